"""Separable ALS from the transfer against the whitened start, on statistics of a trained model.

The trained CRNN of ``bench_fit_crnn.py`` (``sample_models/crnn_bilstm``, cached under
``benchmarks/.cache/crnn_bilstm/``, trained there on first use; ``--weights`` reads another copy).
One pass of the original over 1,024 generated strips (seed 3, as that benchmark's calibration set)
accumulates each conv's symmetric statistics (its own input, its own output as the target: what the
fit of the first rewritten layer sees, and what the planner scores). Then per layer, the row of
``bench_solvers.compare_starts``: 64 rounds of ALS from the rule's SVD transfer (tolerance 1e-6, the
old path) against the whitened start then ALS. No data pass is timed.

    OMP_NUM_THREADS=1 python benchmarks/bench_separable_start.py [--samples 1024] [--weights FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fit_crnn import CRNN, make_strips, trained  # noqa: E402
from bench_solvers import compare_starts, header  # noqa: E402

from convrewrite.layers.separable import SeparableConv2d  # noqa: E402
from convrewrite.recovery.solvers import separable as separable_solver  # noqa: E402
from convrewrite.recovery.statistics import PatchGeometry, StatisticsAccumulator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--weights", type=Path, default=None, help="a CRNN safetensors file (default: the cache)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.weights is not None:
        if not args.weights.is_file():
            parser.error(f"--weights {args.weights}: no such file")
        model, how = CRNN(), f"loaded from {args.weights}"
        model.load_state_dict(load_file(str(args.weights)))
        model.eval()
    else:
        model, how = trained()
    strips, _ = make_strips(args.samples, seed=3)
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1}
    accumulators = {name: StatisticsAccumulator(PatchGeometry.of(m)) for name, m in convs.items()}
    handles = [
        m.register_forward_hook(lambda _m, args_, out, acc=accumulators[name]: acc.add(args_[0], out))
        for name, m in convs.items()
    ]
    began = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(strips), args.batch_size):
            model(strips[first : first + args.batch_size])
    for handle in handles:
        handle.remove()
    print(
        f"# bench_separable_start: trained CRNN ({how}), statistics of {args.samples} strips in "
        f"{time.perf_counter() - began:.1f} s; one torch thread, float64; machine shared with other jobs "
        f"(load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores)"
    )
    print(f"# after: tolerance {separable_solver.TOLERANCE:g}, at most 64 rounds")
    header()
    for name, conv in convs.items():
        stats = accumulators[name].stats
        weight = conv.weight.detach().double()
        bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(conv.out_channels)
        compare_starts(
            f"{name} {conv.in_channels}->{conv.out_channels} {'x'.join(map(str, conv.kernel_size))}",
            lambda conv=conv: SeparableConv2d(
                conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding
            ).double(),
            stats,
            PatchGeometry.of(conv),
            (weight, bias),
        )


if __name__ == "__main__":
    main()
