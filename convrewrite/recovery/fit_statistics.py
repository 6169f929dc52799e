"""The statistics path of fitting: one streaming pass per layer, then a closed-form solve.

For a rewritten block that is linear in its input with the geometry of the dense layer it replaces
(every built-in rule's block is), the squared error of any weights against the original layer's
target is a quadratic form in three sums (``recovery/statistics.py``): the gram of the *rewritten*
model's unfolded block input, its cross moment with the *original* target, and the target energy.
So fitting layer k costs ONE streaming pass over the fit and holdout batches (the rewritten
prefix up to the block's input and the original prefix through the target, both stopped at the
layer), accumulating the fit and the holdout statistics side by side; then the block is solved
from the fit statistics (``recovery/solvers``: least squares, whitened SVD, alternating least
squares, per-group blocks, no data pass per round), and its held-out error before and after is
read from the holdout statistics, exactly, without another pass.

Blocks without a statistics path (``statistics_kernel`` is None: a third-party block that does
not declare its linear structure, a geometry that differs from the original layer's, a patch
beyond the size cap) keep the gradient path of ``recovery/fit.py``.

Optional refinement: ``steps`` > 0 Adam steps on the layer error after the closed form (the
gradient path's machinery, more passes), kept only if they lower the fit-split error and not
kept if the held-out error then gets worse.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from convrewrite.recovery import solvers
from convrewrite.recovery.solvers import statistics_kernel
from convrewrite.recovery.statistics import (
    LayerStatistics,
    PatchGeometry,
    StatisticsAccumulator,
    StatisticsTooLarge,
    all_reduce_statistics,
)

# --------------------------------------------------------------------------- the solvers' API


#: Rounds of the alternating solvers (separable ALS): measured on the TDNN's separable layers,
#: 8 rounds left the held-out layer error up to 0.8% above the old gradient path's, 64 below it
#: on every layer (``docs/fitting-statistics.md``); rounds stop early once the loss is flat.
#: Kept at 64 with the whitened start (``docs/solvers.md``): from it ALS reaches the old 64-round
#: loss in 13-49 rounds on the trained CRNN's layers and the 512-channel/64-tap benchmarks, but
#: not on every layer, and 64 rounds from it end lower than before on all but one of eight.
SOLVER_ROUNDS = 64


def solve_from_statistics(
    block: nn.Module,
    stats: LayerStatistics,
    *,
    geometry: PatchGeometry,
    ridge: float,
    rounds: int = SOLVER_ROUNDS,
    holdout: LayerStatistics | None = None,
) -> solvers.SolveResult | None:
    """Set ``block``'s parameters to the least-squares fit under ``stats``; None = no path.

    ``holdout``: the layer's held-out statistics; the iterative solvers stop on them.
    """
    return solvers.solve_from_statistics(block, stats, geometry=geometry, ridge=ridge, rounds=rounds, holdout=holdout)


# --------------------------------------------------------------------------- one layer


def layer_geometry(original: nn.Module, name: str, target: nn.Module) -> PatchGeometry | None:
    """The patch geometry of the dense layer a block replaces (the original module ``name``; a
    fuse-bn target, a BatchNorm, keeps the geometry of the conv before it), or None."""
    from convrewrite.recovery.fit import _plain_linear

    for candidate in (target, _get(original, name)):
        # Only a module whose forward IS the plain conv/linear has the geometry its attributes say
        # (a subclass may pad or stride itself): others keep the gradient path.
        if candidate is not None and _plain_linear(candidate) is not None:
            return PatchGeometry.of(candidate)
    return None


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def fit_layer_from_statistics(
    layer_data: Any,
    record: Any,
    geometry: PatchGeometry,
    *,
    ridge: float,
    world: int,
    product: torch.dtype = torch.float64,
    max_unknowns: int | None = None,
    cache: bool = False,
) -> dict[str, Any] | None:
    """Fit one layer from its statistics; None (nothing done, no pass spent) without a path.

    Returns what the optional refinement needs: the fit and holdout statistics, the snapshots.
    ``cache``: keep the streamed (input, target) pairs in ``layer_data``'s bounded cache, for
    refinement steps to come (without, the pass holds one batch at a time).
    """
    from convrewrite.recovery.fit import _snapshot
    from convrewrite.recovery.statistics import MAX_UNKNOWNS

    block, device = layer_data.block, layer_data.device
    kernel = statistics_kernel(block, geometry)
    if kernel is None:
        return None
    try:
        # The holdout split (a tenth of the data) always sums float64 products: the held-out errors
        # decide reverts and stops and are what the report shows, and an exact rewrite's float32
        # statistics would put its error at their rounding floor (~1e-4) instead of ~1e-7.
        accumulators = {
            split: StatisticsAccumulator(
                geometry,
                device=device,
                product=product if split == "fit" else torch.float64,
                max_unknowns=max_unknowns if max_unknowns is not None else MAX_UNKNOWNS,
            )
            for split in ("fit", "holdout")
        }
    except StatisticsTooLarge as exc:
        record.note = f"{exc}; fitted by gradient steps"
        return None
    try:
        for split, accumulator in accumulators.items():
            for pairs in layer_data.pairs(split) if cache else layer_data.stream(split):
                for args, kwargs, target in pairs:
                    x = args[0] if args else next(iter(kwargs.values()))
                    accumulator.add(x, target)
    except ValueError as exc:  # the block's input does not unfold to the target's positions
        record.note = f"no statistics path ({exc}); fitted by gradient steps"
        return None
    fit = all_reduce_statistics(accumulators["fit"].stats, world)
    holdout = accumulators["holdout"].stats
    if fit.rows == 0:
        record.note = "no fit batches reached this layer"
        record.method = "statistics"
        return {}
    has_holdout = holdout.rows > 0
    transfer = _snapshot(block)
    record.fit_error_before = fit.relative_error(kernel)
    if has_holdout:
        record.holdout_error_before = holdout.relative_error(kernel)
    solved = solve_from_statistics(block, fit, geometry=geometry, ridge=ridge, holdout=holdout)
    if solved is None:
        return None
    after = statistics_kernel(block, geometry)
    assert after is not None
    record.method = f"statistics:{solved.method}"
    record.solve_seconds = float(getattr(solved, "seconds", 0.0))
    record.closed_form = [solved.method]
    fit_after = fit.relative_error(after)
    if fit_after <= record.fit_error_before:
        record.kept = "closed-form"
        record.fit_error_after = fit_after
        if has_holdout:
            record.holdout_error_after = holdout.relative_error(after)
    else:
        block.load_state_dict(transfer)
        record.fit_error_after = record.fit_error_before
        record.holdout_error_after = record.holdout_error_before
    revert_if_worse_on_holdout(block, record, transfer)
    return {"fit": fit, "holdout": holdout, "transfer": transfer}


def revert_if_worse_on_holdout(block: nn.Module, record: Any, transfer: dict[str, torch.Tensor]) -> None:
    """The held-out revert: a fit that made held-out layer error worse keeps the transfer."""
    before, after = record.holdout_error_before, record.holdout_error_after
    if record.kept != "transfer" and before is not None and after is not None and after > before:
        block.load_state_dict(transfer)
        record.kept = "transfer"
        record.note = "; ".join(
            filter(None, [record.note, f"fit reverted: held-out layer error {before:.3g} -> {after:.3g}"])
        )
        record.holdout_error_after = before
        record.fit_error_after = record.fit_error_before


def refine(
    layer_data: Any,
    record: Any,
    geometry: PatchGeometry,
    found: dict[str, Any],
    *,
    steps: int,
    lr: float,
    world: int,
) -> None:
    """``steps`` Adam steps after the closed form; kept only where the statistics say they help."""
    from convrewrite.recovery.fit import _gradient_steps, _snapshot

    block = layer_data.block
    fit, holdout = found["fit"], found["holdout"]
    energy_per_element = float(fit.energy.sum()) / max(fit.rows * fit.outputs, 1)
    solved = _snapshot(block)
    record.gradient_steps = _gradient_steps(
        block, layer_data.cycle(epoch_start=0), steps, lr, energy_per_element, world
    )
    kernel = statistics_kernel(block, geometry)
    if kernel is None:
        block.load_state_dict(solved)
        return
    fit_error = fit.relative_error(kernel)
    current = record.fit_error_after if record.fit_error_after is not None else float("inf")
    holdout_error = holdout.relative_error(kernel) if holdout.rows else None
    worse_held_out = (
        holdout_error is not None
        and record.holdout_error_after is not None
        and holdout_error > record.holdout_error_after
    )
    if fit_error < current and not worse_held_out:
        record.kept = "closed-form+gradient"
        record.fit_error_after = fit_error
        record.holdout_error_after = holdout_error
    else:
        block.load_state_dict(solved)


__all__ = [
    "fit_layer_from_statistics",
    "layer_geometry",
    "refine",
    "revert_if_worse_on_holdout",
    "solve_from_statistics",
    "statistics_kernel",
]
