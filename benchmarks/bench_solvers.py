"""Time the statistics solvers on layers of real size (512 -> 512 3x3, a 64-tap Conv1d).

No data pass is timed: the solvers read only a ``LayerStatistics``. The statistics here are
synthetic but consistent (what a large sample of inputs with a channel covariance ``S_c``, a tap
covariance ``S_t`` and a mean would give; the target is a random dense conv plus independent
noise of 10% of its energy), built directly as sums: ``gram = R (S_c ⊗ S_t + μμᵀ)`` with the ones
column, ``cross = gram Kᵀ``, ``energy = diag(K gram Kᵀ) + noise``. The Kronecker product is only
how this benchmark makes a full-rank, correlated gram; the solvers never form one.

Per block: the method the dispatcher chose, the wall time of ``solve_from_statistics``, the
number of rounds, and the relative layer error sqrt(loss / energy) at the start (the block's own
initialization) and after the solve (0.316 is the noise floor: 10% of the energy is noise).

The second table compares the two starts of separable alternating least squares, on the same
statistics and from the weights the ``separable`` rule transfers (the SVD of the original
kernel): "before" starts ALS from that transfer (``WHITENED_START`` off) for ``SOLVER_ROUNDS`` = 64
rounds at the old tolerance 1e-6, as the fit did; "after" takes the whitened-SVD start when it is
lower and runs ALS from it. ``xfer+1``: the relative error after one round from the transfer;
``start``: that of the whitened start alone ("-" when the transfer was kept). ``to old`` is the
first round of "after" whose loss is within 1e-4 (relative) of the old 64-round loss (0 = the
start alone already is).

    OMP_NUM_THREADS=1 python benchmarks/bench_solvers.py [--threads 1] [--channels 512] [--starts-only]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from typing import Any

import torch
from torch import nn

from convrewrite.layers.channelwise import ChannelwiseConv2d
from convrewrite.layers.low_rank import LowRankConv2d
from convrewrite.layers.separable import SeparableConv1d, SeparableConv2d
from convrewrite.recovery.solvers import separable as separable_solver
from convrewrite.recovery.solvers import solve_from_statistics
from convrewrite.recovery.statistics import LayerStatistics, PatchGeometry
from convrewrite.rules.separable import svd_factors


def correlation(size: int, rho: float) -> torch.Tensor:
    index = torch.arange(size, dtype=torch.float64)
    return rho ** (index.unsqueeze(0) - index.unsqueeze(1)).abs()


def synthetic_statistics(
    original: nn.Module, rows: int, generator: torch.Generator, *, with_kernel: bool = False
) -> Any:
    out, cin = int(original.out_channels), int(original.in_channels)
    taps = math.prod(original.kernel_size)
    scales = torch.logspace(0, -1.5, cin, dtype=torch.float64)
    channels = correlation(cin, 0.6) * torch.outer(scales, scales)
    covariance = torch.kron(channels, correlation(taps, 0.8))
    mean = 0.3 * torch.randn(cin * taps, generator=generator, dtype=torch.float64)
    n = cin * taps + 1
    gram = torch.empty(n, n, dtype=torch.float64)
    gram[:-1, :-1] = rows * (covariance + torch.outer(mean, mean))
    gram[:-1, -1] = gram[-1, :-1] = rows * mean
    gram[-1, -1] = rows
    kernel = torch.randn(out, n, generator=generator, dtype=torch.float64) / math.sqrt(n)
    cross = gram @ kernel.t()
    clean = (kernel * (kernel @ gram)).sum(1)
    energy = clean / 0.9  # 10% of each output's energy is noise no kernel can explain
    stats = LayerStatistics(gram=gram, cross=cross, energy=energy, rows=rows)
    if with_kernel:
        # The "trained" original's weights, for the transfer: (out, in, *k) and its bias.
        return stats, kernel[:, :-1].reshape(out, cin, *original.kernel_size), kernel[:, -1]
    return stats


def run(name: str, block: nn.Module, stats: LayerStatistics, geometry: PatchGeometry, rounds: int) -> None:
    began = time.perf_counter()
    result = solve_from_statistics(block, stats, geometry=geometry, rounds=rounds)
    wall = time.perf_counter() - began
    assert result is not None
    energy = float(stats.energy.sum())
    start, end = (math.sqrt(v / energy) for v in (result.losses[0], result.losses[-1]))
    rounds = result.method.rsplit("(", 1)[1].split()[0] if "rounds)" in result.method else len(result.losses) - 1
    print(
        f"{name:<34} {stats.unknowns:>6,} {wall:>8.2f} {rounds:>6} {start:>10.4f} {end:>10.4f}  {result.method}",
        flush=True,
    )


def transferred(block: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """``block`` with the separable rule's SVD transfer of ``weight`` (and the bias on the pointwise)."""
    depthwise, pointwise, _ = svd_factors(weight, int(block[0].out_channels) // int(block[0].in_channels))
    with torch.no_grad():
        block[0].weight.copy_(depthwise)
        block[0].bias.zero_()
        block[1].weight.copy_(pointwise.reshape(block[1].weight.shape))
        block[1].bias.copy_(bias)
    return block


def header() -> None:
    """The column heads of ``compare_starts``'s rows."""
    print(
        f"{'block':<32} {'n':>6} {'rel xfer':>9} {'xfer+1':>8} {'start':>8} | {'old s':>7} {'rnds':>5} "
        f"{'old rel':>9} | {'new s':>7} {'rnds':>5} {'new rel':>9} {'to old':>6} {'new/old-1':>10}  method",
        flush=True,
    )


def compare_starts(name: str, make: Any, stats: LayerStatistics, geometry: PatchGeometry, kernel: tuple) -> None:
    """One row of the start comparison: the old path (transfer, 64 rounds, tolerance 1e-6) and the new."""
    energy = float(stats.energy.sum())
    figures = {}
    saved = (separable_solver.WHITENED_START, separable_solver.TOLERANCE)
    try:
        for label, whitened, tolerance, rounds in (("before", False, 1e-6, 64), ("after", True, saved[1], 64)):
            separable_solver.WHITENED_START, separable_solver.TOLERANCE = whitened, tolerance
            block = transferred(make(), *kernel)
            began = time.perf_counter()
            result = solve_from_statistics(block, stats, geometry=geometry, rounds=rounds)
            assert result is not None
            figures[label] = (time.perf_counter() - began, result)
    finally:
        separable_solver.WHITENED_START, separable_solver.TOLERANCE = saved
    (old_wall, old), (new_wall, new) = figures["before"], figures["after"]
    old_rounds = int(old.method.rsplit("(", 1)[1].split()[0])
    new_rounds = int(new.method.rsplit("(", 1)[1].split()[0])
    # The "after" history: [transfer, whitened start (when taken), one per round]; the first entry
    # within 1e-4 of the old 64-round loss, counted in rounds (0 = the start alone).
    goal = old.losses[-1] * (1 + 1e-4)
    offset = 1 if "whitened" in new.method else 0
    reached = [i for i, v in enumerate(new.losses) if i >= offset and v <= goal]
    rounds_to_old = reached[0] - offset if reached else None

    def rel(value: float) -> float:
        return math.sqrt(value / energy)

    first = old.losses[min(1, len(old.losses) - 1)]
    print(
        f"{name:<32} {stats.unknowns:>6,} {rel(old.losses[0]):>9.4f} {rel(first):>8.4f} "
        f"{'-' if not offset else f'{rel(new.losses[1]):.4f}':>8} | {old_wall:>7.1f} {old_rounds:>5} "
        f"{rel(old.losses[-1]):>9.5f} | {new_wall:>7.1f} {new_rounds:>5} {rel(new.losses[-1]):>9.5f} "
        f"{'-' if rounds_to_old is None else rounds_to_old:>6} {new.losses[-1] / old.losses[-1] - 1:>+10.2e}  "
        f"{new.method}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--starts-only", action="store_true", help="only the separable start comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the blocks' initializations (the starts)
    c = args.channels
    print(
        f"# bench_solvers: torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores "
        f"(machine shared with other jobs), {args.threads} thread(s), float64"
    )
    if not args.starts_only:
        others(args, generator)
    print()
    print("# separable ALS from the rule's SVD transfer: before = 64 rounds from the transfer (tolerance 1e-6),")
    print(f"# after = the whitened start when lower, then ALS (tolerance {separable_solver.TOLERANCE:g}, at most 64)")
    header()
    generator = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(c, c, 3, padding=1).double()
    stats, weight, bias = synthetic_statistics(conv, 100_000, generator, with_kernel=True)
    compare_starts(
        f"SeparableConv2d {c}->{c} 3x3",
        lambda: SeparableConv2d(c, c, 3, padding=1).double(),
        stats,
        PatchGeometry.of(conv),
        (weight, bias),
    )
    tdnn = nn.Conv1d(64, 64, 64, padding=32).double()
    stats, weight, bias = synthetic_statistics(tdnn, 100_000, generator, with_kernel=True)
    compare_starts(
        "SeparableConv1d 64->64, 64 taps",
        lambda: SeparableConv1d(64, 64, 64, padding=32).double(),
        stats,
        PatchGeometry.of(tdnn),
        (weight, bias),
    )


def others(args: argparse.Namespace, generator: torch.Generator) -> None:
    """The first table: every solver on layers of real size, from the blocks' own initialization."""
    c = args.channels
    print(f"{'block':<34} {'n':>6} {'wall s':>8} {'rounds':>6} {'rel start':>10} {'rel after':>10}  method", flush=True)
    conv = nn.Conv2d(c, c, 3, padding=1).double()
    stats = synthetic_statistics(conv, 100_000, generator)
    geometry = PatchGeometry.of(conv)
    run(f"Conv2d {c}->{c} 3x3 (least squares)", nn.Conv2d(c, c, 3, padding=1).double(), stats, geometry, args.rounds)
    run(f"SeparableConv2d {c}->{c} 3x3", SeparableConv2d(c, c, 3, padding=1).double(), stats, geometry, args.rounds)
    run(
        f"LowRankConv2d {c}->{c} 3x3 rank {c // 4}",
        LowRankConv2d(c, c, 3, c // 4, padding=1).double(),
        stats,
        geometry,
        args.rounds,
    )
    run(f"Conv2d {c}->{c} 3x3 groups 8", nn.Conv2d(c, c, 3, padding=1, groups=8).double(), stats, geometry, args.rounds)
    pointwise = nn.Conv2d(c, c, 1).double()
    stats1 = synthetic_statistics(pointwise, 100_000, generator)
    run(
        f"ChannelwiseConv2d {c}->{c} (dc 7, g 2)",
        ChannelwiseConv2d(c, c, 7, groups=2).double(),
        stats1,
        PatchGeometry.of(pointwise),
        args.rounds,
    )
    tdnn = nn.Conv1d(64, 64, 64, padding=32).double()
    stats_1d = synthetic_statistics(tdnn, 100_000, generator)
    run(
        "SeparableConv1d 64->64, 64 taps",
        SeparableConv1d(64, 64, 64, padding=32).double(),
        stats_1d,
        PatchGeometry.of(tdnn),
        args.rounds,
    )


if __name__ == "__main__":
    main()
