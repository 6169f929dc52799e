"""The channelwise rule: the channel-wise conv, its least-squares fit, and the group channel-wise module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convrewrite.errors import UsageError
from convrewrite.layers import (
    ChannelwiseConv1d,
    ChannelwiseConv2d,
    ChannelwiseConv3d,
    GroupChannelwiseConv1d,
    GroupChannelwiseConv2d,
    GroupChannelwiseConv3d,
)
from convrewrite.layers.dense import dense_kernel, kernel_error
from convrewrite.rules.channelwise import (
    channel_padding,
    channelwise_matrix,
    fit_channelwise,
    fit_group_channelwise,
    interleave_index,
)

from .rule_test_support import (
    equivalent_conv,
    example_input,
    make_conv,
    measured,
    relative,
    rule,
    site_of,
)


def diagonal_means(weight: torch.Tensor, taps: int, stride: int) -> torch.Tensor:
    """Closed form of the projection: tap t is the mean of W[o, o*s + t - pad] over valid o."""
    out_channels, in_channels = weight.shape
    before, _ = channel_padding(in_channels, out_channels, taps, stride)
    kernel = torch.zeros(taps, dtype=weight.dtype)
    for t in range(taps):
        values = [
            weight[o, o * stride + t - before]
            for o in range(out_channels)
            if 0 <= o * stride + t - before < in_channels
        ]
        kernel[t] = torch.stack(values).mean() if values else 0.0
    return kernel


# --------------------------------------------------------------------------- the operation


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_a_channel_wise_conv_slides_one_shared_kernel_along_the_channels(dims: int) -> None:
    cls = {1: ChannelwiseConv1d, 2: ChannelwiseConv2d, 3: ChannelwiseConv3d}[dims]
    block = cls(12, 6, 4, bias=False)  # channel stride 2, dc = 4
    assert sum(p.numel() for p in block.parameters()) == 4
    x = torch.randn(2, 12, *([5] * dims))
    before, _ = channel_padding(12, 6, 4, 2)
    padded = torch.cat([torch.zeros(2, before, *x.shape[2:]), x, torch.zeros(2, 4, *x.shape[2:])], dim=1)
    w = block.weight.detach()[0]
    expected = torch.stack([sum(w[t] * padded[:, o * 2 + t] for t in range(4)) for o in range(6)], dim=1)
    assert torch.allclose(block(x), expected, atol=1e-6)


def test_cost_follows_the_papers_formula() -> None:
    """Params dc, MACs dc x n x df x df (n outputs, df x df positions)."""
    conv = nn.Conv2d(64, 32, 1, bias=False)
    x = torch.randn(1, 64, 7, 7)
    site = site_of(conv, x)
    cost = rule("channelwise:kernel=5").cost(site)
    assert cost.params == 5
    assert cost.macs == 5 * 32 * 7 * 7
    block = rule("channelwise:kernel=5").build(site).module
    assert measured(block, x) == (cost.params, cost.macs)


@pytest.mark.parametrize("groups,taps", [(1, 3), (2, 4), (3, 7)])
def test_to_dense_is_the_banded_matrix(groups: int, taps: int) -> None:
    block = ChannelwiseConv2d(12, 6, taps, groups=groups, bias=False)
    weight, bias = dense_kernel(block)
    assert bias is None
    stride = 12 * groups // 6
    assert torch.equal(weight.reshape(6, 12), channelwise_matrix(block.weight.detach(), 12, 6, stride))
    x = torch.randn(2, 12, 4, 3)
    assert torch.allclose(block(x), torch.nn.functional.conv2d(x, weight), atol=1e-6)


# --------------------------------------------------------------------------- weight transfer


@pytest.mark.parametrize("in_channels,out_channels,taps", [(8, 8, 3), (12, 4, 5), (16, 8, 2), (6, 6, 8)])
def test_fit_is_the_mean_of_each_diagonal_and_an_orthogonal_projection(
    in_channels: int, out_channels: int, taps: int
) -> None:
    stride = in_channels // out_channels
    weight = torch.randn(out_channels, in_channels, dtype=torch.float64)
    kernel = fit_channelwise(weight, torch.eye(in_channels, dtype=torch.float64), 1, taps, stride)
    assert torch.allclose(kernel[0], diagonal_means(weight, taps, stride))
    fitted = channelwise_matrix(kernel, in_channels, out_channels, stride)
    residual = weight - fitted
    for t in range(taps):  # orthogonal to each basis matrix of the structure
        basis = torch.zeros(1, taps, dtype=torch.float64)
        basis[0, t] = 1.0
        assert abs(float((residual * channelwise_matrix(basis, in_channels, out_channels, stride)).sum())) < 1e-10
    refit = fit_channelwise(fitted, torch.eye(in_channels, dtype=torch.float64), 1, taps, stride)
    assert torch.allclose(refit, kernel)  # idempotent


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_a_kernel_that_is_already_channel_wise_is_kept_exactly(dims: int) -> None:
    conv = make_conv(dims, 12, 6, 1, stride=2, padding=1, padding_mode="replicate")
    with torch.no_grad():
        matrix = channelwise_matrix(torch.tensor([[0.5, -1.0, 2.0, 0.25, 1.5]]), 12, 6, 2)
        conv.weight.copy_(matrix.reshape(conv.weight.shape))
    x = example_input(conv)
    replacement = rule("channelwise:kernel=5").build(site_of(conv, x))
    assert replacement.notes["energy_retained"] == pytest.approx(1.0)
    assert kernel_error(replacement.module, conv) < 1e-7
    assert relative(replacement.module(x), conv(x)) < 1e-5


@pytest.mark.parametrize("spec", ["channelwise", "channelwise:kernel=8"])
def test_a_single_channel_layer_is_exact(spec: str) -> None:
    """Taps that meet no channel make the normal equations singular: the fit must not zero out."""
    conv = make_conv(2, 1, 1, 1)
    x = example_input(conv)
    replacement = rule(spec).build(site_of(conv, x))
    assert replacement.notes["energy_retained"] == pytest.approx(1.0)
    assert relative(replacement.module(x), conv(x)) < 1e-6


def test_kernels_longer_than_the_channels_still_fit_by_diagonal_means() -> None:
    weight = torch.randn(3, 3, dtype=torch.float64)
    kernel = fit_channelwise(weight, torch.eye(3, dtype=torch.float64), 1, 9, 1)
    assert torch.allclose(kernel[0], diagonal_means(weight, 9, 1))
    assert int((kernel[0] != 0).sum()) == 5  # the 5 diagonals of a 3x3 matrix; the other taps see nothing


@pytest.mark.parametrize("dims", [1, 2])
def test_energy_note_matches_the_kernel_error_and_bias_is_kept(dims: int) -> None:
    conv = make_conv(dims, 16, 16, 1, padding="same", dtype=torch.float64)
    x = example_input(conv)
    replacement = rule("channelwise").build(site_of(conv, x))
    assert replacement.notes["channel_kernel"] == 3 and replacement.notes["channel_stride"] == 1
    assert kernel_error(replacement.module, conv) == pytest.approx(
        (1 - replacement.notes["energy_retained"]) ** 0.5, abs=1e-9
    )
    assert torch.equal(dense_kernel(replacement.module)[1], conv.bias.detach())
    assert relative(replacement.module(x), equivalent_conv(replacement.module, conv)(x)) < 1e-12


# --------------------------------------------------------------------------- group channel-wise module


def test_the_start_undoes_the_interleave_so_the_module_is_the_grouped_conv() -> None:
    weight = torch.randn(12, 8, dtype=torch.float64)
    fit = fit_group_channelwise(weight, groups=4, taps=9, sweeps=0)
    block = GroupChannelwiseConv2d(8, 12, 9, groups=4, bias=False).double()
    with torch.no_grad():
        block.group_conv.weight.copy_(fit.grouped.reshape(12, 2, 1, 1))
        block.channelwise.weight.copy_(fit.kernels)
    dense = dense_kernel(block)[0].reshape(12, 8)
    mask = torch.block_diag(*[torch.ones(3, 2, dtype=torch.float64)] * 4)
    assert torch.allclose(dense, weight * mask)
    assert fit.energy_start == pytest.approx(float((weight * mask).pow(2).sum() / weight.pow(2).sum()))


def test_alternating_least_squares_never_loses_energy() -> None:
    weight = torch.randn(16, 16, dtype=torch.float64) + torch.diag(torch.ones(15, dtype=torch.float64), 1) * 3
    energies = [fit_group_channelwise(weight, 4, 9, sweeps).energy for sweeps in range(6)]
    assert all(later >= earlier - 1e-12 for earlier, later in zip(energies, energies[1:]))
    assert energies[-1] > energies[0]


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_a_block_diagonal_kernel_is_kept_exactly(dims: int) -> None:
    conv = make_conv(dims, 8, 12, 1, bias=True)
    with torch.no_grad():
        mask = torch.block_diag(*[torch.ones(6, 4)] * 2)
        conv.weight.mul_(mask.reshape(conv.weight.shape))
    x = example_input(conv)
    replacement = rule("channelwise:groups=2").build(site_of(conv, x))
    expected = {1: GroupChannelwiseConv1d, 2: GroupChannelwiseConv2d, 3: GroupChannelwiseConv3d}[dims]
    assert isinstance(replacement.module, expected)
    assert replacement.notes["energy_retained"] == pytest.approx(1.0)
    assert relative(replacement.module(x), conv(x)) < 1e-5


def test_the_group_channel_wise_conv_fuses_every_group() -> None:
    """With dc >= g and the groups interleaved, each output reads a channel of every group."""
    block = GroupChannelwiseConv2d(16, 16, 5, groups=4, bias=False)
    dense = dense_kernel(block)[0].reshape(16, 16)
    for row in range(16):
        groups_read = {column // 4 for column in range(16) if dense[row, column] != 0}
        assert groups_read == {0, 1, 2, 3}
    # The interleave is ShuffleNet's shuffle.
    assert interleave_index(6, 2) == [0, 3, 1, 4, 2, 5]


def test_group_form_reports_both_energies_and_its_formula_cost() -> None:
    conv = make_conv(2, 16, 32, 1, dtype=torch.float64)
    x = example_input(conv)
    site = site_of(conv, x)
    spec = rule("channelwise:groups=4,kernel=8")
    replacement = spec.build(site)
    notes = replacement.notes
    assert notes["form"] == "group channel-wise module"
    assert notes["energy_retained"] >= notes["energy_retained_grouped"] - 1e-12
    assert kernel_error(replacement.module, conv) == pytest.approx((1 - notes["energy_retained"]) ** 0.5, abs=1e-8)
    cost = spec.cost(site)
    positions = x.shape[0] * 9 * 9
    assert cost.params == 32 * 4 + 4 * 8 + 32
    assert cost.macs == positions * (32 * 4 + 32 * 8)
    assert measured(replacement.module, x) == (cost.params, cost.macs)


# --------------------------------------------------------------------------- skips and options


@pytest.mark.parametrize(
    "spec,conv,reason",
    [
        ("channelwise", nn.Conv2d(8, 8, 3), "not a pointwise conv (kernel 3x3)"),
        ("channelwise", nn.Conv1d(8, 16, 1), "expands channels (8 -> 16)"),
        ("channelwise", nn.Conv1d(12, 8, 1), "in_channels=12 is not a multiple of out_channels=8"),
        ("channelwise:kernel=2", nn.Conv2d(12, 4, 1), "kernel=2 is shorter than the channel stride 3"),
        ("channelwise", nn.Conv2d(8, 8, 1, groups=2), "already grouped (groups=2)"),
        ("channelwise", nn.Conv2d(8, 8, 3, groups=8), "already depthwise (groups=8)"),
        ("channelwise:groups=3", nn.Conv2d(8, 9, 1), "in_channels=8 is not divisible by groups=3"),
        ("channelwise:groups=4,kernel=3", nn.Conv2d(8, 8, 1), "kernel=3 is shorter than groups=4"),
        ("channelwise", nn.ConvTranspose2d(8, 8, 1), "transposed conv"),
        ("channelwise", nn.Conv3d(8, 8, 3), "not a pointwise conv (kernel 3x3x3)"),
        ("channelwise", nn.ConvTranspose3d(8, 8, 1), "transposed conv (ConvTranspose3d)"),
    ],
)
def test_skip_reasons_are_specific(spec: str, conv: nn.Module, reason: str) -> None:
    dims = len(conv.kernel_size)
    site = site_of(conv, torch.randn(1, conv.in_channels, *([4] * dims)))
    assert reason in (rule(spec).skip_reason(site) or "")


def test_the_group_form_handles_expanding_layers() -> None:
    conv = nn.Conv2d(8, 16, 1)
    site = site_of(conv, torch.randn(1, 8, 4, 4))
    assert rule("channelwise:groups=2").skip_reason(site) is None


def test_options_are_validated() -> None:
    for spec, message in [
        ("channelwise:groups=0", "groups must be a positive integer"),
        ("channelwise:kernel=-1", "kernel must be >= 0"),
        ("channelwise:refine=-2", "refine must be >= 0"),
    ]:
        with pytest.raises(UsageError, match=message):
            rule(spec)
