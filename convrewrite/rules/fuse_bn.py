"""``fuse-bn``: fold an eval-mode BatchNorm into the conv that feeds it, exactly.

In eval mode a BatchNorm is a fixed affine map per channel, ``y = s * (x - mean) + beta`` with
``s = gamma / sqrt(var + eps)``, so ``BN(conv(x))`` is a conv with kernel ``s * W`` (each output
channel's filter scaled) and bias ``s * (b - mean) + beta``. The rule replaces the conv with that
conv (computed in float64, stored in the conv's dtype) and the BatchNorm with ``nn.Identity``: one
layer less to run, and the same output up to float rounding. Run it before other rules
(``--rule fuse-bn --rule separable``): their weight transfer then sees each output channel's real
scale instead of a kernel that the BatchNorm rescales afterwards. When the accuracy is won back by
distillation, keeping the BatchNorms measured better (docs/results.md, "What it wins back, measured").

It needs the graph: the conv must be called once, its output read by exactly one node, a
``BatchNorm1d``/``BatchNorm2d`` matching the conv's dimensions that is called once (not shared),
uses running statistics (``track_running_stats``) and is in eval mode. Everything else is skipped
with the reason. The kernel error the report shows compares the folded float32 kernel with the
float64 fold: it measures rounding only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from convrewrite.layers.dense import conv_dense_kernel
from convrewrite.rules._shared import geometry
from convrewrite.rules.api import Consumer, ConvSite, Cost, Replacement, Rule, RuleConfig, common_skip_reason

_BATCH_NORMS: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}


@dataclass
class FoldedKernel:
    """The exact fold in float64, what the replacement conv must equal (``to_dense()``)."""

    weight: torch.Tensor
    bias: torch.Tensor
    groups: int

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return conv_dense_kernel(self)


def fold(conv: Any, norm: Any) -> FoldedKernel:
    """``norm(conv(x))`` as one kernel and bias, in float64."""
    weight = conv.weight.detach().to(torch.float64)
    mean = norm.running_mean.detach().to(torch.float64)
    variance = norm.running_var.detach().to(torch.float64)
    scale = 1.0 / torch.sqrt(variance + norm.eps)
    shift = torch.zeros_like(mean)
    if norm.affine:
        scale = scale * norm.weight.detach().to(torch.float64)
        shift = norm.bias.detach().to(torch.float64)
    bias = conv.bias.detach().to(torch.float64) if conv.bias is not None else torch.zeros_like(mean)
    folded_weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    folded_bias = (bias - mean) * scale + shift
    return FoldedKernel(folded_weight, folded_bias, int(conv.groups))


class FuseBatchNormRule(Rule):
    name = "fuse-bn"
    summary = "fold an eval-mode BatchNorm into the preceding conv (exact); the BN becomes Identity"
    config_class = RuleConfig

    def _norm(self, site: ConvSite) -> tuple[Consumer | None, str | None]:
        """The BatchNorm to fold, or why there is none."""
        if site.consumers is None:
            if site.calls > 1:
                return None, f"called {site.calls} times: one BatchNorm cannot be folded into a shared conv"
            return None, "the traced graph does not show what reads its output (no graph, or inside a block)"
        norm_types = nn.modules.batchnorm._NormBase
        norms = [c for c in site.consumers if c.kind == "module" and isinstance(c.module, norm_types)]
        if not norms:
            return None, "its output does not go to a BatchNorm"
        if len(norms) > 1:
            return None, f"feeds several BatchNorms ({', '.join(c.name for c in norms)})"
        others = [c.name for c in site.consumers if c is not norms[0]]
        if others:
            return None, f"its output also goes to {', '.join(others)}, which would see the folded values"
        return norms[0], None

    def skip_reason(self, site: ConvSite) -> str | None:
        reason = common_skip_reason(site, self.config)
        if reason:
            return reason
        if site.tied_to:
            return f"weight is tied to {', '.join(site.tied_to)}; folding a BatchNorm would change those too"
        consumer, reason = self._norm(site)
        if consumer is None:
            return reason
        norm = consumer.module
        expected = _BATCH_NORMS.get(site.conv_dims)
        if type(norm) is not expected:
            wanted = expected.__name__ if expected else "a BatchNorm"
            return f"{consumer.name} is a {type(norm).__name__}, not the {wanted} a Conv{site.conv_dims}d folds"
        if consumer.calls != 1:
            return f"{consumer.name} is called {consumer.calls} times (shared); folding it here would break the others"
        if not consumer.sole_input:
            return f"{consumer.name} reads more than this conv's output"
        if norm.training:
            return f"{consumer.name} is in training mode (batch statistics)"
        if not norm.track_running_stats or norm.running_mean is None or norm.running_var is None:
            return f"{consumer.name} has no running statistics (track_running_stats=False): it normalizes by batch"
        if norm.num_features != site.out_channels:
            return f"{consumer.name} has {norm.num_features} features, the conv {site.out_channels} channels"
        return None

    def build(self, site: ConvSite) -> Replacement:
        conv = site.module
        consumer, _ = self._norm(site)
        assert consumer is not None
        folded = fold(conv, consumer.module)
        fused = type(conv)(
            conv.in_channels, conv.out_channels, conv.kernel_size, groups=conv.groups, bias=True, **geometry(conv)
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(folded.weight)
            fused.bias.copy_(folded.bias)
        scale = folded.weight.flatten(1).norm(dim=1) / conv.weight.detach().to(torch.float64).flatten(1).norm(
            dim=1
        ).clamp_min(1e-300)
        notes = {
            "exact": True,
            "batchnorm": consumer.name,
            "channel_scale_min": float(scale.min()),
            "channel_scale_max": float(scale.max()),
        }
        return Replacement(fused, notes, also_replace={consumer.name: nn.Identity()}, reference=folded)

    def cost(self, site: ConvSite) -> Cost:
        conv = site.module
        params = conv.weight.numel() + site.out_channels
        macs = site.output_elements_per_channel * site.out_channels * (site.in_channels // conv.groups)
        return Cost(params, macs * site.kernel_elements)


__all__ = ["FoldedKernel", "FuseBatchNormRule", "fold"]
