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
  Kronecker product of the full gram.

Each step minimizes the loss plus a proximal ridge towards the current value, so the loss never
increases from one step to the next. The first round starts from the block's current (transferred)
weights; the solver stops after ``rounds`` rounds or when a round improves the loss by less than
1e-9 of it. Cost per round: a Cholesky of size CmT (+ Cm) (4,608 for 512 channels x 3x3, about
2 s on one core) and one of size Cm + 1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from convrewrite.layers.separable import _SeparableConvNd
from convrewrite.recovery.solvers.base import assign, register_solver, solve_spd
from convrewrite.recovery.solvers.dense import is_plain
from convrewrite.recovery.statistics import LayerStatistics

#: A round that improves the loss by less than this fraction of it ends the alternation.
TOLERANCE = 1e-9


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
        self.depthwise = depthwise.weight.detach().to("cpu", torch.float64).reshape(self.channels, self.multiplier, self.taps)
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

    def loss(self) -> float:
        return self.stats.squared_error(self.kernel())

    def solve_pointwise(self, ridge: float) -> None:
        """P (and its bias) given D̂: least squares on the middle features' statistics."""
        stats, c, t, n = self.stats, self.channels, self.taps, self.stats.unknowns
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
        if self.use_pointwise_bias:
            ones_row = torch.cat([dg[:, self.width], stats.gram[self.width, self.width].reshape(1)])
            middle_gram = torch.cat(
                [torch.cat([middle_gram, dg[:, self.width : self.width + 1]], dim=1), ones_row.unsqueeze(0)]
            )
            middle_cross = torch.cat([middle_cross, stats.cross[self.width].unsqueeze(0)])
            start = torch.cat([self.pointwise, self.pointwise_bias.unsqueeze(1)], dim=1).t()
        else:
            start = self.pointwise.t()
        middle_gram = (middle_gram + middle_gram.t()) / 2
        solution = solve_spd(middle_gram, middle_cross, start, ridge).t()
        self.pointwise = solution[:, : self.middle].contiguous()
        if self.use_pointwise_bias:
            self.pointwise_bias = solution[:, self.middle].contiguous()

    def solve_depthwise(self, ridge: float) -> None:
        """D̂ given P (the pointwise bias held): the gram at D's support masked by PᵀP."""
        stats, c, m, t = self.stats, self.channels, self.multiplier, self.taps
        middle = torch.arange(self.middle)
        # Unknown e = (q, tap): middle channel q, patch entry s = channel(q)·T + tap.
        q_index = middle.repeat_interleave(t)
        s_index = (middle // m).repeat_interleave(t) * t + torch.arange(t).repeat(self.middle)
        if self.use_depthwise_bias:
            q_index = torch.cat([q_index, middle])
            s_index = torch.cat([s_index, torch.full((self.middle,), self.width, dtype=torch.long)])
        mix = self.pointwise.t() @ self.pointwise  # PᵀP (Cm, Cm)
        gram_rows = stats.gram.index_select(0, s_index)
        normal = gram_rows.index_select(1, s_index)
        del gram_rows
        mix_rows = mix.index_select(0, q_index)
        normal.mul_(mix_rows.index_select(1, q_index))
        del mix_rows
        # Right-hand side: (Pᵀ (Cᵀ - bp e₁ᵀ G))[q, s] at the support.
        target = self.pointwise.t() @ stats.cross.t()  # (Cm, n)
        if self.use_pointwise_bias:
            target = target - torch.outer(self.pointwise.t() @ self.pointwise_bias, stats.gram[self.width])
        rhs = target[q_index, s_index]
        current = self.depthwise.reshape(-1)
        if self.use_depthwise_bias:
            current = torch.cat([current, self.depthwise_bias])
        solution = solve_spd(normal, rhs, current, ridge)
        count = self.middle * t
        self.depthwise = solution[:count].reshape(c, m, t).contiguous()
        if self.use_depthwise_bias:
            self.depthwise_bias = solution[count:].contiguous()

    def write(self, block: nn.Module) -> None:
        depthwise, pointwise = block[0], block[1]  # type: ignore[index]
        assign(depthwise.weight, self.depthwise)
        assign(pointwise.weight, self.pointwise)
        if self.use_depthwise_bias:
            assign(depthwise.bias, self.depthwise_bias)
        if self.use_pointwise_bias:
            assign(pointwise.bias, self.pointwise_bias)


@register_solver(_SeparableConvNd)
def solve_separable(
    block: nn.Module, stats: LayerStatistics, ridge: float, rounds: int
) -> tuple[str, list[float]] | None:
    """Alternating least squares (pointwise, then depthwise, per round) from the current weights."""
    depthwise, pointwise = block[0], block[1]  # type: ignore[index]
    if not (is_plain(depthwise) and is_plain(pointwise)):
        return None
    if int(depthwise.groups) != int(depthwise.in_channels) or int(pointwise.groups) != 1:
        return None
    state = _Separable(block, stats)
    if stats.unknowns != state.width + (1 if stats.with_ones else 0) or stats.outputs != state.out:
        return None
    losses: list[float] = []
    previous = state.loss()
    for _ in range(max(int(rounds), 1)):
        saved = (state.depthwise, state.depthwise_bias, state.pointwise, state.pointwise_bias)
        state.solve_pointwise(ridge)
        state.solve_depthwise(ridge)
        loss = state.loss()
        if loss > previous:
            # Each step minimizes the loss plus a proximal term that is zero at the current value,
            # so a rise can only be rounding at the optimum: keep the previous round and stop.
            state.depthwise, state.depthwise_bias, state.pointwise, state.pointwise_bias = saved
            break
        losses.append(loss)
        if previous - loss <= TOLERANCE * max(previous, 1e-300):
            break
        previous = loss
    if not losses:
        losses.append(previous)
    state.write(block)
    return f"alternating least squares ({len(losses)} rounds)", losses


__all__ = ["TOLERANCE", "solve_separable"]
