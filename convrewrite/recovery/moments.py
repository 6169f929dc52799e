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
import torch.nn.functional as F

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


def patch_moments(
    geometry: PatchGeometry,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    with_ones: bool = True,
    product: torch.dtype = torch.float64,
    cross: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(gram, cross, energy, rows)`` of a batch: ``x`` (N, C, L1..Ld) the layer input, ``y``
    (N, out, L1'..Ld') its target output; float64 sums of ``product``-dtype products.

    Equal to ``a = geometry.unfold(x)``, ``t = geometry.target_rows(y)``: ``aᵀa``, ``aᵀt``,
    ``Σ t²`` per channel, and the number of rows. ``cross=False`` leaves ``aᵀt`` and ``Σ t²`` at
    zero (a caller that derives them from the gram).
    """
    dims = geometry.dims
    channels, taps, out = geometry.in_channels, geometry.taps, geometry.out_channels
    kernel, dilation = geometry.kernel_size, geometry.dilation
    if x.dim() == dims + 1:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    pads: list[int] = []
    for before, after in reversed(geometry.padding):
        pads += [before, after]
    padded = F.pad(x.detach().to(product), pads) if any(pads) else x.detach().to(product)
    lengths = [padded.shape[2 + d] - dilation[d] * (kernel[d] - 1) for d in range(dims)]
    if list(y.shape[2:]) != lengths or y.shape[1] != out or padded.shape[1] != channels:
        raise ValueError(
            f"the layer input gives output positions {lengths}, its target has shape {list(y.shape[1:])}: "
            "the block's input does not have the original layer's geometry"
        )
    samples = int(x.shape[0])
    rows = samples * math.prod(lengths)
    n = channels * taps + (1 if with_ones else 0)
    target = y.detach().to(product)
    # (C, N, L...) so that a window of positions is a view whose matrix is (C, N·positions).
    by_channel = padded.transpose(0, 1)
    target_by_channel = target.transpose(0, 1)
    gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    moment = torch.zeros(n, out, dtype=torch.float64, device=x.device)
    body = gram[: channels * taps, : channels * taps].view(channels, taps, channels, taps)
    body_cross = moment[: channels * taps].view(channels, taps, out)
    tap_grid = list(itertools.product(*(range(k) for k in kernel)))

    def flat(tap: tuple[int, ...]) -> int:
        index = 0
        for d in range(dims):
            index = index * kernel[d] + tap[d]
        return index

    def window(tensor: torch.Tensor, starts: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        view = tensor
        for d in range(dims):
            view = view.narrow(2 + d, starts[d], sizes[d])
        return view.reshape(view.shape[0], -1)

    # -- the second moment, lag by lag (only lags >= 0 in lexicographic order; the rest by transpose)
    for lag in itertools.product(*(range(-(k - 1), k) for k in kernel)):
        if lag < tuple(0 for _ in range(dims)):
            continue
        firsts = [range(max(0, -m), min(k, k - m)) for m, k in zip(lag, kernel)]
        shift = [m * dilation[d] for d, m in enumerate(lag)]
        per_dim = []
        for d in range(dims):
            windows = [(j * dilation[d], j * dilation[d] + lengths[d]) for j in firsts[d]]
            per_dim.append(_segments(windows))
        # The product of X with X shifted by the lag, summed over every combination of segments.
        sums: dict[tuple[int, ...], torch.Tensor] = {}
        for combo in itertools.product(*(range(len(points) - 1) for points, _ in per_dim)):
            starts = tuple(per_dim[d][0][s] for d, s in enumerate(combo))
            sizes = tuple(per_dim[d][0][s + 1] - per_dim[d][0][s] for d, s in enumerate(combo))
            if any(size <= 0 for size in sizes):
                continue
            first = window(by_channel, starts, sizes)
            second = window(by_channel, tuple(s + m for s, m in zip(starts, shift)), sizes)
            sums[combo] = (first @ second.t()).to(torch.float64)
        for tap in itertools.product(*firsts):
            ranges = [per_dim[d][1][firsts[d].index(tap[d])] for d in range(dims)]
            block = torch.zeros(channels, channels, dtype=torch.float64, device=x.device)
            for combo in itertools.product(*(range(lo, hi) for lo, hi in ranges)):
                part = sums.get(combo)
                if part is not None:
                    block += part
            i, j = flat(tap), flat(tuple(t + m for t, m in zip(tap, lag)))
            if i == j:
                body[:, i, :, i] += (block + block.t()) / 2  # exactly symmetric, as the gram is
            else:
                body[:, i, :, j] += block
                body[:, j, :, i] += block.t()
    # -- the cross moment and the ones column: one window of X per tap
    full = tuple(lengths)
    targets = target_by_channel.reshape(out, -1)
    for tap in tap_grid:
        starts = tuple(t * dilation[d] for d, t in enumerate(tap))
        patch = window(by_channel, starts, full)
        if cross:
            body_cross[:, flat(tap), :] += (patch @ targets.t()).to(torch.float64)
        if with_ones:
            sums_of_tap = patch.sum(dim=1, dtype=torch.float64)
            gram[: channels * taps, -1].view(channels, taps)[:, flat(tap)] += sums_of_tap
    if with_ones:
        gram[-1, : channels * taps] = gram[: channels * taps, -1]
        gram[-1, -1] += rows
        if cross:
            moment[-1] += targets.sum(dim=1, dtype=torch.float64)
    energy = targets.to(torch.float64).pow(2).sum(dim=1) if cross else torch.zeros(out, dtype=torch.float64)
    return gram, moment, energy, rows


__all__ = ["patch_moments", "supported"]
