"""Checks every rule must pass: analytic cost == measured cost, to_dense() is what the block computes,
the reported kernel error matches the weight transfer, composition, and apply round trips."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from convrewrite.cli import run
from convrewrite.core.loading import ExampleInputs, LoadedModel
from convrewrite.engine.pipeline import analyse
from convrewrite.layers import is_block
from convrewrite.layers.dense import kernel_error
from convrewrite.testing import CONV_GEOMETRIES

from .rule_test_support import (
    REPO_SAMPLES,
    RULE_SPECS,
    equivalent_conv,
    example_input,
    make_conv,
    measured,
    relative,
    rule,
    site_of,
)

#: (dims, in, out, kernel, conv kwargs, spatial size): the contract's geometries (convrewrite.testing).
CONFIGURATIONS: list[tuple[int, int, int, Any, dict[str, Any], Any]] = [
    (g.dims, g.in_channels, g.out_channels, g.kernel_size, dict(g.options), g.spatial) for g in CONV_GEOMETRIES
]


def _case_id(case: tuple) -> str:
    dims, cin, cout, kernel, kwargs, _ = case
    extra = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return f"{dims}d-{cin}to{cout}-k{kernel}-{extra}"


def _built(spec: str, case: tuple, dtype: torch.dtype = torch.float64):
    dims, cin, cout, kernel, kwargs, spatial = case
    conv = make_conv(dims, cin, cout, kernel, dtype=dtype, **kwargs)
    x = example_input(conv, spatial)
    site = site_of(conv, x)
    current = rule(spec)
    reason = current.skip_reason(site)
    if reason is not None:
        return conv, x, site, current, reason, None
    return conv, x, site, current, None, current.build(site)


@pytest.mark.parametrize("case", CONFIGURATIONS, ids=_case_id)
@pytest.mark.parametrize("spec", RULE_SPECS)
def test_every_rule_on_every_geometry(spec: str, case: tuple) -> None:
    """Rewrite or skip with a reason; a rewrite keeps shapes, computes its dense kernel and costs
    exactly what its formula says, measured by the report's own profiler."""
    conv, x, site, current, reason, replacement = _built(spec, case)
    if replacement is None:
        assert isinstance(reason, str) and reason
        return
    block = replacement.module
    assert is_block(type(block))
    assert (block.in_channels, block.out_channels) == (conv.in_channels, conv.out_channels)
    with torch.no_grad():
        expected_shape = conv(x).shape
        y = block(x)
    assert y.shape == expected_shape
    # The dense equivalent really is what the block computes, with the original geometry.
    with torch.no_grad():
        assert relative(y, equivalent_conv(block, conv)(x)) < 1e-10
    # Analytic params and MACs are what the report counts on the built module.
    cost = current.cost(site)
    assert measured(block, x) == (cost.params, cost.macs)
    assert cost.params == sum(p.numel() for p in block.parameters())
    # Energy kept and kernel error are two views of one projection: error^2 = 1 - energy.
    if "energy_retained" in replacement.notes:
        energy = replacement.notes["energy_retained"]
        assert 0.0 <= energy <= 1.0 + 1e-12
        assert kernel_error(block, conv) == pytest.approx(max(1.0 - energy, 0.0) ** 0.5, abs=1e-6)


@pytest.mark.parametrize(
    "spec", ["group-shuffle:groups=1", "group-shuffle:groups=1,assign=energy", "log-group:groups=1"]
)
@pytest.mark.parametrize("case", CONFIGURATIONS[::3], ids=_case_id)
def test_identity_structures_are_exact(spec: str, case: tuple) -> None:
    conv, x, _, _, reason, replacement = _built(spec, case, dtype=torch.float32)
    assert reason is None and replacement is not None
    assert replacement.notes["exact"] is True
    assert kernel_error(replacement.module, conv) < 1e-7
    with torch.no_grad():
        assert relative(replacement.module(x), conv(x)) < 1e-5


