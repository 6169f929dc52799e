"""The rule contract, as tests a rule author can run on their own rule.

Every rule, built-in or plugin, must on every conv geometry either skip with a reason or build a
block that keeps the output shape, exposes ``in_channels``/``out_channels`` like the conv it
stands for, computes exactly its ``to_dense()`` kernel (when it has one), and costs exactly what
``Rule.cost`` says, counted by the report's own profiler. A rule that passes also goes through the
whole pipeline and ``apply``: the written ``model.py`` reloads and reproduces the rewritten model.

In a plugin's test suite::

    import pytest
    from convrewrite.testing import CONV_GEOMETRIES, check_rule_on_geometry, check_rule_round_trip

    @pytest.mark.parametrize("geometry", CONV_GEOMETRIES, ids=str)
    def test_my_rule_contract(geometry):
        check_rule_on_geometry("my-rule:rank=2", geometry)

    def test_my_rule_round_trip(tmp_path):
        check_rule_round_trip("my-rule:rank=2", tmp_path)

convrewrite's own suite runs the same checks over every registered rule
(``tests/test_rule_contract.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convrewrite.core.loading import ExampleInputs, LoadedModel
from convrewrite.core.profiling import profile
from convrewrite.layers.dense import dense_kernel
from convrewrite.rules.api import ConvSite, Rule, make_rule


@dataclass(frozen=True)
class ConvGeometry:
    """A conv to offer a rule: dimensions, channels, kernel, constructor options, input size."""

    dims: int
    in_channels: int
    out_channels: int
    kernel_size: Any
    options: dict[str, Any] = field(default_factory=dict)
    spatial: Any = 7

    def __str__(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.dims}d-{self.in_channels}to{self.out_channels}-k{self.kernel_size}" + (
            f"-{extra}" if extra else ""
        )


#: Geometries every rule must handle (rewrite or skip with a reason): 1-D, 2-D and 3-D, strides,
#: padding modes, "same"/"valid" padding, dilation, 1x1 and rectangular kernels, no bias.
CONV_GEOMETRIES: tuple[ConvGeometry, ...] = (
    ConvGeometry(2, 8, 8, 3, {"padding": 1}, 7),
    ConvGeometry(2, 8, 16, 3, {"stride": 2, "padding": 1, "bias": False}, 9),
    ConvGeometry(2, 16, 8, 1, {}, 5),
    ConvGeometry(2, 16, 16, 1, {"stride": 2}, 7),
    ConvGeometry(2, 8, 8, 1, {"padding": 1, "padding_mode": "reflect"}, 6),
    ConvGeometry(2, 8, 8, (2, 3), {"padding": "same"}, (6, 7)),
    ConvGeometry(2, 8, 4, 3, {"dilation": 2, "padding": 2, "padding_mode": "circular"}, 8),
    ConvGeometry(2, 4, 8, 1, {"padding": "same"}, 5),
    ConvGeometry(2, 6, 6, 3, {"padding": "valid"}, 6),
    ConvGeometry(2, 12, 12, (1, 3), {"stride": (1, 2), "padding": (0, 1), "padding_mode": "replicate"}, (4, 9)),
    ConvGeometry(1, 8, 8, 4, {"padding": "same"}, 10),
    ConvGeometry(1, 16, 8, 1, {}, 6),
    ConvGeometry(1, 8, 16, 1, {"bias": False}, 6),
    ConvGeometry(1, 12, 12, 3, {"stride": 2, "padding": 1, "padding_mode": "replicate"}, 11),
    ConvGeometry(1, 16, 16, 1, {"padding": 2, "padding_mode": "circular"}, 7),
    ConvGeometry(1, 40, 40, 9, {"padding": "same"}, 12),
    ConvGeometry(3, 8, 8, 3, {"padding": 1}, 4),
    ConvGeometry(3, 8, 16, (1, 3, 3), {"stride": (1, 2, 2), "padding": (0, 1, 1), "bias": False}, (3, 6, 6)),
    ConvGeometry(3, 16, 8, 1, {}, 3),
    ConvGeometry(3, 8, 8, 1, {"stride": 2, "padding": 1, "padding_mode": "reflect"}, 5),
    ConvGeometry(3, 8, 8, (3, 1, 2), {"padding": "same"}, (4, 3, 4)),
    ConvGeometry(3, 12, 12, 1, {"padding": 1, "padding_mode": "circular"}, 3),
    ConvGeometry(3, 6, 12, 3, {"dilation": (2, 1, 1), "padding": (2, 1, 1), "padding_mode": "replicate"}, (5, 4, 4)),
)


def conv_class(dims: int) -> type[nn.Module]:
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]


def make_conv(geometry: ConvGeometry, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The conv of ``geometry`` with seeded random weights and a nonzero bias."""
    torch.manual_seed(seed)
    conv = conv_class(geometry.dims)(
        geometry.in_channels, geometry.out_channels, geometry.kernel_size, **geometry.options
    ).to(dtype)
    with torch.no_grad():
        if conv.bias is not None:
            conv.bias.normal_()
    return conv


