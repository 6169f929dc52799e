"""Plan to a budget on trained models: the planned model against every single-rule rewrite.

Models and data are those of ``bench_recovery.py`` (trained once, cached; the tool sees only the
unlabeled training inputs, the labelled test split measures accuracy): the digits CNN, the
BatchNorm TDNN on tones, and ``sample_models/tdnn.py`` on chirps; and with ``--model crnn`` the
trained CRNN with a BiLSTM head of ``bench_fit_crnn.py`` (1,024 unlabeled strips of seed 3 to plan
and fit on, whole-sequence accuracy on 512 labelled strips of seed 1).

For each model and each single rule (``separable``, ``group-shuffle``, ``log-group``,
``low-rank``, default options, on every layer the rule takes):
- the single-rule rewrite, fitted (``convrewrite.rewrite(..., fit=True)``, closed-form
  statistics fit, no gradient steps), its parameter count P, test accuracy and held-out relative
  output error;
- ``convrewrite.plan(..., budget={"params": f"{P}"})`` at that exact parameter count, applied
  and fitted the same way, its accuracy and error;
- with ``--distill N``: both of the above then distilled for N steps.

Then the ranking check: random plans sampled from the planner's own scored candidate table (one
option per layer, uniformly), each applied and fitted; Spearman rank correlation of the
predicted squared output error against the measured held-out squared output error, for the
Hutchinson-weighted prediction and for the unweighted one (every layer weight 1), so the table
says whether the sensitivity weighting helps.

Planning cost: the plan's own timings (statistics, sensitivity, scoring, allocation) against one
forward pass of the original over the calibration set.

One torch thread; the machine is shared, so times are indicative.

    OMP_NUM_THREADS=1 python benchmarks/bench_plan.py [--model digits,tdnn,tdnn-chirps]
        [--distill 0] [--samples 12]
    OMP_NUM_THREADS=1 python benchmarks/bench_plan.py --model crnn --samples 0
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_recovery import Task, tasks, trained_model  # noqa: E402
from bench_trained_digits import accuracy  # noqa: E402

import convrewrite  # noqa: E402
from convrewrite.rules.api import make_rule  # noqa: E402

SINGLE_RULES = ["separable", "group-shuffle", "log-group", "low-rank"]


def output_error(reference: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        a, b = reference(x), model(x)
    return float((a - b).norm() / a.norm())


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        for rank, i in enumerate(order):
            result[i] = float(rank)
        return result

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    mean = (n - 1) / 2
    cov = sum((x - mean) * (y - mean) for x, y in zip(ra, rb))
    var = sum((x - mean) ** 2 for x in ra)
    return cov / var if var else float("nan")


def apply_rules(original: torch.nn.Module, rules: list[Any], task: Task, distill: int) -> torch.nn.Module:
    result = convrewrite.rewrite(
        original,
        rules,
        example_inputs=task.train_x[:1],
        data=task.train_x,
        device="cpu",
        fit=True,
        fit_steps=0,
        distill=distill,
    )
    return result.model.eval()


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def crnn_task() -> Task:
    """The trained CRNN of ``bench_fit_crnn.py``: its strips as a ``Task`` (labels are digit sequences)."""
    from bench_fit_crnn import make_strips

    strips, labels = make_strips(1024, seed=3)
    test_x, test_y = make_strips(512, seed=1)
    return Task("crnn", Path("sample_models/crnn_bilstm/model.py"), strips, labels, test_x, test_y, [])


def original_model(task: Task, args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    if task.name == "crnn":
        from bench_fit_crnn import trained

        return trained()
    return trained_model(task, args.epochs, args.cache)


def task_accuracy(task: Task, model: torch.nn.Module) -> float:
    """Test accuracy: class accuracy, or the CRNN's whole-sequence accuracy."""
    if task.name == "crnn":
        from bench_fit_crnn import sequence_accuracy

        return float(sequence_accuracy(model, task.test_x, task.test_y))
    return float(accuracy(model, task.test_x, task.test_y))


