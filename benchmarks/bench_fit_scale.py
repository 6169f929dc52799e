"""Time and peak memory of fitting a ResNet-50 (sample_models/zoo/resnet.py) at 224x224, and how
both grow with the number of calibration images.

Random weights and random images: the figures are about cost, not accuracy. Each image count runs
in its own process so that its peak resident memory (``ru_maxrss``) is its own; the resident
memory before fitting (model, rewritten copy, data) is printed too, so the difference is what
fitting itself costs. ``--cache-mb`` bounds the per-layer cache of (input, target) pairs.

    python benchmarks/bench_fit_scale.py [--images 64 128 256] [--rule separable] [--steps 500]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_mib() -> float:
    """Current resident memory from /proc (Linux), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_run(images: int, rule: str, steps: int, batch_size: int, cache_mb: float, threads: int, layers: int) -> dict:
    import torch

    from convrewrite.engine.loading import load_model
    from convrewrite.engine.pipeline import analyse
    from convrewrite.recovery.data import calibration_data_from
    from convrewrite.recovery.fit import fit_layers, reestimate_batchnorm
    from convrewrite.rules.api import make_rule

    torch.set_num_threads(threads)
    loaded = load_model(f"{ROOT / 'sample_models' / 'zoo' / 'resnet.py'}:resnet50")
    original = copy.deepcopy(loaded.model)
    result = analyse(loaded, [make_rule(rule)])
    names = [record.name for record in result.rewrites]
    if layers:
        names = names[:layers]  # a growth study on the first layers only (cheaper prefixes)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(images, 3, 224, 224, generator=generator)
    data = calibration_data_from(pixels, example=loaded, batch_size=batch_size, holdout=0.1)
    before = rss_mib()
    start = time.perf_counter()
    fit = fit_layers(original, result.model, names, data, steps=steps, cache_mb=cache_mb)
    fitted = time.perf_counter() - start
    start = time.perf_counter()
    reestimate_batchnorm(result.model, data)
    batchnorm = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "images": images,
        "layers": len(fit.layers),
        "fit_s": fitted,
        "bn_s": batchnorm,
        "rss_before_fit_mib": before,
        "peak_rss_mib": peak,
        "images_bytes_mib": pixels.numel() * 4 / (1 << 20),
        "cached": [layer.cached for layer in fit.layers],
        "slowest": sorted(((round(layer.seconds, 1), layer.name) for layer in fit.layers), reverse=True)[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--rule", default="separable")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-mb", type=float, default=512.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=0, help="fit only the first N rewritten layers (0: all)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(
            json.dumps(
                one_run(args.child, args.rule, args.steps, args.batch_size, args.cache_mb, args.threads, args.layers)
            )
        )
        return
    print(
        f"ResNet-50 at 224x224, rule {args.rule}, {args.steps} gradient steps per layer, batch {args.batch_size}, "
        f"cache {args.cache_mb:.0f} MiB, {args.threads} threads, layers fitted: {args.layers or 'all'}"
    )
    header = (
        f"{'images':>6} {'layers':>6} {'fit s':>8} {'BN s':>6} {'RSS before MiB':>14} {'peak RSS MiB':>12} "
        f"{'images MiB':>10}"
    )
    print(header)
    print("-" * len(header))
    for images in args.images:
        command = [sys.executable, __file__, "--child", str(images), "--rule", args.rule, "--steps", str(args.steps)]
        command += [
            "--batch-size",
            str(args.batch_size),
            "--cache-mb",
            str(args.cache_mb),
            "--threads",
            str(args.threads),
        ]
        completed = subprocess.run(command, capture_output=True, text=True, check=True)
        row = json.loads(completed.stdout.strip().splitlines()[-1])
        print(
            f"{row['images']:>6} {row['layers']:>6} {row['fit_s']:>8.1f} {row['bn_s']:>6.1f} "
            f"{row['rss_before_fit_mib']:>14.0f} {row['peak_rss_mib']:>12.0f} {row['images_bytes_mib']:>10.0f}"
        )
        print(f"       slowest layers: {row['slowest']}; caches: {sorted(set(row['cached']))}", flush=True)


if __name__ == "__main__":
    main()
