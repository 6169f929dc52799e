"""Alternating least squares for depthwise-separable blocks, from the statistics alone.

A separable block with C input channels, multiplier m (Cm middle channels, middle channel
q = c·m + j reads input channel c), T taps and ``out`` outputs computes ``K = P D̂`` where ``D̂``
((Cm + 1) x n) holds depthwise row q's taps at input channel c's T patch entries and its bias in
the ones column (the last row of ``D̂`` is the ones column itself), and ``P`` (out x (Cm + 1)) is the
pointwise weight with its bias as last column. The loss is bilinear in (P, D̂), so it is minimized
by alternating two exact solves, each from the same statistics:

- **pointwise given depthwise**: the middle features are ``z = D̂ a``, so their statistics are
  ``D̂ G D̂ᵀ`` and ``D̂ C``: an ordinary least squares of size Cm + 1. ``D̂`` is never formed:
  it is sparse, and ``D̂ G D̂ᵀ`` is two einsums over the (C, T) view of the gram (m n² operations).
- **depthwise given pointwise** (pointwise bias held): the depthwise entries (q, s) are the
  unknowns; the normal matrix is ``H[(q,s),(q',s')] = (PᵀP)[q,q'] · G[s,s']``, the gram gathered
  at the depthwise support and masked by ``PᵀP``: size CmT (+ Cm for the biases), never a
  Kronecker product of the full gram. Up to ``DIRECT_LIMIT`` unknowns it is formed and factored
  (Cholesky); from ``RECYCLE_MIN`` unknowns the factor is kept, and later rounds solve their own
  system by CG preconditioned with it (to the same 1e-8 residual), factoring afresh only once
  that takes more than ``RECYCLE_REFRESH`` iterations. Above ``DIRECT_LIMIT`` it is never
  formed: preconditioned conjugate gradients apply it as ``PᵀP (V G)`` gathered at the support
  (m n² + (Cm)² T per product), preconditioned by its per-channel diagonal blocks, warm-started
  at the current value, to a relative residual of 1e-8.

After each round an exact line search along the round's step (the loss is a quartic in the step
length) extrapolates when that is lower. Each step minimizes the loss plus a proximal ridge
towards the current value, so the loss never increases from one step to the next (every CG iterate
also lowers the quadratic from its warm start). The first round starts from the block's current
(transferred) weights; the solver stops after ``rounds`` rounds or when a round improves the loss
by less than ``TOLERANCE`` (1e-6) of it. Cost per round for 512 channels x 3x3 (4,608 depthwise
unknowns) on one core: a Cholesky of 1.3 s (the gram at the support gathered once per solve),
against 4.5 s of unpreconditioned-by-blocks CG at the 127 iterations it took on ResNet-50's
layers; a recycled round is 13-20 iterations of 0.035 s (one matrix-free product, two
triangular solves). Measured on three of ResNet-50's layers (64 images, the captured statistics):
the solve went from 14.9 s to 11.0 s (2,304 unknowns, 33 of 39 rounds recycled) and from 27.3 s
to 18-21 s (4,608 unknowns), to the same losses to seven digits. The pointwise step is a
Cholesky of size Cm + 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from convrewrite.layers.separable import _SeparableConvNd
from convrewrite.recovery.solvers.base import (
    assign,
    cholesky_apply,
    register_solver,
    ridge_scale,
    ridge_scale_of_diagonal,
    solve_spd,
)
from convrewrite.recovery.solvers.dense import is_plain
from convrewrite.recovery.statistics import LayerStatistics

#: A round that improves the loss by less than this fraction of it ends the alternation.
TOLERANCE = 1e-6
#: With held-out statistics: once ``HOLDOUT_PATIENCE`` rounds in a row have not lowered the best
#: held-out loss by this fraction of it, the alternation ends and the round with the lowest
#: held-out loss is kept (the held-out loss can rise for a round and then fall further).
HOLDOUT_TOLERANCE = 1e-4
HOLDOUT_PATIENCE = 3
#: Depthwise systems up to this many unknowns are solved by Cholesky; larger ones by
#: preconditioned conjugate gradients (the normal matrix is never formed). Measured on one core
#: (ResNet-50's 256- and 512-channel 3x3 layers at 256 images): CG took 127 iterations per solve
#: on average, 4.5 s per round at 4,608 unknowns, against 1.3 s for the Cholesky and 0.9 s to
#: gather the masked gram; 5,120 covers 512 channels x 3x3 (and a 64-tap 1-D conv of 80).
DIRECT_LIMIT = 5120
#: Depthwise systems of at least this many unknowns (and at most ``DIRECT_LIMIT``) keep the
#: Cholesky factor of the round that formed them, and the next rounds first solve their own system
#: by conjugate gradients preconditioned by that factor, warm-started at the current value, to
#: the same ``CG_TOLERANCE``. When that does not converge in ``RECYCLE_ITERATIONS`` the normal
#: matrix is formed and factored after all, and once a recycled solve needs more than
#: ``RECYCLE_REFRESH`` iterations (the factor has grown stale) the next round factors afresh.
#: The normal matrix changes with PᵀP only, which settles as the rounds converge. Measured on
#: ResNet-50's 512-channel layers (one core): a factorization costs 1.3 s at 4,608 unknowns
#: (plus 0.19 s to form the matrix), a preconditioned iteration 0.035 s; the first recycled solve
#: after a factorization took 13-17 iterations, later ones more (up to 90 after eight rounds).
#: A refresh after 20 and after 10 iterations measured the same (within the machine's noise).
RECYCLE_MIN = 1024
RECYCLE_ITERATIONS = 40
RECYCLE_REFRESH = 20
#: Conjugate gradients stop at this relative residual (float64 CG stalls near 1e-9) or after this many iterations.
CG_TOLERANCE = 1e-8
CG_ITERATIONS = 500
#: After each round, move further along its step when the loss keeps falling (``_line_search``).
EXTRAPOLATE = True
#: Start the alternation from the whitened-SVD start when it is lower than the transfer (``choose_start``).
WHITENED_START = True


#: What ``_Separable.snapshot`` holds: depthwise (C, m, T), its bias, pointwise (out, Cm), its bias.
Snapshot = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class _Separable:
    """The float64 state of the alternation: D (C, m, T), depthwise bias (Cm,), P (out, Cm), bias (out,)."""

    def __init__(self, block: nn.Module, stats: LayerStatistics) -> None:
        depthwise, pointwise = block[0], block[1]  # type: ignore[index]
        self.channels = int(depthwise.in_channels)
        middle = int(depthwise.out_channels)
        self.multiplier = middle // self.channels
        self.taps = math.prod(int(k) for k in depthwise.kernel_size)
        self.out = int(pointwise.out_channels)
        self.width = self.channels * self.taps
        self.depthwise = (
            depthwise.weight.detach().to("cpu", torch.float64).reshape(self.channels, self.multiplier, self.taps)
        )
        self.use_depthwise_bias = stats.with_ones and depthwise.bias is not None
        self.use_pointwise_bias = stats.with_ones and pointwise.bias is not None
        self.depthwise_bias = (
            depthwise.bias.detach().to("cpu", torch.float64).clone()
            if depthwise.bias is not None
            else torch.zeros(middle, dtype=torch.float64)
        )
        if not self.use_depthwise_bias:
            self.depthwise_bias = torch.zeros(middle, dtype=torch.float64)
        self.pointwise = pointwise.weight.detach().to("cpu", torch.float64).reshape(self.out, middle).clone()
        self.pointwise_bias = (
            pointwise.bias.detach().to("cpu", torch.float64).clone()
            if self.use_pointwise_bias and pointwise.bias is not None
            else torch.zeros(self.out, dtype=torch.float64)
        )
        self.stats = stats
        self._support_gram: torch.Tensor | None = None
        #: The kept factor of an earlier round's depthwise system (``RECYCLE_MIN``), its λ over
        #: the ridge scale it was formed at, and how many depthwise solves were recycled or factored.
        self._factor: torch.Tensor | None = None
        self._factor_raise = 1.0
        self.recycled = 0
        self.factored = 0

    @property
    def middle(self) -> int:
        return self.channels * self.multiplier

    def kernel(self) -> torch.Tensor:
        """(out, n) kernel matrix of the current state (bias column last when the stats have one)."""
        p = self.pointwise.reshape(self.out, self.channels, self.multiplier)
        weight = torch.einsum("ocj,cjt->oct", p, self.depthwise).reshape(self.out, self.width)
        if not self.stats.with_ones:
            return weight
        bias = self.pointwise @ self.depthwise_bias + self.pointwise_bias
        return torch.cat([weight, bias.unsqueeze(1)], dim=1)

    def middle_statistics(self, stats: LayerStatistics | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Gram and cross of the middle features ``z = D̂ a`` (a ones entry last when the stats have one).

        ``D̂ G D̂ᵀ`` and ``D̂ C`` by two einsums over the (C, T) view of the gram: m n² operations.
        ``stats``: another set of the same layer's statistics (the held-out ones); default the fit's.
        """
        stats = self.stats if stats is None else stats
        c, t, n = self.channels, self.taps, stats.unknowns
        gram_rows = stats.gram[: self.width].reshape(c, t, n)
        dg = torch.einsum("cjt,ctn->cjn", self.depthwise, gram_rows).reshape(self.middle, n)
        if stats.with_ones:
            dg = dg + torch.outer(self.depthwise_bias, stats.gram[self.width])
        middle_gram = torch.einsum("qct,cjt->qcj", dg[:, : self.width].reshape(self.middle, c, t), self.depthwise)
        middle_gram = middle_gram.reshape(self.middle, self.middle)
        cross_rows = stats.cross[: self.width].reshape(c, t, self.out)
        middle_cross = torch.einsum("cjt,cto->cjo", self.depthwise, cross_rows).reshape(self.middle, self.out)
        if stats.with_ones:
            middle_gram = middle_gram + torch.outer(dg[:, self.width], self.depthwise_bias)
            middle_cross = middle_cross + torch.outer(self.depthwise_bias, stats.cross[self.width])
            ones_row = torch.cat([dg[:, self.width], stats.gram[self.width, self.width].reshape(1)])
            middle_gram = torch.cat(
                [torch.cat([middle_gram, dg[:, self.width : self.width + 1]], dim=1), ones_row.unsqueeze(0)]
            )
            middle_cross = torch.cat([middle_cross, stats.cross[self.width].unsqueeze(0)])
        return (middle_gram + middle_gram.t()) / 2, middle_cross

    def loss(self, stats: LayerStatistics | None = None) -> float:
        """Squared error of the current state, from the middle features' statistics (no out x n² product).

        ``stats``: another set of the same layer's statistics (the held-out ones); default the fit's.
        """
        stats = self.stats if stats is None else stats
        middle_gram, middle_cross = self.middle_statistics(stats)
        pointwise = self.pointwise
        if stats.with_ones:
            pointwise = torch.cat([pointwise, self.pointwise_bias.unsqueeze(1)], dim=1)
        value = (
            stats.energy.sum()
            - 2 * (pointwise * middle_cross.t()).sum()
            + (pointwise * (pointwise @ middle_gram)).sum()
        )
        return max(float(value), 0.0)

    def free_bias(self) -> bool:
        """Whether the kernel's bias column is unconstrained (a pointwise bias and a ones column)."""
        return self.stats.with_ones and self.use_pointwise_bias

    def whitened_start(self, ridge: float, factored: dict | None = None) -> None:
        """Move to the whitened-SVD start: per channel, the best rank-m part of the unconstrained optimum.

        ``K* = C G⁻¹`` (one Cholesky of the gram, pulled to the current kernel by the proximal
        ridge) is the least-squares kernel with no structure. The separable kernel is, per input
        channel c, a rank-m product ``K[:, c] = P_c D_c``; each channel's block is replaced by the
        optimal rank-m approximation of ``K*_c`` under that channel's own diagonal block of the
        metric, ``min ||(K*_c − P_c D_c) L_c||`` with ``L_c L_cᵀ = G_cc``: an SVD of ``K*_c L_c``
        (the generalized SVD of the low-rank solver, one channel at a time). The cross-channel
        blocks of the gram are what this ignores; ALS then accounts for them. With a free bias the
        metric is the Schur complement ``G_cc − g_c g_cᵀ / R`` (the bias optimized out), and the
        bias is then set exactly: ``b = (C₁ − W g) / R``. Components beyond the block's rank (m
        above min(out, T)) get a small fixed random filter with a zero pointwise column, as the
        SVD transfer does, so that ALS can still use them.

        ``factored``: a dict shared by several starts on the same statistics (the planner's
        multipliers): the first keeps the Cholesky factor of ``G + λI`` in it, later ones reuse it
        (the same solve: only the proximal centre, the current kernel, differs between them).
        """
        stats, c, m, t, out, w = self.stats, self.channels, self.multiplier, self.taps, self.out, self.width
        current = self.kernel()
        if factored is not None and "factor" in factored:
            optimum = cholesky_apply(factored["factor"], stats.cross + factored["scale"] * current.t()).t()
        else:
            optimum = solve_spd(stats.gram, stats.cross, current.t(), ridge, keep=factored).t()  # (out, n)
        weight = optimum[:, :w].reshape(out, c, t).permute(1, 0, 2)  # (C, out, T)
        local = torch.arange(c).unsqueeze(1) * t + torch.arange(t).unsqueeze(0)  # (C, T)
        metric = stats.gram[local.unsqueeze(2), local.unsqueeze(1)]  # (C, T, T): G_cc
        if self.free_bias():
            ones_column = stats.gram[w, local]  # (C, T)
            metric = metric - ones_column.unsqueeze(2) * ones_column.unsqueeze(1) / stats.gram[w, w].clamp_min(1e-300)
        metric = (metric + metric.transpose(1, 2)) / 2
        values, vectors = torch.linalg.eigh(metric)  # G_cc = Q Λ Qᵀ; L_c = Q Λ^½
        floor = 1e-12 * values.amax(dim=1, keepdim=True).clamp_min(1e-300)
        seen = values > floor
        root = torch.where(seen, values.clamp_min(0).sqrt(), torch.zeros_like(values))
        inverse_root = torch.where(seen, 1 / root.clamp_min(1e-300), torch.zeros_like(values))
        whitened = torch.einsum("cot,cts->cos", weight, vectors) * root.unsqueeze(1)  # K*_c Q Λ^½
        u, s, vh = torch.linalg.svd(whitened, full_matrices=False)  # (C,out,r) (C,r) (C,r,T)
        kept = min(m, s.shape[1])
        scale = s[:, :kept].sqrt()
        # D_c = Σ^½ Vᵀ Λ^-½ Qᵀ, P_c = U Σ^½ (the product is the whitened truncation mapped back).
        depthwise = torch.einsum("cks,cts->ckt", scale.unsqueeze(2) * vh[:, :kept] * inverse_root.unsqueeze(1), vectors)
        pointwise = u[:, :, :kept] * scale.unsqueeze(1)  # (C, out, kept)
        self.depthwise = torch.zeros(c, m, t, dtype=torch.float64)
        self.depthwise[:, :kept] = depthwise
        new_pointwise = torch.zeros(out, c, m, dtype=torch.float64)
        new_pointwise[:, :, :kept] = pointwise.permute(1, 0, 2)
        if m > kept:
            generator = torch.Generator().manual_seed(0)
            extra = torch.randn(c, m - kept, t, generator=generator, dtype=torch.float64)
            self.depthwise[:, kept:] = extra / math.sqrt(t)
        self.pointwise = new_pointwise.reshape(out, self.middle).contiguous()
        self.depthwise_bias = torch.zeros(self.middle, dtype=torch.float64)
        self.pointwise_bias = torch.zeros(out, dtype=torch.float64)
        if stats.with_ones and (self.use_pointwise_bias or self.use_depthwise_bias):
            # The exact bias given the weights: b = (C₁ − W g) / R.
            new_weight = self.kernel()[:, :w]
            total = (stats.cross[w] - new_weight @ stats.gram[w, :w]) / stats.gram[w, w].clamp_min(1e-300)
            if self.use_pointwise_bias:
                self.pointwise_bias = total
            else:
                # Only a depthwise bias: the total bias is P b_d, least squares in b_d.
                mix = self.pointwise.t() @ self.pointwise
                self.depthwise_bias = solve_spd(mix, self.pointwise.t() @ total, self.depthwise_bias, ridge)

    def snapshot(self) -> Snapshot:
        """The state's four tensors (depthwise, its bias, pointwise, its bias); every step replaces
        them rather than writing into them, so holding them is a copy of the state."""
        return self.depthwise, self.depthwise_bias, self.pointwise, self.pointwise_bias

    def restore(self, saved: Snapshot) -> None:
        """Back to a ``snapshot()``."""
        self.depthwise, self.depthwise_bias, self.pointwise, self.pointwise_bias = saved

    def balance(self) -> None:
        """Rescale each middle channel so its depthwise row and pointwise column have equal norms.

        The kernel is unchanged: middle channel q's depthwise taps and bias are multiplied by
        ``s_q`` and its pointwise column by ``1 / s_q`` (the bilinear block's gauge freedom). ALS
        alone leaves that scale wherever the rounds drift (measured on the trained digits CNN:
        depthwise rows of norm 0.05 against pointwise columns of norm 21), and a distillation
        that follows then takes Adam steps of one size on both, huge for the small factor. The
        balanced point ``||D_q|| = ||P_q||`` is the minimum of ``||D||² + ||P||²`` over the gauge
        (what weight decay drifts towards) and the convention of the SVD transfer.
        """
        rows = self.depthwise.reshape(self.middle, self.taps)
        row_norms = (rows.square().sum(dim=1) + self.depthwise_bias.square()).sqrt()
        column_norms = self.pointwise.norm(dim=0)
        usable = (row_norms > 0) & (column_norms > 0)
        scale = torch.where(usable, (column_norms / row_norms.clamp_min(1e-300)).sqrt(), torch.ones_like(row_norms))
        self.depthwise = (rows * scale.unsqueeze(1)).reshape(self.channels, self.multiplier, self.taps).contiguous()
        self.depthwise_bias = self.depthwise_bias * scale
        self.pointwise = (self.pointwise / scale.unsqueeze(0)).contiguous()

    def solve_pointwise(self, ridge: float) -> None:
        """P (and its bias) given D̂: least squares on the middle features' statistics."""
        middle_gram, middle_cross = self.middle_statistics()
        if self.use_pointwise_bias:
            start = torch.cat([self.pointwise, self.pointwise_bias.unsqueeze(1)], dim=1).t()
        else:
            start = self.pointwise.t()
            middle_gram, middle_cross = middle_gram[: self.middle, : self.middle], middle_cross[: self.middle]
        solution = solve_spd(middle_gram, middle_cross, start, ridge).t()
        self.pointwise = solution[:, : self.middle].contiguous()
        if self.use_pointwise_bias:
            self.pointwise_bias = solution[:, self.middle].contiguous()

    def _support(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, s) of every depthwise unknown: middle channel q, patch entry s (taps, then biases)."""
        t, m = self.taps, self.multiplier
        middle = torch.arange(self.middle)
        q_index = middle.repeat_interleave(t)
        s_index = (middle // m).repeat_interleave(t) * t + torch.arange(t).repeat(self.middle)
        if self.use_depthwise_bias:
            q_index = torch.cat([q_index, middle])
            s_index = torch.cat([s_index, torch.full((self.middle,), self.width, dtype=torch.long)])
        return q_index, s_index

    def solve_depthwise(self, ridge: float) -> None:
        """D̂ given P (the pointwise bias held): the gram at D's support masked by PᵀP."""
        stats, c, m, t = self.stats, self.channels, self.multiplier, self.taps
        q_index, s_index = self._support()
        mix = self.pointwise.t() @ self.pointwise  # PᵀP (Cm, Cm)
        # Right-hand side: (Pᵀ (Cᵀ - bp e₁ᵀ G))[q, s] at the support.
        # Gathered at the support only: (C, m, T) from P (out, C, m) and the cross's (C, T, out) view.
        pointwise = self.pointwise.reshape(self.out, c, m)
        rhs = torch.einsum("ocj,cto->cjt", pointwise, stats.cross[: self.width].reshape(c, t, self.out)).reshape(-1)
        if self.use_depthwise_bias:
            rhs = torch.cat([rhs, self.pointwise.t() @ stats.cross[self.width]])
        if self.use_pointwise_bias:
            rhs = rhs - (self.pointwise.t() @ self.pointwise_bias)[q_index] * stats.gram[self.width, s_index]
        current = self.depthwise.reshape(-1)
        if self.use_depthwise_bias:
            current = torch.cat([current, self.depthwise_bias])
        if len(q_index) <= DIRECT_LIMIT:
            solution = self._recycled_solve(mix, rhs, current, ridge) if self._factor is not None else None
            if solution is None:
                if self._support_gram is None:
                    # The gram at the support is the same every round; only the PᵀP mask changes.
                    self._support_gram = stats.gram.index_select(0, s_index).index_select(1, s_index)
                normal = mix.index_select(0, q_index).index_select(1, q_index)
                normal.mul_(self._support_gram)
                keep: dict = {}
                base = ridge_scale(normal, ridge)
                solution = solve_spd(normal, rhs, current, ridge, keep=keep if len(q_index) >= RECYCLE_MIN else None)
                self.factored += 1
                self._factor = keep.get("factor")
                self._factor_raise = float(keep.get("scale", base)) / base if base > 0 else 1.0
        else:
            solution = self._conjugate_gradients(mix, rhs, current, ridge)
        count = self.middle * t
        self.depthwise = solution[:count].reshape(c, m, t).contiguous()
        if self.use_depthwise_bias:
            self.depthwise_bias = solution[count:].contiguous()

    def _normal_product(self, mix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """H v for the depthwise normal matrix, without forming H: (PᵀP (V G)) at the support."""
        stats, c, m, t, n = self.stats, self.channels, self.multiplier, self.taps, self.stats.unknowns
        count = self.middle * t
        taps = vector[:count].reshape(c, m, t)
        product = torch.einsum("cjt,ctn->cjn", taps, stats.gram[: self.width].reshape(c, t, n)).reshape(self.middle, n)
        if self.use_depthwise_bias:
            product = product + torch.outer(vector[count:], stats.gram[self.width])
        gathered = product[:, : self.width].reshape(self.middle, c, t)
        result = torch.einsum("cjq,qct->cjt", mix.reshape(c, m, self.middle), gathered).reshape(-1)
        if self.use_depthwise_bias:
            result = torch.cat([result, mix @ product[:, self.width]])
        return result

    def _conjugate_gradients(
        self, mix: torch.Tensor, rhs: torch.Tensor, current: torch.Tensor, ridge: float
    ) -> torch.Tensor:
        """Preconditioned conjugate gradients on ``(H + λI) x = rhs + λ current`` from ``current``.

        Each iterate lowers the quadratic from the warm start, so the loss never rises even if the
        iteration stops early. The preconditioner is H's diagonal blocks, one per middle channel
        (``PᵀP[q,q]`` times the gram at that channel's taps and the ones column), factored at once.
        """
        stats, t = self.stats, self.taps
        q_index, s_index = self._support()
        diagonal = mix.diagonal()[q_index] * stats.gram[s_index, s_index]
        scale = ridge * float(diagonal.mean()) if float(diagonal.mean()) > 0 else 1e-30
        middle = torch.arange(self.middle)
        local = (middle // self.multiplier).unsqueeze(1) * t + torch.arange(t).unsqueeze(0)  # (Cm, T)
        if self.use_depthwise_bias:
            local = torch.cat([local, torch.full((self.middle, 1), self.width, dtype=torch.long)], dim=1)
        blocks = stats.gram[local.unsqueeze(2), local.unsqueeze(1)] * mix.diagonal().reshape(-1, 1, 1)
        blocks = blocks + scale * torch.eye(local.shape[1], dtype=blocks.dtype)
        factor, info = torch.linalg.cholesky_ex(blocks)
        usable = bool((info == 0).all())
        count = self.middle * t

        def to_blocks(vector: torch.Tensor) -> torch.Tensor:
            parts = vector[:count].reshape(self.middle, t)
            if self.use_depthwise_bias:
                parts = torch.cat([parts, vector[count:].unsqueeze(1)], dim=1)
            return parts

        def from_blocks(parts: torch.Tensor) -> torch.Tensor:
            if self.use_depthwise_bias:
                return torch.cat([parts[:, :t].reshape(-1), parts[:, t]])
            return parts.reshape(-1)

        def precondition(vector: torch.Tensor) -> torch.Tensor:
            if not usable:
                return vector
            return from_blocks(torch.cholesky_solve(to_blocks(vector).unsqueeze(2), factor).squeeze(2))

        x, _ = self._preconditioned_cg(mix, rhs, current, scale, precondition, CG_ITERATIONS)
        return x

    def _recycled_solve(
        self, mix: torch.Tensor, rhs: torch.Tensor, current: torch.Tensor, ridge: float
    ) -> torch.Tensor | None:
        """This round's depthwise system by CG preconditioned with the kept factor (None: it did not converge).

        The system is the one the direct solve would factor, ``(H + λI) x = rhs + λ current`` with
        λ the ridge scale of this round's H (H's diagonal is ``PᵀP[q,q] · G[s,s]``, no H formed)
        raised as the kept factor's was; the converged solution agrees with the direct one to
        ``CG_TOLERANCE``. Iterations run the matrix-free product (m n² operations) and two
        triangular solves with the factor.
        """
        factor = self._factor
        assert factor is not None
        q_index, s_index = self._support()
        diagonal = mix.diagonal()[q_index] * self.stats.gram[s_index, s_index]
        scale = ridge_scale_of_diagonal(diagonal, ridge) * self._factor_raise

        def precondition(vector: torch.Tensor) -> torch.Tensor:
            return cholesky_apply(factor, vector.unsqueeze(1)).squeeze(1)

        x, converged = self._preconditioned_cg(mix, rhs, current, scale, precondition, RECYCLE_ITERATIONS)
        if not converged:
            self._factor = None
            return None
        self.recycled += 1
        if self.cg_iterations > RECYCLE_REFRESH:
            self._factor = None  # grown stale: the next round factors its own system
        return x

    def _preconditioned_cg(
        self,
        mix: torch.Tensor,
        rhs: torch.Tensor,
        current: torch.Tensor,
        scale: float,
        precondition: Callable[[torch.Tensor], torch.Tensor],
        iterations: int,
    ) -> tuple[torch.Tensor, bool]:
        """Preconditioned CG on ``(H + scale·I) x = rhs + scale·current`` from ``current``; (x, converged).

        Converged: the relative residual reached ``CG_TOLERANCE`` within ``iterations``. Every
        iterate lowers the quadratic from the warm start.
        """
        right = rhs + scale * current
        x = current.clone()
        residual = right - (self._normal_product(mix, x) + scale * x)
        goal = CG_TOLERANCE * float(right.norm())
        z = precondition(residual)
        direction = z.clone()
        rz = float(residual @ z)
        converged = False
        for done in range(iterations + 1):
            self.cg_iterations = done
            if float(residual.norm()) <= goal:
                converged = True
                break
            if done == iterations:
                break
            applied = self._normal_product(mix, direction) + scale * direction
            curvature = float(direction @ applied)
            if curvature <= 0:
                break
            step = rz / curvature
            x = x + step * direction
            residual = residual - step * applied
            z = precondition(residual)
            rz_next = float(residual @ z)
            direction = z + (rz_next / rz) * direction
            rz = rz_next
        self.cg_residual = float(residual.norm()) / max(float(right.norm()), 1e-300)
        return x, converged

    def write(self, block: nn.Module) -> None:
        depthwise, pointwise = block[0], block[1]  # type: ignore[index]
        assign(depthwise.weight, self.depthwise)
        assign(pointwise.weight, self.pointwise)
        if self.use_depthwise_bias:
            assign(depthwise.bias, self.depthwise_bias)
        if self.use_pointwise_bias:
            assign(pointwise.bias, self.pointwise_bias)


def _line_search(state: _Separable, saved: tuple, loss: float, before: float | None = None) -> float:
    """Extrapolate along the round's step: the exact minimum of the loss on that line, if lower.

    With ``θ(α) = θ₀ + α (θ₁ − θ₀)`` for the state before (θ₀) and after (θ₁) a round, the kernel
    ``P(α) D̂(α)`` is quadratic in α, so the loss is a quartic: five values determine it (two known), its
    minimum over α in [1, 8] is found on a fine grid, polished by Newton steps, and kept only if
    it beats α = 1 (the enhanced line search of alternating least squares for tensor
    decompositions). Returns the loss kept.
    """
    after = state.snapshot()
    steps = [a - b for a, b in zip(after, saved)]

    def place(alpha: float) -> None:
        depthwise, depthwise_bias, pointwise, pointwise_bias = (b + alpha * d for b, d in zip(saved, steps))
        state.restore((depthwise, depthwise_bias, pointwise, pointwise_bias))

    nodes = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    # α = 0 and α = 1 are the states before and after the round, whose losses the caller has
    # (``before``, ``loss``): three more evaluations, each a read of the gram, determine the quartic.
    known = {0.0: before, 1.0: loss}
    values = []
    for alpha in nodes.tolist():
        value = known.get(alpha)
        if value is None:
            place(alpha)
            value = state.loss()
        values.append(value)
    vandermonde = nodes.unsqueeze(1) ** torch.arange(5, dtype=torch.float64)
    coefficients = torch.linalg.solve(vandermonde, torch.tensor(values, dtype=torch.float64))
    grid = torch.linspace(1.0, 8.0, 701, dtype=torch.float64)
    curve = (grid.unsqueeze(1) ** torch.arange(5, dtype=torch.float64)) @ coefficients
    best = float(grid[int(torch.argmin(curve))])
    # Polish the grid point to the quartic's stationary point (Newton on p'): a step length that
    # moves continuously with the statistics, not in grid steps (which would amplify rounding).
    a0, a1, a2, a3, a4 = (float(c) for c in coefficients)
    for _ in range(30):
        slope = a1 + 2 * a2 * best + 3 * a3 * best**2 + 4 * a4 * best**3
        bend = 2 * a2 + 6 * a3 * best + 12 * a4 * best**2
        if bend <= 0:
            break
        best = min(max(best - slope / bend, 1.0), 8.0)
    if best > 1.0:
        place(best)
        extrapolated = state.loss()  # measured, not the polynomial's value
        if extrapolated < loss:
            return extrapolated
    state.restore(after)
    return loss


@register_solver(_SeparableConvNd)
def solve_separable(
    block: nn.Module, stats: LayerStatistics, ridge: float, rounds: int, holdout: LayerStatistics | None = None
) -> tuple[str, list[float]] | None:
    """Alternating least squares (pointwise, then depthwise, per round) from the current weights.

    With ``holdout`` (the layer's held-out statistics) the rounds also stop once the held-out loss
    has not fallen by ``HOLDOUT_TOLERANCE`` of its best for ``HOLDOUT_PATIENCE`` rounds, and the
    block keeps the round where the held-out loss was lowest (early stopping: later rounds only
    fit the fit split's own noise).
    """
    state = _state(block, stats)
    if state is None:
        return None
    losses: list[float] = []
    previous = state.loss()
    start = "the transfer"
    if WHITENED_START:
        previous, start = choose_start(state, previous, ridge)
        if start != "the transfer":
            losses.append(previous)  # the start is a step of its own: the history stays monotone
    initial = previous
    watched = holdout is not None and holdout.rows > 0
    best_held = state.loss(holdout) if watched else 0.0
    best_at, best_state = len(losses), state.snapshot()
    stopped, waited = "", 0
    for _ in range(max(int(rounds), 1)):
        saved = state.snapshot()
        state.solve_pointwise(ridge)
        state.solve_depthwise(ridge)
        loss = state.loss()
        if EXTRAPOLATE and loss <= previous:
            loss = _line_search(state, saved, loss, previous)
        if loss > previous:
            # Each step minimizes the loss plus a proximal term that is zero at the current value,
            # so a rise can only be rounding at the optimum: keep the previous round and stop.
            state.restore(saved)
            break
        losses.append(loss)
        if watched:
            held = state.loss(holdout)
            waited = 0 if held < best_held * (1 - HOLDOUT_TOLERANCE) else waited + 1
            if held < best_held:
                best_held, best_at = held, len(losses)
                best_state = state.snapshot()
            if waited >= HOLDOUT_PATIENCE:
                stopped = ", stopped on the held-out loss"
                break
        if previous - loss <= TOLERANCE * max(previous, 1e-300):
            break
        previous = loss
    if watched and best_at < len(losses):
        # Back to the round with the lowest held-out loss (its fit loss is in the history).
        state.restore(best_state)
        del losses[best_at:]
    rounds_run = len(losses) - (start != "the transfer")
    if not losses:
        losses.append(initial)
    state.balance()
    state.write(block)
    return f"alternating least squares from {start} ({rounds_run} rounds{stopped})", losses


def _state(block: nn.Module, stats: LayerStatistics) -> _Separable | None:
    """The alternation's state for ``block``, or None when the block or the statistics do not fit it."""
    depthwise, pointwise = block[0], block[1]  # type: ignore[index]
    if not (is_plain(depthwise) and is_plain(pointwise)):
        return None
    if int(depthwise.groups) != int(depthwise.in_channels) or int(pointwise.groups) != 1:
        return None
    state = _Separable(block, stats)
    if stats.unknowns != state.width + (1 if stats.with_ones else 0) or stats.outputs != state.out:
        return None
    return state


def start_then_pointwise(
    block: nn.Module,
    stats: LayerStatistics,
    ridge: float,
    *,
    factored: dict | None = None,
    holdout: LayerStatistics | None = None,
) -> tuple[torch.Tensor, float | None] | None:
    """The solver's start (``choose_start``) then one exact pointwise solve, no depthwise step;
    the block is set to it; (its (out, n) kernel, its squared error on ``holdout`` or None), or
    None when there is no path for this block.

    What the planner scores a separable candidate by: an upper bound of the fitted error (the
    alternation only lowers it) for the cost of one Cholesky of the gram, shared between the
    candidates of one layer through ``factored`` (``_Separable.whitened_start``). The held-out
    error comes from the middle features' statistics (``m n²``), not from the dense kernel (``out n²``).
    """
    state = _state(block, stats)
    if state is None:
        return None
    loss, _ = choose_start(state, state.loss(), ridge, factored)
    saved = state.snapshot()
    state.solve_pointwise(ridge)
    if not state.loss() <= loss:
        state.restore(saved)
    state.write(block)
    return state.kernel(), (state.loss(holdout) if holdout is not None else None)


def choose_start(state: _Separable, transfer: float, ridge: float, factored: dict | None = None) -> tuple[float, str]:
    """Replace ``state`` by its whitened start when that is lower; (loss kept, which start).

    Both losses are exact (from the statistics). The whitened start must win by more than
    rounding (a relative 1e-9 and 1e-12 of the energy), so that a transfer that is already
    optimal stays exactly where it is; a transfer with no error skips the solve altogether.
    """
    energy = float(state.stats.energy.sum())
    slack = 1e-12 * max(energy, 1e-300)
    if transfer <= slack:
        return transfer, "the transfer"
    saved = state.snapshot()
    state.whitened_start(ridge, factored)
    whitened = state.loss()
    if whitened < transfer * (1 - 1e-9) - slack:
        return whitened, "the whitened start"
    state.restore(saved)
    return transfer, "the transfer"


__all__ = [
    "CG_ITERATIONS",
    "CG_TOLERANCE",
    "DIRECT_LIMIT",
    "EXTRAPOLATE",
    "HOLDOUT_PATIENCE",
    "HOLDOUT_TOLERANCE",
    "RECYCLE_ITERATIONS",
    "RECYCLE_MIN",
    "TOLERANCE",
    "WHITENED_START",
    "choose_start",
    "solve_separable",
    "start_then_pointwise",
]