def example_input(conv: Any, spatial: Any = 9, batch: int = 2, seed: int = 1) -> torch.Tensor:
    dims = len(conv.kernel_size)
    sizes = (spatial,) * dims if isinstance(spatial, int) else tuple(spatial)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, conv.in_channels, *sizes, generator=generator, dtype=conv.weight.dtype)


def site_of(conv: nn.Module, x: torch.Tensor, name: str = "layer") -> ConvSite:
    """A ConvSite as the engine would build it for ``conv`` called once on ``x``."""
    with torch.no_grad():
        y = conv(x)
    return ConvSite(name=name, module=conv, input_shape=tuple(x.shape), output_shape=tuple(y.shape))


def equivalent_conv(block: nn.Module, original: Any) -> nn.Module:
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


def measured_cost(module: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(params, MACs) of ``module`` as the report's profiler counts them."""
    result = profile(module, ExampleInputs((x,)))
    return result.params, result.macs


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-300))


def _rule(spec: str | Rule) -> Rule:
    return spec if isinstance(spec, Rule) else make_rule(spec)


def check_rule_on_geometry(spec: str | Rule, geometry: ConvGeometry, *, tolerance: float = 1e-9) -> str | None:
    """Offer ``geometry``'s conv to the rule and check the contract; returns the skip reason, if any.

    Raises ``AssertionError`` naming the rule, the geometry and the broken promise.
    """
    rule = _rule(spec)
    where = f"rule {rule.name!r} on {geometry}"
    conv = make_conv(geometry)
    x = example_input(conv, geometry.spatial)
    site = site_of(conv, x)
    reason = rule.skip_reason(site)
    if reason is not None:
        assert isinstance(reason, str) and reason.strip(), f"{where}: a skip needs a reason, got {reason!r}"
        return reason
    cost = rule.cost(site)
    block = rule.build(site).module
    assert isinstance(block, nn.Module), f"{where}: build() must return a Replacement holding an nn.Module"
    channels = (getattr(block, "in_channels", None), getattr(block, "out_channels", None))
    assert channels == (conv.in_channels, conv.out_channels), (
        f"{where}: the block must expose in_channels/out_channels of the conv it stands for, got {channels}"
    )
    with torch.no_grad():
        expected = conv(x)
        actual = block(x)
    assert actual.shape == expected.shape, f"{where}: output shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if callable(getattr(block, "to_dense", None)):
        with torch.no_grad():
            difference = relative_difference(actual, equivalent_conv(block, conv)(x))
        assert difference < tolerance, f"{where}: the block does not compute its to_dense() kernel ({difference:.2e})"
    counted = measured_cost(block, x)
    assert counted == (cost.params, cost.macs), (
        f"{where}: cost() says {cost.params:,} params / {cost.macs:,} MACs, the profiler counts "
        f"{counted[0]:,} / {counted[1]:,}"
    )
    return None


class _TwoConvs(nn.Module):
    def __init__(self, dims: int) -> None:
        super().__init__()
        conv, norm = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self.conv1 = conv(8, 16, 3, padding=1)
        self.norm = norm(16)
        self.conv2 = conv(16, 16, 3, padding=1)
        self.proj = conv(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.conv2(torch.relu(self.norm(self.conv1(x))))))


def check_rule_round_trip(spec: str | Rule, directory: Path, dims: int = 2) -> None:
    """Rewrite a small model with the rule, write it with ``apply``'s writer, reload and compare."""
    from convrewrite.engine.pipeline import analyse
    from convrewrite.engine.report_builder import build_report
    from convrewrite.export.writer import write_apply_output

    rule = _rule(spec)
    torch.manual_seed(0)
    model = _TwoConvs(dims).eval()
    x = torch.randn(2, 8, *([9] * dims))
    loaded = LoadedModel(model, ExampleInputs((x,)), "contract", "contract", "convrewrite.testing")
    result = analyse(loaded, [rule])
    assert result.rewrites or result.skipped, f"rule {rule.name!r} neither rewrote nor skipped any conv"
    # The writer reloads model.py + weights and raises unless they reproduce the rewritten model.
    written = write_apply_output(result, build_report(result), Path(directory) / f"{rule.name}-{dims}d")
    assert (written.directory / "model.py").is_file()


__all__ = [
    "CONV_GEOMETRIES",
    "ConvGeometry",
    "check_rule_on_geometry",
    "check_rule_round_trip",
    "conv_class",
    "equivalent_conv",
    "example_input",
    "make_conv",
    "measured_cost",
    "relative_difference",
    "site_of",
]
