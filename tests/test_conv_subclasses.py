"""Conv subclasses with their own forward: suspect by class, rewritten as what they compute, or skipped.

The expected effective weights and paddings are computed here by hand (TensorFlow's SAME formula,
weight standardization written out), never read from the code under test.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from typing import Any

import pytest
import torch
from torch import nn

from convrewrite.core.loading import ExampleInputs, LoadedModel
from convrewrite.engine.conv_subclasses import resolve_conv_subclasses, suspect_reason
from convrewrite.engine.pipeline import analyse
from convrewrite.layers import PaddedConv
from convrewrite.rules.api import ConvSite, make_rule

from .conftest import SAMPLES


def _fixture() -> Any:
    """sample_models/zoo/conv_subclasses.py (the classes as real libraries write them)."""
    name = "convrewrite_test_conv_subclasses"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SAMPLES / "zoo" / "conv_subclasses.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


zoo = _fixture()


def tf_same(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME: output ceil(size / stride), the odd padding element after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def resolve(module: nn.Module, *shapes: tuple[int, ...]) -> tuple[list[ConvSite], list[Any]]:
    module.eval()
    site = ConvSite("layer", module, shapes[0] if shapes else None, None, calls=len(shapes))
    holder = nn.Sequential()
    holder.add_module("layer", module)
    return resolve_conv_subclasses(holder, [site], {"layer": list(shapes)})


class LoggingConv(nn.Conv2d):
    """Overrides forward but computes exactly the stock conv: proven plain, offered unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class Conv2d(nn.Conv2d):  # the name of a stock class, and a different forward: the class decides
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class Renamed(nn.Conv2d):
    """Named like nothing torch has, but forward is the stock one: not suspect."""


WEIGHT_NORM_DEPRECATED = "ignore:.*weight_norm.* is deprecated:FutureWarning"


@pytest.mark.filterwarnings(WEIGHT_NORM_DEPRECATED)
def test_suspicion_is_decided_by_class_not_by_name() -> None:
    assert suspect_reason(nn.Conv2d(3, 4, 3)) is None
    assert suspect_reason(Renamed(3, 4, 3)) is None
    assert suspect_reason(Conv2d(3, 4, 3)) == "Conv2d.forward is not Conv2d.forward"
    assert suspect_reason(zoo.StdConv2d(3, 4, 3)) == "StdConv2d.forward is not Conv2d.forward"
    normed = torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3))
    assert suspect_reason(normed) == "Conv2d has forward hooks"


def test_a_subclass_that_computes_the_stock_conv_is_offered_unchanged() -> None:
    conv = LoggingConv(4, 8, 3, padding=1)
    sites, unresolved = resolve(conv, (1, 4, 9, 9))
    assert not unresolved and sites[0].module is conv and sites[0].computed is None


def test_a_scaled_output_is_not_a_plain_conv() -> None:
    sites, unresolved = resolve(Conv2d(4, 8, 3), (1, 4, 9, 9))
    assert not sites
    assert "it runs mul after the convolution" in unresolved[0].reason


@pytest.mark.parametrize(("size", "stride"), [(32, 2), (33, 2), (16, 1)])
def test_tf_same_padding_becomes_explicit(size: int, stride: int) -> None:
    conv = zoo.Conv2dSame(4, 6, 3, stride=stride)
    sites, unresolved = resolve(conv, (1, 4, size, size))
    assert not unresolved
    stand_in, computed = sites[0].module, sites[0].computed
    assert computed.original is conv
    assert torch.equal(stand_in.weight, conv.weight) and torch.equal(stand_in.bias, conv.bias)
    before, after = tf_same(size, 3, stride)
    if stride == 1:  # the same (1, 1) for every size: folded into the plain conv
        assert computed.padding == "" and stand_in.padding == (before, before) == (1, 1)
    else:  # depends on the size: recomputed at run time
        assert computed.padding == "same" and stand_in.padding == (0, 0)


def test_fixed_asymmetric_padding_is_kept_in_front() -> None:
    conv = zoo.Conv2dSame(4, 6, 4)  # even kernel, stride 1: (1, 2) on every size
    sites, _ = resolve(conv, (1, 4, 10, 10))
    computed = sites[0].computed
    assert computed.padding == "fixed" and computed.amounts == (*tf_same(10, 4, 1), *tf_same(10, 4, 1)) == (1, 2, 1, 2)


