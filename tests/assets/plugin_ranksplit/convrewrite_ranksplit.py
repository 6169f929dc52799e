"""A third-party rule for the plugin test: a KxK conv becomes a rank-r KxK conv followed by a 1x1 conv.

The weights come from the truncated SVD of the (Cout, Cin*k*k) kernel matrix. (convrewrite has a
built-in ``low-rank`` rule that does more; this one keeps its own name, ``rank-split``, so the two
never clash in the registry.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from ranksplit_layers import RankSplitConv2d

from convrewrite.rules.api import ConvSite, Cost, Replacement, Rule, RuleConfig, common_skip_reason


@dataclass(frozen=True)
class RankSplitConfig(RuleConfig):
    rank: int = field(default=4, metadata={"help": "rank of the factorisation"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1:
            raise ValueError("rank must be >= 1")


class RankSplitRule(Rule):
    name = "rank-split"
    summary = "KxK conv -> rank-r KxK conv + 1x1 conv (SVD of the kernel matrix)"
    config_class = RankSplitConfig
    config: RankSplitConfig

    def skip_reason(self, site: ConvSite) -> str | None:
        reason = common_skip_reason(site, self.config)
        if reason:
            return reason
        if site.module.groups != 1:
            return "grouped conv"
        if site.conv_dims != 2 or site.module.dilation != (1, 1) or site.module.padding_mode != "zeros":
            return "the plugin's block is a plain 2-D conv pair"
        if self.config.rank >= site.out_channels:
            return "rank is not below the output channels"
        return None

    def build(self, site: ConvSite) -> Replacement:
        conv = site.module
        rank = self.config.rank
        block = RankSplitConv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            rank,
            stride=conv.stride,
            padding=conv.padding,
            bias=conv.bias is not None,
        )
        first, second = block.reduce, block.expand
        matrix = conv.weight.detach().reshape(conv.out_channels, -1).double()
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        root = s[:rank].sqrt()
        with torch.no_grad():
            first.weight.copy_((root[:, None] * vh[:rank]).reshape(first.weight.shape))
            second.weight.copy_((u[:, :rank] * root).reshape(second.weight.shape))
            if conv.bias is not None:
                second.bias.copy_(conv.bias)
        kept = float((s[:rank] ** 2).sum() / (s**2).sum())
        return Replacement(block, {"energy_retained": kept})

    def cost(self, site: ConvSite) -> Cost:
        k = math.prod(site.module.kernel_size)
        rank = self.config.rank
        params = site.in_channels * k * rank + rank * site.out_channels
        params += site.out_channels if site.module.bias is not None else 0
        positions = site.output_elements_per_channel
        return Cost(params, positions * (site.in_channels * k * rank + rank * site.out_channels))
