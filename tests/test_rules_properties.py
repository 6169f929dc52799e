"""Property tests: random conv configurations, every rule and every ordered pair of rules.

Each case must either rewrite (the forward runs, the output shape is the original's, params and
MACs equal the rule's formula as the report measures them) or skip with a reason. Never a crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from torch import nn

from convrewrite.core.loading import ExampleInputs, LoadedModel
from convrewrite.engine.pipeline import analyse

from .rule_test_support import RULE_SPECS, conv_class, equivalent_conv, measured, relative, rule, site_of

PAIR_SPECS = (
    "separable",
    "group-shuffle:groups=2",
    "log-group:groups=3",
    "channelwise",
    "channelwise:groups=2",
    "winograd",
    "low-rank",
)
PAIRS = [(a, b) for a in PAIR_SPECS for b in PAIR_SPECS]


@dataclass
class Case:
    conv: nn.Module
    x: torch.Tensor

    def __repr__(self) -> str:
        return f"Case({self.conv!r}, input {tuple(self.x.shape)})"


@st.composite
def conv_cases(draw: Any, dtype: torch.dtype = torch.float64) -> Case:
    dims = draw(st.sampled_from([1, 2]))
    # Lean towards counts that divide well, so that pairs of rules meet layers they can rewrite.
    channels = st.one_of(st.sampled_from([2, 4, 8, 12, 16]), st.integers(1, 16))
    in_channels, out_channels = draw(channels), draw(channels)
    divisors = [d for d in range(1, min(in_channels, out_channels) + 1) if not in_channels % d and not out_channels % d]
    groups = draw(st.sampled_from(divisors)) if draw(st.integers(0, 3)) == 0 else 1
    pointwise = draw(st.integers(0, 2)) == 0
    kernel = tuple(1 if pointwise else draw(st.integers(1, 4)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding_choices = [st.just("valid"), st.tuples(*[st.integers(0, 2) for _ in range(dims)])]
    if all(s == 1 for s in stride):
        padding_choices.append(st.just("same"))
    padding = draw(st.one_of(*padding_choices))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    bias = draw(st.booleans())
    spatial = tuple(draw(st.integers(1, 12)) for _ in range(dims))
    try:
        conv = conv_class(dims)(
            in_channels,
            out_channels,
            kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
        ).to(dtype)
        x = torch.randn(2, in_channels, *spatial, dtype=dtype)
        with torch.no_grad():
            conv(x)
    except (RuntimeError, ValueError, NotImplementedError):
        assume(False)  # PyTorch itself rejects this configuration (too small, bad padding, ...)
        raise
    return Case(conv, x)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases())
def test_every_rule_rewrites_or_skips(case: Case) -> None:
    conv, x = case.conv, case.x
    site = site_of(conv, x)
    with torch.no_grad():
        expected = conv(x)
    for spec in RULE_SPECS:
        current = rule(spec)
        reason = current.skip_reason(site)
        event(f"{spec}: {'skipped' if reason else 'rewritten'}")
        if reason is not None:
            assert isinstance(reason, str) and reason, spec
            continue
        replacement = current.build(site)
        block = replacement.module
        with torch.no_grad():
            y = block(x)
            assert y.shape == expected.shape, spec
            assert relative(y, equivalent_conv(block, conv)(x)) < 1e-9, spec
        cost = current.cost(site)
        assert sum(p.numel() for p in block.parameters()) == cost.params, spec
        assert measured(block, x) == (cost.params, cost.macs), spec


class Wrapper(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.layer = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases(dtype=torch.float32), pair=st.sampled_from(PAIRS))
def test_every_pair_of_rules_composes_through_the_engine(case: Case, pair: tuple[str, str]) -> None:
    model = Wrapper(case.conv).eval()
    loaded = LoadedModel(model, ExampleInputs((case.x,)), "case", "case", "hypothesis")
    with torch.no_grad():
        expected = model(case.x).shape
    result = analyse(loaded, [rule(spec) for spec in pair])  # raises on any shape change: never a crash
    assert result.after is not None
    assert result.after.output.shape == expected
    for record in result.rewrites:
        assert (record.params_after, record.macs_after) == (record.analytic_params, record.analytic_macs), record
    for skip in result.skipped:
        assert skip.reason
    # The conv is rewritten once (by the first rule, or by the second after the first skipped it),
    # or skipped by both; a rewritten block's own parts are offered to the second rule instead.
    rewrites = sum(r.name == "layer" for r in result.rewrites)
    skips = sum(s.name == "layer" for s in result.skipped)
    assert (rewrites, skips) in {(1, 0), (1, 1), (0, 2)}
    event(f"rewrites by the pair: {len(result.rewrites)}")
