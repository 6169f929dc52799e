"""``group-shuffle``: a dense conv becomes a grouped conv followed by a channel shuffle (ShuffleNet).

The block is ``GroupShuffleConvNd``: a conv with ``groups=g`` (same kernel, stride, padding,
dilation, padding mode and bias) and then ShuffleNet's channel shuffle of its output (reshape to
(g, C/g), transpose, flatten). Under that shuffle, output channel p of the block is channel
``p // g`` of group ``p % g``, and group j reads input block j (input channels
``j*Cin/g .. (j+1)*Cin/g - 1``). The rule therefore writes original output channel p into row
``(p % g) * Cout/g + p // g`` of the grouped conv: after the shuffle every channel is back at its
original index, so the BN, activations and residual adds downstream keep their meaning.

Weight transfer is the masked projection: row p keeps ``W[p, block(p % g)]`` and drops the rest.
Masking is the orthogonal projection onto kernels with that sparsity pattern, so no grouped kernel
with the same assignment is closer to the original. ``energy_retained`` reports what it keeps.

``assign=energy`` picks the balanced output-to-group assignment (each group gets Cout/g outputs)
that keeps the most kernel energy, solved exactly as an assignment problem
(``scipy.optimize.linear_sum_assignment``), and realizes it with a general channel permutation in
place of the fixed shuffle. The notes then give the retained energy of both assignments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from convrewrite.rules._shared import block_class_for, energy_fraction, float64_weight, geometry, grouping_skip_reason
from convrewrite.rules.api import ConvSite, Cost, Replacement, Rule, RuleConfig, common_skip_reason


@dataclass(frozen=True)
class GroupShuffleConfig(RuleConfig):
    groups: int = field(default=4, metadata={"help": "number of groups g; must divide the in and out channels"})
    assign: Literal["shuffle", "energy"] = field(
        default="shuffle",
        metadata={"help": "shuffle: ShuffleNet's fixed shuffle; energy: best balanced assignment + permutation"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.groups < 1:
            raise ValueError(f"groups must be a positive integer, got {self.groups}")


def group_energy(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(Cout, g): the squared norm of each output row restricted to each input block."""
    out_channels, in_channels = weight.shape[0], weight.shape[1]
    per_block = weight.reshape(out_channels, groups, in_channels // groups, -1)
    return per_block.pow(2).sum(dim=(2, 3))


def shuffle_assignment(out_channels: int, groups: int) -> list[int]:
    """The group each output channel comes from under ShuffleNet's shuffle: p % g."""
    return [p % groups for p in range(out_channels)]


def balanced_assignment(energy: torch.Tensor) -> list[int]:
    """The group per output channel, Cout/g outputs per group, maximizing the kept energy."""
    from scipy.optimize import linear_sum_assignment

    out_channels, groups = energy.shape
    per_group = out_channels // groups
    # One column per slot: group j owns slots j*per_group .. (j+1)*per_group - 1.
    slots = energy.repeat_interleave(per_group, dim=1).numpy()
    rows, columns = linear_sum_assignment(slots, maximize=True)
    assignment = [0] * out_channels
    for row, column in zip(rows.tolist(), columns.tolist()):
        assignment[row] = column // per_group
    return assignment


def kept_energy(energy: torch.Tensor, assignment: list[int]) -> float:
    total = float(energy.sum())
    kept = float(energy[torch.arange(len(assignment)), torch.tensor(assignment)].sum())
    return energy_fraction(kept, total)


def grouped_rows(assignment: list[int], groups: int) -> list[int]:
    """Row of the grouped conv that holds each original output channel (ascending within a group)."""
    per_group = len(assignment) // groups
    filled = [0] * groups
    rows = [0] * len(assignment)
    for p, group in enumerate(assignment):
        rows[p] = group * per_group + filled[group]
        filled[group] += 1
    return rows


def masked_grouped_weight(weight: torch.Tensor, assignment: list[int], groups: int) -> tuple[torch.Tensor, list[int]]:
    """The grouped conv weight (Cout, Cin/g, *k) of the masked projection, and each channel's row."""
    out_channels, in_channels = weight.shape[0], weight.shape[1]
    per_in = in_channels // groups
    rows = grouped_rows(assignment, groups)
    grouped = weight.new_zeros((out_channels, per_in, *weight.shape[2:]))
    for p, (group, row) in enumerate(zip(assignment, rows)):
        grouped[row] = weight[p, group * per_in : (group + 1) * per_in]
    return grouped, rows


class GroupShuffleRule(Rule):
    name = "group-shuffle"
    summary = "dense conv -> grouped conv + channel shuffle (ShuffleNet), masked-projection weight transfer"
    config_class = GroupShuffleConfig
    config: GroupShuffleConfig

    def skip_reason(self, site: ConvSite) -> str | None:
        reason = common_skip_reason(site, self.config) or grouping_skip_reason(site)
        if reason:
            return reason
        g = self.config.groups
        for side, channels in (("in", site.in_channels), ("out", site.out_channels)):
            if channels % g:
                return f"{side}_channels={channels} is not divisible by groups={g}"
        return None

    def build(self, site: ConvSite) -> Replacement:
        conv = site.module
        g = self.config.groups
        weight = float64_weight(conv)
        energy = group_energy(weight, g)
        shuffle = shuffle_assignment(site.out_channels, g)
        notes: dict[str, Any] = {"groups": g, "assign": self.config.assign}
        shuffle_energy = kept_energy(energy, shuffle)
        if self.config.assign == "energy":
            assignment = balanced_assignment(energy)
            chosen_energy = kept_energy(energy, assignment)
        else:
            assignment, chosen_energy = shuffle, shuffle_energy
        grouped, rows = masked_grouped_weight(weight, assignment, g)
        block_class = block_class_for("GroupShuffleConv", site.conv_dims)
        block = block_class(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            groups=g,
            bias=conv.bias is not None,
            permutation=tuple(rows) if self.config.assign == "energy" else None,
            **geometry(conv),
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        grouped_conv: Any = block[0]
        with torch.no_grad():
            grouped_conv.weight.copy_(grouped)
            if conv.bias is not None:
                bias = conv.bias.detach()
                grouped_conv.bias[torch.tensor(rows, device=bias.device)] = bias
        notes["energy_retained"] = chosen_energy
        notes["energy_retained_shuffle"] = shuffle_energy
        if self.config.assign == "energy":
            notes["outputs_moved_from_shuffle_group"] = sum(a != s for a, s in zip(assignment, shuffle))
        notes["exact"] = g == 1
        return Replacement(block, notes)

    def cost(self, site: ConvSite) -> Cost:
        g = self.config.groups
        weights = site.out_channels * (site.in_channels // g) * site.kernel_elements
        params = weights + (site.out_channels if site.module.bias is not None else 0)
        return Cost(params, site.output_elements_per_channel * weights)


__all__ = [
    "GroupShuffleConfig",
    "GroupShuffleRule",
    "balanced_assignment",
    "group_energy",
    "grouped_rows",
    "masked_grouped_weight",
    "shuffle_assignment",
]
