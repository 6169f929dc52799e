"""The separable rule: exact at full rank, optimal (Eckart-Young) below it, specific skips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from convrewrite.core.loading import ExampleInputs
from convrewrite.core.profiling import profile
from convrewrite.layers.dense import dense_kernel, relative_error
from convrewrite.rules.api import ConvSite, build_config
from convrewrite.rules.separable import SeparableConfig, SeparableRule


def site_for(conv: nn.Module, x: torch.Tensor, name: str = "conv") -> ConvSite:
    with torch.no_grad():
        y = conv(x)
    return ConvSite(name, conv, tuple(x.shape), tuple(y.shape))


def rule(**options: object) -> SeparableRule:
    return SeparableRule(build_config("separable", SeparableConfig, dict(options)))


CONFIGS = [
    # (dims, cin, cout, kernel, kwargs)
    (2, 3, 8, 3, {"padding": 1}),
    (2, 4, 6, (3, 5), {"stride": (2, 1), "padding": (1, 2)}),
    (2, 5, 7, 4, {"padding": "same"}),  # even kernel with 'same'
    (2, 4, 4, 3, {"dilation": 2, "padding": 2, "padding_mode": "reflect"}),
    (2, 3, 5, 3, {"padding": 1, "padding_mode": "circular", "bias": False}),
    (2, 6, 2, 3, {"padding": 1, "padding_mode": "replicate"}),
    (1, 39, 40, 3, {"padding": "same"}),
    (1, 8, 12, 9, {"stride": 2, "dilation": 3, "padding": 4}),
    (1, 6, 6, 2, {"padding": "same", "padding_mode": "reflect"}),
    (3, 3, 8, 3, {"padding": 1}),
    (3, 4, 6, (3, 1, 3), {"stride": (1, 2, 1), "padding": (1, 0, 1), "padding_mode": "replicate"}),
    (3, 4, 5, 2, {"padding": "same", "bias": False}),
]


def _conv(dims: int, cin: int, cout: int, kernel, kwargs) -> nn.Module:
    torch.manual_seed(0)
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    return cls(cin, cout, kernel, **kwargs).eval()


def _input(dims: int, cin: int) -> torch.Tensor:
    return {1: torch.randn(2, cin, 40), 2: torch.randn(2, cin, 11, 13), 3: torch.randn(2, cin, 5, 7, 6)}[dims]


@pytest.mark.parametrize("bias", ["both", "pointwise"])
@pytest.mark.parametrize(("dims", "cin", "cout", "kernel", "kwargs"), CONFIGS)
def test_full_rank_rewrite_is_exact(dims, cin, cout, kernel, kwargs, bias) -> None:
    conv = _conv(dims, cin, cout, kernel, kwargs)
    x = _input(dims, cin)
    site = site_for(conv, x)
    full_rank = min(cout, site.kernel_elements)
    replacement = rule(multiplier=full_rank, bias=bias).build(site).module.eval()
    with torch.no_grad():
        expected, actual = conv(x), replacement(x)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) < 1e-5
    assert relative_error(dense_kernel(replacement)[0], conv.weight) < 1e-5
    if bias == "pointwise":
        assert replacement[0].bias is None


@pytest.mark.parametrize("multiplier", [1, 2])
def test_truncated_svd_keeps_the_best_rank_m_slices(multiplier: int) -> None:
    conv = _conv(2, 4, 16, 3, {"padding": 1})
    site = site_for(conv, _input(2, 4))
    replacement = rule(multiplier=multiplier).build(site)
    # Oracle: numpy's SVD of each input channel's Cout x k*k slice; the best rank-m error is the
    # energy of the discarded singular values (Eckart-Young).
    weight = conv.weight.detach().double().numpy()
    discarded = 0.0
    for i in range(4):
        singular = np.linalg.svd(weight[:, i].reshape(16, 9), compute_uv=False)
        discarded += float((singular[multiplier:] ** 2).sum())
    expected_error = np.sqrt(discarded) / np.linalg.norm(weight)
    actual_error = relative_error(dense_kernel(replacement.module)[0], conv.weight)
    assert actual_error == pytest.approx(expected_error, rel=1e-4)
    assert replacement.notes["energy_retained"] == pytest.approx(1 - discarded / float((weight**2).sum()), rel=1e-6)


def test_document_layout_and_cost_formula() -> None:
    conv = _conv(2, 64, 128, 3, {"padding": 1})
    x = torch.randn(1, 64, 16, 160)
    site = site_for(conv, x)
    block = rule().build(site).module
    # The document's table: depthwise 64*9 + 64 = 640 and pointwise 64*128 + 128 = 8,320.
    assert block[0].weight.numel() + block[0].bias.numel() == 640
    assert block[1].weight.numel() + block[1].bias.numel() == 8_320
    cost = rule().cost(site)
    measured = profile(block, ExampleInputs((x,), {}))
    assert (cost.params, cost.macs) == (measured.params, measured.macs)
    assert cost.macs == 16 * 160 * (64 * 9 + 64 * 128)  # hand formula: positions x (Cin*k*k + Cin*Cout)


def test_random_init_ignores_the_trained_kernel() -> None:
    conv = _conv(2, 4, 8, 3, {"padding": 1})
    site = site_for(conv, _input(2, 4))
    replacement = rule(init="random", multiplier=8).build(site)
    assert "energy_retained" not in replacement.notes
    assert relative_error(dense_kernel(replacement.module)[0], conv.weight) > 0.5


@pytest.mark.parametrize(
    ("module", "x", "reason"),
    [
        (nn.Conv2d(8, 8, 3, groups=8), torch.randn(1, 8, 6, 6), "already depthwise (groups=8)"),
        (nn.Conv2d(8, 16, 3, groups=2), torch.randn(1, 8, 6, 6), "already grouped (groups=2)"),
        (nn.Conv2d(8, 16, 1), torch.randn(1, 8, 6, 6), "1x1 conv: nothing to separate"),
        (nn.ConvTranspose2d(8, 4, 2), torch.randn(1, 8, 6, 6), "transposed conv (ConvTranspose2d) is not rewritten"),
        (nn.Conv3d(2, 4, 1), torch.randn(1, 2, 5, 5, 5), "1x1 conv: nothing to separate"),
        (nn.ConvTranspose3d(2, 4, 3), torch.randn(1, 2, 5, 5, 5), "transposed conv (ConvTranspose3d) is not rewritten"),
    ],
)
def test_skip_reasons_are_specific(module: nn.Module, x: torch.Tensor, reason: str) -> None:
    assert rule().skip_reason(site_for(module, x)) == reason


def test_selection_options() -> None:
    conv = nn.Conv2d(4, 8, 3)
    site = site_for(conv, torch.randn(1, 4, 6, 6), name="layer1.conv")
    assert rule(include="layer2.*").skip_reason(site) == "not selected by include=layer2.*"
    assert rule(exclude="layer1.*|stem").skip_reason(site) == "excluded by exclude=layer1.*|stem"
    assert "min-channels=6" in (rule(min_channels=6).skip_reason(site) or "")
    assert rule(include="layer1.*").skip_reason(site) is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"multiplier": "0"}, "multiplier must be a positive integer, got 0"),
        ({"multiplier": "two"}, "option multiplier='two' is not an integer"),
        ({"bias": "depthwise"}, "is not one of both, pointwise"),
        ({"rank": "2"}, "has no option 'rank'"),
    ],
)
def test_bad_options_are_usage_errors(options: dict[str, str], message: str) -> None:
    from convrewrite.errors import UsageError

    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config("separable", SeparableConfig, options)
