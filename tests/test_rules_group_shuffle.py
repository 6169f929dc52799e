"""The group-shuffle rule: shuffle mapping, masked projection, energy assignment, skips."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from convrewrite.cli import run
from convrewrite.errors import UsageError
from convrewrite.layers import (
    ChannelPermutation,
    ChannelShuffle,
    GroupShuffleConv1d,
    GroupShuffleConv2d,
    GroupShuffleConv3d,
)
from convrewrite.layers.dense import dense_kernel, kernel_error
from convrewrite.rules.group_shuffle import balanced_assignment, group_energy, masked_grouped_weight

from .rule_test_support import equivalent_conv, example_input, make_conv, relative, rule, site_of


def block_mask(out_channels: int, in_channels: int, assignment: list[int], groups: int) -> torch.Tensor:
    """mask[p, c] = 1 where input channel c lies in the block of output p's group."""
    per_in = in_channels // groups
    mask = torch.zeros(out_channels, in_channels, dtype=torch.float64)
    for p, group in enumerate(assignment):
        mask[p, group * per_in : (group + 1) * per_in] = 1.0
    return mask


# --------------------------------------------------------------------------- the shuffle itself


@pytest.mark.parametrize("channels,groups", [(12, 3), (12, 4), (16, 4), (8, 1), (6, 6)])
def test_channel_shuffle_is_reshape_g_by_c_over_g_transpose_flatten(channels: int, groups: int) -> None:
    x = torch.randn(2, channels, 5)
    expected = x.reshape(2, groups, channels // groups, 5).transpose(1, 2).reshape(2, channels, 5)
    shuffle = ChannelShuffle(groups)
    assert torch.equal(shuffle(x), expected)
    # Output channel i*g + j is channel i of group j.
    source = shuffle.source_indices(channels)
    assert torch.equal(shuffle(x), x[:, source])
    for i in range(channels // groups):
        for j in range(groups):
            assert source[i * groups + j] == j * (channels // groups) + i


@pytest.mark.parametrize("channels,groups", [(12, 3), (16, 4), (9, 3), (8, 2)])
def test_seed_keras_shuffle_is_the_inverse_permutation(channels: int, groups: int) -> None:
    """The seed's Keras code reshapes to (C/g, g): the inverse of ours; equal only when g*g == C."""
    x = torch.randn(1, channels, 3)
    keras_like = x.reshape(1, channels // groups, groups, 3).transpose(1, 2).reshape(1, channels, 3)
    ours = ChannelShuffle(groups)
    inverse = torch.empty(channels, dtype=torch.long)
    inverse[torch.tensor(ours.source_indices(channels))] = torch.arange(channels)
    assert torch.equal(keras_like, x[:, inverse])
    assert torch.equal(keras_like, ours(x)) == (groups * groups == channels)


def test_channel_permutation_reorders_and_validates() -> None:
    x = torch.randn(2, 4, 3, 3)
    permutation = ChannelPermutation((2, 0, 3, 1))
    assert torch.equal(permutation(x), x[:, [2, 0, 3, 1]])
    assert "index" not in permutation.state_dict()
    with pytest.raises(ValueError, match="exactly once"):
        ChannelPermutation((0, 0, 1))


# --------------------------------------------------------------------------- weight transfer


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [2, 4])
def test_output_channels_keep_their_order_and_read_their_groups_block(dims: int, groups: int) -> None:
    conv = make_conv(dims, 8, 12, 3, padding=1, dtype=torch.float64)
    site = site_of(conv, example_input(conv, 5))
    block = rule(f"group-shuffle:groups={groups}").build(site).module
    assert isinstance(block, {1: GroupShuffleConv1d, 2: GroupShuffleConv2d, 3: GroupShuffleConv3d}[dims])
    assert isinstance(block.shuffle, ChannelShuffle)
    weight, bias = dense_kernel(block)
    original = conv.weight.detach()
    mask = block_mask(12, 8, [p % groups for p in range(12)], groups)
    expected = original * mask.reshape(12, 8, *([1] * dims))
    assert torch.allclose(weight, expected)
    assert torch.equal(bias, conv.bias.detach())
    x = example_input(conv, 5)
    assert relative(block(x), equivalent_conv(block, conv)(x)) < 1e-12


def test_masked_projection_is_the_orthogonal_projection() -> None:
    conv = make_conv(2, 8, 8, 3, padding=1, dtype=torch.float64)
    weight = conv.weight.detach()
    assignment = [p % 4 for p in range(8)]
    grouped, rows = masked_grouped_weight(weight, assignment, 4)
    mask = block_mask(8, 8, assignment, 4).reshape(8, 8, 1, 1)
    projected = weight * mask
    residual = weight - projected
    # The residual is orthogonal to every kernel of the structure ...
    for seed in range(5):
        structured = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed), dtype=weight.dtype)
        assert abs(float((residual * structured * mask).sum())) < 1e-10
    # ... so no other kernel of the structure is closer, and projecting twice changes nothing.
    best = float(residual.norm())
    for seed in range(20):
        step = 0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed), dtype=weight.dtype)
        assert float((weight - projected - step * mask).norm()) >= best
    regrouped, _ = masked_grouped_weight(projected, assignment, 4)
    assert torch.equal(regrouped, grouped)
    for p, row in enumerate(rows):
        assert torch.equal(grouped[row], weight[p, (p % 4) * 2 : (p % 4) * 2 + 2])


