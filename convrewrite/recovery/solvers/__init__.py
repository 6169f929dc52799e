"""Closed-form fits from layer statistics: a replacement block solved with no data pass.

``solve_from_statistics(block, stats, geometry=...)`` sets ``block``'s parameters in place to the
least-squares optimum of the quadratic loss that ``stats`` (a ``LayerStatistics``: gram, cross and
energy of the unfolded input and the original layer's target) defines, and returns a
``SolveResult``; None means there is no statistics path for this block (its dense kernel does not
have the statistics' geometry, or it declares none) and the caller fits it with gradients.

One file per structure, each registering its solver with ``register_solver``:

- ``dense``: plain ``nn.ConvNd``/``nn.Linear`` (block-diagonal for groups > 1), ``GroupShuffleConv*``,
  ``LogGroupConv*``, ``WinogradConv2d``, ``PaddedConv`` (its inner block): exact least squares;
- ``low_rank``: ``LowRankLinear``/``LowRankConv*``: the optimal rank-r kernel (generalized SVD);
- ``separable``: ``SeparableConv*``: alternating least squares, monotone;
- ``channelwise``: ``ChannelwiseConv*`` (exact, linear in the taps), ``GroupChannelwiseConv*``;
- ``generic``: any other block with ``to_dense()`` (plugins, compositions), never worse than the start.

A rewrite that is already exact stays exact: every solve pulls the directions the data cannot see
towards the current value (a proximal ridge), and a result worse than the start is undone. With
``stats.with_ones`` False the loss has no constant input: biases are left as they are.
"""

from __future__ import annotations

import functools
import inspect
import time
from typing import Any

import torch
from torch import nn

from convrewrite.recovery.solvers import channelwise, dense, low_rank, separable  # noqa: F401  (registration)
from convrewrite.recovery.solvers.base import (
    SolveResult,
    block_loss,
    on_cpu,
    parameters_of,
    register_solver,
    registered_solver,
    restore_parameters,
    statistics_kernel,
)
from convrewrite.recovery.solvers.generic import solve_generic
from convrewrite.recovery.statistics import LayerStatistics


@functools.cache
def _takes_holdout(solver: Any) -> bool:
    """Whether a registered solver accepts the ``holdout`` keyword (the optional part of the protocol)."""
    try:
        return "holdout" in inspect.signature(solver).parameters
    except (TypeError, ValueError):
        return False


def solve_inner(
    block: nn.Module,
    stats: LayerStatistics,
    *,
    ridge: float,
    rounds: int,
    holdout: LayerStatistics | None = None,
) -> tuple[str, list[float]] | None:
    """The registered solver of ``block``, else the generic path; (method, losses) or None.

    ``holdout``: the held-out statistics of the same layer, passed to solvers that take the
    keyword (the iterative ones stop on it); the others never see it.
    """
    solver = registered_solver(block)
    if solver is not None:
        if holdout is not None and _takes_holdout(solver):
            outcome = solver(block, stats, ridge, rounds, holdout=holdout)  # type: ignore[call-arg]
        else:
            outcome = solver(block, stats, ridge, rounds)
        if outcome is not None:
            return outcome
    return solve_generic(block, stats, ridge, rounds, holdout=holdout)


def solve_from_statistics(
    block: nn.Module,
    stats: LayerStatistics,
    *,
    geometry: Any,
    ridge: float = 1e-7,
    rounds: int = 8,
    holdout: LayerStatistics | None = None,
) -> SolveResult | None:
    """Set ``block``'s parameters in place to the statistics fit; None = no statistics path for it.

    The solves run in float64 on the CPU (statistics on an accelerator are copied; the block's
    parameters stay where they are). ``geometry`` describes the patches the statistics were
    unfolded from (a ``PatchGeometry``, or the original conv/Linear). ``ridge`` is relative to the
    mean diagonal of each normal matrix and pulls towards the current value; ``rounds`` bounds the
    alternating solvers. ``holdout`` (the held-out statistics of the same layer, optional) lets
    an iterative solver stop when the held-out loss stops falling and keep its best round there
    (separable's ALS does). ``losses[0]`` of the result is the start's squared error, ``losses[-1]``
    that of the block as left (in its own dtype).
    """
    start_kernel = statistics_kernel(block, geometry)
    if start_kernel is None or start_kernel.shape[1] - (0 if stats.with_ones else 1) != stats.unknowns:
        return None
    if start_kernel.shape[0] != stats.outputs:
        return None
    began = time.perf_counter()
    stats = on_cpu(stats)
    if holdout is not None:
        holdout = on_cpu(holdout) if holdout.rows > 0 else None
    start = block_loss(stats, start_kernel)
    saved = parameters_of(block)
    with torch.no_grad():
        outcome = solve_inner(block, stats, ridge=ridge, rounds=rounds, holdout=holdout)
    if outcome is None:
        restore_parameters(block, saved)
        return None
    method, losses = outcome
    final_kernel = statistics_kernel(block, geometry)
    final = block_loss(stats, final_kernel) if final_kernel is not None else float("inf")
    if not final <= start:
        restore_parameters(block, saved)
        method += "; not better than the start, start kept"
        final, losses = start, []
    # The rounds are float64; the last entry is measured on the stored parameters, so for a
    # float32 block it includes their rounding.
    history = [start, *losses[:-1], final]
    return SolveResult(method=method, losses=history, seconds=time.perf_counter() - began)


__all__ = ["SolveResult", "register_solver", "solve_from_statistics", "solve_inner", "statistics_kernel"]
