"""The generic statistics path: any block whose ``to_dense()`` has the original layer's geometry.

This is the protocol for plugin blocks and for compositions (a separable block whose pointwise was
then replaced by a channel-wise conv, say): nothing about the block's structure is known except
its dense kernel ``K(θ)`` as a function of its parameters, and the statistics loss
``L(θ) = E - 2 tr(K C) + tr(K G Kᵀ)`` needs nothing else. On a float64 copy of the block:

1. **Exact least squares where K is linear.** For a parameter tensor with few entries the Jacobian
   of K is probed column by column (``J_i = K(θ + e_i) - K(θ)``, exact when K is linear in that
   tensor) and kept sparse; the Newton step ``(Σ_o J_oᵀ G J_o + λI) δ = Jᵀ(Cᵀ - K G)`` is then the
   exact least-squares update. All small tensors are first solved jointly (exact in one step when
   K is jointly linear in them, as for a channel-wise conv's taps and bias); when the step's
   prediction misses (K is only multilinear, as in a composition), they are solved one tensor at a
   time, block-coordinate, for up to ``rounds`` rounds.
2. **Gradient steps elsewhere.** Tensors too large to probe are fitted by L-BFGS on the statistics
   loss (each evaluation one (out, n) x (n, n) product, no data), when ``to_dense()`` is
   differentiable; otherwise they keep their transferred values.

Every step is kept only if it lowers the loss, so the result is never worse than the start.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from convrewrite.recovery.solvers.base import assign, dense_of, solve_spd
from convrewrite.recovery.statistics import LayerStatistics, kernel_matrix

#: Parameter entries probed for an exact least-squares step (one ``to_dense()`` call each).
PROBE_LIMIT = 8192
#: L-BFGS iterations per round on the tensors too large to probe.
GRADIENT_STEPS = 50
#: A round that improves the loss by less than this fraction of it ends the rounds.
TOLERANCE = 1e-9


def _kernel(block: nn.Module, with_ones: bool) -> torch.Tensor:
    dense = dense_of(block)
    assert dense is not None
    matrix = kernel_matrix(dense[0].to("cpu", torch.float64), dense[1].to("cpu", torch.float64) if dense[1] is not None else None)
    return matrix if with_ones else matrix[:, :-1]


def _loss(stats: LayerStatistics, kernel: torch.Tensor) -> float:
    return stats.squared_error(kernel)


def _probe(block: nn.Module, tensors: Sequence[torch.Tensor], stats: LayerStatistics) -> tuple[torch.Tensor, ...]:
    """Sparse Jacobian of the kernel in ``tensors``: (output, entry, column, value) of every nonzero."""
    base = _kernel(block, stats.with_ones)
    outputs, entries, columns, values = [], [], [], []
    column = 0
    with torch.no_grad():
        for tensor in tensors:
            flat = tensor.view(-1)
            for index in range(flat.numel()):
                flat[index] += 1.0
                difference = _kernel(block, stats.with_ones) - base
                flat[index] -= 1.0
                where = difference.nonzero(as_tuple=True)
                outputs.append(where[0])
                entries.append(where[1])
                columns.append(torch.full_like(where[0], column))
                values.append(difference[where])
                column += 1
    return torch.cat(outputs), torch.cat(entries), torch.cat(columns), torch.cat(values)


def _newton_step(
    block: nn.Module, tensors: Sequence[torch.Tensor], stats: LayerStatistics, ridge: float
) -> tuple[float, float, float]:
    """One exact least-squares step in ``tensors`` (kept only if it lowers the loss).

    Returns (loss before, loss after, loss the quadratic model predicted).
    """
    gram = stats.gram
    kernel = _kernel(block, stats.with_ones)
    before = _loss(stats, kernel)
    outputs, entries, columns, values = _probe(block, tensors, stats)
    count = sum(t.numel() for t in tensors)
    residual = stats.cross.t() - kernel @ gram  # (out, n)
    rhs = torch.zeros(count, dtype=torch.float64).index_add_(0, columns, values * residual[outputs, entries])
    normal = torch.zeros(count, count, dtype=torch.float64)
    order = torch.argsort(outputs, stable=True)
    outputs, entries, columns, values = outputs[order], entries[order], columns[order], values[order]
    bounds = torch.searchsorted(outputs, torch.arange(int(kernel.shape[0]) + 1))
    for output in range(int(kernel.shape[0])):
        low, high = int(bounds[output]), int(bounds[output + 1])
        if low == high:
            continue
        rows, used = torch.unique(entries[low:high], return_inverse=True)
        cols, placed = torch.unique(columns[low:high], return_inverse=True)
        local = torch.zeros(len(rows), len(cols), dtype=torch.float64)
        local.index_put_((used, placed), values[low:high], accumulate=True)
        block_gram = gram.index_select(0, rows).index_select(1, rows)
        normal[cols.unsqueeze(1), cols.unsqueeze(0)] += local.t() @ block_gram @ local
    normal = (normal + normal.t()) / 2
    step = solve_spd(normal, rhs, torch.zeros_like(rhs), ridge)
    predicted = before - 2 * float(rhs @ step) + float(step @ (normal @ step))
    saved = [t.detach().clone() for t in tensors]
    offset = 0
    with torch.no_grad():
        for tensor in tensors:
            size = tensor.numel()
            tensor.add_(step[offset : offset + size].view_as(tensor))
            offset += size
    after = _loss(stats, _kernel(block, stats.with_ones))
    if not after < before:
        with torch.no_grad():
            for tensor, old in zip(tensors, saved):
                tensor.copy_(old)
        after = before
    return before, after, predicted


def _differentiable(block: nn.Module) -> bool:
    with torch.enable_grad():
        dense = dense_of(block)
    return dense is not None and dense[0].requires_grad


def _gradient_steps(block: nn.Module, tensors: Sequence[torch.Tensor], stats: LayerStatistics) -> None:
    """L-BFGS on the statistics loss in ``tensors``; the best point seen is kept."""
    saved = [t.detach().clone() for t in tensors]
    before = _loss(stats, _kernel(block, stats.with_ones))
    energy = stats.energy.sum()
    parameters = [t for t in tensors if isinstance(t, nn.Parameter)]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.LBFGS(parameters, max_iter=GRADIENT_STEPS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        with torch.enable_grad():
            weight, bias = dense_of(block)  # type: ignore[misc]
            kernel = weight.reshape(weight.shape[0], -1)
            if stats.with_ones:
                column = bias.reshape(-1, 1) if bias is not None else kernel.new_zeros(kernel.shape[0], 1)
                kernel = torch.cat([kernel, column], dim=1)
            loss = energy - 2 * (kernel * stats.cross.t()).sum() + (kernel * (kernel @ stats.gram)).sum()
            (loss / energy.clamp_min(1e-300)).backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    after = _loss(stats, _kernel(block, stats.with_ones))
    if not (math.isfinite(after) and after < before):
        with torch.no_grad():
            for tensor, old in zip(tensors, saved):
                tensor.copy_(old)


def solve_generic(
    block: nn.Module, stats: LayerStatistics, ridge: float, rounds: int, *, label: str = ""
) -> tuple[str, list[float]] | None:
    """Minimize the statistics loss through ``to_dense()`` (see the module docstring); None without one."""
    if not callable(getattr(block, "to_dense", None)):
        return None
    work = copy.deepcopy(block).to("cpu", torch.float64)
    named = [(name, p) for name, p in work.named_parameters() if p.numel()]
    if not named:
        return "nothing to fit", [_loss(stats, _kernel(work, stats.with_ones))]
    small = [p for _, p in named if p.numel() <= PROBE_LIMIT]
    large = [p for _, p in named if p.numel() > PROBE_LIMIT]
    differentiable = bool(large) and _differentiable(work)
    losses: list[float] = []
    previous = _loss(stats, _kernel(work, stats.with_ones))
    method = label or "generic"
    linear = False
    if small and sum(p.numel() for p in small) <= PROBE_LIMIT:
        before, after, predicted = _newton_step(work, small, stats, ridge)
        linear = abs(after - predicted) <= 1e-8 * max(before, 1e-300) + 1e-12 * float(stats.energy.sum())
        losses.append(after)
        previous = after
        if linear and not large:
            method = label or "least squares through to_dense()"
    if not (linear and not large):
        for _ in range(max(int(rounds), 1)):
            for parameter in small:
                _newton_step(work, [parameter], stats, ridge)
            if differentiable:
                _gradient_steps(work, large, stats)
            loss = _loss(stats, _kernel(work, stats.with_ones))
            losses.append(loss)  # every step above was kept only if it lowered the loss
            if previous - loss <= TOLERANCE * max(previous, 1e-300):
                break
            previous = loss
        parts = ["block-coordinate least squares" if small else "", "L-BFGS" if differentiable else ""]
        method = label or " + ".join(part for part in parts if part) + " through to_dense()"
        if large and not differentiable:
            method += (
                f" ({sum(p.numel() for p in large):,} weights kept: too many to probe, to_dense() not differentiable)"
            )
    originals = dict(block.named_parameters())
    for name, parameter in named:
        assign(originals[name], parameter.detach())
    return method, losses


__all__ = ["GRADIENT_STEPS", "PROBE_LIMIT", "solve_generic"]
