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
from dataclasses import dataclass

import torch


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


__all__ = ["LayerStatistics", "kernel_matrix"]
