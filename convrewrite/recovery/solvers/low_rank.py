"""The optimal rank-r kernel under the input's second moment, in closed form (Zhang et al., TPAMI 2016).

A low-rank block computes ``y = B A a + b`` with ``A`` (r, n_w) the ``reduce`` kernel, ``B`` (out, r)
the ``expand`` 1x1 and ``b`` its bias. With the statistics partitioned into the patch entries w and
the ones column 1, the optimal bias for a weight W is ``b = (c₁ - W g)/g₁₁`` (``g = gram[w, 1]``,
``g₁₁`` the number of rows, ``c₁ = cross[1]``); substituting it leaves a quadratic in W alone with
the *centred* statistics

    G̃ = G_ww - g gᵀ/g₁₁,    C̃ = C_w - g c₁ᵀ/g₁₁,    loss(W) = const + ||(W - W*) G̃^{1/2}||²_F,

where ``W* = C̃ᵀ G̃⁻¹`` is the unconstrained optimum. The best W of rank r is therefore the
projection ``U_r U_rᵀ W*`` onto the top r eigenvectors of ``W* G̃ W*ᵀ`` (out x out), the
generalized SVD of the paper: not the truncated SVD of the weights, which ignores how the inputs
are distributed. A small proximal ridge (towards the current kernel) enters G̃ and the metric.
The block is set to ``A = U_rᵀ W*`` and ``B = U_r``, rescaled so each rank's row of A and column of B
have equal norms, and the bias is solved exactly for that W. Without a bias on ``expand`` (or
without a ones column) the uncentred statistics are used and the bias stays zero.

Cost: one SPD solve of size n_w with ``out`` right-hand sides and one out x out eigenproblem.
"""

from __future__ import annotations

import torch
from torch import nn

from convrewrite.layers.low_rank import LowRankLinear, _LowRankConvNd
from convrewrite.recovery.solvers.base import assign, block_loss, register_solver, ridge_scale
from convrewrite.recovery.solvers.dense import is_plain
from convrewrite.recovery.statistics import LayerStatistics


def optimal_low_rank(
    stats: LayerStatistics, rank: int, start: torch.Tensor, use_bias: bool, ridge: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(A (r, n_w), B (out, r), bias or None): the rank-``rank`` optimum of the statistics loss.

    ``start`` is the current (out, n_w) weight, the centre of the proximal ridge.
    """
    width = stats.unknowns - (1 if stats.with_ones else 0)
    gram = stats.gram[:width, :width]
    cross = stats.cross[:width]
    ones = None
    if use_bias and stats.with_ones and float(stats.gram[width, width]) > 0:
        ones = float(stats.gram[width, width])
        column = stats.gram[:width, width]
        target = stats.cross[width]
        gram = gram - torch.outer(column, column) / ones
        cross = cross - torch.outer(column, target) / ones
    scale = ridge_scale(gram, ridge)
    system = gram + scale * torch.eye(width, dtype=gram.dtype)
    right = cross + scale * start.t()
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        optimum_t = torch.cholesky_solve(right, factor)
    else:
        optimum_t = torch.linalg.lstsq(system, right).solution
    optimum = optimum_t.t()  # (out, n_w)
    # W* (G̃ + λI) W*ᵀ = W* (right): the metric the rank-r projection is optimal in.
    metric = optimum @ right
    metric = (metric + metric.t()) / 2
    _, vectors = torch.linalg.eigh(metric)
    basis = vectors[:, -rank:] if rank < vectors.shape[1] else vectors
    reduce = basis.t() @ optimum
    expand = basis.clone()
    if basis.shape[1] < rank:  # rank above out: the extra ranks carry nothing
        pad = rank - basis.shape[1]
        reduce = torch.cat([reduce, reduce.new_zeros(pad, width)], dim=0)
        expand = torch.cat([expand, expand.new_zeros(expand.shape[0], pad)], dim=1)
    norms = reduce.norm(dim=1).clamp_min(1e-300).sqrt()
    reduce = reduce / norms.unsqueeze(1)
    expand = expand * norms.unsqueeze(0)
    bias = None
    if ones is not None:
        weight = expand @ reduce
        bias = (stats.cross[width] - weight @ stats.gram[:width, width]) / ones
    return reduce, expand, bias


@register_solver(LowRankLinear, _LowRankConvNd)
def solve_low_rank(
    block: nn.Module, stats: LayerStatistics, ridge: float, rounds: int
) -> tuple[str, list[float]] | None:
    """Closed-form optimal rank-r fit of a ``LowRankLinear`` / ``LowRankConv*`` (plain parts only)."""
    reduce, expand = block[0], block[1]  # type: ignore[index]
    if not (is_plain(reduce) and is_plain(expand)) or int(getattr(reduce, "groups", 1)) != 1:
        return None
    out = int(expand.weight.shape[0])
    rank = int(reduce.weight.shape[0])
    current = (expand.weight.detach().to("cpu", torch.float64).reshape(out, rank)) @ (
        reduce.weight.detach().to("cpu", torch.float64).reshape(rank, -1)
    )
    width = current.shape[1]
    if stats.unknowns != width + (1 if stats.with_ones else 0) or stats.outputs != out:
        return None
    use_bias = expand.bias is not None
    a, b, bias = optimal_low_rank(stats, rank, current, use_bias, ridge)
    assign(reduce.weight, a)
    assign(expand.weight, b)
    if bias is not None:
        assign(expand.bias, bias)
    if expand.bias is not None:
        column = bias if bias is not None else expand.bias.detach().to("cpu", torch.float64)
    else:
        column = torch.zeros(out, dtype=torch.float64)
    kernel = torch.cat([b @ a, column.unsqueeze(1)], dim=1)
    return f"optimal rank-{rank} (generalized SVD)", [block_loss(stats, kernel)]


__all__ = ["optimal_low_rank", "solve_low_rank"]
