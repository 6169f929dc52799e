"""Choose one option per layer under several budgets: a multiple-choice knapsack.

Every layer offers options, each with a cost per budgeted metric (params, MACs, milliseconds) and
a loss (the sensitivity-weighted predicted error it adds to the model's output). The problem is
``min Σ loss`` subject to ``Σ cost_k <= limit_k`` for every budget ``k``, one option per layer.

How it is solved (no torch here; plain floats):

1. **Lagrangian sweep.** The budgets are folded into one scalar cost, ``Σ_k cost_k / limit_k``.
   For a multiplier ``λ >= 0`` each layer independently minimises ``loss + λ·cost``, and only the
   options on the lower convex hull of its (cost, loss) points can win. Walking every layer's hull
   steps in order of their exchange rate (loss added per unit of cost saved) visits every
   Lagrangian solution from "keep everything" (λ = 0) to "cheapest everywhere": that sequence is
   the explored front, and its first point inside every budget is the Lagrangian choice.
2. **Greedy repair.** The Lagrangian choice usually leaves budget unused (it is a hull vertex),
   and with several budgets it may miss one. Repair first buys feasibility (the move that removes
   the most violation per unit of loss added) and then spends the slack (the move with the best
   loss saved per unit of cost added that keeps every budget), over all options, not only the hull.
3. **Branch and bound** from that incumbent, with the Lagrangian dual as the lower bound
   (``Σ_j min_o (loss + λ·cost) − λ·(remaining budget)`` for the sweep's λ, and ``Σ_j min loss``)
   and the cheapest completion per budget as the feasibility cut. Within ``node_limit`` nodes it
   proves the choice optimal (``Allocation.optimal``); past it the repaired choice stands and the
   allocation says it is not proven.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class Choice(Protocol):
    """What the knapsack reads from an option: its costs per metric and its loss."""

    @property
    def costs(self) -> Mapping[str, float]: ...

    @property
    def loss(self) -> float: ...


@dataclass(frozen=True)
class SimpleChoice:
    """A plain option (tests, and callers without richer objects)."""

    costs: Mapping[str, float]
    loss: float


@dataclass(frozen=True)
class FrontPoint:
    """One Lagrangian solution of the sweep: its totals per metric and its loss."""

    costs: dict[str, float]
    loss: float
    picks: tuple[int, ...]


@dataclass
class Allocation:
    """The chosen option index per layer, its totals, and how the choice was reached."""

    picks: tuple[int, ...]
    costs: dict[str, float]
    loss: float
    feasible: bool
    optimal: bool
    front: list[FrontPoint] = field(default_factory=list)
    nodes: int = 0


class Infeasible(ValueError):
    """No choice meets every budget; ``smallest`` is the least total reachable per metric."""

    def __init__(self, metric: str, limit: float, smallest: float, smallest_all: dict[str, float]) -> None:
        super().__init__(f"{metric} budget {limit:g} is below the smallest reachable {smallest:g}")
        self.metric = metric
        self.limit = limit
        self.smallest = smallest
        self.smallest_all = smallest_all


def totals(choices: Sequence[Sequence[Choice]], picks: Sequence[int], metrics: Sequence[str]) -> dict[str, float]:
    return {k: sum(float(choices[i][p].costs[k]) for i, p in enumerate(picks)) for k in metrics}


def _loss(choices: Sequence[Sequence[Choice]], picks: Sequence[int]) -> float:
    return sum(float(choices[i][p].loss) for i, p in enumerate(picks))


def smallest_reachable(choices: Sequence[Sequence[Choice]], metric: str) -> float:
    """The least total of ``metric`` any choice reaches (every layer at its cheapest)."""
    return sum(min(float(option.costs[metric]) for option in layer) for layer in choices)


def _hull(points: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Lower convex hull of (cost, loss, index), from the least loss (largest cost) to the least cost."""
    best: dict[float, tuple[float, float, int]] = {}
    for cost, loss, index in points:
        if cost not in best or loss < best[cost][1]:
            best[cost] = (cost, loss, index)
    ordered = sorted(best.values(), key=lambda p: (-p[0], p[1]))  # descending cost
    # Drop dominated points: going to lower cost, loss must rise.
    frontier: list[tuple[float, float, int]] = []
    for point in ordered:
        if frontier and point[1] <= frontier[-1][1]:
            # cheaper and no worse: the previous (costlier) point is dominated
            while frontier and point[1] <= frontier[-1][1]:
                frontier.pop()
        frontier.append(point)
    # Convexity: the exchange rate (loss added per cost saved) must rise along the walk.
    hull: list[tuple[float, float, int]] = []
    for point in frontier:
        while len(hull) >= 2:
            (c1, l1, _), (c2, l2, _) = hull[-2], hull[-1]
            rate_prev = (l2 - l1) / (c1 - c2)
            rate_new = (point[1] - l2) / (c2 - point[0])
            if rate_new <= rate_prev:
                hull.pop()
            else:
                break
        hull.append(point)
    return hull


