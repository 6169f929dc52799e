"""What planning costs, against one forward pass of the original over the calibration set.

For the trained digits CNN of ``bench_recovery.py`` (its 1,437 unlabeled training images) and the
CRNN sample (``sample_models/crnn.py``, seeded random weights, 64 seeded random 1x32x100 inputs,
as in the README's ``params=0.25x`` transcript): one forward pass of the original over the
calibration set (seconds, batches of 32), then ``convrewrite.plan(..., budget={"params": 0.25})``
with the plan's own timings (statistics, sensitivity, scoring, allocation), the total, and the
total in forward passes.

``--reference``: also score every candidate of every layer with the independent per-candidate
solve (``candidate_error``: one ``solve_from_statistics`` each, 3 alternating rounds, what the
planner did before the shared factorizations) on the same statistics, and print per rule the
time of both, the largest relative difference of the scores, and the Spearman rank correlation of
the scores of each layer's candidates (the ranking the allocation sees).

One torch thread; the machine is shared, so times are indicative.

    OMP_NUM_THREADS=1 python benchmarks/bench_plan_cost.py [--model digits,crnn] [--reference]
"""

from __future__ import annotations

import argparse
import collections
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_plan import spearman  # noqa: E402
from bench_recovery import tasks, trained_model  # noqa: E402

import convrewrite  # noqa: E402
from convrewrite.core.loading import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def models(names: set[str], args: argparse.Namespace) -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    found = []
    if "digits" in names:
        work = Path(tempfile.mkdtemp(prefix="bench-plan-cost-"))
        task = tasks({"digits"}, work)[0]
        model, _ = trained_model(task, 30, args.cache)
        found.append(("digits CNN (trained)", model.eval(), task.train_x))
    if "crnn" in names:
        torch.manual_seed(0)
        model = load_model(str(ROOT / "sample_models" / "crnn.py")).model.eval()
        data = torch.randn(64, 1, 32, 100, generator=torch.Generator().manual_seed(0))
        found.append(("CRNN sample (random weights)", model, data))
    return found


def forward_seconds(model: torch.nn.Module, data: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(data), 32):
            model(data[i : i + 32])
    return time.perf_counter() - start


def reference(model: torch.nn.Module, data: torch.Tensor) -> None:
    """Shared-factorization scores against the independent per-candidate solves (module doc)."""
    import convrewrite.api as api
    from convrewrite.planning import scoring
    from convrewrite.planning.budgets import parse_budgets
    from convrewrite.planning.planner import prepare_plan

    loaded = api._loaded(model, data[:1], copy_module=True, caller="bench")
    source = api._calibration(data, loaded, 0.1, None)
    setup = prepare_plan(loaded, parse_budgets(["params=0.25x"]))
    layers = [layer for layer in setup.layers if layer.protected is None]
    names = [layer.site.name for layer in layers]
    statistics = scoring.collect(loaded.model, names, source, device=torch.device("cpu"))
    seconds: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    difference: dict[str, float] = collections.defaultdict(float)
    rhos = []
    for layer in layers:
        stats = statistics[layer.site.name]
        scorer = scoring.LayerScorer(layer.site.module, stats)
        shared, independent = [], []
        for option in layer.options[1:]:
            assert option.rule is not None
            block = option.rule.build(layer.site).module.to(dtype=torch.float64)
            began = time.perf_counter()
            fast, _ = scorer.score(copy.deepcopy(block))
            seconds[option.rule.name][0] += time.perf_counter() - began
            began = time.perf_counter()
            slow, _ = scoring.candidate_error(block, layer.site.module, stats)
            seconds[option.rule.name][1] += time.perf_counter() - began
            shared.append(fast)
            independent.append(slow)
            difference[option.rule.name] = max(difference[option.rule.name], abs(fast - slow) / max(slow, 1e-300))
        if len(shared) > 2:
            rho = spearman(shared, independent)
            rhos.append(rho)
            print(f"  {layer.site.name}: {len(shared)} candidates, Spearman rho of the scores {rho:.3f}")
    print("  | rule | shared scoring (s) | independent solves (s) | largest relative score difference |")
    print("  |---|---:|---:|---:|")
    for rule, (fast_s, slow_s) in seconds.items():
        print(f"  | {rule} | {fast_s:.2f} | {slow_s:.2f} | {difference[rule]:.2e} |")
    if rhos:
        print(f"  mean Spearman rho over layers: {sum(rhos) / len(rhos):.3f} (lowest {min(rhos):.3f})")


def one(name: str, model: torch.nn.Module, data: torch.Tensor, args: argparse.Namespace) -> Any:
    forward = forward_seconds(model, data)
    began = time.perf_counter()
    plan = convrewrite.plan(model, data=data, budget={"params": 0.25}, example_inputs=data[:1], device="cpu")
    total = time.perf_counter() - began
    parts = {k: plan.seconds.get(k, 0.0) for k in ("statistics", "sensitivity", "scoring", "allocation")}
    print(f"\n## {name}: {len(data):,} calibration samples, plan params=0.25x")
    print(
        "| forward pass (s) | statistics (s) | sensitivity (s) | scoring (s) | allocation (s) | total (s) "
        "| total / forward |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {forward:.2f} | {parts['statistics']:.2f} | {parts['sensitivity']:.2f} | {parts['scoring']:.2f} | "
        f"{parts['allocation']:.3f} | {total:.2f} | {total / forward:.1f} |"
    )
    chosen = ", ".join(f"{layer.name}={layer.chosen.spec}" for layer in plan.layers)
    print(f"plan: {chosen}; predicted error {plan.predicted_error:.4f}")
    if args.reference:
        reference(model, data)
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits,crnn")
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "convrewrite-bench-cache")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("bench_plan_cost: one torch thread on a shared 2-core machine (times are indicative)")
    for name, model, data in models(set(args.model.split(",")) - {""}, args):
        one(name, model, data, args)


if __name__ == "__main__":
    main()
