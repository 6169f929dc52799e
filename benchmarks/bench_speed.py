"""Measured speed of every rule: does a MAC reduction buy latency on a CPU?

For the CRNN sample and three zoo models (residual: ResNet-18; mobile: MobileNetV2; 1-D: the
x-vector TDNN), every rule, ``fuse-bn``, ``winograd`` and the seed document's combination
(``separable`` then ``winograd`` on the depthwise halves): MAC and parameter reduction from
convrewrite's counter, and the latency speedup measured with convrewrite.speed's interleaved
timing, in torch eager and in ONNX Runtime (CPU provider; each variant exported once with
export/onnx.py, dynamic batch, verified), at 1 and 2 threads, batch 1 and 8. All variants of a
model run side by side in one interleaved measurement per setting (blocks A, B1, ..., Bn, then the
reverse order), so the original is timed in the same conditions as each rewrite.

Then the ratio measured speedup / MAC reduction per rule: 1.0 means the MACs saved turn into time
one for one; well below 1 means the structure is slower per MAC than the dense conv it replaced.

The machine is shared, so the whole grid runs several times in one invocation (``--passes``, 2 by
default) to show the noise between repeated runs, and once more with a busy loop pinned to one
core beside it (``--busy``, default on).

    python benchmarks/bench_speed.py [--passes 2] [--no-busy] [--quick] [--json results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from convrewrite.core.loading import ExampleInputs, load_model
from convrewrite.engine.pipeline import analyse
from convrewrite.rules.api import make_rule
from convrewrite.speed.latency import Timing, fixed_threads, interleaved, with_batch

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"

MODELS: list[tuple[str, str, tuple[int, ...]]] = [
    ("crnn", str(SAMPLES / "crnn.py"), (1, 1, 32, 320)),
    ("resnet18", str(SAMPLES / "zoo" / "resnet.py") + ":resnet18", (1, 3, 112, 112)),
    ("mobilenetv2", str(SAMPLES / "zoo" / "mobilenetv2.py"), (1, 3, 160, 160)),
    ("tdnn", str(SAMPLES / "zoo" / "tdnn.py"), (1, 40, 200)),
]

VARIANTS: list[tuple[str, list[str]]] = [
    ("separable", ["separable"]),
    ("group-shuffle", ["group-shuffle"]),
    ("log-group", ["log-group"]),
    ("channelwise", ["channelwise"]),
    ("fuse-bn", ["fuse-bn"]),
    ("winograd", ["winograd"]),
    ("separable+winograd(dw)", ["separable", "winograd:include=*.depthwise"]),
]


@dataclass
class Variant:
    name: str
    specs: list[str]
    model: torch.nn.Module
    params: int
    macs: int
    rewrites: int
    onnx_path: Path | None = None


@dataclass
class Cell:
    """One (model, backend, threads, batch) setting of one pass: a Timing per variant."""

    model: str
    backend: str
    threads: int
    batch: int
    busy: bool
    pass_index: int
    timings: dict[str, Timing] = field(default_factory=dict)

    def speedup(self, variant: str) -> float:
        return self.timings["original"].median_ms / self.timings[variant].median_ms


def busy_loop() -> None:  # pragma: no cover - runs in a child process
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {0})
    while True:
        pass


def build_variants(spec: str, shape: tuple[int, ...], export_dir: Path, backends: list[str]) -> list[Variant]:
    from convrewrite.export.onnx import export_onnx

    variants = []
    loaded = load_model(spec, input_shapes=[shape])
    base = analyse(loaded)
    original = Variant("original", [], copy.deepcopy(loaded.model), base.before.params, base.before.macs, 0)
    variants.append(original)
    for name, specs in VARIANTS:
        loaded = load_model(spec, input_shapes=[shape])
        result = analyse(loaded, [make_rule(s) for s in specs])
        assert result.after is not None
        after = result.after
        variants.append(Variant(name, specs, loaded.model, after.params, after.macs, len(result.rewrites)))
    if "onnxruntime" in backends:
        inputs = ExampleInputs((torch.randn(*shape),))
        for variant in variants:
            started = time.perf_counter()
            exported = export_onnx(variant.model, inputs, export_dir / f"{variant.name}.onnx")
            variant.onnx_path = exported.path
            print(
                f"    exported {variant.name}: {exported.exporter}, opset {exported.opset}, "
                f"max abs diff {exported.max_abs_diff:.2g}, {time.perf_counter() - started:.1f} s",
                flush=True,
            )
    return variants


def measure_cell(
    variants: list[Variant],
    shape: tuple[int, ...],
    backend: str,
    threads: int,
    batch: int,
    min_run_time: float,
    min_rounds: int,
) -> dict[str, Timing]:
    from convrewrite.export.onnx import ort_feed, ort_session

    inputs = with_batch(ExampleInputs((torch.randn(*shape, generator=torch.Generator().manual_seed(0)),)), batch)
    functions: dict[str, Any] = {}
    for variant in variants:
        if backend == "torch":
            model = variant.model.eval()

            def run(model: torch.nn.Module = model) -> Any:
                with torch.no_grad():
                    return inputs.call(model)

        else:
            assert variant.onnx_path is not None
            session = ort_session(variant.onnx_path, threads)
            feed = ort_feed(session, inputs)

            def run(session: Any = session, feed: dict[str, Any] = feed) -> Any:
                return session.run(None, feed)

        functions[variant.name] = run
    with fixed_threads(threads):
        measured = interleaved(
            functions, threads=threads, min_run_time=min_run_time, min_rounds=min_rounds, warmup_calls=2
        )
    return {name: Timing.from_measurement(m) for name, m in measured.items()}


def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[int(fraction * (len(sorted_values) - 1))]


def geometric_mean(values: list[float]) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=2, help="quiet passes over the whole grid (noise between them)")
    parser.add_argument("--no-busy", action="store_true", help="skip the pass with a busy loop on one core")
    parser.add_argument("--quick", action="store_true", help="CRNN only, batch 1, 1 thread (a smoke run)")
    parser.add_argument("--min-run-time", type=float, default=0.4, help="seconds per variant per setting, at least")
    parser.add_argument("--min-rounds", type=int, default=7, help="interleaved blocks per variant, at least")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    parser.add_argument("--report-only", type=Path, default=None, help="print the tables of an earlier --json")
    args = parser.parse_args()
    if args.report_only:
        reprint(args.report_only)
        return

    backends = ["torch", "onnxruntime"]
    threads_grid = [1] if args.quick else [1, 2]
    batch_grid = [1] if args.quick else [1, 8]
    models = MODELS[:1] if args.quick else MODELS
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        backends = ["torch"]
        ort_version = "not installed"
    print(f"machine: {os.cpu_count()} cores, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"torch {torch.__version__}, onnxruntime {ort_version}, Python {sys.version.split()[0]}")
    print(f"settings: min run time {args.min_run_time} s and >= {args.min_rounds} interleaved blocks per variant\n")

    cells: list[Cell] = []
    sizes: dict[str, dict[str, dict[str, int]]] = {}
    started = time.perf_counter()
    run_time, rounds = args.min_run_time, args.min_rounds
    plan = [(p, False) for p in range(args.passes)] + ([] if args.no_busy else [(args.passes, True)])
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as directory:
        built: dict[str, list[Variant]] = {}
        for model_name, spec, shape in models:
            print(f"building {model_name} {'x'.join(map(str, shape))}: {len(VARIANTS)} variants", flush=True)
            export_dir = Path(directory) / model_name
            export_dir.mkdir()
            built[model_name] = build_variants(spec, shape, export_dir, backends)
            sizes[model_name] = {
                v.name: {"params": v.params, "macs": v.macs, "rewrites": v.rewrites} for v in built[model_name]
            }
        for pass_index, busy in plan:
            child = None
            if busy:
                child = multiprocessing.Process(target=busy_loop, daemon=True)
                child.start()
            try:
                for model_name, _, shape in models:
                    for backend in backends:
                        for threads in threads_grid:
                            for batch in batch_grid:
                                cell = Cell(model_name, backend, threads, batch, busy, pass_index)
                                variants = built[model_name]
                                timings = measure_cell(variants, shape, backend, threads, batch, run_time, rounds)
                                cell.timings = timings
                                cells.append(cell)
                                print(
                                    f"pass {pass_index}{' (busy loop)' if busy else ''}: {model_name} {backend} "
                                    f"{threads}t b{batch}: original {cell.timings['original'].median_ms:.2f} ms; "
                                    + ", ".join(f"{name} {cell.speedup(name):.2f}x" for name, _ in VARIANTS),
                                    flush=True,
                                )
            finally:
                if child is not None:
                    child.terminate()
                    child.join()
    elapsed = time.perf_counter() - started
    report(cells, sizes, models, backends, threads_grid, batch_grid, args.passes)
    print(f"\nwall time {elapsed / 60:.1f} min")
    if args.json:
        data = {
            "sizes": sizes,
            "cells": [
                {
                    "model": c.model,
                    "backend": c.backend,
                    "threads": c.threads,
                    "batch": c.batch,
                    "busy": c.busy,
                    "pass": c.pass_index,
                    "timings": {k: t.to_dict() for k, t in c.timings.items()},
                }
                for c in cells
            ],
        }
        args.json.write_text(json.dumps(data, indent=1))


def reprint(path: Path) -> None:
    data = json.loads(path.read_text())
    cells = []
    for entry in data["cells"]:
        cell = Cell(entry["model"], entry["backend"], entry["threads"], entry["batch"], entry["busy"], entry["pass"])
        cell.timings = {name: Timing(**timing) for name, timing in entry["timings"].items()}
        cells.append(cell)
    names = list(dict.fromkeys(c.model for c in cells))
    models = [m for m in MODELS if m[0] in names]
    backends = list(dict.fromkeys(c.backend for c in cells))
    threads_grid = sorted({c.threads for c in cells})
    batch_grid = sorted({c.batch for c in cells})
    passes = len({c.pass_index for c in cells if not c.busy})
    report(cells, data["sizes"], models, backends, threads_grid, batch_grid, passes)


def report(
    cells: list[Cell],
    sizes: dict[str, dict[str, dict[str, int]]],
    models: list[tuple[str, str, tuple[int, ...]]],
    backends: list[str],
    threads_grid: list[int],
    batch_grid: list[int],
    passes: int,
) -> None:
    quiet = [c for c in cells if not c.busy]
    names = [name for name, _ in VARIANTS]

    def median_speedup(model: str, backend: str, threads: int, batch: int, variant: str, busy: bool = False) -> float:
        values = [
            c.speedup(variant)
            for c in cells
            if c.busy == busy and (c.model, c.backend, c.threads, c.batch) == (model, backend, threads, batch)
        ]
        return statistics.median(values) if values else float("nan")

    print("\n## MAC and parameter reduction (convrewrite's counter; rewrites = layers rewritten)\n")
    print("| model | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for model, _, _ in models:
        base = sizes[model]["original"]
        row = []
        for name in names:
            entry = sizes[model][name]
            row.append(
                f"{base['macs'] / entry['macs']:.2f}x MACs, {base['params'] / entry['params']:.2f}x params"
                f" ({entry['rewrites']})"
            )
        print(f"| {model} ({base['macs'] / 1e6:,.0f} M MACs) | " + " | ".join(row) + " |")

    print(f"\n## Measured speedup (median over {passes} quiet passes; original median in ms)\n")
    print("| model | backend | threads | batch | original ms | " + " | ".join(names) + " |")
    print("|---|---|---:|---:|---:|" + "---:|" * len(names))
    for model, _, _ in models:
        for backend in backends:
            for threads in threads_grid:
                for batch in batch_grid:
                    originals = [
                        c.timings["original"].median_ms
                        for c in quiet
                        if (c.model, c.backend, c.threads, c.batch) == (model, backend, threads, batch)
                    ]
                    speedups = [median_speedup(model, backend, threads, batch, n) for n in names]
                    print(
                        f"| {model} | {backend} | {threads} | {batch} | {statistics.median(originals):,.2f} | "
                        + " | ".join(f"{s:.2f}x" for s in speedups)
                        + " |"
                    )

    print("\n## Speedup / MAC reduction (1.0: the MACs saved become time one for one)\n")
    settings = [f"{b} {t}t b{n}" for b in backends for t in threads_grid for n in batch_grid]
    print("| rule | " + " | ".join(settings) + " | geometric mean |")
    print("|---|" + "---:|" * (len(settings) + 1))
    for name in names:
        columns = []
        everything = []
        for backend in backends:
            for threads in threads_grid:
                for batch in batch_grid:
                    ratios = []
                    for model, _, _ in models:
                        reduction = sizes[model]["original"]["macs"] / sizes[model][name]["macs"]
                        if sizes[model][name]["rewrites"] == 0:
                            continue  # the rule did not touch this model: no ratio to speak of
                        ratios.append(median_speedup(model, backend, threads, batch, name) / reduction)
                    everything += ratios
                    columns.append(f"{geometric_mean(ratios):.2f}" if ratios else "--")
        overall = f"{geometric_mean(everything):.2f}" if everything else "--"
        print(f"| {name} | " + " | ".join(columns) + f" | {overall} |")

    print("\n## Noise between repeated quiet passes (same setting, same variant)\n")
    for threads in threads_grid:
        for backend in backends:
            spreads = []
            for model, _, _ in models:
                for batch in batch_grid:
                    for name in names:
                        values = [
                            c.speedup(name)
                            for c in quiet
                            if (c.model, c.backend, c.threads, c.batch) == (model, backend, threads, batch)
                        ]
                        if len(values) >= 2:
                            spreads.append((max(values) - min(values)) / statistics.median(values))
            same = [c for c in quiet if (c.threads, c.backend) == (threads, backend)]
            iqrs = sorted(t.relative_iqr for c in same for t in c.timings.values())
            if spreads:
                spreads.sort()
                print(
                    f"{backend}, {threads} thread(s): speedup spread (max - min) / median over {passes} passes: "
                    f"median {statistics.median(spreads):.1%}, 90th percentile {percentile(spreads, 0.9):.1%}, "
                    f"max {spreads[-1]:.1%} ({len(spreads)} figures); IQR / median within a measurement: "
                    f"median {statistics.median(iqrs):.1%}, 90th percentile {percentile(iqrs, 0.9):.1%}"
                )
    busy = [c for c in cells if c.busy]
    if busy:
        print("\n## With a busy loop on one core beside it (speedup busy / speedup quiet, and original ms ratio)\n")
        shifts: list[tuple[float, Cell]] = []
        for c in busy:
            key = (c.model, c.backend, c.threads, c.batch)
            reference = [q for q in quiet if (q.model, q.backend, q.threads, q.batch) == key]
            if not reference:
                continue
            for name in names:
                quiet_speedup = statistics.median(q.speedup(name) for q in reference)
                shifts.append((c.speedup(name) / quiet_speedup, c))
        for threads in threads_grid:
            ratios = [
                c.timings["original"].median_ms
                / statistics.median(
                    q.timings["original"].median_ms
                    for q in quiet
                    if (q.model, q.backend, q.threads, q.batch) == (c.model, c.backend, c.threads, c.batch)
                )
                for c in busy
                if c.threads == threads
            ]
            if ratios:
                typical = statistics.median(ratios)
                print(f"original model latency, busy / quiet, {threads} thread(s): median {typical:.2f}x")
        for threads in threads_grid:
            shifted = sorted(shift for shift, c in shifts if c.threads == threads)
            if shifted:
                print(
                    f"speedups, busy / quiet, {threads} thread(s): median {statistics.median(shifted):.2f}, "
                    f"10th-90th percentile {percentile(shifted, 0.1):.2f} .. {percentile(shifted, 0.9):.2f}, "
                    f"range {shifted[0]:.2f} .. {shifted[-1]:.2f} ({len(shifted)} figures)"
                )


if __name__ == "__main__":
    main()