def one_model(task: Task, args: argparse.Namespace) -> None:
    original, how = original_model(task, args)
    original = original.eval()
    base_acc = task_accuracy(task, original)
    print(f"\n## {task.name}: {params(original):,} params, test accuracy {base_acc:.4f} ({how})")
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(task.train_x), 64):
            original(task.train_x[i : i + 64])
    forward = time.perf_counter() - start
    print(f"one forward pass of the original over the {len(task.train_x):,} calibration samples: {forward:.2f} s")
    header = "| rewrite | params | test acc | held-out output error |"
    rows = [header, "|---|---:|---:|---:|"]
    last_plan = None
    for rule in SINGLE_RULES:
        try:
            single = apply_rules(original, [rule], task, 0)
        except Exception as exc:  # a rule that applies to no layer
            rows.append(f"| {rule} (all convs) | -- | -- | failed: {exc} |")
            continue
        count = params(single)
        rows.append(
            f"| {rule} (all convs), fitted | {count:,} | {task_accuracy(task, single):.4f} | "
            f"{output_error(original, single, task.test_x):.4f} |"
        )
        if count >= params(original):
            continue
        began = time.perf_counter()
        plan = convrewrite.plan(
            original, data=task.train_x, budget={"params": str(count)}, example_inputs=task.train_x[:1], device="cpu"
        )
        planning = time.perf_counter() - began
        planned = plan.apply(original, example_inputs=task.train_x[:1], data=task.train_x, device="cpu", fit_steps=0)
        model = planned.model.eval()
        chosen = ", ".join(f"{layer.name}={layer.chosen.spec}" for layer in plan.layers)
        rows.append(
            f"| plan at params={count:,}, fitted: {chosen} | {params(model):,} | "
            f"{task_accuracy(task, model):.4f} | {output_error(original, model, task.test_x):.4f} |"
        )
        seconds = ", ".join(f"{k} {v:.2f} s" for k, v in plan.seconds.items())
        rows.append(
            f"| (planning: {planning:.2f} s in all; {seconds}; predicted error {plan.predicted_error:.4f}) | | | |"
        )
        if args.distill:
            for label, rules in ((f"{rule} (all convs)", [rule]), (f"plan at params={count:,}", plan.rules())):
                distilled = apply_rules(original, rules, task, args.distill)
                rows.append(
                    f"| {label}, fitted + distill {args.distill} | {params(distilled):,} | "
                    f"{task_accuracy(task, distilled):.4f} | "
                    f"{output_error(original, distilled, task.test_x):.4f} |"
                )
        last_plan = plan
    print("\n".join(rows))
    if last_plan is not None and args.samples:
        ranking(task, original, last_plan, args)


def ranking(task: Task, original: torch.nn.Module, plan: Any, args: argparse.Namespace) -> None:
    rng = random.Random(0)
    weights = {layer.name: layer.sensitivity for layer in plan.layers}
    predicted: dict[str, list[float]] = {"hutchinson (probe moments)": [], "isotropic": [], "uniform": []}
    measured: list[float] = []
    for _ in range(args.samples):
        tables: dict[str, dict[str, Any]] = {}
        losses = dict.fromkeys(predicted, 0.0)
        for name, options in plan.options.items():
            option = rng.choice(options)
            losses["hutchinson (probe moments)"] += option.loss
            losses["isotropic"] += weights[name] * option.error**2
            losses["uniform"] += option.error**2
            if option.rule is not None:
                table = tables.setdefault(option.spec, {"name": option.rule, **option.options, "include": []})
                table["include"].append(name)
        if not tables:
            continue
        rules = [make_rule(table) for table in tables.values()]
        model = apply_rules(original, rules, task, 0)
        for key, value in losses.items():
            predicted[key].append(value)
        measured.append(output_error(original, model, task.test_x) ** 2)
    shown = ", ".join(f"{key} {spearman(values, measured):.3f}" for key, values in predicted.items())
    print(
        f"\nranking on {len(measured)} random plans (predicted vs measured held-out squared output error "
        f"after fitting), Spearman rho: {shown}"
    )


def resnet_cost(images: int) -> None:
    """Planning cost on a ResNet-50 at 224x224 (random weights: cost only) against forward passes."""
    from bench_fit_scale import build_resnet50

    model = build_resnet50()
    x = torch.randn(images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, images, 32):
            model(x[i : i + 32])
    forward = time.perf_counter() - start
    began = time.perf_counter()
    plan = convrewrite.plan(
        model,
        data=x,
        budget={"params": 0.5},
        example_inputs=x[:1],
        device="cpu",
        batch_size=32,
        candidates=["separable", "low-rank"],
    )
    total = time.perf_counter() - began
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in plan.seconds.items())
    print(
        f"\n## ResNet-50 at 224x224, {images} images: one forward pass {forward:.1f} s; "
        f"plan (candidates separable, low-rank; params=0.5x) {total:.1f} s = {total / forward:.1f} forward passes "
        f"({seconds}); {len(plan.rewritten)} of {len(plan.layers)} layers rewritten"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits,tdnn,tdnn-chirps")
    parser.add_argument("--distill", type=int, default=0)
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--resnet", type=int, default=0, help="also time planning a ResNet-50 on this many images")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "convrewrite-bench-cache")
    args = parser.parse_args()
    torch.set_num_threads(1)

    print("bench_plan: one torch thread on a shared 2-core machine (times are indicative)")
    work = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    wanted = set(args.model.split(",")) - {""}
    for task in tasks(wanted, work) + ([crnn_task()] if "crnn" in wanted else []):
        one_model(copy.copy(task), args)
    if args.resnet:
        resnet_cost(args.resnet)


if __name__ == "__main__":
    main()
