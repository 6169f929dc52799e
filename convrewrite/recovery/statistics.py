"""Sufficient statistics of a layer's least-squares fit, and the quadratic loss they define.

A rewritten layer that is linear in its input with the geometry of the dense conv it replaces
(kernel, stride, padding, dilation) computes ``y = K a`` at every output position, where ``a`` is
the unfolded (im2col) input patch and ``K`` the block's equivalent dense kernel (``to_dense()``),
flattened channel-major like ``weight.reshape(out, -1)``, with the bias as a last column against a
constant 1 appended to ``a``. For a ``nn.Linear`` the "patch" is the feature vector.

Everything the calibration data can say about the squared error of any such ``K`` against the
original layer's target ``y`` is then in three sums over samples and positions:

- ``gram   = Σ a aᵀ``   (n, n): the second moment of the rewritten model's unfolded input;
- ``cross  = Σ a yᵀ``   (n, out): its cross moment with the original layer's target output;
- ``energy = Σ y²``     (out,): the target's energy per output channel.

``Σ ||K a - y||² = Σ_o energy[o] - 2 tr(K cross) + tr(K gram Kᵀ)``. All sums are float64; they are
sums (not means), so the statistics of two halves of the data add up to those of the whole, and
under ``torch.distributed`` an all-reduce of each tensor gives every rank the statistics of the
whole fit split.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LayerStatistics:
    """``gram``, ``cross`` and ``energy`` of one layer over one split; see the module docstring.

    ``with_ones``: the last row/column of ``gram`` (and last row of ``cross``) belong to the
    constant 1 appended to every patch (the bias column of ``K``). ``rows``: how many patches
    (samples x output positions) were summed.
    """

    gram: torch.Tensor
    cross: torch.Tensor
    energy: torch.Tensor
    rows: int
    with_ones: bool = True

    @property
    def unknowns(self) -> int:
        """n: patch length, the ones column included."""
        return int(self.gram.shape[0])

    @property
    def outputs(self) -> int:
        return int(self.cross.shape[1])

    def squared_error(self, kernel: torch.Tensor) -> float:
        """``Σ ||K a - y||²`` for ``kernel`` of shape (out, n) (float64, bias column last)."""
        k = kernel.to(self.gram.dtype)
        value = self.energy.sum() - 2 * (k * self.cross.t()).sum() + (k * (k @ self.gram)).sum()
        return max(float(value), 0.0)

    def relative_error(self, kernel: torch.Tensor) -> float:
        """``sqrt(Σ ||K a - y||² / Σ ||y||²)``: the relative layer error the fit reports."""
        energy = float(self.energy.sum())
        error = self.squared_error(kernel)
        if energy <= 0:
            return 0.0 if error <= 0 else math.inf
        return math.sqrt(error / energy)

    def add_(self, other: LayerStatistics) -> LayerStatistics:
        """Add ``other``'s sums into these (two halves of a data set make the whole)."""
        self.gram.add_(other.gram)
        self.cross.add_(other.cross)
        self.energy.add_(other.energy)
        self.rows += other.rows
        return self


def kernel_matrix(weight: torch.Tensor, bias: torch.Tensor | None, with_ones: bool = True) -> torch.Tensor:
    """(out, n) float64: a dense conv/linear ``weight`` flattened channel-major, ``bias`` as last column."""
    matrix = weight.detach().to(torch.float64).reshape(weight.shape[0], -1)
    if not with_ones:
        return matrix
    column = (
        bias.detach().to(torch.float64).reshape(-1, 1) if bias is not None else matrix.new_zeros(matrix.shape[0], 1)
    )
    return torch.cat([matrix, column], dim=1)