def _within(costs: Mapping[str, float], limits: Mapping[str, float], slack: float = 1e-9) -> bool:
    return all(costs[k] <= limits[k] * (1 + slack) + slack for k in limits)


def allocate(
    choices: Sequence[Sequence[Choice]],
    limits: Mapping[str, float],
    *,
    node_limit: int = 200_000,
) -> Allocation:
    """The least-loss option per layer with every budget in ``limits`` met (see the module doc).

    ``limits`` maps a metric to the most its total over the layers may be. Raises ``Infeasible``
    when one budget is below the smallest total its metric can reach.
    """
    metrics = list(limits)
    if not choices:
        return Allocation((), dict.fromkeys(metrics, 0.0), 0.0, True, True)
    smallest = {k: smallest_reachable(choices, k) for k in metrics}
    for k in metrics:
        if smallest[k] > limits[k] * (1 + 1e-9) + 1e-9:
            raise Infeasible(k, limits[k], smallest[k], smallest)
    scale = {k: 1.0 / max(limits[k], 1e-12) for k in metrics}

    def scalar(option: Choice) -> float:
        return sum(float(option.costs[k]) * scale[k] for k in metrics)

    # 1. the sweep over the hulls
    steps: list[tuple[float, int, int]] = []  # (rate, layer, option index after the step)
    picks = []
    for layer_index, layer in enumerate(choices):
        hull = _hull([(scalar(option), float(option.loss), i) for i, option in enumerate(layer)])
        picks.append(hull[0][2])
        for (c1, l1, _), (c2, l2, i2) in zip(hull, hull[1:]):
            steps.append(((l2 - l1) / (c1 - c2), layer_index, i2))
    steps.sort(key=lambda s: (s[0], s[1]))
    current = list(picks)
    front = [FrontPoint(totals(choices, current, metrics), _loss(choices, current), tuple(current))]
    chosen: list[int] | None = list(current) if _within(front[0].costs, limits) else None
    rate_at_choice = 0.0
    for rate, layer_index, option_index in steps:
        current[layer_index] = option_index
        point = FrontPoint(totals(choices, current, metrics), _loss(choices, current), tuple(current))
        front.append(point)
        if chosen is None and _within(point.costs, limits):
            chosen, rate_at_choice = list(current), rate
    if chosen is None:
        chosen = list(current)  # the cheapest hull point; repair buys what remains

    # 2. greedy repair
    chosen = _repair(choices, chosen, limits, metrics, scale)
    cost_now = totals(choices, chosen, metrics)
    feasible = _within(cost_now, limits)

    # 3. branch and bound from the repaired incumbent
    lambdas = sorted({0.0, rate_at_choice, *(s[0] for s in steps[:: max(1, len(steps) // 8)])})
    best, optimal, nodes = _branch_and_bound(
        choices, chosen if feasible else None, limits, metrics, scale, lambdas, node_limit
    )
    if best is not None:
        chosen = best
        feasible = True
    cost_now = totals(choices, chosen, metrics)
    return Allocation(tuple(chosen), cost_now, _loss(choices, chosen), feasible, optimal and feasible, front, nodes)


def _violation(costs: Mapping[str, float], limits: Mapping[str, float], scale: Mapping[str, float]) -> float:
    return sum(max(0.0, costs[k] - limits[k]) * scale[k] for k in limits)


def _repair(
    choices: Sequence[Sequence[Choice]],
    picks: list[int],
    limits: Mapping[str, float],
    metrics: list[str],
    scale: Mapping[str, float],
) -> list[int]:
    picks = list(picks)
    costs = totals(choices, picks, metrics)
    # buy feasibility
    for _ in range(10 * sum(len(layer) for layer in choices)):
        violation = _violation(costs, limits, scale)
        if violation <= 1e-12:
            break
        best: tuple[float, int, int] | None = None
        for i, layer in enumerate(choices):
            here = layer[picks[i]]
            for j, option in enumerate(layer):
                if j == picks[i]:
                    continue
                moved = {k: costs[k] - float(here.costs[k]) + float(option.costs[k]) for k in metrics}
                gain = violation - _violation(moved, limits, scale)
                if gain <= 1e-15:
                    continue
                added = max(float(option.loss) - float(here.loss), 0.0)
                score = added / gain
                if best is None or score < best[0]:
                    best = (score, i, j)
        if best is None:
            break
        _, i, j = best
        for k in metrics:
            costs[k] += float(choices[i][j].costs[k]) - float(choices[i][picks[i]].costs[k])
        picks[i] = j
    if _violation(costs, limits, scale) > 1e-12:
        return picks
    # spend the slack
    while True:
        best = None
        for i, layer in enumerate(choices):
            here = layer[picks[i]]
            for j, option in enumerate(layer):
                saved = float(here.loss) - float(option.loss)
                if j == picks[i] or saved <= 1e-15:
                    continue
                moved = {k: costs[k] - float(here.costs[k]) + float(option.costs[k]) for k in metrics}
                if not _within(moved, limits):
                    continue
                added = max(sum((moved[k] - costs[k]) * scale[k] for k in metrics), 1e-15)
                score = saved / added
                if best is None or score > best[0]:
                    best = (score, i, j)
        if best is None:
            return picks
        _, i, j = best
        for k in metrics:
            costs[k] += float(choices[i][j].costs[k]) - float(choices[i][picks[i]].costs[k])
        picks[i] = j


def _branch_and_bound(
    choices: Sequence[Sequence[Choice]],
    incumbent: list[int] | None,
    limits: Mapping[str, float],
    metrics: list[str],
    scale: Mapping[str, float],
    lambdas: list[float],
    node_limit: int,
) -> tuple[list[int] | None, bool, int]:
    """Depth-first search with Lagrangian bounds; (best, proven optimal, nodes visited)."""
    count = len(choices)
    # Layers with the widest loss range first: their choice moves the bound the most.
    order = sorted(range(count), key=lambda i: -(max(o.loss for o in choices[i]) - min(o.loss for o in choices[i])))
    layers = [choices[i] for i in order]
    cost_of = [[[float(o.costs[k]) for k in metrics] for o in layer] for layer in layers]
    loss_of = [[float(o.loss) for o in layer] for layer in layers]
    scalar_of = [[sum(c[m] * scale[k] for m, k in enumerate(metrics)) for c in layer] for layer in cost_of]
    limit = [float(limits[k]) * (1 + 1e-9) + 1e-9 for k in metrics]
    suffix_min_cost = [[0.0] * len(metrics) for _ in range(count + 1)]
    for d in range(count - 1, -1, -1):
        for m in range(len(metrics)):
            suffix_min_cost[d][m] = suffix_min_cost[d + 1][m] + min(c[m] for c in cost_of[d])
    suffix_dual = [[0.0] * len(lambdas) for _ in range(count + 1)]
    for d in range(count - 1, -1, -1):
        for q, lam in enumerate(lambdas):
            suffix_dual[d][q] = suffix_dual[d + 1][q] + min(
                loss_of[d][o] + lam * scalar_of[d][o] for o in range(len(loss_of[d]))
            )
    best_loss = math.inf
    best: list[int] | None = None
    if incumbent is not None:
        best = [incumbent[i] for i in order]
        best_loss = sum(loss_of[d][best[d]] for d in range(count))
    nodes = 0
    exhausted = True
    picks = [0] * count
    used = [0.0] * len(metrics)
    option_order = [sorted(range(len(layer)), key=lambda o: loss_of[d][o]) for d, layer in enumerate(layers)]

    def bound(depth: int, loss: float) -> float:
        remaining = sum((limit[m] - used[m]) * scale[k] for m, k in enumerate(metrics))
        return loss + max(suffix_dual[depth][q] - lam * remaining for q, lam in enumerate(lambdas))

    def search(depth: int, loss: float) -> None:
        nonlocal nodes, exhausted, best_loss, best
        if nodes >= node_limit:
            exhausted = False
            return
        nodes += 1
        if depth == count:
            if loss < best_loss - 1e-15:
                best_loss, best = loss, list(picks)
            return
        if bound(depth, loss) >= best_loss - 1e-15:
            return
        for o in option_order[depth]:
            cost = cost_of[depth][o]
            if any(used[m] + cost[m] + suffix_min_cost[depth + 1][m] > limit[m] for m in range(len(metrics))):
                continue
            for m in range(len(metrics)):
                used[m] += cost[m]
            picks[depth] = o
            search(depth + 1, loss + loss_of[depth][o])
            for m in range(len(metrics)):
                used[m] -= cost[m]
            if nodes >= node_limit:
                exhausted = False
                return

    search(0, 0.0)
    if best is None:
        return None, exhausted, nodes
    unordered = [0] * count
    for d, i in enumerate(order):
        unordered[i] = best[d]
    return unordered, exhausted, nodes


__all__ = ["Allocation", "Choice", "FrontPoint", "Infeasible", "SimpleChoice", "allocate", "smallest_reachable"]
