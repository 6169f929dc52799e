"""Statistics of a layer fit: patch geometry, streamed accumulation, the symmetric collector.

Oracles: torch's own conv/linear (a dense kernel times the unfolded patches must give the layer's
output), a brute-force im2col written here with explicit loops over positions and taps, sums over
whole tensors, and the sum of two half-sets.
"""

from __future__ import annotations

import itertools
import os
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convrewrite.recovery.batches import TensorBatches
from convrewrite.recovery.statistics import (
    LayerStatistics,
    PatchGeometry,
    StatisticsAccumulator,
    StatisticsTooLarge,
    all_reduce_statistics,
    collect_statistics,
    kernel_matrix,
)

PAD = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}

LAYERS = [
    (lambda: nn.Conv1d(3, 4, 5, stride=2, padding=3, dilation=2, padding_mode="reflect"), (2, 3, 17)),
    (lambda: nn.Conv1d(2, 3, 4, padding="same"), (2, 2, 9)),
    (lambda: nn.Conv2d(3, 5, 3, padding="same", dilation=2), (2, 3, 9, 8)),
    (lambda: nn.Conv2d(3, 5, (2, 3), stride=(2, 1), padding=(1, 0), padding_mode="replicate"), (2, 3, 7, 9)),
    (lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1, padding_mode="circular"), (2, 4, 6, 7)),
    (lambda: nn.Conv2d(3, 4, 1, stride=2, bias=False), (2, 3, 6, 5)),
    (lambda: nn.Conv3d(2, 3, (1, 3, 2), stride=(1, 2, 1), padding=(0, 1, 1)), (2, 2, 4, 6, 5)),
    (lambda: nn.Linear(7, 3), (2, 5, 7)),
]


