"""What every statistics solver shares: the registry, the result, the geometry check and the algebra.

A solver sets a replacement block's parameters to the least-squares optimum of the quadratic loss
that a ``LayerStatistics`` defines (see ``convrewrite.recovery.statistics``), with no data pass.
This module holds what the per-structure files build on:

- ``register_solver(*classes)``: the decorator that maps block classes to their exact solver
  (looked up along the block's MRO, so a subclass inherits its parent's solver);
- ``SolveResult``: the method used, the loss after each round, the seconds spent;
- ``statistics_kernel``: a block's (out, n) float64 kernel matrix from ``to_dense()`` (a plain conv or
  Linear from its weight), or None when its dense kernel does not have the statistics' geometry;
- the linear algebra: the ridge scale, an SPD solve that pulls towards the current value
  (a *proximal* ridge, so a kernel that is already optimal stays exactly where it is), and views
  of the statistics restricted to a subset of inputs and outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from convrewrite.recovery.statistics import LayerStatistics, kernel_matrix

#: A solver: (block, stats, ridge, rounds) -> (method, losses after each round), or None to decline.
Solver = Callable[[nn.Module, LayerStatistics, float, int], "tuple[str, list[float]] | None"]

_SOLVERS: dict[type, Solver] = {}


@dataclass
class SolveResult:
    """How a block was solved. ``losses[0]`` is the start's squared error, then one per round (a
    solver's own start, such as separable's whitened start, counts as one); the sequence never
    increases and ``losses[-1]`` is the squared error of the block as left."""

    method: str
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def register_solver(*block_classes: type) -> Callable[[Solver], Solver]:
    """Decorator: ``solver(block, stats, ridge, rounds)`` is the exact statistics solver of these classes.

    The solver sets the block's parameters in place and returns ``(method, losses)`` (the squared
    error after each of its rounds), or None to hand the block to the generic path. The caller
    checks the result: a solve that ends worse than the start is undone.
    """

    if not block_classes:
        raise ValueError("register_solver needs at least one block class")

    def decorate(solver: Solver) -> Solver:
        for block_class in block_classes:
            _SOLVERS[block_class] = solver
        return solver

    return decorate


def registered_solver(block: nn.Module) -> Solver | None:
    """The solver registered for ``block``'s class or its nearest registered base class."""
    for klass in type(block).__mro__:
        solver = _SOLVERS.get(klass)
        if solver is not None:
            return solver
    return None


# -- geometry --------------------------------------------------------------------------------------


def _as_tuple(value: Any) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def geometry_shape(geometry: Any) -> tuple[int, ...] | None:
    """The dense weight shape (out, in, *kernel) the statistics were unfolded for, or None if unknown.

    ``geometry`` is the ``PatchGeometry`` of the statistics pass, or any object that says the same
    thing: a ``weight_shape``/``kernel_shape`` attribute, or ``out_channels``/``in_channels``/
    ``kernel_size`` (a conv, or the original layer itself), or ``out_features``/``in_features``.
    """
    for name in ("weight_shape", "kernel_shape", "dense_shape"):
        shape = getattr(geometry, name, None)
        if shape is not None:
            return tuple(int(v) for v in shape)
    if hasattr(geometry, "in_features") and hasattr(geometry, "out_features"):
        return (int(geometry.out_features), int(geometry.in_features))
    if hasattr(geometry, "in_channels") and hasattr(geometry, "kernel_size"):
        out = getattr(geometry, "out_channels", None)
        if out is None:
            return None
        return (int(out), int(geometry.in_channels), *_as_tuple(geometry.kernel_size))
    return None


def _pairs(value: Any, name: str) -> tuple:
    """Strides and dilations as int tuples; paddings as (before, after) pairs (an int p is (p, p)),
    with no pair left when there is no padding at all (so 0 and (0, 0) and ((0, 0),) agree)."""
    if name != "padding":
        return _as_tuple(value)
    items = (value,) if isinstance(value, int) else tuple(value)
    pairs = tuple((int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1])) for v in items)
    return () if all(p == (0, 0) for p in pairs) else pairs