def test_weight_standardization_is_transferred_as_the_weight_it_computes() -> None:
    conv = zoo.ScaledStdConv2d(4, 6, 3)
    with torch.no_grad():
        conv.gain.uniform_(0.5, 2.0)
    sites, unresolved = resolve(conv, (1, 4, 8, 8))
    assert not unresolved
    weight = conv.weight.detach().double()
    flat = weight.flatten(1)
    standard = (flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + conv.eps)
    expected = standard.view_as(weight) * conv.gain.detach().double() * conv.scale
    torch.testing.assert_close(sites[0].module.weight.detach().double(), expected, rtol=1e-5, atol=1e-6)
    assert "weight standardization" in sites[0].computed.note


@pytest.mark.filterwarnings(WEIGHT_NORM_DEPRECATED)
def test_weight_norm_hooks_give_the_weight_they_compute() -> None:
    conv = torch.nn.utils.weight_norm(nn.Conv2d(4, 6, 3, padding=1))
    with torch.no_grad():
        conv.weight_g.mul_(3.0)
    sites, unresolved = resolve(conv, (1, 4, 8, 8))
    assert not unresolved
    v, g = conv.weight_v.detach(), conv.weight_g.detach()
    expected = g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(sites[0].module.weight.detach(), expected)


def test_a_conv_used_as_a_banded_linear_layer_is_skipped_with_the_reason() -> None:
    sites, unresolved = resolve(zoo.BandedLinear(32, 2, 5), (1, 32))
    assert not sites
    reason = unresolved[0].reason
    assert reason.startswith("BandedLinear.forward is not Conv1d.forward, and its forward is not padding followed by")
    assert "it runs unsqueeze on its input" in reason and "returns 1x64" in reason


def test_never_called_and_tied_subclasses_are_skipped() -> None:
    sites, unresolved = resolve(zoo.StdConv2d(4, 4, 3))
    assert not sites and "never called on the example input" in unresolved[0].reason
    first, second = zoo.StdConv2d(4, 4, 3), nn.Conv2d(4, 4, 3)
    second.weight = first.weight
    holder = nn.Sequential(first, second).eval()
    site = ConvSite("0", first, (1, 4, 8, 8), None)
    sites, unresolved = resolve_conv_subclasses(holder, [site], {"0": [(1, 4, 8, 8)]})
    assert not sites and "its weight is shared with another module" in unresolved[0].reason


class Ported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = zoo.StdConv2dSame(3, 8, 3, stride=2)
        self.even = zoo.Conv2dSame(8, 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.even(torch.relu(self.stem(x)))


@pytest.mark.parametrize("rule", ["separable:multiplier=16", "group-shuffle:groups=1"])
def test_an_exact_rewrite_computes_what_the_subclasses_computed_at_every_size(rule: str) -> None:
    """The padding of a SAME conv with stride 2 depends on the input size: the rewrite, verified
    on 32x32, must also match at sizes it never saw (odd ones pad differently)."""
    torch.manual_seed(0)
    original = Ported().eval()
    model = Ported().eval()
    model.load_state_dict(original.state_dict())
    x = torch.randn(1, 3, 32, 32)
    loaded = LoadedModel(model, ExampleInputs((x,), {}, arg_names=("x",)), "ported", "ported", "test")
    result = analyse(loaded, [make_rule(rule)])
    assert {r.name for r in result.rewrites} == {"stem", "even"}
    assert isinstance(model.stem, PaddedConv) and model.stem.same
    assert isinstance(model.even, PaddedConv) and model.even.amounts == (1, 2, 1, 2)
    for size in (32, 33, 17):
        sample = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(model(sample), original(sample), rtol=1e-4, atol=1e-5)


class Doubled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.plain = nn.Conv2d(3, 8, 3, padding=1)
        self.scaled = Conv2d(8, 8, 3, padding=1)  # computes 2 x the conv: no rule may touch it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaled(torch.relu(self.plain(x)))


def _analyse_doubled(rule: str) -> Any:
    x = torch.randn(1, 3, 16, 16)
    loaded = LoadedModel(Doubled().eval(), ExampleInputs((x,), {}, arg_names=("x",)), "doubled", "doubled", "test")
    return analyse(loaded, [make_rule(rule)])


def test_a_subclass_no_rule_may_touch_is_a_usage_error_when_named_in_include() -> None:
    from convrewrite.errors import UsageError

    with pytest.raises(UsageError, match=r"cannot rewrite scaled, which you named explicitly: .*runs mul"):
        _analyse_doubled("separable:include=scaled")
    # A pattern that merely matches it still skips it with the reason, and rewrites the rest.
    result = _analyse_doubled("separable:include=*")
    assert [r.name for r in result.rewrites] == ["plain"]
    assert any(s.name == "scaled" and "runs mul" in s.reason for s in result.skipped)
