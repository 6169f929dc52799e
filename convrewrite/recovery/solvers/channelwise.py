"""Channel-wise convolutions: least squares in the shared taps.

A ``ChannelwiseConv*`` kernel is linear in its g x dc shared taps and its bias jointly (each dense
entry is one tap or zero), so one exact least-squares step of the generic path solves it: the
Jacobian of ``to_dense()`` is probed once (g·dc + out columns, each touching at most ``out``
entries) and the normal matrix ``Σ_o J_oᵀ G J_o`` is gathered from the gram at each output's few
nonzero entries. ``GroupChannelwiseConv*`` (a grouped 1x1 conv, a shuffle, then a group
channel-wise conv) is bilinear: it goes block-coordinate through the generic path, the taps and
bias exactly and the grouped 1x1 conv exactly when it is small enough to probe (else it keeps its
transferred weights; see ``generic.PROBE_LIMIT``).
"""

from __future__ import annotations

from torch import nn

from convrewrite.layers.channelwise import _ChannelwiseConvNd, _GroupChannelwiseConvNd
from convrewrite.recovery.solvers.base import register_solver
from convrewrite.recovery.solvers.generic import solve_generic
from convrewrite.recovery.statistics import LayerStatistics


@register_solver(_ChannelwiseConvNd)
def solve_channelwise(
    block: nn.Module, stats: LayerStatistics, ridge: float, rounds: int
) -> tuple[str, list[float]] | None:
    """Exact least squares in the shared taps (and the bias): K is linear in them."""
    return solve_generic(block, stats, ridge, rounds, label="least squares in the shared taps")


@register_solver(_GroupChannelwiseConvNd)
def solve_group_channelwise(
    block: nn.Module, stats: LayerStatistics, ridge: float, rounds: int, holdout: LayerStatistics | None = None
) -> tuple[str, list[float]] | None:
    """Block-coordinate least squares: the grouped 1x1 conv and the channel-wise taps in turn
    (stopping on the held-out loss when ``holdout`` is given)."""
    return solve_generic(block, stats, ridge, rounds, holdout=holdout)


__all__ = ["solve_channelwise", "solve_group_channelwise"]
