"""The ``low-rank`` rule: Linear and conv layers through rank r, checked against numpy's SVD.

The generic rule tests (test_rules_generic.py, test_rules_properties.py, test_zoo.py) already cover
its conv form on every geometry. Here: the Linear form, how the rank is chosen (against numpy's
SVD and hand formulas), the skips, and the engine offering Linear layers to this rule only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convrewrite.core.loading import ExampleInputs, LoadedModel
from convrewrite.engine.pipeline import analyse
from convrewrite.errors import UsageError
from convrewrite.layers import LowRankConv2d, LowRankLinear
from convrewrite.layers.dense import kernel_error
from convrewrite.rules.api import ConvSite

from .rule_test_support import measured, relative, rule


def linear_site(in_features: int, out_features: int, leading: tuple[int, ...] = (3,), bias: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias).double()
    x = torch.randn(*leading, in_features, dtype=torch.float64)
    with torch.no_grad():
        y = linear(x)
    return linear, x, ConvSite("fc", linear, tuple(x.shape), tuple(y.shape))


def numpy_truncation_error(weight: torch.Tensor, rank: int) -> float:
    """||M - M_r||_F / ||M||_F for the best rank-r approximation, from numpy's own SVD."""
    matrix = weight.detach().reshape(weight.shape[0], -1).numpy()
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return float(np.linalg.norm(matrix - approx) / np.linalg.norm(matrix))


@pytest.mark.parametrize("leading", [(5,), (2, 7), (2, 3, 4)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("spec", ["low-rank", "low-rank:rank=3", "low-rank:energy=0.8", "low-rank:ratio=0.3"])
def test_linear_is_two_linears_with_the_truncated_svd(spec: str, leading: tuple[int, ...], bias: bool) -> None:
    linear, x, site = linear_site(24, 16, leading, bias)
    current = rule(spec)
    assert current.skip_reason(site) is None
    replacement = current.build(site)
    block = replacement.module
    assert isinstance(block, LowRankLinear)
    rank = replacement.notes["rank"]
    assert (block.reduce.weight.shape, block.expand.weight.shape) == ((rank, 24), (16, rank))
    assert block.reduce.bias is None and (block.expand.bias is not None) == bias
    # to_dense() is what the block computes, and it is numpy's best rank-r approximation.
    weight, dense_bias = block.to_dense()
    with torch.no_grad():
        assert relative(block(x), F.linear(x, weight, dense_bias)) < 1e-12
        if bias:
            assert torch.equal(block.expand.bias, linear.bias)
    expected_error = numpy_truncation_error(linear.weight, rank)
    assert kernel_error(block, linear) == pytest.approx(expected_error, rel=1e-9, abs=1e-12)
    assert replacement.notes["energy_retained"] == pytest.approx(1 - expected_error**2, rel=1e-9)
    # Analytic cost: r*(in + out) weights (+ out bias); MACs r*(in + out) per position (all leading axes).
    positions = int(np.prod(leading))
    cost = current.cost(site)
    assert cost.params == rank * (24 + 16) + (16 if bias else 0) == sum(p.numel() for p in block.parameters())
    assert cost.macs == positions * rank * (24 + 16)
    assert measured(block, x) == (cost.params, cost.macs)


def test_the_rank_each_criterion_picks() -> None:
    linear, _, site = linear_site(256, 100)
    # ratio: floor(q * A*B / (A+B)) with A*B/(A+B) = 25600/356 = 71.91...
    assert rule("low-rank").plan(site).rank == 35  # default ratio 0.5
    assert rule("low-rank:ratio=0.25").plan(site).rank == 17
    assert rule("low-rank:rank=9").plan(site).rank == 9
    # energy: the smallest r whose squared singular values (numpy's) reach the fraction.
    s = np.linalg.svd(linear.weight.detach().numpy(), compute_uv=False)
    kept = np.cumsum(s**2) / np.sum(s**2)
    for energy in (0.3, 0.5, 0.62):
        expected = int(np.argmax(kept >= energy)) + 1
        assert rule(f"low-rank:energy={energy}").plan(site).rank == expected
        assert kept[expected - 1] >= energy > (kept[expected - 2] if expected > 1 else 0.0)


def test_a_conv_becomes_a_kxk_conv_to_rank_r_then_a_1x1() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 32, 3, stride=2, padding=1, dilation=1, padding_mode="reflect").double()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        y = conv(x)
    site = ConvSite("conv", conv, tuple(x.shape), tuple(y.shape))
    current = rule("low-rank:rank=6")
    block = current.build(site).module
    assert isinstance(block, LowRankConv2d)
    reduce, expand = block.reduce, block.expand
    assert (reduce.in_channels, reduce.out_channels, reduce.kernel_size, reduce.stride) == (8, 6, (3, 3), (2, 2))
    assert reduce.padding_mode == "reflect" and reduce.bias is None
    assert (expand.in_channels, expand.out_channels, expand.kernel_size) == (6, 32, (1, 1))
    assert kernel_error(block, conv) == pytest.approx(numpy_truncation_error(conv.weight, 6), rel=1e-9)
    # Hand count: 6*(8*9) + 32*6 weights + 32 bias; per output position 6*72 + 32*6 MACs, 2*5*5 positions.
    assert current.cost(site).params == 6 * 72 + 32 * 6 + 32
    assert current.cost(site).macs == 2 * 5 * 5 * (6 * 72 + 32 * 6)
    assert measured(block, x) == (current.cost(site).params, current.cost(site).macs)


@pytest.mark.parametrize(
    ("spec", "features", "fragments"),
    [
        # 16x16: r*(16+16) < 256 only for r <= 7.
        ("low-rank:rank=8", (16, 16), ["no saving: rank=8 needs rank 8 of 16 for the 16x16 weight", "up to 7"]),
        ("low-rank:energy=1", (16, 16), ["no saving: energy=1 needs rank 16 of 16", "only ranks up to 7"]),
        ("low-rank:ratio=0.1", (4, 4), ["ratio=0.1 gives rank 0 for the 4x4 weight"]),
        # 1 output: r*(8+1) < 8 has no solution.
        ("low-rank:rank=1", (8, 1), ["no rank saves parameters"]),
    ],
)
def test_skips_where_the_factorisation_saves_nothing(spec: str, features: tuple[int, int], fragments: list[str]):
    _, _, site = linear_site(*features)
    reason = rule(spec).skip_reason(site)
    assert reason is not None
    for fragment in fragments:
        assert fragment in reason, reason


def test_rank_seven_of_sixteen_still_saves() -> None:
    _, _, site = linear_site(16, 16)
    current = rule("low-rank:rank=7")
    assert current.skip_reason(site) is None
    assert current.cost(site).params == 7 * 32 + 16 < 16 * 16 + 16


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("low-rank:rank=4,energy=0.9", "give at most one of rank, ratio and energy, not rank and energy"),
        ("low-rank:ratio=1", "ratio must be between 0 and 1"),
        ("low-rank:energy=0", "energy must be in (0, 1]"),
        ("low-rank:rank=0", "rank must be a positive integer"),
    ],
)
def test_bad_options_are_usage_errors(spec: str, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("]", r"\]")):
        rule(spec)


