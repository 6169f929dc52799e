"""The knapsack of ``convrewrite plan``: every budget holds, and on small cases it is optimal.

The oracle is brute force over every combination of options (``itertools.product``).
"""

from __future__ import annotations

import itertools
import random

import pytest

from convrewrite.planning.allocate import Infeasible, SimpleChoice, allocate, smallest_reachable


def _random_case(seed: int, layers: int, options: int, metrics: tuple[str, ...]) -> list[list[SimpleChoice]]:
    rng = random.Random(seed)
    table = []
    for _ in range(layers):
        full = {k: rng.uniform(50, 200) for k in metrics}
        layer = [SimpleChoice(full, 0.0)]  # "keep": full cost, no loss
        for _ in range(options - 1):
            layer.append(SimpleChoice({k: full[k] * rng.uniform(0.05, 0.9) for k in metrics}, rng.uniform(0.0, 1.0)))
        table.append(layer)
    return table


def _brute_force(table, limits):
    best = None
    for picks in itertools.product(*(range(len(layer)) for layer in table)):
        costs = {k: sum(table[i][p].costs[k] for i, p in enumerate(picks)) for k in limits}
        if any(costs[k] > limits[k] for k in limits):
            continue
        loss = sum(table[i][p].loss for i, p in enumerate(picks))
        if best is None or loss < best:
            best = loss
    return best


@pytest.mark.parametrize("metrics", [("params",), ("params", "macs")])
@pytest.mark.parametrize("seed", range(25))
def test_optimal_and_within_every_budget_on_enumerable_cases(seed, metrics):
    table = _random_case(seed, layers=4, options=5, metrics=metrics)
    rng = random.Random(1000 + seed)
    full = {k: sum(layer[0].costs[k] for layer in table) for k in metrics}
    limits = {k: full[k] * rng.uniform(0.3, 0.8) for k in metrics}
    expected = _brute_force(table, limits)
    if expected is None:
        with pytest.raises(Infeasible):
            allocate(table, limits)
        return
    result = allocate(table, limits)
    assert result.feasible and result.optimal
    for k in metrics:
        assert result.costs[k] <= limits[k] + 1e-6
    assert result.loss == pytest.approx(expected, abs=1e-12)


def test_repair_alone_meets_every_budget_when_the_search_is_cut_short():
    table = _random_case(7, layers=12, options=6, metrics=("params", "macs"))
    full = {k: sum(layer[0].costs[k] for layer in table) for k in ("params", "macs")}
    limits = {"params": 0.4 * full["params"], "macs": 0.5 * full["macs"]}
    result = allocate(table, limits, node_limit=1)
    assert result.feasible and not result.optimal
    assert all(result.costs[k] <= limits[k] + 1e-6 for k in limits)


def test_front_is_monotone_cost_down_loss_up():
    table = _random_case(3, layers=6, options=6, metrics=("params",))
    full = sum(layer[0].costs["params"] for layer in table)
    result = allocate(table, {"params": 0.5 * full})
    costs = [p.costs["params"] for p in result.front]
    losses = [p.loss for p in result.front]
    assert costs[0] == pytest.approx(full) and losses[0] == 0.0
    assert all(b <= a + 1e-9 for a, b in zip(costs, costs[1:]))
    assert all(b >= a - 1e-12 for a, b in zip(losses, losses[1:]))
    assert costs[-1] == pytest.approx(smallest_reachable(table, "params"))


def test_budget_below_every_choice_is_infeasible_with_the_smallest_figure():
    table = [[SimpleChoice({"params": 100}, 0.0), SimpleChoice({"params": 30}, 0.5)] for _ in range(3)]
    with pytest.raises(Infeasible) as caught:
        allocate(table, {"params": 80})
    assert caught.value.smallest == 90
    assert caught.value.metric == "params"