def brute_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """im2col by explicit loops: pad as torch does, then read every tap of every position."""
    if isinstance(module, nn.Linear):
        return torch.cat([x.reshape(-1, x.shape[-1]), torch.ones(x[..., :1].numel(), 1, dtype=x.dtype)], 1)
    dims = x.dim() - 2
    k, s, d = module.kernel_size, module.stride, module.dilation
    if module.padding == "same":
        totals = [d[i] * (k[i] - 1) for i in range(dims)]
        pads = [(t // 2, t - t // 2) for t in totals]
    else:
        pads = [(p, p) for p in module.padding]
    flat = [v for pair in reversed(pads) for v in pair]
    xp = F.pad(x, flat, mode=PAD[module.padding_mode]) if module.padding_mode != "zeros" else F.pad(x, flat)
    out_sizes = [(xp.shape[2 + i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(dims)]
    rows = []
    for n in range(x.shape[0]):
        for position in itertools.product(*[range(o) for o in out_sizes]):
            patch = []
            for c in range(x.shape[1]):
                for tap in itertools.product(*[range(kk) for kk in k]):
                    index = tuple(position[i] * s[i] + tap[i] * d[i] for i in range(dims))
                    patch.append(xp[(n, c, *index)])
            rows.append(torch.stack(patch + [torch.ones((), dtype=x.dtype)]))
    return torch.stack(rows)


@pytest.mark.parametrize("index", range(len(LAYERS)))
def test_unfold_matches_brute_force_and_the_layer(index: int) -> None:
    make, shape = LAYERS[index]
    torch.manual_seed(index)
    module = make().double()
    x = torch.randn(shape, dtype=torch.float64)
    geometry = PatchGeometry.of(module)
    patches = geometry.unfold(x)
    assert torch.equal(patches, brute_patches(module, x))
    with torch.no_grad():
        output = module(x)
    predicted = patches @ geometry.dense_kernel(module).t()
    assert torch.allclose(predicted, geometry.target_rows(output), atol=1e-12)


@pytest.mark.parametrize("index", range(len(LAYERS)))
def test_statistics_equal_brute_force_sums(index: int) -> None:
    make, shape = LAYERS[index]
    torch.manual_seed(100 + index)
    module = make().double()
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        y = module(x)
    geometry = PatchGeometry.of(module)
    accumulator = StatisticsAccumulator(geometry, chunk_elements=64)  # many chunks
    accumulator.add(x, y)
    stats = accumulator.stats
    a = brute_patches(module, x)
    t = geometry.target_rows(y)
    assert stats.rows == a.shape[0]
    assert torch.allclose(stats.gram, a.t() @ a, atol=1e-10)
    assert torch.allclose(stats.cross, a.t() @ t, atol=1e-10)
    assert torch.allclose(stats.energy, t.pow(2).sum(0), atol=1e-10)
    # The loss the statistics define is the direct squared error, for the layer's own kernel and another.
    kernel = geometry.dense_kernel(module)
    assert stats.squared_error(kernel) == pytest.approx(0.0, abs=1e-8)
    other = torch.randn_like(kernel)
    direct = float((a @ other.t() - t).pow(2).sum())
    assert stats.squared_error(other) == pytest.approx(direct, rel=1e-9)


def test_two_half_sets_add_up_to_the_whole() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(10, 3, 6, 6, dtype=torch.float64)
    y = conv(x)
    geometry = PatchGeometry.of(conv)
    whole, first, second = (StatisticsAccumulator(geometry) for _ in range(3))
    whole.add(x, y)
    first.add(x[:4], y[:4])
    second.add(x[4:], y[4:])
    summed = first.stats.add_(second.stats)
    assert summed.rows == whole.stats.rows
    for name in ("gram", "cross", "energy"):
        assert torch.allclose(getattr(summed, name), getattr(whole.stats, name), rtol=1e-12, atol=1e-10), name


def test_float32_products_are_close_but_float64_is_exact() -> None:
    torch.manual_seed(4)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(16, 8, 10, 10)
    y = conv(x)
    geometry = PatchGeometry.of(conv)
    exact = StatisticsAccumulator(geometry)
    fast = StatisticsAccumulator(geometry, product=torch.float32)
    exact.add(x, y)
    fast.add(x, y)
    a = geometry.unfold(x.double())
    assert torch.allclose(exact.stats.gram, a.t() @ a, rtol=1e-12, atol=1e-9)
    error = float((fast.stats.gram - exact.stats.gram).abs().max() / exact.stats.gram.abs().max())
    assert 0 < error < 1e-5


def test_too_wide_a_patch_is_refused_with_its_size() -> None:
    conv = nn.Conv1d(200, 4, 64)
    with pytest.raises(StatisticsTooLarge, match="12,801 unknowns"):
        StatisticsAccumulator(PatchGeometry.of(conv))
    with pytest.raises(ValueError, match="no patch geometry for a ReLU"):
        PatchGeometry.of(nn.ReLU())


def test_streamed_accumulation_memory_is_flat_in_samples() -> None:
    """Peak traced memory of streaming 4 vs 32 batches is the same (no per-sample storage)."""
    conv = nn.Conv2d(8, 16, 3, padding=1)
    geometry = PatchGeometry.of(conv)

    def peak(batches: int) -> int:
        torch.manual_seed(0)
        accumulator = StatisticsAccumulator(geometry, chunk_elements=1 << 16)
        tracemalloc.start()
        try:
            with torch.no_grad():
                for _ in range(batches):
                    x = torch.randn(16, 8, 16, 16)
                    accumulator.add(x, conv(x))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(4), peak(32)
    # torch's allocations are not traced by tracemalloc; what is traced must not grow with samples.
    assert large < small * 1.5 + 256 * 1024


def test_collect_statistics_one_pass_all_layers() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2), nn.Flatten(), nn.Linear(4 * 3 * 3, 5)
    )
    x = torch.randn(20, 3, 8, 8)
    data = TensorBatches((x,), batch_size=6, holdout=0.25, shuffle=False)
    calls = {"count": 0}
    model.register_forward_pre_hook(lambda m, a: calls.__setitem__("count", calls["count"] + 1))
    stats = collect_statistics(model, ["0", "2", "4"], data)
    batches = len(list(data.batches("fit"))) + len(list(data.batches("holdout")))
    assert calls["count"] == batches  # one pass over each split, every layer at once
    assert set(stats) == {"0", "2", "4"} and all(set(v) == {"fit", "holdout"} for v in stats.values())
    fit_x = torch.cat([b.args[0] for b in data.batches("fit")])
    with torch.no_grad():
        inputs = {"0": fit_x, "2": model[1](model[0](fit_x))}
        inputs["4"] = model[3](model[2](inputs["2"]))
    for name, x_in in inputs.items():
        module = model.get_submodule(name)
        geometry = PatchGeometry.of(module)
        a = geometry.unfold(x_in.double())
        layer_stats: LayerStatistics = stats[name]["fit"]
        assert torch.allclose(layer_stats.gram, a.t() @ a, rtol=1e-9, atol=1e-7), name
        # Symmetric: the target is the layer itself, so its own kernel has (almost) zero error.
        assert layer_stats.relative_error(kernel_matrix(module.weight, module.bias)) < 1e-6, name
    assert model.training  # modes restored


def test_wide_patches_accumulate_the_lower_block_triangle_and_read_whole() -> None:
    """n > SYMMETRIC_BLOCK: the blocked symmetric accumulation equals aᵀa, over several adds."""
    torch.manual_seed(6)
    conv = nn.Conv2d(64, 3, 3, padding=1).double()  # n = 577 > 512
    geometry = PatchGeometry.of(conv)
    accumulator = StatisticsAccumulator(geometry, chunk_elements=1 << 15)
    accumulator.shifted = False  # the unfolded path (tests/test_statistics_moments.py: the shifted one)
    xs = [torch.randn(3, 64, 5, 5, dtype=torch.float64) for _ in range(2)]
    with torch.no_grad():
        for x in xs:
            accumulator.add(x, conv(x))
    a = torch.cat([geometry.unfold(x) for x in xs])
    assert torch.allclose(accumulator.stats.gram, a.t() @ a, rtol=1e-12, atol=1e-9)
    assert torch.equal(accumulator.stats.gram, accumulator.stats.gram.t())


def _half_statistics(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(8)
        conv = nn.Conv1d(3, 4, 5, padding=2)
        x = torch.randn(12, 3, 20)
        with torch.no_grad():
            y = conv(x)
        accumulator = StatisticsAccumulator(PatchGeometry.of(conv))
        half = slice(0, 5) if rank == 0 else slice(5, 12)
        accumulator.add(x[half], y[half])
        stats = all_reduce_statistics(accumulator.stats)
        torch.save(
            {"gram": stats.gram, "cross": stats.cross, "energy": stats.energy, "rows": stats.rows},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_all_reduce_to_the_whole_set(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(
        _half_statistics,
        args=(2, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="fork" if sys.platform == "linux" else "spawn",
    )
    torch.manual_seed(8)
    conv = nn.Conv1d(3, 4, 5, padding=2)
    x = torch.randn(12, 3, 20)
    with torch.no_grad():
        y = conv(x)
    whole = StatisticsAccumulator(PatchGeometry.of(conv))
    whole.add(x, y)
    for rank in (0, 1):
        shared = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert shared["rows"] == whole.stats.rows == 12 * 20
        for name in ("gram", "cross", "energy"):
            assert torch.allclose(shared[name], getattr(whole.stats, name), rtol=1e-10, atol=1e-9), (rank, name)
