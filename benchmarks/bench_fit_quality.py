"""Per-layer held-out error of the two fitting paths, every built-in rule, on trained models.

For each trained model: the CRNN of ``sample_models/crnn_bilstm`` (a 2-D CNN + BiLSTM, trained by
``bench_fit_crnn.py`` and cached), the digits CNN and the two TDNNs of ``bench_recovery.py``
(trained once and cached there; the digits CNN needs scikit-learn's bundled digits), and each
rule set: the rule's transfer, then ``fit_layers`` twice on copies of the
same rewritten model, with the same calibration data (the unlabeled training inputs, 10% held
out):
- ``old``: the gradient path (``statistics=False``, ``--fit-method gradient``) with 500 Adam steps
  per layer (the default before the statistics fit);
- ``new``: the statistics path (``--fit-method statistics``) with 0 refinement steps.
Printed per layer: held-out layer error as transferred, after each path, the new path's method
and each path's time and passes. Then the end-to-end test accuracy of each path's model (after the
BatchNorm re-estimation the pipeline does), on the labelled test split the tool never sees.

One torch thread; the machine is shared with other work (load average printed).

    OMP_NUM_THREADS=1 python benchmarks/bench_fit_quality.py [--model digits,tdnn,tdnn-chirps] [--steps 500]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_recovery import DIGITS_RULES, HOLDOUT, tasks, trained_model  # noqa: E402
from bench_trained_digits import accuracy  # noqa: E402

import convrewrite  # noqa: E402
from convrewrite.recovery.batches import TensorBatches  # noqa: E402
from convrewrite.recovery.fit import fit_layers, reestimate_batchnorm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

RULES = {
    "crnn": [
        ["separable"],
        ["group-shuffle:groups=4"],
        ["log-group"],
        ["channelwise:groups=4"],
        ["low-rank"],
        ["separable", "channelwise:groups=4"],
        ["fuse-bn", "separable"],
        ["fuse-bn"],
    ],
    "digits": DIGITS_RULES,
    "tdnn": [["separable"], ["log-group"], ["low-rank"], ["group-shuffle:groups=4"]],
    "tdnn-chirps": [["separable"], ["log-group"], ["low-rank"]],
}


def models(args: argparse.Namespace, cache: Path, work: Path) -> Any:
    """(name, trained original, unlabeled calibration inputs, test accuracy function, how loaded)."""
    wanted = set(args.model.split(","))
    if "crnn" in wanted:
        from bench_fit_crnn import make_strips, sequence_accuracy, trained

        model, how = trained()
        strips, _ = make_strips(1024, seed=3)
        test_x, test_y = make_strips(512, seed=1)
        yield "crnn", model, strips, lambda m: sequence_accuracy(m, test_x, test_y), how
    names = wanted & {"digits", "tdnn", "tdnn-chirps"}
    for name in sorted(names):
        try:
            (task,) = tasks({name}, work)
        except ModuleNotFoundError as exc:  # the digits need scikit-learn's bundled data set
            print(f"\n{name}: skipped ({exc})")
            continue
        original, how = trained_model(task, args.epochs, cache)
        yield name, original, task.train_x, (lambda m, t=task: accuracy(m, t.test_x, t.test_y)), how


def fmt(value: float | None) -> str:
    return "--" if value is None else f"{value:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="crnn,digits,tdnn,tdnn-chirps")
    parser.add_argument("--steps", type=int, default=500, help="Adam steps per layer of the old path")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--only", default="", help="run only rule sets whose specs contain one of these (commas)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = Path(tempfile.gettempdir()) / "convrewrite-bench-cache"
    print(
        f"fit_layers: old = gradient path, {args.steps} Adam steps/layer; new = statistics path, 0 steps. "
        f"One torch thread; machine shared (load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores)"
    )
    worse = 0
    with tempfile.TemporaryDirectory() as work:
        for name, original, train_x, score, how in models(args, cache, Path(work)):
            print(f"\n{name}: {how}; test accuracy {score(original):.3f}")
            header = (
                f"  {'rule':<28} {'layer':<10} {'transfer':>8} {'old':>8} {'new':>8}  "
                f"{'new method':<30} {'old s':>6} {'new s':>6} {'old passes':>10} {'new passes':>10}"
            )
            print(header)
            for specs in RULES[name]:
                if args.only and not any(word in spec for word in args.only.split(",") for spec in specs):
                    continue
                rewritten_result = convrewrite.rewrite(original, specs, example_inputs=train_x[:1])
                state = rewritten_result.state
                names = list(state.originals)
                data = TensorBatches((train_x,), batch_size=args.batch_size, holdout=HOLDOUT)
                fitted = {}
                results = {}
                for path, statistics, steps in (("old", False, args.steps), ("new", True, 0)):
                    model = copy.deepcopy(rewritten_result.model)
                    began = time.perf_counter()
                    results[path] = fit_layers(
                        original, model, names, data, steps=steps, statistics=statistics, targets=state.output_of
                    )
                    reestimate_batchnorm(model, data, reference=original)
                    results[path].seconds = time.perf_counter() - began
                    fitted[path] = model
                old_layers = {layer.name: layer for layer in results["old"].layers}
                for layer in results["new"].layers:
                    old = old_layers[layer.name]
                    if (
                        layer.holdout_error_after is not None
                        and old.holdout_error_after is not None
                        and layer.holdout_error_after > old.holdout_error_after * 1.001 + 1e-6
                    ):
                        worse += 1
                        mark = "  <- new worse"
                    else:
                        mark = ""
                    print(
                        f"  {'+'.join(specs):<28} {layer.name:<10} {fmt(layer.holdout_error_before):>8} "
                        f"{fmt(old.holdout_error_after):>8} {fmt(layer.holdout_error_after):>8}  "
                        f"{layer.method[:30]:<30} {old.seconds:>6.2f} {layer.seconds:>6.2f} "
                        f"{old.passes:>10.1f} {layer.passes:>10.1f}{mark}",
                        flush=True,
                    )
                accuracies = {path: score(model) for path, model in fitted.items()}
                print(
                    f"  {'+'.join(specs):<28} {'(model)':<10} test accuracy old {accuracies['old']:.3f} "
                    f"new {accuracies['new']:.3f}; fit+bn s old {results['old'].seconds:.1f} "
                    f"new {results['new'].seconds:.1f}; passes old {results['old'].passes:.1f} "
                    f"new {results['new'].passes:.1f}",
                    flush=True,
                )
    print(f"\nlayers where the new path's held-out error exceeds the old one's: {worse}")


if __name__ == "__main__":
    main()
