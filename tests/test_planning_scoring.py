"""The shared-factorization scores of ``LayerScorer`` against independent per-candidate solves.

Oracles: ``candidate_error`` (one ``solve_from_statistics`` per candidate, the path the planner
took before), torch running the fitted block (or the scored kernel as a dense conv) on the held-out
samples, and the dense ``LayerStatistics.squared_error`` for the structured error formulas.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convrewrite.planning.scoring import (
    LayerScorer,
    block_squared_error,
    candidate_error,
    collect,
    factored_squared_error,
)
from convrewrite.recovery.batches import TensorBatches
from convrewrite.rules.api import ConvSite, make_rule

SPECS = [
    "low-rank:ratio=0.1",
    "low-rank:ratio=0.35",
    "low-rank:ratio=0.7",
    "low-rank:rank=11",  # above out/2: the eigenbasis is (nearly) all kept
    "group-shuffle:groups=2",
    "group-shuffle:groups=4",
    "log-group:groups=2",
    "log-group:groups=3",
]


def _layer(kind: str) -> tuple[nn.Module, torch.Tensor, ConvSite]:
    torch.manual_seed(3)
    if kind in ("conv2d", "conv2d-nobias"):
        # No bias: the conv of every conv-BatchNorm pair (its low-rank block has no bias to solve).
        layer: nn.Module = nn.Conv2d(8, 12, kernel_size=3, padding=1, bias=kind == "conv2d").double()
        # Correlated inputs, so that the gram is far from a multiple of the identity.
        x = torch.randn(48, 8, 9, 9, dtype=torch.float64)
        x = x + 0.8 * x.roll(1, dims=1) + 0.3
        site = ConvSite("0", layer, (1, 8, 9, 9), (1, 12, 9, 9))
    else:
        layer = nn.Conv1d(8, 16, kernel_size=5, stride=2).double()
        x = torch.randn(48, 8, 31, dtype=torch.float64).cumsum(dim=2) / 3
        site = ConvSite("0", layer, (1, 8, 31), (1, 16, 14))
    return layer, x, site


@pytest.mark.parametrize("kind", ["conv2d", "conv1d", "conv2d-nobias"])
@pytest.mark.parametrize("spec", SPECS)
def test_shared_score_equals_the_independent_solve(kind: str, spec: str) -> None:
    layer, x, site = _layer(kind)
    data = TensorBatches((x,), batch_size=16, holdout=0.25)
    stats = collect(nn.Sequential(layer), ["0"], data, device=torch.device("cpu"), product=torch.float64)["0"]
    scorer = LayerScorer(layer, stats)
    block = make_rule(spec).build(site).module.double()
    independent = copy.deepcopy(block)
    assert scorer._fast(copy.deepcopy(block)) is not None  # the shared path, not the fallback
    shared_error, shared_kernel = scorer.score(block)
    error, kernel = candidate_error(independent, layer, stats)
    assert shared_error == pytest.approx(error, rel=1e-9, abs=1e-12)
    assert float((shared_kernel - kernel).abs().max()) <= 1e-9 * float(kernel.abs().max())
    # Independent of both solves: the scored kernel run as a dense conv on the held-out samples.
    held = x[data.indices["holdout"]]
    weight = shared_kernel[:, :-1].reshape(layer.weight.shape)
    conv = F.conv1d if kind == "conv1d" else F.conv2d
    with torch.no_grad():
        got = conv(held, weight, shared_kernel[:, -1], stride=layer.stride, padding=layer.padding)
        want = layer(held)
    assert shared_error == pytest.approx(float((got - want).norm() / want.norm()), rel=1e-8)
    if not spec.startswith("low-rank"):  # the block itself carries the fitted weights
        with torch.no_grad():
            ran = block(held)
        assert shared_error == pytest.approx(float((ran - want).norm() / want.norm()), rel=1e-8)


def test_structured_squared_errors_equal_the_dense_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    n, out, rows = 13, 6, 200
    a = torch.randn(rows, n, generator=generator, dtype=torch.float64)
    y = torch.randn(rows, out, generator=generator, dtype=torch.float64)
    from convrewrite.recovery.statistics import LayerStatistics

    stats = LayerStatistics(gram=a.t() @ a, cross=a.t() @ y, energy=(y**2).sum(dim=0), rows=rows)
    left = torch.randn(out, 3, generator=generator, dtype=torch.float64)
    right = torch.randn(3, n, generator=generator, dtype=torch.float64)
    brute = float(((a @ (left @ right).t() - y) ** 2).sum())
    assert factored_squared_error(stats, left, right) == pytest.approx(brute, rel=1e-10)
    kernel = torch.zeros(out, n, dtype=torch.float64)
    supports = [([0, 3, 4], [0, 1, 2, 12]), ([1, 2, 5], [5, 6, 7, 8, 12])]
    for rows_, columns in supports:
        kernel[torch.tensor(rows_).unsqueeze(1), torch.tensor(columns)] = torch.randn(
            len(rows_), len(columns), generator=generator, dtype=torch.float64
        )
    brute = float(((a @ kernel.t() - y) ** 2).sum())
    assert block_squared_error(stats, kernel, supports) == pytest.approx(brute, rel=1e-10)


@pytest.mark.parametrize("multiplier", [1, 2])
def test_separable_score_is_the_fitted_block_and_lies_between_transfer_and_als(multiplier: int) -> None:
    layer, x, site = _layer("conv2d")
    data = TensorBatches((x,), batch_size=16, holdout=0.25)
    stats = collect(nn.Sequential(layer), ["0"], data, device=torch.device("cpu"), product=torch.float64)["0"]
    block = make_rule(f"separable:multiplier={multiplier}").build(site).module.double()
    transfer, als = copy.deepcopy(block), copy.deepcopy(block)
    error, kernel = LayerScorer(layer, stats).score(block)
    held = x[data.indices["holdout"]]
    with torch.no_grad():
        want = layer(held)
        assert error == pytest.approx(float((block(held) - want).norm() / want.norm()), rel=1e-8)
    from convrewrite.layers.dense import dense_kernel
    from convrewrite.recovery.statistics import kernel_matrix

    start = kernel_matrix(*dense_kernel(transfer))
    _, als_kernel = candidate_error(als, layer, stats, rounds=3)
    fit = stats["fit"]
    assert fit.squared_error(als_kernel) <= fit.squared_error(kernel) <= fit.squared_error(start)


@pytest.mark.parametrize("kind", ["conv2d", "conv2d-nobias"])
def test_separable_scores_sharing_one_factor_equal_fresh_scorers(kind: str) -> None:
    """The multipliers of a layer share the whitened start's factorization of the gram (and score the
    held-out error from the middle features): each score equals a scorer of its own, and the
    held-out error equals the fitted block run by torch on the held-out samples."""
    layer, x, site = _layer(kind)
    data = TensorBatches((x,), batch_size=16, holdout=0.25)
    stats = collect(nn.Sequential(layer), ["0"], data, device=torch.device("cpu"), product=torch.float64)["0"]
    shared = LayerScorer(layer, stats)
    held = x[data.indices["holdout"]]
    with torch.no_grad():
        want = layer(held)
    for multiplier in (1, 2, 4):
        block = make_rule(f"separable:multiplier={multiplier}").build(site).module.double()
        alone = copy.deepcopy(block)
        error, kernel = shared.score(block)
        fresh_error, fresh_kernel = LayerScorer(layer, stats).score(alone)
        assert error == pytest.approx(fresh_error, rel=1e-10)
        assert float((kernel - fresh_kernel).abs().max()) <= 1e-10 * float(kernel.abs().max())
        with torch.no_grad():
            assert error == pytest.approx(float((block(held) - want).norm() / want.norm()), rel=1e-8)
    assert "factor" in shared._full  # the first start kept it for the next ones


def test_split_batch_cuts_every_batched_tensor_and_passes_the_rest() -> None:
    from convrewrite.planning.scoring import split_batch
    from convrewrite.recovery.batches import Batch

    x = torch.arange(10.0).reshape(10, 1)
    mask = torch.ones(3)  # not batched: passed whole
    pieces = list(split_batch(Batch((x,), {"mask": mask, "scale": 2}, 10), 4))
    assert [piece.size for piece in pieces] == [4, 4, 2]
    assert torch.equal(torch.cat([piece.args[0] for piece in pieces]), x)
    assert all(piece.kwargs["mask"] is mask and piece.kwargs["scale"] == 2 for piece in pieces)


def test_float32_products_score_candidates_as_float64_ones_do() -> None:
    """The planner's default float32 statistics products move a candidate's score by far less than
    the differences between candidates (1e-5 relative here; scores differ in the second digit)."""
    layer, x, site = _layer("conv2d")
    data = TensorBatches((x,), batch_size=16, holdout=0.25)
    scores = {}
    for product in (torch.float32, torch.float64):
        stats = collect(nn.Sequential(layer), ["0"], data, device=torch.device("cpu"), product=product)["0"]
        block = make_rule("separable").build(site).module.double()
        scores[product] = LayerScorer(layer, stats).score(block)[0]
    assert scores[torch.float32] == pytest.approx(scores[torch.float64], rel=1e-5)
