"""The log-group rule: recursive halving, the document's TDNN shapes, block-diagonal projection."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from convrewrite.commands.run import run_job
from convrewrite.config.job import make_job
from convrewrite.config.project import ProjectConfig
from convrewrite.errors import UsageError
from convrewrite.layers import LogGroupConv1d, LogGroupConv2d, LogGroupConv3d, log_group_sizes
from convrewrite.layers.dense import dense_kernel, kernel_error

from .rule_test_support import REPO_SAMPLES, equivalent_conv, example_input, make_conv, relative, rule
from .rule_test_support import site_of as make_site


@pytest.mark.parametrize(
    "channels,groups,sizes",
    [
        (40, 4, [20, 10, 5, 5]),  # the document's layer
        (39, 4, [20, 10, 5, 4]),  # odd counts round up at every level
        (64, 3, [32, 16, 16]),
        (7, 3, [4, 2, 1]),
        (96, 5, [48, 24, 12, 6, 6]),
        (10, 1, [10]),
        (6, 4, [3, 2, 1, 0]),  # too few channels: a group is empty (the rule skips)
    ],
)
def test_recursive_halving(channels: int, groups: int, sizes: list[int]) -> None:
    assert log_group_sizes(channels, groups) == sizes


@settings(max_examples=60, deadline=None)
@given(channels=st.integers(1, 300), groups=st.integers(1, 8))
def test_halving_partitions_the_channels_largest_first(channels: int, groups: int) -> None:
    sizes = log_group_sizes(channels, groups)
    assert len(sizes) == groups and sum(sizes) == channels
    assert sizes == sorted(sizes, reverse=True)
    remaining = channels
    for size in sizes[:-1]:
        assert size == -(-remaining // 2)  # ceil of half of what is left
        remaining -= size


def test_tdnn_groups_have_the_documents_shapes(tmp_path, monkeypatch) -> None:
    """(batch, 50, 20), (batch, 50, 10), (batch, 50, 5), (batch, 50, 5) in channel-first order."""
    monkeypatch.chdir(tmp_path)
    job = make_job(
        "report", {"model": str(REPO_SAMPLES / "tdnn.py"), "rules": ["log-group:include=tdnn2"]}, ProjectConfig()
    )
    result = run_job(job)
    block = result.model.tdnn2
    assert isinstance(block, LogGroupConv1d)
    assert result.after is not None
    shapes = [result.after.first_call(f"tdnn2.branches.{i}").output_shapes[0] for i in range(4)]
    assert shapes == [[1, 20, 50], [1, 10, 50], [1, 5, 50], [1, 5, 50]]
    assert [b.in_channels for b in block.branches] == [20, 10, 5, 5]
    assert all(b.kernel_size == (9,) and b.padding == "same" for b in block.branches)
    rewrite = result.rewrites[0]
    assert rewrite.notes["in_groups"] == rewrite.notes["out_groups"] == [20, 10, 5, 5]
    assert rewrite.params_after == (20 * 20 + 10 * 10 + 5 * 5 + 5 * 5) * 9 + 40 == rewrite.analytic_params


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_block_diagonal_projection(dims: int) -> None:
    conv = make_conv(dims, 13, 11, 3, padding=1, dtype=torch.float64)
    x = example_input(conv, 5)
    replacement = rule("log-group:groups=3").build(make_site(conv, x))
    block = replacement.module
    assert isinstance(block, {1: LogGroupConv1d, 2: LogGroupConv2d, 3: LogGroupConv3d}[dims])
    assert block.in_sizes == [7, 3, 3] and block.out_sizes == [6, 3, 2]
    mask = torch.zeros(11, 13, dtype=torch.float64)
    for (r, c), (co, ci) in zip([(0, 0), (6, 7), (9, 10)], [(6, 7), (3, 3), (2, 3)]):
        mask[r : r + co, c : c + ci] = 1
    weight, bias = dense_kernel(block)
    projected = conv.weight.detach() * mask.reshape(11, 13, *([1] * dims))
    assert torch.allclose(weight, projected)
    assert torch.equal(bias, conv.bias.detach())
    # Orthogonal projection: the discarded part is orthogonal to every block-diagonal kernel.
    residual = conv.weight.detach() - projected
    assert float((residual * mask.reshape(11, 13, *([1] * dims))).abs().max()) == 0.0
    energy = replacement.notes["energy_retained"]
    assert kernel_error(block, conv) == pytest.approx((1 - energy) ** 0.5, abs=1e-9)
    assert relative(block(x), equivalent_conv(block, conv)(x)) < 1e-12


@pytest.mark.parametrize(
    "dims,kwargs",
    [
        (1, {"padding": "same"}),
        (2, {"stride": 2, "padding": 1, "padding_mode": "circular"}),
        (2, {"kernel_size": (2, 4), "padding": "same", "dilation": 2, "bias": False}),
        (3, {"kernel_size": (3, 1, 3), "stride": (1, 2, 2), "padding": (1, 0, 1), "padding_mode": "reflect"}),
    ],
)
def test_one_group_is_exact(dims: int, kwargs: dict) -> None:
    kernel = kwargs.pop("kernel_size", 3)
    conv = make_conv(dims, 5, 7, kernel, **kwargs)
    x = example_input(conv)
    replacement = rule("log-group:groups=1").build(make_site(conv, x))
    assert replacement.notes["exact"] is True
    assert kernel_error(replacement.module, conv) < 1e-7
    assert relative(replacement.module(x), conv(x)) < 1e-5


@pytest.mark.parametrize(
    "spec,conv,reason",
    [
        (
            "log-group",
            nn.Conv1d(6, 40, 3),
            "6 input channels cannot be halved into 4 groups (3/2/1/0): a group is empty",
        ),
        ("log-group", nn.Conv2d(40, 5, 3), "5 output channels cannot be halved into 4 groups (3/1/1/0)"),
        ("log-group:min-group-size=6", nn.Conv1d(40, 40, 3), "go below min-group-size=6"),
        ("log-group", nn.Conv2d(40, 40, 3, groups=4), "already grouped (groups=4)"),
        ("log-group", nn.Conv1d(40, 40, 3, groups=40), "already depthwise (groups=40)"),
        ("log-group", nn.ConvTranspose1d(40, 40, 3), "transposed conv"),
    ],
)
def test_skip_reasons_are_specific(spec: str, conv: nn.Module, reason: str) -> None:
    dims = len(conv.kernel_size)
    site = make_site(conv, torch.randn(1, conv.in_channels, *([6] * dims)))
    assert reason in (rule(spec).skip_reason(site) or "")


def test_min_group_size_keeps_layers_that_are_big_enough() -> None:
    conv = nn.Conv1d(40, 40, 3)
    site = make_site(conv, torch.randn(1, 40, 6))
    assert rule("log-group:min-group-size=5").skip_reason(site) is None


def test_options_are_validated() -> None:
    with pytest.raises(UsageError, match="groups must be a positive integer"):
        rule("log-group:groups=0")
    with pytest.raises(UsageError, match="min_group_size must be a positive integer"):
        rule("log-group:min-group-size=0")


def test_the_block_rejects_impossible_splits() -> None:
    with pytest.raises(ValueError, match="cannot be split"):
        LogGroupConv2d(3, 8, 3, groups=4)
