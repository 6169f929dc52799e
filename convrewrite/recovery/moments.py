"""A conv layer's patch moments without unfolding: shifted products of the padded input.

For a stride-1 conv with zero padding, the unfolded patch of output position ``p`` holds, for each
tap ``j`` (per dimension ``j·d`` into the padded input ``X``), the value ``X(p + j·d)``. Two taps
``j`` and ``j' = j + m`` of the patch second moment then contribute

    G[(c, j), (c', j')] = Σ_p X_c(p + j·d) X_c'(p + j·d + m·d),

a product of ``X`` with itself shifted by the lag ``m·d``, summed over the window
``[j·d, j·d + L_out)`` of ``p + j·d``. Every pair of taps with the same lag sums the *same*
product image over windows that differ only in a strip at each end, so per lag the sums are
taken once over a partition of the union of those windows into segments (a large middle and thin
ends), and each pair's block is the sum of the segments inside its window. A 3x3 kernel has 25
lags, and the lag ``-m`` block is the transpose of the lag ``m`` one: 13 products of the
input's size per sample, against the 81 (or 40.5 with the symmetric half) per output position of
``unfold(x)ᵀ unfold(x)``; a 1-D kernel of 64 taps needs 64 against 2,048. Nothing of the
unfolded size is ever formed. The cross moment with the target, ``Σ_p X(p + j·d) y(p)ᵀ``, is one
product per tap of a window of ``X`` with ``y``.

``supported`` says which geometries this covers (stride 1, zero padding, more than one tap); the
results equal the unfolded ones to rounding (``tests/test_statistics_moments.py``), in the
order of ``PatchGeometry.unfold``: channel-major, taps in row-major order, the ones column last.
"""

from __future__ import annotations

import itertools
import math

import torch

from convrewrite.recovery.statistics import PatchGeometry


def supported(geometry: PatchGeometry) -> bool:
    """True when :func:`patch_moments` computes this geometry's moments (else: unfold)."""
    return (
        geometry.kind == "conv"
        and geometry.padding_mode == "zeros"
        and all(s == 1 for s in geometry.stride)
        and geometry.taps > 1
    )


