"""The rule contract of ``convrewrite.testing``, run over every registered rule (plugins included).

A plugin author runs the same functions on their rule; these tests also prove that the checks can
fail, on rules that break each promise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from convrewrite.rules.api import ConvSite, Cost, Replacement, Rule, rule_registry
from convrewrite.testing import CONV_GEOMETRIES, check_rule_on_geometry, check_rule_round_trip


@pytest.mark.parametrize("name", sorted(rule_registry()))
def test_every_registered_rule_keeps_the_contract(name: str) -> None:
    # A rule that needs graph context (fuse-bn: the BatchNorm after the conv) skips a lone conv with
    # its reason; the round trip below shows it rewriting inside a model.
    for geometry in CONV_GEOMETRIES:
        check_rule_on_geometry(name, geometry)


@pytest.mark.parametrize("name", sorted(rule_registry()))
def test_every_registered_rule_round_trips_through_apply(name: str, tmp_path: Path) -> None:
    check_rule_round_trip(name, tmp_path)


class _Doubling(Rule):
    """Breaks the contract on purpose: a conv with twice the weights, and a wrong cost."""

    name = "broken"

    def skip_reason(self, site: ConvSite) -> str | None:
        return None

    def build(self, site: ConvSite) -> Replacement:
        conv = site.module
        clone = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
        clone = clone.to(conv.weight.dtype)
        with torch.no_grad():
            clone.weight.copy_(conv.weight)
        return Replacement(clone)

    def cost(self, site: ConvSite) -> Cost:
        return Cost(params=1, macs=1)


class _NoReason(_Doubling):
    def skip_reason(self, site: ConvSite) -> str | None:
        return ""


class _WrongShape(_Doubling):
    def build(self, site: ConvSite) -> Replacement:
        conv = site.module
        return Replacement(nn.Conv2d(conv.in_channels, conv.out_channels, 1, stride=2).to(conv.weight.dtype))


@pytest.mark.parametrize(
    ("rule", "message"),
    [(_Doubling(), "cost\\(\\) says 1 params"), (_NoReason(), "needs a reason"), (_WrongShape(), "output shape")],
)
def test_the_contract_catches_broken_rules(rule: Rule, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        check_rule_on_geometry(rule, CONV_GEOMETRIES[0])