class Stack(nn.Module):
    """Two convs with BN and ReLU, 1-D, 2-D or 3-D: enough for rules to compose."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.conv1 = conv(8, 16, 3, padding=1)
        self.norm = norm(16)
        self.conv2 = conv(16, 16, 3, padding="same", bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.norm(self.conv1(x))))


def _analyse(dims: int, specs: list[str]):
    torch.manual_seed(0)
    model = Stack(dims).eval()
    x = torch.randn(2, 8, *([6] * dims))
    loaded = LoadedModel(model, ExampleInputs((x,)), "stack", "stack", "test")
    return analyse(loaded, [rule(spec) for spec in specs])


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_separable_then_group_shuffle_is_a_shufflenet_style_unit(dims: int) -> None:
    result = _analyse(dims, ["separable", "group-shuffle:groups=4"])
    block = result.model.conv2
    assert type(block).__name__ == f"SeparableConv{dims}d"
    pointwise = block.pointwise
    assert type(pointwise).__name__ == f"GroupShuffleConv{dims}d"
    assert pointwise.conv.groups == 4 and pointwise.conv.kernel_size == (1,) * dims
    assert block.depthwise.groups == 16  # left to the depthwise conv
    reasons = {(s.name, s.rule): s.reason for s in result.skipped}
    assert reasons[("conv2.depthwise", "group-shuffle")] == "already depthwise (groups=16)"
    assert {(r.name, r.rule) for r in result.rewrites} >= {("conv2", "separable"), ("conv2.pointwise", "group-shuffle")}
    for record in result.rewrites:
        assert (record.params_after, record.macs_after) == (record.analytic_params, record.analytic_macs)
    layers = {layer.name: layer for layer in result.fidelity.layers}
    assert layers["conv2"].rules == ["separable", "group-shuffle"]
    torch.manual_seed(0)
    original = Stack(dims).conv2  # the same seed rebuilds the weights the rules started from
    assert layers["conv2"].kernel_relative_error == pytest.approx(kernel_error(block, original), rel=1e-5)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_separable_then_channelwise_is_depthwise_plus_channel_wise(dims: int) -> None:
    result = _analyse(dims, ["separable", "channelwise"])
    block = result.model.conv2
    assert type(block.pointwise).__name__ == f"ChannelwiseConv{dims}d"
    assert sum(p.numel() for p in block.pointwise.parameters()) == 3  # dc = 3, bias was off
    # conv1's pointwise expands 8 -> 16: the plain channel-wise conv cannot, so it is skipped.
    reasons = {(s.name, s.rule): s.reason for s in result.skipped}
    assert reasons[("conv1.pointwise", "channelwise")].startswith("expands channels (8 -> 16)")
    grouped = _analyse(dims, ["separable", "channelwise:groups=2"])
    assert type(grouped.model.conv1.pointwise).__name__ == f"GroupChannelwiseConv{dims}d"


def test_later_rules_see_layers_earlier_rules_made_and_per_rule_include_limits_them() -> None:
    result = _analyse(2, ["log-group:groups=2,include=conv2", "separable:include=conv2.*"])
    assert type(result.model.conv1).__name__ == "Conv2d"
    branches = result.model.conv2.branches
    assert [type(b).__name__ for b in branches] == ["SeparableConv2d", "SeparableConv2d"]
    assert [r.name for r in result.rewrites] == ["conv2", "conv2.branches.0", "conv2.branches.1"]
    excluded = _analyse(2, ["group-shuffle:exclude=conv2"])
    assert [r.name for r in excluded.rewrites] == ["conv1"]
    assert any(s.reason.startswith("excluded by exclude=conv2") for s in excluded.skipped)


def test_the_json_report_says_how_much_of_each_kernel_was_kept(tmp_path, monkeypatch) -> None:
    from convrewrite.api import report

    monkeypatch.chdir(tmp_path)
    data = report(str(REPO_SAMPLES / "tdnn.py"), rules=["group-shuffle:assign=energy", "log-group"]).to_dict()
    rewrites = {(r["name"], r["rule"]): r for r in data["rewrites"]}
    shuffled = rewrites[("tdnn2", "group-shuffle")]["notes"]
    assert shuffled["energy_retained"] >= shuffled["energy_retained_shuffle"]
    assert rewrites[("tdnn1", "log-group")]["notes"]["in_groups"] == [20, 10, 5, 4]
    errors = {layer["name"]: layer["kernel_relative_error"] for layer in data["fidelity"]["layers"]}
    assert errors["tdnn2"] == pytest.approx((1 - shuffled["energy_retained"]) ** 0.5, abs=1e-5)
    assert all(0 < errors[name] < 1 for name in ("tdnn1", "tdnn2", "tdnn3"))


@pytest.mark.parametrize(
    "model,specs",
    [
        ("tdnn.py", ["group-shuffle"]),
        ("tdnn.py", ["group-shuffle:assign=energy"]),
        ("tdnn.py", ["log-group"]),
        ("tdnn.py", ["separable", "channelwise"]),
        ("tdnn.py", ["log-group", "separable"]),  # separable blocks inside the log-group's ModuleList
        ("crnn.py", ["group-shuffle"]),
        ("crnn.py", ["log-group"]),
        ("crnn.py", ["separable:multiplier=2", "channelwise"]),
        ("crnn.py", ["separable", "group-shuffle:groups=2,assign=energy"]),
        ("crnn.py", ["separable", "channelwise:groups=2,refine=2"]),
        ("tdnn.py", ["low-rank:energy=0.8"]),  # the classifier Linear too
        ("crnn.py", ["low-rank", "separable"]),  # separable then splits each low-rank block's KxK part
    ],
)
def test_apply_writes_a_model_that_reloads(tmp_path, monkeypatch, capsys, model: str, specs: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["apply", str(REPO_SAMPLES / model), "--out", str(tmp_path / "out"), "--format", "json"]
    if model == "crnn.py":
        argv += ["--input-shape", "1,1,32,48"]  # the model's own height; a narrower strip keeps this quick
    for spec in specs:
        argv += ["--rule", spec]
    assert run(argv) == 0, capsys.readouterr().err
    source = (tmp_path / "out" / "model.py").read_text()
    top_level = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not [line for line in top_level if "convrewrite" in line]  # standalone: torch only
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.py", "report.json", "weights.safetensors"]


@pytest.mark.parametrize(
    "model,spec,block",
    [
        ("crnn.py", "group-shuffle", "GroupShuffleConv2d"),
        ("crnn.py", "log-group", "LogGroupConv2d"),
        ("tdnn.py", "log-group", "LogGroupConv1d"),
        ("crnn.py", "separable --rule channelwise:groups=2", "Rules: separable then channelwise:groups=2"),
    ],
)
def test_report_tables_show_each_rule(tmp_path, monkeypatch, capsys, model: str, spec: str, block: str) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["report", str(REPO_SAMPLES / model), "--width", "110"]
    if model == "crnn.py":
        argv += ["--input-shape", "1,1,32,48"]
    for part in spec.split(" --rule "):
        argv += ["--rule", part]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert block in out
    assert "Kernel" in out and "reduction" in out
