"""``winograd``: a 3x3 stride-1 conv (dense, grouped or depthwise) becomes a ``WinogradConv2d``.

The idea of the seed document "Winograd for depthwise-separable convolution" (its code is wrong;
the idea is F(2x2,3x3)): compute the 3x3 convolution in Winograd's transform domain, 16 products
per 2x2 output tile instead of 36 (``tile=4``: F(4x4,3x3), 36 per 4x4 tile instead of 144). The
rewrite is exact up to float rounding: the block keeps the trained kernel and bias as they are.
``--rule separable --rule winograd:include=*.depthwise`` applies it to the depthwise half of a
separable block.

The cost is counted honestly (see layers/winograd.py): with F(2x2,3x3) the input and output
transforms are additions of tensor slices, so the MACs are the transform-domain products alone
and the additions are reported beside them (``additions_by_kind`` in the rewrite's notes); with
F(4x4,3x3) the transforms multiply by 2, 4, 5 and 8 and are counted as MACs. Whether it is
faster is a question for ``--latency``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from convrewrite.layers.winograd import WinogradConv2d
from convrewrite.rules.api import ConvSite, Cost, Replacement, Rule, RuleConfig, common_skip_reason


@dataclass(frozen=True)
class WinogradConfig(RuleConfig):
    tile: Literal[2, 4] = field(
        default=2, metadata={"help": "output tile m of F(m x m, 3x3): 2 (16 products per 4 outputs) or 4 (36 per 16)"}
    )


def _padding_of(conv: Any) -> tuple[int, int]:
    padding = conv.padding
    if padding == "same":
        return (1, 1)
    if padding == "valid":
        return (0, 0)
    return (int(padding[0]), int(padding[1]))


class WinogradRule(Rule):
    name = "winograd"
    summary = "3x3 stride-1 conv (dense, grouped, depthwise) -> Winograd F(2x2,3x3) or F(4x4,3x3); exact"
    config_class = WinogradConfig
    config: WinogradConfig

    def skip_reason(self, site: ConvSite) -> str | None:
        reason = common_skip_reason(site, self.config)
        if reason:
            return reason
        module = site.module
        if site.conv_dims != 2:
            return f"{type(module).__name__}: Winograd is implemented for 2-D 3x3 convs only"
        if tuple(module.kernel_size) != (3, 3):
            return f"kernel {'x'.join(str(k) for k in module.kernel_size)}: Winograd F(m x m, 3x3) needs 3x3"
        if tuple(module.stride) != (1, 1):
            return f"stride {tuple(module.stride)}: Winograd needs stride 1"
        if tuple(module.dilation) != (1, 1):
            return f"dilation {tuple(module.dilation)}: Winograd needs dilation 1"
        return None

    def _block(self, site: ConvSite) -> WinogradConv2d:
        conv = site.module
        return WinogradConv2d(
            conv.in_channels,
            conv.out_channels,
            padding=_padding_of(conv),
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            tile=self.config.tile,
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)

    def _breakdown(self, site: ConvSite) -> dict[str, int]:
        """MACs per call by kind, from the output shape: tiles x (products, transforms)."""
        if site.output_shape is None or len(site.output_shape) != 4:
            return {}
        batch, _, out_h, out_w = site.output_shape
        m, a = self.config.tile, self.config.tile + 2
        tiles = batch * -(-out_h // m) * -(-out_w // m)
        per_group_in = site.in_channels // int(site.module.groups)
        macs = {"winograd_product": tiles * a * a * per_group_in * site.out_channels}
        if m != 2:  # F(2x2,3x3) transforms by additions (see _additions)
            macs["winograd_input_transform"] = tiles * site.in_channels * a**4
            macs["winograd_output_transform"] = tiles * site.out_channels * m * m * a * a
        return macs

    def _additions(self, site: ConvSite) -> dict[str, int]:
        """F(2x2,3x3)'s transform additions per call (not MACs; reported beside them), as the
        block counts them (``WinogradConv2d.additions_breakdown``)."""
        if self.config.tile != 2 or site.output_shape is None or len(site.output_shape) != 4:
            return {}
        batch, _, out_h, out_w = site.output_shape
        rows, columns = -(-out_h // 2), -(-out_w // 2)
        return {
            "winograd_input_transform": batch * site.in_channels * (4 * rows * (2 * columns + 2) + 16 * rows * columns),
            "winograd_output_transform": batch * rows * columns * site.out_channels * 24,
        }

    def build(self, site: ConvSite) -> Replacement:
        conv = site.module
        block = self._block(site)
        with torch.no_grad():
            block.weight.copy_(conv.weight)
            if conv.bias is not None and block.bias is not None:
                block.bias.copy_(conv.bias)
        m, a = self.config.tile, self.config.tile + 2
        breakdown = self._breakdown(site)
        notes: dict[str, object] = {
            "exact": True,
            "algorithm": f"F({m}x{m},3x3)",
            # Per call on the example input; the filter transform is computed once per weight value.
            "macs_by_kind": breakdown,
            "additions_by_kind": self._additions(site),
            "filter_transform_macs_once": site.out_channels * (site.in_channels // conv.groups) * (a * 9 + 3 * a * a),
        }
        if site.output_shape is not None:
            direct = site.output_elements_per_channel * site.out_channels * (site.in_channels // conv.groups) * 9
            notes["direct_conv_macs"] = direct
        return Replacement(block, notes)

    def cost(self, site: ConvSite) -> Cost:
        conv = site.module
        params = conv.weight.numel() + (conv.bias.numel() if conv.bias is not None else 0)
        return Cost(params, sum(self._breakdown(site).values()))


__all__ = ["WinogradConfig", "WinogradRule"]
