"""Where is Winograd F(2x2,3x3) / F(4x4,3x3) faster than the direct conv, and where slower?

One 3x3 stride-1 conv at a time (dense and depthwise, a few channel counts and feature-map sizes,
batch 1 and 8), the plain ``nn.Conv2d`` against ``WinogradConv2d`` with tile 2 and tile 4, timed
side by side with convrewrite.speed's interleaved measurement in torch eager, 1 thread. Beside each
speedup: the MAC ratio the block really has (direct conv MACs / the block's MACs as convrewrite
counts them: F(2x2,3x3)'s products alone, its transforms being additions; F(4x4,3x3)'s products
plus its transform matmuls) and the products-only ratio (the textbook 2.25x and 4x); for F(2x2),
the transform additions per direct-conv MAC.

    python benchmarks/bench_winograd.py [--threads 1] [--min-run-time 0.3]
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from convrewrite.core.loading import ExampleInputs
from convrewrite.core.profiling import profile
from convrewrite.layers import WinogradConv2d
from convrewrite.speed.latency import LayerCase, measure_layers

#: (label, in, out, groups, size): CRNN-like and ResNet-like dense layers, MobileNet-like depthwise.
SHAPES = [
    ("dense", 64, 64, 1, 56),
    ("dense", 128, 128, 1, 28),
    ("dense", 256, 256, 1, 14),
    ("dense", 512, 512, 1, 7),
    ("depthwise", 64, 64, 64, 56),
    ("depthwise", 256, 256, 256, 28),
    ("depthwise", 512, 512, 512, 14),
]


def block_for(conv: nn.Conv2d, tile: int) -> WinogradConv2d:
    block = WinogradConv2d(conv.in_channels, conv.out_channels, padding=1, groups=conv.groups, tile=tile)
    with torch.no_grad():
        block.weight.copy_(conv.weight)
        block.bias.copy_(conv.bias)
    return block.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-run-time", type=float, default=0.3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.2f}")
    print("| conv | batch | input | direct ms | F(2x2) speedup | F(2x2) MAC ratio (products only) |", end="")
    print(" F(2x2) additions per direct MAC | F(4x4) speedup | F(4x4) MAC ratio (products only) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for label, cin, cout, groups, size in SHAPES:
        for batch in (1, 8):
            torch.manual_seed(0)
            conv = nn.Conv2d(cin, cout, 3, padding=1, groups=groups).eval()
            x = torch.randn(batch, cin, size, size)
            direct = profile(conv, ExampleInputs((x,))).macs
            cells = []
            for tile in (2, 4):
                block = block_for(conv, tile)
                with torch.no_grad():
                    assert torch.allclose(block(x), conv(x), rtol=1e-3, atol=1e-3)
                kinds = profile(block, ExampleInputs((x,))).records[0].macs_by_kind
                (result,) = measure_layers(
                    [LayerCase(label, conv, block, (x,))], threads=args.threads, min_run_time=args.min_run_time
                )
                cells.append(
                    f"{result.speedup:.2f}x | {direct / sum(kinds.values()):.2f}x "
                    f"({direct / kinds['winograd_product']:.2f}x)"
                )
                if tile == 2:
                    additions = sum(block.additions_breakdown(batch, size, size).values())
                    cells.append(f"{additions / direct:.3f}")
                direct_ms = result.before.median_ms
            print(f"| {label} {cin}->{cout} | {batch} | {size}x{size} | {direct_ms:.2f} | " + " | ".join(cells) + " |")
    print(f"load average at the end {os.getloadavg()[0]:.2f} (2 cores shared with other work: speedups are noisy)")


if __name__ == "__main__":
    main()
