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

from convrewrite.recovery.solvers.base import assign, dense_of, parameters_of, restore_parameters, solve_spd
from convrewrite.recovery.statistics import LayerStatistics, kernel_matrix

#: Parameter entries probed for an exact least-squares step (one ``to_dense()`` call each).
PROBE_LIMIT = 8192
#: Probe a tensor's entries together under ``torch.func.vmap`` (falls back to one at a time), in
#: chunks of at most this many float64 elements of unit vectors and kernels (128 MiB).
PROBE_BATCHED = True
PROBE_BATCH_ELEMENTS = 1 << 24
#: The normal matrix is assembled for groups of outputs gathering at most this many gram entries.
ASSEMBLY_ELEMENTS = 1 << 24
#: L-BFGS iterations per round on the tensors too large to probe.
GRADIENT_STEPS = 50
#: A round that improves the loss by less than this fraction of it ends the rounds.
TOLERANCE = 1e-9
#: With held-out statistics: the rounds end once ``HOLDOUT_PATIENCE`` rounds in a row have not
#: lowered the best held-out loss by this fraction of it (separable ALS's rule).
HOLDOUT_TOLERANCE = 1e-4
HOLDOUT_PATIENCE = 3


def _kernel(block: nn.Module, with_ones: bool) -> torch.Tensor:
    dense = dense_of(block)
    assert dense is not None
    matrix = kernel_matrix(
        dense[0].to("cpu", torch.float64), dense[1].to("cpu", torch.float64) if dense[1] is not None else None
    )
    return matrix if with_ones else matrix[:, :-1]


def _loss(stats: LayerStatistics, kernel: torch.Tensor) -> float:
    return stats.squared_error(kernel)


class _KernelOf(nn.Module):
    """``forward()`` = the wrapped block's kernel matrix: what ``torch.func.functional_call`` needs."""

    def __init__(self, block: nn.Module, with_ones: bool) -> None:
        super().__init__()
        self.block = block
        self.with_ones = with_ones

    def forward(self) -> torch.Tensor:
        return _kernel(self.block, self.with_ones)