_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def _tuple(value: Any, dims: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class PatchGeometry:
    """How a layer's input is unfolded into patches (rows of ``a``), the geometry of a dense layer.

    ``kind``: ``"linear"`` (the patch is the feature vector, last dim) or ``"conv"``. For a conv:
    ``dims`` (1, 2, 3), ``kernel_size``, ``stride``, ``dilation`` per spatial dim, and ``padding``
    resolved to ``(before, after)`` pairs per spatial dim (``'same'`` and ``'valid'`` included; an
    odd total 'same' padding puts the extra element after, as torch does). ``padding_mode`` is the
    conv's (``zeros``, ``reflect``, ``replicate``, ``circular``). ``groups`` is recorded for
    information; :meth:`unfold` always gives the patch over all ``in_channels``
    (n = in_channels x taps), channel-major like ``weight.reshape(out, -1)`` of a dense conv.
    """

    kind: str
    in_channels: int
    out_channels: int
    dims: int = 0
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[tuple[int, int], ...] = ()
    dilation: tuple[int, ...] = ()
    padding_mode: str = "zeros"
    groups: int = 1

    @staticmethod
    def of(module: nn.Module) -> PatchGeometry:
        """The geometry of an ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (ValueError for anything else)."""
        if isinstance(module, nn.Linear):
            return PatchGeometry("linear", int(module.in_features), int(module.out_features))
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            dims = len(module.kernel_size)
            kernel = _tuple(module.kernel_size, dims)
            stride = _tuple(module.stride, dims)
            dilation = _tuple(module.dilation, dims)
            padding: Any = module.padding
            if padding == "valid":
                pairs = tuple((0, 0) for _ in range(dims))
            elif padding == "same":
                totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
                pairs = tuple((t // 2, t - t // 2) for t in totals)
            else:
                pairs = tuple((p, p) for p in _tuple(padding, dims))
            return PatchGeometry(
                "conv",
                int(module.in_channels),
                int(module.out_channels),
                dims,
                kernel,
                stride,
                pairs,
                dilation,
                str(module.padding_mode),
                int(module.groups),
            )
        raise ValueError(f"no patch geometry for a {type(module).__name__}: only nn.Linear and nn.Conv1d/2d/3d")

    @property
    def taps(self) -> int:
        return math.prod(self.kernel_size) if self.kind == "conv" else 1

    def unknowns(self, with_ones: bool = True) -> int:
        """n: the patch length, plus the ones column when ``with_ones``."""
        return self.in_channels * self.taps + (1 if with_ones else 0)

    def unfold(self, x: torch.Tensor, with_ones: bool = True) -> torch.Tensor:
        """(rows, n) patches of input ``x`` (same dtype), rows ordered (sample, output position).

        Channel-major within a patch (channel, then kernel taps in order), the ones column last.
        The row order matches :meth:`target_rows` of the layer's output.
        """
        if self.kind == "linear":
            rows = x.reshape(-1, self.in_channels)
        else:
            rows = self._conv_patches(x)
        if with_ones:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """A batched conv input ``x`` (N, C, L...) padded as the layer pads it (its padding mode)."""
        pads: list[int] = []
        for before, after in reversed(self.padding):
            pads += [before, after]
        if not any(pads):
            return x
        mode = _PAD_MODES[self.padding_mode]
        return F.pad(x, pads, mode=mode) if mode != "constant" else F.pad(x, pads)

    def _conv_patches(self, x: torch.Tensor) -> torch.Tensor:
        dims = self.dims
        batched = x.dim() == dims + 2
        if not batched:
            x = x.unsqueeze(0)
        x = self.pad(x)
        for d in range(dims):
            span = self.dilation[d] * (self.kernel_size[d] - 1) + 1
            x = x.unfold(2 + d, span, self.stride[d])
            if self.dilation[d] > 1:
                x = x[..., :: self.dilation[d]]
        # x: (N, C, P1..Pd, k1..kd) -> (N, P1..Pd, C, k1..kd)
        order = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
        return x.permute(order).reshape(-1, self.in_channels * self.taps)

    def target_rows(self, y: torch.Tensor) -> torch.Tensor:
        """(rows, out) of a layer output ``y`` in the row order of :meth:`unfold`."""
        if self.kind == "linear":
            return y.reshape(-1, self.out_channels)
        if y.dim() == self.dims + 1:
            y = y.unsqueeze(0)
        return y.movedim(1, -1).reshape(-1, self.out_channels)

    def dense_kernel(self, module: nn.Module) -> torch.Tensor:
        """(out, n) float64 kernel of a dense conv / linear of this geometry, grouped convs expanded."""
        weight = module.weight.detach().to(torch.float64)
        bias = getattr(module, "bias", None)
        if self.kind == "conv" and self.groups > 1:
            full = weight.new_zeros(self.out_channels, self.in_channels, *self.kernel_size)
            per_in, per_out = self.in_channels // self.groups, self.out_channels // self.groups
            for g in range(self.groups):
                full[g * per_out : (g + 1) * per_out, g * per_in : (g + 1) * per_in] = weight[
                    g * per_out : (g + 1) * per_out
                ]
            weight = full
        return kernel_matrix(weight, bias)


#: Rows x unknowns of one chunk of patches (4 Mi elements: 32 MiB in float64), the bound on the
#: memory of one accumulation step beyond the statistics themselves.
CHUNK_ELEMENTS = 1 << 22
#: Patches longer than this accumulate their gram by column blocks of this width, lower block
#: triangle only (the gram is symmetric): ~half the multiply-adds of a whole ``aᵀa``.
SYMMETRIC_BLOCK = 512
#: Largest patch length (ones column included) accumulated: a gram of 8,192² float64 is 512 MiB.
MAX_UNKNOWNS = 8192
#: Stride-1 zero-padded convs accumulate their moments from shifted products of the input
#: (``recovery/moments.py``: for 3x3, 13 products of the input's size per sample instead of a gram
#: of the 9x larger unfolded patches). ``CONVREWRITE_SHIFTED_MOMENTS=0`` unfolds every layer.
SHIFTED_MOMENTS = os.environ.get("CONVREWRITE_SHIFTED_MOMENTS", "1") != "0"


class StatisticsTooLarge(ValueError):
    """The layer's patch is longer than the size cap: its gram would not be affordable."""


class StatisticsAccumulator:
    """Streams (input, target) pairs of one layer into a :class:`LayerStatistics`.

    Memory: the statistics (n² + n·out + out float64) plus one chunk of at most
    ``chunk_elements`` patch elements (and the chunk's target rows), whatever the number of
    samples. A 512-channel 3x3 conv has n = 4,609: its gram is 170 MB float64 and a chunk is ~900
    patch rows; a Conv1d of 80 channels with a 64-tap kernel has n = 5,121 (210 MB). Above
    ``max_unknowns`` (default 8,192: 512 MiB) the accumulator refuses with
    :class:`StatisticsTooLarge` and the caller falls back to the gradient path.

    ``product``: the dtype of the per-chunk products ``aᵀa`` and ``aᵀy`` before they are summed
    into the float64 statistics. ``float64`` (the default) is exact to rounding; ``float32`` is
    about twice as fast on CPU but its chunk products carry ~1e-7 relative error, which the solve
    amplifies by the gram's condition number (measured in ``docs/fitting-statistics.md``).
    """

    def __init__(
        self,
        geometry: PatchGeometry,
        *,
        device: torch.device | str = "cpu",
        with_ones: bool = True,
        chunk_elements: int = CHUNK_ELEMENTS,
        max_unknowns: int = MAX_UNKNOWNS,
        product: torch.dtype = torch.float64,
        target_kernel: torch.Tensor | None = None,
    ) -> None:
        n = geometry.unknowns(with_ones)
        if n > max_unknowns:
            raise StatisticsTooLarge(
                f"a patch of {n:,} unknowns (gram {n * n * 8 / 2**20:,.0f} MiB) exceeds the statistics cap "
                f"{max_unknowns:,}"
            )
        self.geometry = geometry
        self.with_ones = with_ones
        self.chunk_elements = chunk_elements
        self.product = product
        device = torch.device(device)
        out = geometry.out_channels
        from convrewrite.recovery import moments

        #: Whether conv inputs are summed as shifted products (``recovery/moments.py``) instead of
        #: unfolded: stride-1, zero-padded convs of more than one tap, unless ``SHIFTED_MOMENTS`` is off.
        self.shifted = SHIFTED_MOMENTS and moments.supported(geometry)
        #: With ``target_kernel`` (out, n) the target IS ``K a`` (the planner's symmetric statistics of
        #: a layer's own input and output): only the gram is summed, and ``cross = gram Kᵀ`` and
        #: ``energy = diag(K gram Kᵀ)`` are derived from it, exactly, without a product per row.
        self.target_kernel = None if target_kernel is None else target_kernel.to(device=device, dtype=torch.float64)
        self._derived = -1  # the row count the derived cross and energy were computed at
        self._moments: Any = None  # recovery.moments.ShiftedMoments, made at the first add when shifted
        self._symmetric = True
        self._stats = LayerStatistics(
            gram=torch.zeros(n, n, dtype=torch.float64, device=device),
            cross=torch.zeros(n, out, dtype=torch.float64, device=device),
            energy=torch.zeros(out, dtype=torch.float64, device=device),
            rows=0,
            with_ones=with_ones,
        )

    def add(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """Add one call: ``x`` the block's input, ``target`` the original layer's output on it."""
        x = x.detach()
        target = target.detach()
        if x.dim() == 0 or target.dim() == 0:
            raise ValueError("statistics need batched tensors")
        geometry = self.geometry
        chunkable = x.dim() >= 2 if geometry.kind == "linear" else x.dim() == geometry.dims + 2
        if not chunkable or x.shape[0] == 0:
            self._add_rows(geometry.unfold(x, self.with_ones), geometry.target_rows(target))
            return
        samples = x.shape[0]
        rows_per_sample = max(1, target[0].numel() // max(geometry.out_channels, 1))
        step = max(1, self.chunk_elements // (rows_per_sample * self._stats.unknowns))
        if self.shifted:
            # No unfolding (``recovery/moments.py``). Float32 chunks hold as many output positions
            # as the unfolded path's hold rows: their products then sum the same number of terms,
            # so both paths have the same rounding floor; float64 products take the whole batch.
            from convrewrite.recovery.moments import ShiftedMoments

            if self._moments is None:
                self._moments = ShiftedMoments(
                    geometry, with_ones=self.with_ones, product=self.product, cross=self.target_kernel is None
                )
            if self.product == torch.float64:
                step = samples
            stats = self._stats
            device = stats.gram.device
            for start in range(0, samples, step):
                energy, count = self._moments.add(
                    x[start : start + step].to(device), target[start : start + step].to(device), stats.gram, stats.cross
                )
                if energy is not None:
                    stats.energy.add_(energy)
                stats.rows += count
            return
        for start in range(0, samples, step):
            rows = geometry.unfold(x[start : start + step], self.with_ones)
            wanted = geometry.target_rows(target[start : start + step])
            self._add_rows(rows, wanted)

    def _add_rows(self, rows: torch.Tensor, wanted: torch.Tensor) -> None:
        if rows.shape[0] != wanted.shape[0]:
            raise ValueError(
                f"the layer input gives {rows.shape[0]} patches, its target {wanted.shape[0]} rows: "
                "the block's input does not have the original layer's geometry"
            )
        stats = self._stats
        dtype = self.product
        rows = rows.to(device=stats.gram.device, dtype=dtype)
        wanted = wanted.to(device=stats.gram.device, dtype=dtype)
        n = rows.shape[1]
        if n <= SYMMETRIC_BLOCK:
            stats.gram.add_((rows.t() @ rows).to(torch.float64))
        else:
            # Only the lower block triangle (about half the products); mirrored when read.
            for first in range(0, n, SYMMETRIC_BLOCK):
                block = rows[:, first : first + SYMMETRIC_BLOCK]
                stats.gram[first:, first : first + block.shape[1]].add_((rows[:, first:].t() @ block).to(torch.float64))
            self._symmetric = False
        if self.target_kernel is None:
            stats.cross.add_((rows.t() @ wanted).to(torch.float64))
            stats.energy.add_(wanted.to(torch.float64).pow(2).sum(dim=0))
        stats.rows += int(rows.shape[0])

    @property
    def stats(self) -> LayerStatistics:
        """The statistics so far (the gram made whole from its accumulated lower block triangle)."""
        if self._moments is not None:
            self._moments.flush(self._stats.gram)
        if not self._symmetric:
            gram = self._stats.gram
            n = gram.shape[0]
            for first in range(0, n, SYMMETRIC_BLOCK):
                last = min(first + SYMMETRIC_BLOCK, n)
                # The diagonal block was computed whole; above it, copy the mirrored lower part.
                gram[first:last, last:] = gram[last:, first:last].t()
                diagonal = gram[first:last, first:last]
                diagonal.copy_((diagonal + diagonal.t()) / 2)
            self._symmetric = True
        if self.target_kernel is not None and self._derived != self._stats.rows:
            stats = self._stats
            kernel = self.target_kernel
            stats.cross = stats.gram @ kernel.t()
            stats.energy = (kernel * stats.cross.t()).sum(dim=1)
            self._derived = stats.rows
        return self._stats

    def all_reduce(self, world: int | None = None) -> LayerStatistics:
        """Sum the statistics over the ranks of ``torch.distributed`` (a no-op with one process)."""
        return all_reduce_statistics(self.stats, world)


def all_reduce_statistics(stats: LayerStatistics, world: int | None = None) -> LayerStatistics:
    """All-reduce (sum) gram, cross, energy and rows of ``stats`` in place across the ranks."""
    from convrewrite.recovery.fit import _all_reduce, distributed_world

    if world is None:
        world = distributed_world()[1]
    if world <= 1:
        return stats
    for tensor in (stats.gram, stats.cross, stats.energy):
        _all_reduce(tensor, world)
    rows = _all_reduce(torch.tensor([float(stats.rows)], dtype=torch.float64, device=stats.gram.device), world)
    stats.rows = int(rows.item())
    return stats


_PLAIN_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def collect_statistics(
    original: nn.Module,
    layer_names: list[str],
    data: Any,
    *,
    device: torch.device | str = "cpu",
    splits: tuple[str, ...] = ("fit", "holdout"),
    product: torch.dtype = torch.float64,
    max_unknowns: int = MAX_UNKNOWNS,
) -> dict[str, dict[str, LayerStatistics]]:
    """Symmetric statistics of every named layer of ``original``, in ONE pass per split.

    Hooks at every named ``nn.Linear`` / ``nn.Conv1d/2d/3d`` record its input and output on each
    call; the input is unfolded with the layer's own geometry and the output is the target, so
    ``cross`` is ``gram @ Kᵀ`` of the layer's own kernel K (the statistics of the planner, which
    scores candidate rewrites of every layer at once before any is applied). ``data`` is a
    :class:`~convrewrite.recovery.batches.BatchSource`; the fit split is sharded over the ranks of
    ``torch.distributed`` and all-reduced, the holdout split is read whole on every rank.
    Layers whose patch exceeds ``max_unknowns`` are left out of the result (no entry).
    Memory: the statistics of all named layers together, plus one batch's activations and a chunk.
    """
    from convrewrite.recovery.fit import distributed_world

    device = torch.device(device)
    rank, world = distributed_world()
    modules = {name: original.get_submodule(name) for name in dict.fromkeys(layer_names)}
    geometries = {name: PatchGeometry.of(module) for name, module in modules.items()}
    result: dict[str, dict[str, LayerStatistics]] = {}
    home = next((t.device for t in [*original.parameters(), *original.buffers()]), torch.device("cpu"))
    modes = {id(m): m.training for m in original.modules()}
    original.to(device).eval()
    try:
        for split in splits:
            accumulators: dict[str, StatisticsAccumulator] = {}
            for name, geometry in geometries.items():
                try:
                    module = modules[name]
                    # The layer's own output is K a for the plain torch layers; a subclass (weight
                    # standardization, dynamic padding) may compute something else: measured.
                    own = geometry.dense_kernel(module) if type(module) in _PLAIN_LAYERS else None
                    accumulators[name] = StatisticsAccumulator(
                        geometry, device=device, product=product, max_unknowns=max_unknowns, target_kernel=own
                    )
                except StatisticsTooLarge:
                    continue
            handles = []
            for name, accumulator in accumulators.items():

                def hook(module: nn.Module, args: tuple, output: Any, acc: StatisticsAccumulator = accumulator) -> None:
                    acc.add(args[0], output)

                handles.append(modules[name].register_forward_hook(hook))
            try:
                batches = data.batches(split, rank=rank, world_size=world) if split == "fit" else data.batches(split)
                with torch.no_grad():
                    for batch in batches:
                        batch.to(device).call(original)
            finally:
                for handle in handles:
                    handle.remove()
            for name, accumulator in accumulators.items():
                if split == "fit":
                    accumulator.all_reduce(world)
                result.setdefault(name, {})[split] = accumulator.stats
    finally:
        original.to(home)
        for module in original.modules():
            module.train(modes.get(id(module), False))
    return result


__all__ = [
    "CHUNK_ELEMENTS",
    "MAX_UNKNOWNS",
    "LayerStatistics",
    "PatchGeometry",
    "StatisticsAccumulator",
    "StatisticsTooLarge",
    "all_reduce_statistics",
    "collect_statistics",
    "kernel_matrix",
]
