"""``log-group``: a dense conv becomes logarithmic filter groups (recursive halving, concatenated).

Input and output channels are each split by recursive halving into ``groups`` parts: the first
part takes ceil(C/2), the next ceil of half the rest, and so on, and the last part takes what
remains (40 channels in 4 groups: 20 / 10 / 5 / 5, as in the logarithmic-filter-groups document; 39
channels: 20 / 10 / 5 / 4). groups = halving levels + 1. Group i is its own conv with the original
kernel, stride, padding (``'same'`` too), dilation and padding mode, reading input part i and
writing output part i; the outputs are concatenated in order, so channel indices are unchanged.

Weight transfer is the block-diagonal projection: group i gets ``W[out part i, in part i]`` and its
slice of the bias. Zeroing the off-diagonal blocks is the orthogonal projection onto block-diagonal
kernels, so it is the closest such kernel to the original. A split that would leave a part empty,
or smaller than ``min-group-size``, skips the layer with the sizes in the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from convrewrite.layers import log_group_sizes
from convrewrite.rules._shared import block_class_for, energy_fraction, float64_weight, geometry, grouping_skip_reason
from convrewrite.rules.api import ConvSite, Cost, Replacement, Rule, RuleConfig, common_skip_reason


@dataclass(frozen=True)
class LogGroupConfig(RuleConfig):
    groups: int = field(
        default=4, metadata={"help": "number of groups (halving levels + 1); 4 gives 1/2, 1/4, 1/8, 1/8"}
    )
    min_group_size: int = field(
        default=1, metadata={"help": "skip a layer whose split has an in or out part smaller than this"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.groups < 1:
            raise ValueError(f"groups must be a positive integer, got {self.groups}")
        if self.min_group_size < 1:
            raise ValueError(f"min_group_size must be a positive integer, got {self.min_group_size}")


def _shown(sizes: list[int]) -> str:
    return "/".join(str(s) for s in sizes)


class LogGroupRule(Rule):
    name = "log-group"
    summary = "dense conv -> logarithmic filter groups (recursive halving), block-diagonal weight transfer"
    config_class = LogGroupConfig
    config: LogGroupConfig

    def split(self, site: ConvSite) -> tuple[list[int], list[int]]:
        return log_group_sizes(site.in_channels, self.config.groups), log_group_sizes(
            site.out_channels, self.config.groups
        )

    def skip_reason(self, site: ConvSite) -> str | None:
        reason = common_skip_reason(site, self.config) or grouping_skip_reason(site)
        if reason:
            return reason
        groups, smallest = self.config.groups, self.config.min_group_size
        for side, sizes in zip(("input", "output"), self.split(site)):
            split = f"{sum(sizes)} {side} channels"
            if min(sizes) < 1:
                return f"{split} cannot be halved into {groups} groups ({_shown(sizes)}): a group is empty"
            if min(sizes) < smallest:
                return f"{split} in {groups} groups ({_shown(sizes)}) go below min-group-size={smallest}"
        return None

    def build(self, site: ConvSite) -> Replacement:
        conv = site.module
        in_sizes, out_sizes = self.split(site)
        block_class = block_class_for("LogGroupConv", site.conv_dims)
        block = block_class(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            groups=self.config.groups,
            bias=conv.bias is not None,
            **geometry(conv),
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        weight = conv.weight.detach()
        row = column = 0
        with torch.no_grad():
            for branch, cin, cout in zip(block.branches, in_sizes, out_sizes):
                part: Any = branch
                part.weight.copy_(weight[row : row + cout, column : column + cin])
                if conv.bias is not None:
                    part.bias.copy_(conv.bias.detach()[row : row + cout])
                row += cout
                column += cin
        full = float64_weight(conv)
        kept = sum(
            float(full[r : r + co, c : c + ci].pow(2).sum())
            for r, c, ci, co in zip(_starts(out_sizes), _starts(in_sizes), in_sizes, out_sizes)
        )
        notes: dict[str, Any] = {
            "groups": self.config.groups,
            "in_groups": in_sizes,
            "out_groups": out_sizes,
            "energy_retained": energy_fraction(kept, float(full.pow(2).sum())),
            "exact": self.config.groups == 1,
        }
        return Replacement(block, notes)

    def cost(self, site: ConvSite) -> Cost:
        in_sizes, out_sizes = self.split(site)
        weights = sum(ci * co for ci, co in zip(in_sizes, out_sizes)) * site.kernel_elements
        params = weights + (site.out_channels if site.module.bias is not None else 0)
        return Cost(params, site.output_elements_per_channel * weights)


def _starts(sizes: list[int]) -> list[int]:
    starts, position = [], 0
    for size in sizes:
        starts.append(position)
        position += size
    return starts


__all__ = ["LogGroupConfig", "LogGroupRule"]
