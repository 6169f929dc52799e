"""Patch moments of one batch: shifted products (``recovery/moments.py``) against unfolding.

For conv shapes of ResNet-50, the CRNN and a TDNN, one ``StatisticsAccumulator.add`` of a batch
with each method, interleaved (unfold, shifted, unfold, shifted, ...) so that a loaded machine
slows both alike; the best of ``--repeat`` runs, float32 products as the fit uses, one torch
thread. Also the largest relative difference between the two grams.

    OMP_NUM_THREADS=1 python benchmarks/bench_moments.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from convrewrite.recovery.statistics import PatchGeometry, StatisticsAccumulator

CASES = [
    ("ResNet-50 layer1 conv2, 64ch 3x3 @56x56", nn.Conv2d(64, 64, 3, padding=1), (16, 64, 56, 56)),
    ("ResNet-50 layer2 conv2, 128ch 3x3 @28x28", nn.Conv2d(128, 128, 3, padding=1), (32, 128, 28, 28)),
    ("ResNet-50 layer3 conv2, 256ch 3x3 @14x14", nn.Conv2d(256, 256, 3, padding=1), (32, 256, 14, 14)),
    ("ResNet-50 layer4 conv2, 512ch 3x3 @7x7", nn.Conv2d(512, 512, 3, padding=1), (32, 512, 7, 7)),
    ("CRNN conv1, 16->32 3x3 @16x64", nn.Conv2d(16, 32, 3, padding=1), (32, 16, 16, 64)),
    ("CRNN conv5, 128ch 3x3 @4x32", nn.Conv2d(128, 128, 3, padding=1), (32, 128, 4, 32)),
    ("TDNN, 64ch k=9 over 48 frames", nn.Conv1d(64, 64, 9, padding=4), (64, 64, 48)),
    ("Conv1d 80ch k=64 over 200 frames", nn.Conv1d(80, 80, 64, padding=32), (16, 80, 200)),
]


def timed(geometry: PatchGeometry, x: torch.Tensor, y: torch.Tensor, shifted: bool) -> tuple[float, torch.Tensor]:
    accumulator = StatisticsAccumulator(geometry, product=torch.float32)
    accumulator.shifted = shifted
    start = time.perf_counter()
    accumulator.add(x, y)
    gram = accumulator.stats.gram
    return time.perf_counter() - start, gram


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"bench_moments: one torch thread, float32 products, best of {args.repeat} interleaved runs; "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )
    print(f"{'layer':<44} {'n':>6} {'rows':>9} {'unfold s':>9} {'shifted s':>9} {'speed-up':>8} {'max rel diff':>12}")
    for label, conv, shape in CASES:
        geometry = PatchGeometry.of(conv)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            y = conv(x)
        best = {False: float("inf"), True: float("inf")}
        grams: dict[bool, torch.Tensor] = {}
        for _ in range(args.repeat):
            for shifted in (False, True):
                seconds, grams[shifted] = timed(geometry, x, y, shifted)
                best[shifted] = min(best[shifted], seconds)
        diff = float((grams[True] - grams[False]).abs().max() / grams[False].abs().max())
        rows = shape[0] * y[0, 0].numel()
        print(
            f"{label:<44} {geometry.unknowns():>6,} {rows:>9,} {best[False]:>9.3f} {best[True]:>9.3f} "
            f"{best[False] / best[True]:>7.1f}x {diff:>12.1e}"
        )


if __name__ == "__main__":
    main()