def _probe_batched(
    block: nn.Module, tensors: Sequence[torch.Tensor], stats: LayerStatistics
) -> tuple[torch.Tensor, ...] | None:
    """``_probe`` with the unit perturbations of a tensor evaluated together under ``torch.func.vmap``
    (chunks of at most ``PROBE_BATCH_ELEMENTS`` kernel entries); None when ``to_dense()`` cannot be
    vmapped (a plugin's in-place or data-dependent code), and the caller probes one entry at a time.
    Each column is the same difference ``K(θ + e_i) − K(θ)`` as the loop's."""
    from torch.func import functional_call, vmap

    names = {id(parameter): name for name, parameter in block.named_parameters()}
    if any(id(tensor) not in names for tensor in tensors):
        return None
    wrapper = _KernelOf(block, stats.with_ones)
    base = _kernel(block, stats.with_ones)
    outputs, entries, columns, values = [], [], [], []
    column = 0
    try:
        with torch.no_grad():
            for tensor in tensors:
                key, size = "block." + names[id(tensor)], tensor.numel()
                value = tensor.detach()

                def kernel_at(flat_step: torch.Tensor, key: str = key, value: torch.Tensor = value) -> torch.Tensor:
                    return functional_call(wrapper, {key: value + flat_step.view_as(value)}, ())

                # Per probed entry: its unit vector (size) and its kernel (base.numel()).
                chunk = max(1, PROBE_BATCH_ELEMENTS // (size + base.numel()))
                for start in range(0, size, chunk):
                    count = min(chunk, size - start)
                    units = torch.zeros(count, size, dtype=value.dtype)
                    units[torch.arange(count), torch.arange(start, start + count)] = 1.0
                    difference = vmap(kernel_at)(units) - base
                    local, output, entry = difference.nonzero(as_tuple=True)
                    outputs.append(output)
                    entries.append(entry)
                    columns.append(local + column + start)
                    values.append(difference[local, output, entry])
                column += size
    except Exception:  # noqa: BLE001 - any failure of vmap means: probe one entry at a time
        return None
    if not outputs:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty, torch.zeros(0, dtype=torch.float64)
    return torch.cat(outputs), torch.cat(entries), torch.cat(columns), torch.cat(values)


def _probe(block: nn.Module, tensors: Sequence[torch.Tensor], stats: LayerStatistics) -> tuple[torch.Tensor, ...]:
    """Sparse Jacobian of the kernel in ``tensors``: (output, entry, column, value) of every nonzero."""
    if PROBE_BATCHED:
        batched = _probe_batched(block, tensors, stats)
        if batched is not None:
            return batched
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
    normal = _normal_matrix(gram, int(kernel.shape[0]), count, outputs, entries, columns, values)
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


def _normal_matrix(
    gram: torch.Tensor,
    out: int,
    count: int,
    outputs: torch.Tensor,
    entries: torch.Tensor,
    columns: torch.Tensor,
    values: torch.Tensor,
) -> torch.Tensor:
    """``Σ_o J_oᵀ G J_o`` from the sparse Jacobian (output, entry, column, value), outputs batched.

    Per output o, ``J_o`` is nonzero only at the patch entries R_o and parameter columns C_o it
    touches: its contribution is ``L_oᵀ G[R_o, R_o] L_o`` with the dense local block L_o. Outputs are
    processed together, their blocks padded to the largest |R_o| and |C_o| (padding rows and
    columns are zero, so they add nothing), in groups of at most ``ASSEMBLY_ELEMENTS`` gathered gram
    entries: one batched matrix product and one scatter per group instead of a loop over outputs.
    """
    normal = torch.zeros(count, count, dtype=torch.float64)
    if not len(outputs):
        return normal
    order = torch.argsort(outputs * (count + 1) + columns, stable=True)
    outputs, entries, columns, values = outputs[order], entries[order], columns[order], values[order]
    # Local row (entry) and column (parameter) numbers within each output.
    key_rows = outputs * (int(gram.shape[0]) + 1) + entries
    unique_rows, row_of = torch.unique(key_rows, return_inverse=True)
    rows_output = unique_rows // (int(gram.shape[0]) + 1)
    rows_entry = unique_rows % (int(gram.shape[0]) + 1)
    row_counts = torch.bincount(rows_output, minlength=out)
    row_start = torch.cumsum(row_counts, 0) - row_counts
    key_cols = outputs * (count + 1) + columns
    unique_cols, col_of = torch.unique(key_cols, return_inverse=True)
    cols_output = unique_cols // (count + 1)
    cols_column = unique_cols % (count + 1)
    col_counts = torch.bincount(cols_output, minlength=out)
    col_start = torch.cumsum(col_counts, 0) - col_counts
    width_rows, width_cols = int(row_counts.max()), int(col_counts.max())
    # Padded index tables: (out, width) entry / column numbers, and masks of the real ones.
    row_slot = torch.arange(len(unique_rows)) - row_start[rows_output]
    col_slot = torch.arange(len(unique_cols)) - col_start[cols_output]
    row_table = torch.zeros(out, width_rows, dtype=torch.long)
    row_table[rows_output, row_slot] = rows_entry
    col_table = torch.zeros(out, width_cols, dtype=torch.long)
    col_table[cols_output, col_slot] = cols_column
    local = torch.zeros(out, width_rows, width_cols, dtype=torch.float64)
    local.index_put_((outputs, row_slot[row_of], col_slot[col_of]), values, accumulate=True)
    group = max(1, ASSEMBLY_ELEMENTS // max(width_rows * width_rows, 1))
    for first in range(0, out, group):
        last = min(first + group, out)
        rows = row_table[first:last]
        block_gram = gram[rows.unsqueeze(2), rows.unsqueeze(1)]  # (k, R, R); padded rows meet zero L rows
        piece = local[first:last]
        contribution = piece.transpose(1, 2) @ block_gram @ piece  # (k, C, C)
        cols = col_table[first:last]
        normal.index_put_(
            (cols.unsqueeze(2).expand_as(contribution), cols.unsqueeze(1).expand_as(contribution)),
            contribution,
            accumulate=True,
        )
    return (normal + normal.t()) / 2


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
    block: nn.Module,
    stats: LayerStatistics,
    ridge: float,
    rounds: int,
    *,
    label: str = "",
    holdout: LayerStatistics | None = None,
) -> tuple[str, list[float]] | None:
    """Minimize the statistics loss through ``to_dense()`` (see the module docstring); None without one.

    With ``holdout`` (the layer's held-out statistics) the block-coordinate rounds also stop once
    the held-out loss has not fallen by ``HOLDOUT_TOLERANCE`` of its best for ``HOLDOUT_PATIENCE``
    rounds, and the round with the lowest held-out loss is kept (as separable ALS does).
    """
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
    stopped = ""
    if not (linear and not large):
        watched = holdout is not None and holdout.rows > 0
        best_held = _loss(holdout, _kernel(work, stats.with_ones)) if watched else 0.0  # type: ignore[arg-type]
        best_at, best_state, waited = len(losses), parameters_of(work), 0
        for _ in range(max(int(rounds), 1)):
            for parameter in small:
                _newton_step(work, [parameter], stats, ridge)
            if differentiable:
                _gradient_steps(work, large, stats)
            kernel = _kernel(work, stats.with_ones)
            loss = _loss(stats, kernel)
            losses.append(loss)  # every step above was kept only if it lowered the loss
            if watched:
                held = _loss(holdout, kernel)  # type: ignore[arg-type]
                waited = 0 if held < best_held * (1 - HOLDOUT_TOLERANCE) else waited + 1
                if held < best_held:
                    best_held, best_at, best_state = held, len(losses), parameters_of(work)
                if waited >= HOLDOUT_PATIENCE:
                    stopped = ", stopped on the held-out loss"
                    break
            if previous - loss <= TOLERANCE * max(previous, 1e-300):
                break
            previous = loss
        if watched and best_at < len(losses):
            restore_parameters(work, best_state)  # back to the round with the lowest held-out loss
            del losses[best_at:]
            if not losses:
                losses.append(_loss(stats, _kernel(work, stats.with_ones)))
        parts = ["block-coordinate least squares" if small else "", "L-BFGS" if differentiable else ""]
        method = (label or " + ".join(part for part in parts if part) + " through to_dense()") + stopped
        if large and not differentiable:
            method += (
                f" ({sum(p.numel() for p in large):,} weights kept: too many to probe, to_dense() not differentiable)"
            )
    originals = dict(block.named_parameters())
    for name, parameter in named:
        assign(originals[name], parameter.detach())
    return method, losses


__all__ = [
    "ASSEMBLY_ELEMENTS",
    "GRADIENT_STEPS",
    "HOLDOUT_PATIENCE",
    "HOLDOUT_TOLERANCE",
    "PROBE_BATCHED",
    "PROBE_BATCH_ELEMENTS",
    "PROBE_LIMIT",
    "solve_generic",
]
