"""float64 vs float32 chunk products in the statistics accumulation: speed and fit accuracy.

A trained-like layer: a 3x3 conv whose input is the ReLU output of a random conv on smooth
(spatially correlated) images, so its gram is ill-conditioned like a real layer's. The layer's
target is a dense conv of the same geometry (the oracle: its own weights give zero error). For each
product dtype: the accumulation time, the relative error of the gram against the float64 one, and
the held-out relative error of the least-squares solve (a full-capacity replacement: the floor
the statistics allow; 0 with exact statistics).

One torch thread; the machine is shared with other work (load average printed).

    OMP_NUM_THREADS=1 python benchmarks/bench_statistics_precision.py [--channels 64] [--images 64]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from convrewrite.recovery.solvers import solve_from_statistics
from convrewrite.recovery.statistics import PatchGeometry, StatisticsAccumulator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"one torch thread; machine shared (load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores)")
    print(f"{'channels':>8} {'n':>6} {'product':>8} {'accumulate s':>12} {'gram rel err':>12} {'held-out err':>12}")
    for channels in args.channels:
        torch.manual_seed(0)
        coarse = torch.randn(2 * args.images, 3, args.size // 4, args.size // 4)
        images = nn.functional.interpolate(coarse, size=(args.size, args.size), mode="bilinear")
        with torch.no_grad():
            x = torch.relu(nn.Conv2d(3, channels, 3, padding=1)(images))
        layer = nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            y = layer(x)
        geometry = PatchGeometry.of(layer)
        fit_x, fit_y, held_x, held_y = x[: args.images], y[: args.images], x[args.images :], y[args.images :]
        held = StatisticsAccumulator(geometry)
        held.add(held_x, held_y)
        reference = None
        for product in (torch.float64, torch.float32):
            accumulator = StatisticsAccumulator(geometry, product=product)
            began = time.perf_counter()
            accumulator.add(fit_x, fit_y)
            seconds = time.perf_counter() - began
            if reference is None:
                reference = accumulator.stats.gram
            gram_error = float((accumulator.stats.gram - reference).norm() / reference.norm())
            block = nn.Conv2d(channels, channels, 3, padding=1)
            solve_from_statistics(block, accumulator.stats, geometry=geometry, ridge=1e-7)
            error = held.stats.relative_error(geometry.dense_kernel(block))
            print(
                f"{channels:>8} {geometry.unknowns():>6} {str(product).split('.')[-1]:>8} {seconds:>12.2f} "
                f"{gram_error:>12.2e} {error:>12.2e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
