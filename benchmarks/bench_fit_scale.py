"""Time and peak memory of fitting a ResNet-50 (sample_models/zoo/resnet.py) at 224x224, and how
both grow with the number of calibration images.

Through the real pipeline: ``convrewrite.rewrite(resnet50(), ["separable"], data=images, fit=True)``
(what ``convrewrite apply ... --rule separable --data images.pt`` does), in a fresh process per
measurement so that the peak resident memory (``ru_maxrss`` from ``os.wait4``) and the CPU time
are that run's own. Random weights and random images: the figures are about cost, not accuracy.

Each run prints: the fit stage's wall time (``report.stages``) and the whole call's; the process's
CPU time; the resident memory right before the call (interpreter, torch, the model and the images,
which the user holds anyway) and the peak, whose difference is what the pipeline added (the frozen
reference copy of the model, the rewritten model, activations, the per-layer cache of at most
512 MiB of (input, target) pairs, the normal equations).

``--layers N`` fits only the first N rewritable layers in call order (``include=`` their names,
the ``--include`` of the command line) for a prefix study on a slow machine; the per-layer times
in the report then say what the prefix cost. ``--fit-steps`` sets the gradient steps per layer
(refinement steps after the closed form with the statistics path), ``--fit-method`` the path:
``statistics`` (the default: one pass per layer, closed-form solves) or ``gradient`` (the path
before the statistics fit; its recorded whole-model figure at 256 images with 500 steps is
1,734 s and 2,920 MiB peak, ``benchmarks/results/bench_fit_scale.txt``).

    OMP_NUM_THREADS=1 python benchmarks/bench_fit_scale.py [--images 64 128 256] [--layers 0]
        [--fit-steps 0] [--fit-method statistics] [--batch-size 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "sample_models" / "zoo" / "resnet.py"


def rss_mib() -> float:
    """Current resident memory from /proc (Linux), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_resnet50() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("zoo_resnet", MODEL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["zoo_resnet"] = module
    spec.loader.exec_module(module)
    return module.resnet50().eval()


def rewritable_layers(rule: str) -> list[str]:
    """The layers ``rule`` rewrites in ResNet-50, in the order the model calls them (no data: cheap)."""
    import torch

    import convrewrite

    model = build_resnet50()
    result = convrewrite.rewrite(model, [rule], example_inputs=torch.randn(1, 3, 224, 224), copy_module=False)
    return [record.name for record in result.report.rewrites]


def step_times(args: argparse.Namespace) -> None:
    """Seconds of one gradient step of each rewritten block at the batch size, on inputs of its
    real shape at 224x224: what fitting spends per step on each layer whatever the number of
    images (for extrapolating a prefix measurement to the whole model; the pipeline's own step
    is the same computation: the block's relative squared error, backward, an Adam update)."""
    import torch

    import convrewrite

    torch.set_num_threads(args.threads)
    model = build_resnet50()
    result = convrewrite.rewrite(model, [args.rule], example_inputs=torch.randn(1, 3, 224, 224), copy_module=False)
    names = [record.name for record in result.report.rewrites]
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str) -> Any:
        def record(module: Any, inputs: tuple) -> None:  # returns None: the inputs stay as they are
            shapes.setdefault(name, tuple(inputs[0].shape))

        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(recorder(name)) for name in names]
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    for handle in handles:
        handle.remove()
    total = 0.0
    print(f"{'layer':<18} {'input':>18} {'s per step':>10}")
    for name in names:
        block = model.get_submodule(name).train()
        x = torch.randn(args.batch_size, *shapes[name][1:])
        with torch.no_grad():
            target = block(x) + 0.1 * torch.randn(block(x[:1]).shape[1:])
        optimizer = torch.optim.Adam(block.parameters(), lr=1e-3)
        timings = []
        for step in range(args.steps_timed + 1):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = (block(x) - target).pow(2).sum() / target.numel()
            loss.backward()
            optimizer.step()
            if step:  # the first step allocates Adam's state
                timings.append(time.perf_counter() - start)
        per_step = sorted(timings)[len(timings) // 2]
        total += per_step
        print(f"{name:<18} {'x'.join(map(str, shapes[name][1:])):>18} {per_step:>10.3f}", flush=True)
    print(
        f"all {len(names)} layers: {total:.2f} s per step of each; {args.fit_steps} steps per layer: "
        f"{total * args.fit_steps:.0f} s"
    )


def one_run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import convrewrite

    torch.set_num_threads(args.threads)
    # The same random weights every run (before 2026-12-03 they were unseeded: round counts varied by run).
    torch.manual_seed(0)
    model = build_resnet50()
    include = [name for name in args.names.split(",") if name]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.child, 3, 224, 224, generator=generator)
    before = rss_mib()
    start, start_cpu = time.perf_counter(), time.process_time()
    result = convrewrite.rewrite(
        model,
        [args.rule],
        example_inputs=images[:1],
        data=images,
        fit=True,
        fit_steps=args.fit_steps,
        fit_method=args.fit_method,
        batch_size=args.batch_size,
        include=include,
        device="cpu",
        copy_module=False,  # the user's model is the one being rewritten: no third copy
    )
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    stages = {stage["name"]: stage["seconds"] for stage in result.report.stages}
    fitting = result.report.sections["fitting"]
    layers = fitting["layers"]["layers"]
    return {
        "images": args.child,
        "layers": len(layers),
        "fit_s": stages.get("fit"),
        "call_s": wall,
        "call_cpu_s": cpu,
        "rss_before_mib": before,
        "images_mib": images.numel() * 4 / (1 << 20),
        "params": sum(p.numel() for p in model.parameters()),
        "per_layer_s": [
            (layer["name"], round(layer["seconds"], 1), layer.get("method"), round(layer.get("passes", 0.0), 2))
            for layer in layers
        ],
        "passes": fitting["layers"].get("passes"),
        "batchnorm_s": fitting["batchnorm"]["seconds"],
        "held_out_error": (
            fitting["fidelity"]["transfer"]["output_relative_error"],
            fitting["fidelity"]["fitted"]["output_relative_error"],
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--rule", default="separable")
    parser.add_argument("--fit-steps", type=int, default=0)
    parser.add_argument("--fit-method", default="statistics", choices=("statistics", "gradient"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=0, help="fit only the first N rewritable layers (0: all)")
    parser.add_argument("--per-layer", action="store_true", help="print each layer's fitting time")
    parser.add_argument(
        "--step-times", action="store_true", help="time one gradient step of every rewritten layer instead"
    )
    parser.add_argument("--steps-timed", type=int, default=5, help="steps timed per layer with --step-times")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--names", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(one_run(args)))
        return
    if args.step_times:
        step_times(args)
        return
    print(
        f"ResNet-50 at 224x224 through convrewrite.rewrite(..., data=images, fit=True): rule {args.rule}, "
        f"fit method {args.fit_method}, {args.fit_steps} gradient steps per layer, batch {args.batch_size}, "
        f"{args.threads} thread(s), machine shared with other work, "
        f"layers fitted: {args.layers or 'all'}; load average {os.getloadavg()[0]:.2f}"
    )
    header = (
        f"{'images':>6} {'layers':>6} {'fit s':>8} {'call s':>8} {'process CPU s':>13} {'RSS before MiB':>14} "
        f"{'peak RSS MiB':>12} {'added MiB':>9} {'images MiB':>10} {'held-out error':>15} {'passes':>7}"
    )
    # The layer names are found here, not in the measured processes (one more ResNet-50 there
    # would count in their peak memory).
    names = rewritable_layers(args.rule)[: args.layers] if args.layers else []
    if names:
        print(f"fitted layers: {', '.join(names)}")
    print(header)
    print("-" * len(header))
    for images in args.images:
        command = [sys.executable, __file__, "--child", str(images), "--rule", args.rule]
        command += ["--fit-steps", str(args.fit_steps), "--fit-method", args.fit_method]
        command += ["--batch-size", str(args.batch_size)]
        command += ["--threads", str(args.threads), "--names", ",".join(names)]
        with tempfile.TemporaryFile(mode="w+") as errors:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True)
            assert process.stdout is not None
            stdout = process.stdout.read()
            _, status, usage = os.wait4(process.pid, 0)  # this child's own peak memory and CPU time
            process.returncode = os.waitstatus_to_exitcode(status)
            if process.returncode != 0:
                errors.seek(0)
                raise SystemExit(f"run with {images} images failed:\n{errors.read()[-3000:]}")
        row = json.loads(stdout.strip().splitlines()[-1])
        peak, cpu = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
        error = row["held_out_error"]
        print(
            f"{row['images']:>6} {row['layers']:>6} {row['fit_s']:>8.1f} {row['call_s']:>8.1f} {cpu:>13.1f} "
            f"{row['rss_before_mib']:>14,.0f} {peak:>12,.0f} {peak - row['rss_before_mib']:>9,.0f} "
            f"{row['images_mib']:>10,.0f} {error[0]:>7.3f}->{error[1]:.3f} {row['passes'] or 0:>7.2f}",
            flush=True,
        )
        if args.per_layer:
            print(f"       per layer (name, s, method, passes): {row['per_layer_s']}", flush=True)


if __name__ == "__main__":
    main()
