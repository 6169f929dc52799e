"""Helpers the structured rules (separable, group-shuffle, log-group, channelwise) share.

Weight transfer everywhere is a projection of the trained kernel onto what the new structure can
represent; ``energy_retained`` is the fraction of the kernel's squared Frobenius norm that the
projection keeps. For an orthogonal projection P, ||W||^2 = ||PW||^2 + ||W - PW||^2, so the relative
kernel error the report shows is sqrt(1 - energy_retained).
"""

from __future__ import annotations

from typing import Any

import torch

from convrewrite import layers
from convrewrite.rules.api import ConvSite


def block_class_for(family: str, conv_dims: int) -> Any:
    """The block of ``convrewrite.layers`` for a conv of ``conv_dims`` spatial dimensions:
    ``family`` ``SeparableConv`` and 2 is ``SeparableConv2d`` (KeyError for dims outside 1-3)."""
    if conv_dims not in (1, 2, 3):
        raise KeyError(conv_dims)
    return getattr(layers, f"{family}{conv_dims}d")


def grouping_skip_reason(site: ConvSite) -> str | None:
    """Already depthwise or grouped convs are not rewritten by the structured rules."""
    groups = int(site.module.groups)
    if groups > 1 and groups == site.in_channels:
        return f"already depthwise (groups={groups})"
    if groups > 1:
        return f"already grouped (groups={groups})"
    return None


def geometry(conv: Any) -> dict[str, Any]:
    """The spatial arguments a replacement must keep: stride, padding, dilation, padding mode."""
    return {
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "padding_mode": conv.padding_mode,
    }


def float64_weight(conv: Any) -> torch.Tensor:
    return conv.weight.detach().to(device="cpu", dtype=torch.float64)


def energy_fraction(kept: float, total: float) -> float:
    """Kept / total squared norm; a zero kernel is kept entirely."""
    return kept / total if total > 0 else 1.0


def describe_kernel(site: ConvSite) -> str:
    return "x".join(str(k) for k in site.module.kernel_size)