def _padded_conv_pairs(block: Any) -> tuple | None:
    """The static (before, after) padding of a ``PaddedConv`` and its inner conv, None if it depends
    on the input size (TensorFlow 'SAME' with a stride above 1) or cannot be read."""
    dims = len(block.kernel_size)
    if block.same:
        if any(int(step) != 1 for step in block.stride):
            return None
        totals = [int(d) * (int(k) - 1) for d, k in zip(block.dilation, block.kernel_size)]
        outer = [(t // 2, t - t // 2) for t in totals]
    else:
        amounts = [int(a) for a in block.amounts] or [0] * (2 * dims)
        if len(amounts) != 2 * dims:
            return None
        outer = [(amounts[2 * i], amounts[2 * i + 1]) for i in range(dims)][::-1]  # F.pad: last dim first
    inner = getattr(block.conv, "padding", 0)
    if isinstance(inner, str):
        return None
    inner_pairs = _pairs(inner, "padding") or ((0, 0),) * dims
    if len(inner_pairs) != dims:
        return None
    total = tuple((a + c, b + d) for (a, b), (c, d) in zip(outer, inner_pairs))
    return () if all(p == (0, 0) for p in total) else total


def dense_of(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``block``'s equivalent dense (weight, bias), or None when it declares none."""
    from convrewrite.layers.dense import dense_kernel

    try:
        return dense_kernel(block)
    except TypeError:
        return None


def statistics_kernel(block: nn.Module, geometry: Any) -> torch.Tensor | None:
    """(out, n) float64 kernel matrix of ``block`` (bias column last), None if its geometry differs.

    The block's dense kernel (``to_dense()``, or a plain conv/Linear's weight with groups
    expanded) must have the shape (out, in, *kernel) of the layer the statistics describe; strides
    and dilations must agree where both the block and ``geometry`` state them.
    """
    dense = dense_of(block)
    if dense is None:
        return None
    weight, bias = dense
    expected = geometry_shape(geometry)
    if expected is None or tuple(weight.shape) != expected:
        return None
    if hasattr(block, "same") and hasattr(block, "amounts") and hasattr(block, "conv"):
        # A PaddedConv pads in front of its block: the statistics path needs that padding to be
        # static and to be what the statistics were unfolded with.
        want = getattr(geometry, "padding", None)
        have = _padded_conv_pairs(block)
        if have is None or (want is not None and not isinstance(want, str) and _pairs(want, "padding") != have):
            return None
    for name in ("stride", "dilation", "padding"):
        want, have = getattr(geometry, name, None), getattr(block, name, None)
        comparable = want is not None and have is not None and not isinstance(want, str) and not isinstance(have, str)
        if comparable and _pairs(want, name) != _pairs(have, name):
            return None
    # Another padding mode reads other values at the border; it matters only where there is padding.
    want_mode, have_mode = getattr(geometry, "padding_mode", None), getattr(block, "padding_mode", None)
    padded = not isinstance(getattr(block, "padding", 0), str) and _pairs(getattr(block, "padding", 0), "padding")
    if want_mode is not None and have_mode is not None and want_mode != have_mode and padded:
        return None
    return kernel_matrix(weight, bias, with_ones=True)


def block_loss(stats: LayerStatistics, kernel: torch.Tensor) -> float:
    """Squared error of a full (out, n_w + 1) kernel matrix, the bias column dropped if ``stats`` has none."""
    kernel = kernel.to(stats.gram.device)
    if not stats.with_ones:
        kernel = kernel[:, : stats.unknowns]
    return stats.squared_error(kernel)


def on_cpu(stats: LayerStatistics) -> LayerStatistics:
    """``stats`` as float64 CPU tensors (the solves run there; a copy only when needed)."""
    tensors = (stats.gram, stats.cross, stats.energy)
    if all(t.device.type == "cpu" and t.dtype == torch.float64 for t in tensors):
        return stats
    gram, cross, energy = (t.to("cpu", torch.float64) for t in tensors)
    return LayerStatistics(gram=gram, cross=cross, energy=energy, rows=stats.rows, with_ones=stats.with_ones)


# -- algebra ---------------------------------------------------------------------------------------


def ridge_scale(matrix: torch.Tensor, ridge: float) -> float:
    """``ridge`` times the mean diagonal of ``matrix`` (a tiny floor keeps an all-zero gram solvable)."""
    return ridge_scale_of_diagonal(matrix.diagonal(), ridge)


def ridge_scale_of_diagonal(diagonal: torch.Tensor, ridge: float) -> float:
    """``ridge_scale`` from the matrix's diagonal alone (for a matrix that is never formed)."""
    mean = float(diagonal.mean()) if diagonal.numel() else 0.0
    return ridge * mean if mean > 0 else 1e-30


def cholesky_apply(factor: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``(L Lᵀ)⁻¹ right`` for a lower Cholesky factor ``L`` and a (k, columns) ``right``: two
    triangular solves (``torch.cholesky_solve`` took 0.14 s for one vector at 4,609 unknowns on one
    core, these 0.012 s)."""
    return torch.linalg.solve_triangular(
        factor.t(), torch.linalg.solve_triangular(factor, right, upper=False), upper=True
    )


#: Times ``solve_spd`` raises the ridge tenfold when rounding breaks a Cholesky (1e-7 -> 1e-3 of the
#: mean diagonal at most), before falling back to an eigendecomposition.
RIDGE_RETRIES = 4


def solve_spd(
    matrix: torch.Tensor,
    rhs: torch.Tensor,
    current: torch.Tensor,
    ridge: float,
    keep: dict[str, Any] | None = None,
) -> torch.Tensor:
    """argmin_x ``xᵀ A x - 2 xᵀ b + λ||x - current||²`` for symmetric PSD ``A``: ``(A + λI) x = b + λ current``.

    The proximal ridge pulls unidentified directions to the current value, not to zero, so a
    current value that already solves ``A x = b`` is a fixed point. ``rhs`` and ``current`` are
    (k,) or (k, columns). Cholesky first. A gram summed from float32 products (the fit's default)
    carries rounding of ~1e-8 of its entries, so on a rank-deficient gram (fewer patches than
    unknowns, dead channels) its null directions come out slightly negative and the 1e-7 ridge
    does not always cover them: the ridge is then raised tenfold, up to ``RIDGE_RETRIES`` times
    (directions that weak are rounding noise, not data), before an eigendecomposition, which
    costs about 10x a Cholesky (15 s against 1.5 s for a 4,609-wide gram on one core).

    ``keep``: a dict that receives the Cholesky factor of ``A + λI`` (``"factor"``) and the λ it
    took (``"scale"``, after any raise) when the factorization succeeded, for a caller that
    preconditions later systems with it; left empty after the eigendecomposition fallback.
    """
    scale = ridge_scale(matrix, ridge)
    vector = rhs.ndim == 1
    # One copy of the matrix, its diagonal raised in place (no identity matrix, no second copy:
    # at 4,609 unknowns each n² temporary costs about as much as the factorization's first steps).
    system = matrix.clone()
    diagonal = system.diagonal()
    diagonal.add_(scale)
    added = scale
    for _ in range(RIDGE_RETRIES + 1):
        factor, info = torch.linalg.cholesky_ex(system)
        if int(info) == 0:
            break
        scale *= 10.0
        diagonal.add_(scale - added)
        added = scale
    right = rhs + scale * current
    if vector:
        right = right.unsqueeze(1)
    if int(info) == 0:
        solution = cholesky_apply(factor, right)
        if keep is not None:
            keep["factor"], keep["scale"] = factor, scale
    else:
        values, vectors = torch.linalg.eigh(system)
        floor = scale
        inverse = torch.where(values > floor, 1.0 / values.clamp_min(floor), torch.zeros_like(values))
        solution = vectors @ (inverse.unsqueeze(1) * (vectors.t() @ right))
    return solution.squeeze(1) if vector else solution


def sub_statistics(
    stats: LayerStatistics, inputs: Sequence[int] | torch.Tensor, outputs: Sequence[int] | torch.Tensor
) -> LayerStatistics:
    """The statistics of a sub-layer that reads the patch entries ``inputs`` (the ones column, if
    wanted, among them and last) and writes the target channels ``outputs``."""
    rows = torch.as_tensor(inputs, dtype=torch.long)
    columns = torch.as_tensor(outputs, dtype=torch.long)
    with_ones = stats.with_ones and bool(len(rows)) and int(rows[-1]) == stats.unknowns - 1
    every_input = len(rows) == stats.unknowns and torch.equal(rows, torch.arange(stats.unknowns))
    return LayerStatistics(
        # Every patch entry in order (a permutation of the outputs only): the gram itself, no copy.
        gram=stats.gram if every_input else stats.gram.index_select(0, rows).index_select(1, rows),
        cross=stats.cross.index_select(0, rows).index_select(1, columns),
        energy=stats.energy.index_select(0, columns),
        rows=stats.rows,
        with_ones=with_ones,
    )


def parameters_of(block: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``block``'s parameters by name, for ``restore_parameters``."""
    return {name: parameter.detach().clone() for name, parameter in block.named_parameters()}


def restore_parameters(block: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put back the parameters ``parameters_of`` copied."""
    with torch.no_grad():
        for name, parameter in block.named_parameters():
            parameter.copy_(saved[name])


def assign(parameter: torch.Tensor | None, value: torch.Tensor) -> None:
    """Copy a float64 solution into a parameter in place, in the parameter's dtype and device."""
    if parameter is None:
        return
    with torch.no_grad():
        parameter.copy_(value.reshape(parameter.shape).to(dtype=parameter.dtype, device=parameter.device))


__all__ = [
    "RIDGE_RETRIES",
    "SolveResult",
    "Solver",
    "assign",
    "cholesky_apply",
    "parameters_of",
    "restore_parameters",
    "ridge_scale_of_diagonal",
    "block_loss",
    "on_cpu",
    "geometry_shape",
    "register_solver",
    "registered_solver",
    "ridge_scale",
    "solve_spd",
    "statistics_kernel",
    "sub_statistics",
]