class Classifier(nn.Module):
    """Convs, then Linear layers that hold most of the parameters (the VGG situation), plus the
    cases the rule must leave alone: attention's out_proj (never called), a Linear subclass and a
    tied pair."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc1 = nn.Linear(8 * 16, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 64)
        self.fc3.weight = self.fc2.weight  # tied
        self.head = _Scaled(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        tokens = x.flatten(2).transpose(1, 2)
        tokens, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        x = torch.relu(self.fc1(tokens.flatten(1)))
        return self.head(self.fc3(torch.relu(self.fc2(x))))


class _Scaled(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


def _loaded() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel(Classifier().eval(), ExampleInputs((torch.randn(2, 3, 4, 4),)), "classifier", "c", "test")


def test_the_engine_offers_linear_layers_to_low_rank_only() -> None:
    result = analyse(_loaded(), [rule("low-rank:rank=4")])
    assert {r.name for r in result.rewrites} == {"conv", "fc1"}
    assert isinstance(result.model.fc1, LowRankLinear)
    reasons = {s.name: s.reason for s in result.skipped}
    assert reasons["attention.out_proj"].startswith("MultiheadAttention.forward reads out_proj.weight directly")
    assert reasons["head"] == "_Scaled is a subclass of Linear: its forward may differ"
    assert "weight is tied to" in reasons["fc2"] and "weight is tied to" in reasons["fc3"]
    for record in result.rewrites:
        assert (record.params_after, record.macs_after) == (record.analytic_params, record.analytic_macs)
    # The conv rules never see a Linear: no rewrite and no skip record names one.
    separable = analyse(_loaded(), [rule("separable")])
    linear_names = {"attention.out_proj", "fc1", "fc2", "fc3", "head"}
    assert not linear_names & ({s.name for s in separable.skipped} | {r.name for r in separable.rewrites})


def test_apply_writes_a_standalone_model_with_low_rank_linears(tmp_path, monkeypatch, capsys) -> None:
    from convrewrite.cli import run
    from convrewrite.core.loading import load_model

    from .rule_test_support import REPO_SAMPLES

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    model_path = REPO_SAMPLES / "zoo" / "vgg.py"
    argv = ["apply", str(model_path), "--rule", "low-rank:energy=0.5", "--out", str(out), "--input-shape", "1,3,32,32"]
    assert run(argv) == 0, capsys.readouterr().err
    source = (out / "model.py").read_text()
    assert "class LowRankLinear(nn.Sequential)" in source and "class LowRankConv2d" in source
    assert "convrewrite" not in "\n".join(line for line in source.splitlines() if line.startswith(("import", "from")))
    reloaded = load_model(str(out))
    assert isinstance(reloaded.model.classifier[0], nn.Module)
    assert type(reloaded.model.classifier[0]).__name__ == "LowRankLinear"
    weight, _ = reloaded.model.classifier[0].to_dense()  # to_dense() works in the generated file (torch only)
    assert weight.shape == (1024, 512)
