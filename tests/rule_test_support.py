"""Shared helpers for the rule tests: sites from plain convs, dense-equivalent convs, rule lists."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from convrewrite.rules.api import Rule, make_rule
from convrewrite.testing import (
    ConvGeometry,
    equivalent_conv,
    example_input,
    measured_cost,
    relative_difference,
    site_of,
)
from convrewrite.testing import make_conv as make_geometry_conv

__all__ = ["equivalent_conv", "example_input", "site_of"]

REPO_SAMPLES = __import__("pathlib").Path(__file__).resolve().parent.parent / "sample_models"

#: Every built-in rule with settings that exercise its interesting paths.
RULE_SPECS = (
    "separable",
    "separable:multiplier=2,bias=pointwise",
    "group-shuffle:groups=2",
    "group-shuffle:groups=4,assign=energy",
    "log-group",
    "log-group:groups=2",
    "channelwise",
    "channelwise:kernel=4",
    "channelwise:groups=2",
    "channelwise:groups=4,kernel=5,refine=3",
    "winograd",
    "winograd:tile=4",
    "fuse-bn",  # offered a bare conv (no graph context): always a skip with a reason here
    "low-rank",
    "low-rank:energy=0.9",
    "low-rank:rank=2",
)


def conv_class(dims: int) -> type[nn.Module]:
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]


def make_conv(
    dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: Any,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> nn.Module:
    return make_geometry_conv(
        ConvGeometry(dims, in_channels, out_channels, kernel_size, kwargs), seed=seed, dtype=dtype
    )


def rule(spec: str) -> Rule:
    return make_rule(spec)


measured = measured_cost
relative = relative_difference