@pytest.mark.parametrize("assign", ["shuffle", "energy"])
def test_energy_note_is_what_the_kernel_error_says(assign: str) -> None:
    conv = make_conv(2, 16, 8, 3, padding=1, dtype=torch.float64)
    replacement = rule(f"group-shuffle:groups=4,assign={assign}").build(site_of(conv, example_input(conv)))
    error = kernel_error(replacement.module, conv)
    assert error == pytest.approx((1 - replacement.notes["energy_retained"]) ** 0.5, abs=1e-9)


def _brute_force_best(energy: torch.Tensor, groups: int) -> float:
    out_channels = energy.shape[0]
    per_group = out_channels // groups
    best = 0.0
    for labels in set(itertools.permutations([j for j in range(groups) for _ in range(per_group)])):
        best = max(best, float(energy[torch.arange(out_channels), torch.tensor(labels)].sum()))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_energy_assignment_is_balanced_and_optimal(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(6, 6, 3, generator=generator, dtype=torch.float64) * torch.rand(6, 6, 1, generator=generator)
    energy = group_energy(weight, 3)
    assignment = balanced_assignment(energy)
    assert sorted(assignment) == [0, 0, 1, 1, 2, 2]
    kept = float(energy[torch.arange(6), torch.tensor(assignment)].sum())
    assert kept == pytest.approx(_brute_force_best(energy, 3), rel=1e-12)
    shuffle_kept = float(energy[torch.arange(6), torch.arange(6) % 3].sum())
    assert kept >= shuffle_kept - 1e-12


def test_energy_assignment_is_realized_by_a_permutation_and_reported_next_to_the_shuffle() -> None:
    conv = make_conv(1, 8, 12, 3, padding="same", dtype=torch.float64)
    with torch.no_grad():  # make rows prefer a group the shuffle does not give them
        conv.weight[:, :2] *= 10.0
    x = example_input(conv)
    replacement = rule("group-shuffle:groups=4,assign=energy").build(site_of(conv, x))
    block, notes = replacement.module, replacement.notes
    assert isinstance(block.shuffle, ChannelPermutation)
    assert block.permutation == block.shuffle.permutation
    assert notes["energy_retained"] > notes["energy_retained_shuffle"]
    assert notes["outputs_moved_from_shuffle_group"] > 0
    energy = group_energy(conv.weight.detach(), 4)
    assignment = balanced_assignment(energy)
    mask = block_mask(12, 8, assignment, 4).reshape(12, 8, 1)
    weight, _ = dense_kernel(block)
    assert torch.allclose(weight, conv.weight.detach() * mask)
    assert relative(block(x), equivalent_conv(block, conv)(x)) < 1e-12
    shuffle_notes = rule("group-shuffle:groups=4").build(site_of(conv, x)).notes
    assert shuffle_notes["energy_retained"] == pytest.approx(notes["energy_retained_shuffle"])


@pytest.mark.parametrize("assign", ["shuffle", "energy"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_one_group_is_exact(assign: str, dims: int) -> None:
    conv = make_conv(dims, 6, 10, 3, stride=2, padding=1, padding_mode="reflect")
    x = example_input(conv)
    replacement = rule(f"group-shuffle:groups=1,assign={assign}").build(site_of(conv, x))
    assert replacement.notes["exact"] is True
    assert kernel_error(replacement.module, conv) < 1e-7
    assert relative(replacement.module(x), conv(x)) < 1e-5


def test_a_following_grouped_layer_sees_every_group() -> None:
    """Two rewritten 1x1 layers: with the shuffle every output depends on every input."""
    first, second = make_conv(2, 16, 16, 1, seed=1), make_conv(2, 16, 16, 1, seed=2)
    x = torch.randn(1, 16, 2, 2)
    rewritten = [rule("group-shuffle:groups=4").build(site_of(c, x)).module for c in (first, second)]
    composed = dense_kernel(rewritten[1])[0].reshape(16, 16) @ dense_kernel(rewritten[0])[0].reshape(16, 16)
    assert bool((composed.abs() > 0).all())
    # Plain grouped convs in a row stay block-diagonal: group j never hears group k != j.
    plain = [nn.Conv2d(16, 16, 1, groups=4) for _ in range(2)]
    stacked = dense_kernel(plain[1])[0].reshape(16, 16) @ dense_kernel(plain[0])[0].reshape(16, 16)
    assert int((stacked.abs() > 0).sum()) == 4 * 4 * 4


# --------------------------------------------------------------------------- skips and options


@pytest.mark.parametrize(
    "conv,reason",
    [
        (nn.Conv2d(6, 8, 3), "in_channels=6 is not divisible by groups=4"),
        (nn.Conv1d(8, 6, 3), "out_channels=6 is not divisible by groups=4"),
        (nn.Conv2d(8, 8, 3, groups=2), "already grouped (groups=2)"),
        (nn.Conv2d(8, 8, 3, groups=8), "already depthwise (groups=8)"),
        (nn.ConvTranspose2d(8, 8, 3), "transposed conv"),
        (nn.Conv3d(6, 8, 3), "in_channels=6 is not divisible by groups=4"),
        (nn.ConvTranspose3d(8, 8, 3), "transposed conv (ConvTranspose3d)"),
    ],
)
def test_skip_reasons_are_specific(conv: nn.Module, reason: str) -> None:
    dims = len(conv.kernel_size)
    site = site_of(conv, torch.randn(1, conv.in_channels, *([6] * dims)))
    assert reason in (rule("group-shuffle").skip_reason(site) or "")


def test_groups_must_be_positive() -> None:
    with pytest.raises(UsageError, match="groups must be a positive integer"):
        rule("group-shuffle:groups=0")
    with pytest.raises(UsageError, match="not one of shuffle, energy"):
        rule("group-shuffle:assign=best")


def test_an_explicitly_named_layer_that_cannot_be_rewritten_is_a_usage_error(
    tmp_path, monkeypatch, capsys, samples
) -> None:
    monkeypatch.chdir(tmp_path)
    code = run(["report", str(samples / "tdnn.py"), "--rule", "group-shuffle:include=tdnn1"])
    assert code == 2
    assert "tdnn1" in capsys.readouterr().err
    assert run(["report", str(samples / "tdnn.py"), "--rule", "group-shuffle:include=tdnn2|tdnn3"]) == 0


@pytest.fixture
def samples():
    from .rule_test_support import REPO_SAMPLES

    return REPO_SAMPLES
