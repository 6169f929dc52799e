"""Exact least squares for blocks whose kernel entries are free within a fixed support.

A plain ``nn.ConvNd``/``nn.Linear`` is full capacity: every entry of its kernel matrix is a free
parameter, so the optimum is ``K = crossᵀ gram⁻¹``. A grouped conv (``groups > 1``) is
block-diagonal: the outputs of group g read only the patch entries of group g's input channels
(every tap) and the ones column, so each group is its own least-squares problem on a sub-block of
the gram; a depthwise conv is the extreme case (one small solve per channel). The same holds,
with the rows or blocks rearranged, for

- ``GroupShuffleConv*``: a grouped conv whose output channels are then permuted: the target
  columns are permuted back and the grouped conv is solved;
- ``LogGroupConv*``: one conv per branch, reading its slice of input channels and writing its
  slice of outputs: one sub-problem per branch;
- ``WinogradConv2d``: its parameters *are* the 3x3 kernel (the transforms are fixed), so it is
  solved like the grouped conv it computes;
- ``PaddedConv``: the padding carries no weights and the statistics are unfolded with the padding
  the original layer used, so the inner block is solved with the same statistics (any block the
  solvers know, or the generic path).

Cost per group: a Cholesky of (in/groups x taps + 1) squared, one triangular solve per output.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from convrewrite.layers.log_group import _LogGroupConvNd
from convrewrite.layers.padding import PaddedConv
from convrewrite.layers.shuffle import _GroupShuffleConvNd
from convrewrite.layers.winograd import WinogradConv2d
from convrewrite.recovery.solvers.base import assign, register_solver, solve_spd, sub_statistics
from convrewrite.recovery.statistics import LayerStatistics

_PLAIN = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def is_plain(module: nn.Module) -> bool:
    """True for an exact torch conv or Linear (a subclass may compute something else with its weight)."""
    return type(module) in _PLAIN


def solve_grouped(
    weight: torch.Tensor, bias: torch.Tensor | None, groups: int, stats: LayerStatistics, ridge: float
) -> float | None:
    """Set ``weight`` (out, in/groups, *k) and ``bias`` to the block-diagonal least-squares optimum.

    ``stats`` must be laid out for this conv's dense kernel (in x taps entries, then the ones
    column if ``stats.with_ones``). Returns the squared error of the solution (float64), None if
    the statistics do not fit the weight. The groups' output rows partition the outputs, so the
    error is the sum of each group's, on its own block of the gram (``out n² / groups``).
    """
    out, in_per_group = int(weight.shape[0]), int(weight.shape[1])
    taps = math.prod(int(s) for s in weight.shape[2:])
    width = groups * in_per_group * taps
    if stats.unknowns != width + (1 if stats.with_ones else 0) or stats.outputs != out or out % groups:
        return None
    use_bias = stats.with_ones and bias is not None
    out_per_group = out // groups
    block = in_per_group * taps
    current = weight.detach().to("cpu", torch.float64).reshape(out, block)
    current_bias = bias.detach().to("cpu", torch.float64) if bias is not None else None
    new_weight = current.clone()
    new_bias = current_bias.clone() if current_bias is not None else None
    loss = 0.0
    for group in range(groups):
        columns = list(range(group * block, (group + 1) * block)) + ([width] if use_bias else [])
        rows = slice(group * out_per_group, (group + 1) * out_per_group)
        index = torch.tensor(columns, dtype=torch.long)
        gram = stats.gram.index_select(0, index).index_select(1, index)
        cross = stats.cross.index_select(0, index)[:, rows]
        start = current[rows].t()
        if use_bias:
            assert current_bias is not None
            start = torch.cat([start, current_bias[rows].unsqueeze(0)], dim=0)
        solution = solve_spd(gram, cross, start, ridge)
        new_weight[rows] = solution[:block].t()
        if use_bias and new_bias is not None:
            new_bias[rows] = solution[block]
        group_stats = LayerStatistics(gram=gram, cross=cross, energy=stats.energy[rows], rows=stats.rows)
        loss += group_stats.squared_error(solution.t())
    assign(weight, new_weight)
    if use_bias and bias is not None and new_bias is not None:
        assign(bias, new_bias)
    return loss


@register_solver(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, WinogradConv2d)
def solve_plain(block: nn.Module, stats: LayerStatistics, ridge: float, rounds: int) -> tuple[str, list[float]] | None:
    """Least squares in the full (block-diagonal for groups > 1) kernel."""
    if not (is_plain(block) or type(block) is WinogradConv2d):
        return None
    groups = int(getattr(block, "groups", 1))
    loss = solve_grouped(block.weight, block.bias, groups, stats, ridge)  # type: ignore[arg-type]
    if loss is None:
        return None
    return ("least-squares" if groups == 1 else f"block-diagonal least-squares ({groups} groups)"), [loss]


@register_solver(_GroupShuffleConvNd)
def solve_group_shuffle(
    block: nn.Module, stats: LayerStatistics, ridge: float, rounds: int
) -> tuple[str, list[float]] | None:
    """The grouped conv solved against the target channels permuted back (output p is conv row index[p])."""
    conv, shuffle = block[0], block[1]  # type: ignore[index]
    if not is_plain(conv):
        return None
    out = int(conv.out_channels)
    index = shuffle.source_indices(out)
    target_of = [0] * out
    for position, source in enumerate(index):
        target_of[source] = position
    everything = list(range(stats.unknowns))
    loss = solve_grouped(conv.weight, conv.bias, int(conv.groups), sub_statistics(stats, everything, target_of), ridge)
    if loss is None:
        return None
    return f"block-diagonal least-squares ({int(conv.groups)} groups, shuffled)", [loss]


@register_solver(_LogGroupConvNd)
def solve_log_group(
    block: nn.Module, stats: LayerStatistics, ridge: float, rounds: int
) -> tuple[str, list[float]] | None:
    """One least-squares problem per branch: its input channels (every tap) and its output slice."""
    layer: Any = block
    branches = list(layer.branches)
    if not all(is_plain(branch) and int(branch.groups) == 1 for branch in branches):
        return None
    taps = math.prod(int(k) for k in layer.kernel_size)
    width = int(layer.in_channels) * taps
    if stats.unknowns != width + (1 if stats.with_ones else 0):
        return None
    # Solved branch by branch; the branches' output slices partition the outputs, so the loss of
    # the whole block is the sum of theirs.
    row = column = 0
    loss = 0.0
    for branch, cin, cout in zip(branches, layer.in_sizes, layer.out_sizes):
        inputs = list(range(column * taps, (column + cin) * taps))
        if stats.with_ones and branch.bias is not None:
            inputs.append(width)
        sub = sub_statistics(stats, inputs, list(range(row, row + cout)))
        branch_loss = solve_grouped(branch.weight, branch.bias, 1, sub, ridge)
        if branch_loss is None:
            return None
        loss += branch_loss
        row += cout
        column += cin
    return f"per-branch least-squares ({len(branches)} branches)", [loss]


@register_solver(PaddedConv)
def solve_padded(block: nn.Module, stats: LayerStatistics, ridge: float, rounds: int) -> tuple[str, list[float]] | None:
    """The inner block, solved with the same statistics (the padding has no weights)."""
    from convrewrite.recovery.solvers import solve_inner

    inner: Any = block.conv
    return solve_inner(inner, stats, ridge=ridge, rounds=rounds)


__all__ = ["is_plain", "solve_grouped", "solve_group_shuffle", "solve_log_group", "solve_padded", "solve_plain"]