def _segments(windows: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """The sorted cut points of ``windows`` and, per window, its range of segment indices."""
    points = sorted({edge for window in windows for edge in window})
    index = {point: i for i, point in enumerate(points)}
    return points, [(index[lo], index[hi]) for lo, hi in windows]


class ShiftedMoments:
    """Streams batches of one layer into its patch moments by shifted products (see the module doc).

    Per lag, the products of every segment combination are summed across batches in float64
    (about as many numbers as the gram itself); :meth:`flush` assembles them into a gram once.
    ``cross=False`` skips the cross moment and the target energy (a caller that derives them).
    A batch of another spatial size (a model fed variable sizes) flushes and re-plans.
    """

    def __init__(
        self,
        geometry: PatchGeometry,
        *,
        with_ones: bool = True,
        product: torch.dtype = torch.float64,
        cross: bool = True,
    ) -> None:
        if not supported(geometry):
            raise ValueError("shifted moments need a stride-1, zero-padded conv of more than one tap")
        self.geometry = geometry
        self.with_ones = with_ones
        self.product = product
        self.cross = cross
        self._lengths: list[int] | None = None
        self._sums: dict[tuple[tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
        self._plan: list[tuple[tuple[int, ...], list[tuple[list[int], list[tuple[int, int]]]], list[range]]] = []

    # ------------------------------------------------------------------ planning of one spatial size

    def _make_plan(self, lengths: list[int]) -> None:
        geometry = self.geometry
        kernel, dilation, dims = geometry.kernel_size, geometry.dilation, geometry.dims
        self._plan = []
        for lag in itertools.product(*(range(-(k - 1), k) for k in kernel)):
            if lag < tuple(0 for _ in range(dims)):
                continue  # the block of lag -m is the transpose of lag m's
            firsts = [range(max(0, -m), min(k, k - m)) for m, k in zip(lag, kernel)]
            per_dim = [
                _segments([(j * dilation[d], j * dilation[d] + lengths[d]) for j in firsts[d]]) for d in range(dims)
            ]
            self._plan.append((lag, per_dim, firsts))
        self._lengths = lengths

    def add(
        self, x: torch.Tensor, y: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor
    ) -> tuple[torch.Tensor | None, int]:
        """Add a batch: the second moment's segment sums are kept, the cross moment and the ones
        column go straight into ``cross`` and ``gram`` (float64). Returns the target's energy per
        channel (None without ``cross``) and the rows (samples x output positions)."""
        geometry = self.geometry
        dims, kernel, dilation = geometry.dims, geometry.kernel_size, geometry.dilation
        channels, taps, out = geometry.in_channels, geometry.taps, geometry.out_channels
        if x.dim() == dims + 1:
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        padded = geometry.pad(x.detach().to(self.product))  # zeros: ``supported`` checked the mode
        lengths = [padded.shape[2 + d] - dilation[d] * (kernel[d] - 1) for d in range(dims)]
        if list(y.shape[2:]) != lengths or y.shape[1] != out or padded.shape[1] != channels:
            raise ValueError(
                f"the layer input gives output positions {lengths}, its target has shape {list(y.shape[1:])}: "
                "the block's input does not have the original layer's geometry"
            )
        if lengths != self._lengths:
            self.flush(gram)
            self._make_plan(lengths)
        # (C, N, L...): a window of positions is then a view whose matrix is (C, N·positions).
        by_channel = padded.transpose(0, 1)
        for lag, per_dim, _ in self._plan:
            shift = [m * dilation[d] for d, m in enumerate(lag)]
            for combo in itertools.product(*(range(len(points) - 1) for points, _ in per_dim)):
                starts = tuple(per_dim[d][0][c] for d, c in enumerate(combo))
                sizes = tuple(per_dim[d][0][c + 1] - per_dim[d][0][c] for d, c in enumerate(combo))
                first = _window(by_channel, starts, sizes)
                second = _window(by_channel, tuple(a + m for a, m in zip(starts, shift)), sizes)
                part = first @ second.t()
                total = self._sums.get((lag, combo))
                if total is None:
                    self._sums[(lag, combo)] = part.to(torch.float64)
                else:
                    total += part
        rows = int(x.shape[0]) * math.prod(lengths)
        targets = y.detach().to(self.product).transpose(0, 1).reshape(out, -1)
        body_cross = cross[: channels * taps].view(channels, taps, out)
        for tap in itertools.product(*(range(k) for k in kernel)):
            starts = tuple(t * dilation[d] for d, t in enumerate(tap))
            patch = _window(by_channel, starts, tuple(lengths))
            index = _flat(tap, kernel)
            if self.cross:
                body_cross[:, index, :] += patch @ targets.t()
            if self.with_ones:
                sums_of_tap = patch.sum(dim=1, dtype=torch.float64)
                gram[: channels * taps, -1].view(channels, taps)[:, index] += sums_of_tap
                gram[-1, : channels * taps].view(channels, taps)[:, index] += sums_of_tap
        if self.with_ones:
            gram[-1, -1] += rows
            if self.cross:
                cross[-1] += targets.sum(dim=1, dtype=torch.float64)
        energy = targets.to(torch.float64).pow(2).sum(dim=1) if self.cross else None
        return energy, rows

    def flush(self, gram: torch.Tensor) -> None:
        """Add the second moment kept so far into ``gram`` (float64, (n, n)) and start afresh."""
        if not self._sums:
            return
        geometry = self.geometry
        channels, taps, kernel = geometry.in_channels, geometry.taps, geometry.kernel_size
        body = gram[: channels * taps, : channels * taps].view(channels, taps, channels, taps)
        for lag, per_dim, firsts in self._plan:
            for tap in itertools.product(*firsts):
                ranges = [per_dim[d][1][firsts[d].index(tap[d])] for d in range(len(kernel))]
                parts = [
                    self._sums[(lag, combo)]
                    for combo in itertools.product(*(range(lo, hi) for lo, hi in ranges))
                    if (lag, combo) in self._sums
                ]
                if not parts:
                    continue
                block = parts[0].clone()
                for part in parts[1:]:
                    block += part
                i, j = _flat(tap, kernel), _flat(tuple(t + m for t, m in zip(tap, lag)), kernel)
                if i == j:
                    body[:, i, :, i] += (block + block.t()) / 2  # exactly symmetric, as the gram is
                else:
                    body[:, i, :, j] += block
                    body[:, j, :, i] += block.t()
        self._sums = {}


def _flat(tap: tuple[int, ...], kernel: tuple[int, ...]) -> int:
    """A tap's index in the row-major order of the kernel's taps (``PatchGeometry.unfold``'s)."""
    index = 0
    for t, k in zip(tap, kernel):
        index = index * k + t
    return index


def _window(tensor: torch.Tensor, starts: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
    """The (C, N·positions) matrix of a window of a (C, N, L...) tensor."""
    view = tensor
    for d, (start, size) in enumerate(zip(starts, sizes)):
        view = view.narrow(2 + d, start, size)
    return view.reshape(view.shape[0], -1)


def patch_moments(
    geometry: PatchGeometry,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    with_ones: bool = True,
    product: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(gram, cross, energy, rows)`` of one batch: ``x`` (N, C, L1..Ld) the layer input, ``y``
    (N, out, L1'..Ld') its target output; float64 sums of ``product``-dtype products.

    Equal to ``a = geometry.unfold(x)``, ``t = geometry.target_rows(y)``: ``aᵀa``, ``aᵀt``,
    ``Σ t²`` per channel, and the number of rows.
    """
    n = geometry.unknowns(with_ones)
    gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    cross = torch.zeros(n, geometry.out_channels, dtype=torch.float64, device=x.device)
    moments = ShiftedMoments(geometry, with_ones=with_ones, product=product)
    energy, rows = moments.add(x, y, gram, cross)
    moments.flush(gram)
    assert energy is not None
    return gram, cross, energy, rows


__all__ = ["ShiftedMoments", "patch_moments", "supported"]
