"""Shared helpers for the rule tests: sites from plain convs, dense-equivalent convs, rule lists."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from convrewrite.engine.loading import ExampleInputs
from convrewrite.engine.profiling import profile
from convrewrite.layers.dense import dense_kernel
from convrewrite.rules.api import ConvSite, Rule, make_rule

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
    "low-rank",
    "low-rank:energy=0.9",
    "low-rank:rank=2",
)


def conv_class(dims: int) -> type[nn.Module]:
    return nn.Conv1d if dims == 1 else nn.Conv2d


def make_conv(
    dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: Any,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> nn.Module:
    torch.manual_seed(seed)
    conv = conv_class(dims)(in_channels, out_channels, kernel_size, **kwargs).to(dtype)
    with torch.no_grad():
        if conv.bias is not None:
            conv.bias.normal_()
    return conv


def example_input(conv: nn.Module, spatial: int | tuple[int, ...] = 9, batch: int = 2, seed: int = 1) -> torch.Tensor:
    dims = len(conv.kernel_size)
    sizes = (spatial,) * dims if isinstance(spatial, int) else tuple(spatial)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, conv.in_channels, *sizes, generator=generator, dtype=conv.weight.dtype)


def site_of(conv: nn.Module, x: torch.Tensor, name: str = "layer") -> ConvSite:
    """A ConvSite as the engine would build it for ``conv`` called once on ``x``."""
    with torch.no_grad():
        y = conv(x)
    return ConvSite(name=name, module=conv, input_shape=tuple(x.shape), output_shape=tuple(y.shape))


def rule(spec: str) -> Rule:
    return make_rule(spec)


def equivalent_conv(block: nn.Module, original: nn.Module) -> nn.Module:
    """A plain conv with the original geometry carrying ``block``'s dense kernel and bias."""
    weight, bias = dense_kernel(block)
    conv = conv_class(len(original.kernel_size))(
        original.in_channels,
        original.out_channels,
        original.kernel_size,
        stride=original.stride,
        padding=original.padding,
        dilation=original.dilation,
        bias=bias is not None,
        padding_mode=original.padding_mode,
    ).to(weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def measured(module: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(params, MACs) of ``module`` as the report's profiler counts them."""
    result = profile(module, ExampleInputs((x,)))
    return result.params, result.macs


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-300))


def single_thread() -> Any:
    """Fixture body: this 2-core machine is shared, and BLAS threads fight each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
