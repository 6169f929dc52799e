"""Every zoo model walked through report, apply, reload and compare, under every rule, in one place.

A new failure class costs one fixture: a file in ``sample_models/zoo/`` and its entry in ``ZOO``
(expected trace mode and leaves, layers every rule must skip with a reason, layers ``separable``
must rewrite). One parametrized test runs the engine the way ``convrewrite apply`` does (load,
analyse, build the report, write the output directory) on a small input, then checks the result
against oracles that share no code with convrewrite:

* parameters: ``sum(p.numel() for p in model.parameters())`` (which counts a tied parameter once);
* MACs: ``torch.utils.flop_counter.FlopCounterMode`` / 2 with gradients on (tests/oracles.py),
  before and after the rewrite;
* the written ``model.py`` + ``weights.safetensors``, imported afresh, against the in-memory model;
* which module objects and parameters are shared, read from the model before the rewrite.

A second test rewrites every zoo model with a rule at a setting that must not change what the
model computes (``group-shuffle:groups=1``: one group, shuffle of one): the output must stay the
same. A rule that rewrote a conv from its attributes while the conv computes something else (a
conv subclass with its own forward) fails it. A third runs ``report`` without rules.

The rules come from the registry (``rule_registry()``), so every installed rule is covered.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from convrewrite.core.loading import ExampleInputs, load_model
from convrewrite.core.modules import CONV_TYPES
from convrewrite.engine.pipeline import EngineResult, analyse
from convrewrite.engine.report_builder import build_report
from convrewrite.errors import NothingRewritten
from convrewrite.export.writer import write_apply_output
from convrewrite.rules.api import make_rule, rule_registry

from .oracles import flop_counter_macs as oracle_macs

ROOT = Path(__file__).resolve().parent.parent


def _import_zoo() -> Any:
    """``sample_models/zoo/__init__.py`` (data only) without making ``sample_models`` a package."""
    name = "convrewrite_sample_zoo"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "sample_models" / "zoo" / "__init__.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


zoo = _import_zoo()
RULES = sorted(rule_registry())


def flop_counter_macs(model: nn.Module, inputs: ExampleInputs) -> int:
    return oracle_macs(model, inputs.args, inputs.kwargs)


def tensors_of(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def shapes_of(value: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tensors_of(value)]


def assert_same_outputs(expected: Any, actual: Any, what: str) -> None:
    left, right = tensors_of(expected), tensors_of(actual)
    assert [t.shape for t in left] == [t.shape for t in right], what
    for a, b in zip(left, right):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=what)


class Inventory:
    """What the original model shares, read before the rewrite (independent of the engine)."""

    def __init__(self, model: nn.Module) -> None:
        self.conv_names: dict[str, str] = {}  # first name -> type
        self.aliases: list[list[str]] = []  # names of one module object registered more than once
        names_of: dict[int, list[str]] = defaultdict(list)
        for name, module in model.named_modules(remove_duplicate=False):
            names_of[id(module)].append(name)
        for name, module in model.named_modules():
            if isinstance(module, CONV_TYPES):
                self.conv_names[name] = type(module).__name__
                if len(names_of[id(module)]) > 1:
                    self.aliases.append(names_of[id(module)])
        holders: dict[int, list[str]] = defaultdict(list)
        for name, module in model.named_modules():
            if isinstance(module, CONV_TYPES):
                holders[id(module.weight)].append(name)
        self.tied = [names for names in holders.values() if len(names) > 1]
        self.called: dict[str, int] = defaultdict(int)
        handles = [
            module.register_forward_pre_hook(lambda m, a, n=name: self.called.__setitem__(n, self.called[n] + 1))
            for name, module in model.named_modules()
            if isinstance(module, CONV_TYPES)
        ]
        self._handles = handles

    def stop_counting(self) -> None:
        for handle in self._handles:
            handle.remove()


def unseen_elementwise_products(result: EngineResult) -> int:
    """MACs FlopCounterMode cannot see: a depthwise Winograd block multiplies elementwise in the
    transform domain (F(2x2)'s transforms are additions, not MACs; a dense block's products are a
    matmul, which it does see). Hand formula per call:
    tiles x a^2 x Cout, a = tile + 2, tiles = N x ceil(Ho / tile) x ceil(Wo / tile)."""
    assert result.after is not None
    total = 0
    modules = dict(result.model.named_modules())
    for record in result.after.records:
        module = modules.get(record.name)
        if type(module).__name__ != "WinogradConv2d" or not record.called:
            continue
        if module.in_channels // module.groups != 1:
            continue
        batch, channels, out_h, out_w = record.output_shapes[0]
        m = module.tile
        total += batch * -(-out_h // m) * -(-out_w // m) * (m + 2) ** 2 * channels
    return total


def filter_transforms_under_grad(model: nn.Module, inputs: ExampleInputs) -> int:
    """The oracle counts with gradients on, where a Winograd block transforms its filter on every
    call (it caches the transform only under no_grad, where the report's profile runs). Hand
    formula per call: G W G^T for each (Cout, Cin/groups) 3x3 filter, G being (tile + 2) x 3:
    a * 9 + 3 * a^2 MACs with a = tile + 2."""
    calls: dict[int, int] = defaultdict(int)
    blocks = [m for m in model.modules() if type(m).__name__ == "WinogradConv2d"]
    handles = [m.register_forward_hook(lambda m, i, o: calls.__setitem__(id(m), calls[id(m)] + 1)) for m in blocks]
    try:
        with torch.enable_grad():
            inputs.call(model)
    finally:
        for handle in handles:
            handle.remove()
    total = 0
    for block in blocks:
        a = block.tile + 2
        filters = block.out_channels * (block.in_channels // block.groups)
        total += calls[id(block)] * filters * (a * 9 + 3 * a * a)
    return total


def rewritten_names(result: EngineResult) -> set[str]:
    names: set[str] = set()
    for record in result.rewrites:
        names.add(record.name)
        names.update(record.aliases)
    return names


def skip_reasons(result: EngineResult) -> dict[str, list[str]]:
    reasons: dict[str, list[str]] = defaultdict(list)
    for skip in result.skipped:
        reasons[skip.name].append(skip.reason)
    return reasons


def load_entry(entry: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Load a zoo model at its small test input (with ``SITE_DIR`` importable where it needs it)."""
    if entry.needs_site:
        monkeypatch.syspath_prepend(str(zoo.SITE_DIR))
    return load_model(entry.path, input_shapes=list(entry.test_shapes) if entry.test_shapes else None)


CASES = [pytest.param(rule, entry, id=f"{rule}-{entry.name}") for rule in RULES for entry in zoo.ZOO]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize(("rule", "entry"), CASES)
def test_rule_on_zoo_model(rule: str, entry: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_entry(entry, monkeypatch)
    model, inputs = loaded.model, loaded.inputs

    # ---- oracles on the original model, before the engine touches it
    inventory = Inventory(model)
    with torch.no_grad():
        reference = inputs.call(model)
    inventory.stop_counting()
    params_before = sum(p.numel() for p in model.parameters())
    macs_before = flop_counter_macs(model, inputs)

    result = analyse(loaded, [make_rule(rule)])
    report = build_report(result)
    assert report.after is not None and result.after is not None

    # ---- every conv is rewritten, or each skipped one carries its reason
    rewritten = rewritten_names(result)
    reasons = skip_reasons(result)
    for name, kind in inventory.conv_names.items():
        if name not in rewritten:
            assert reasons.get(name), f"{name} ({kind}) neither rewritten nor skipped with a reason"
            assert all(reason.strip() for reason in reasons[name])
    for record in result.before.records:
        if record.macs_by_kind.get("convolution") and record.name not in inventory.conv_names:
            owner = record.name or "(model)"
            assert reasons.get(owner), f"functional conv in {owner} has no skip reason"
    for name, fragment in entry.skipped:
        if rule == "fuse-bn":  # folds a BatchNorm into any conv kind; the expectations are about structure
            assert name in rewritten or reasons[name], name
            continue
        assert name not in rewritten, f"{name} must be left alone"
        # A rule that does not handle the layer's kind at all may give that reason instead.
        kind = ("implemented for 2-D", "only Conv2d", "factorises Linear, Conv1d and Conv2d")
        assert any(fragment in reason or any(k in reason for k in kind) for reason in reasons[name]), (
            name,
            reasons[name],
        )
    if rule == "separable":
        missing = set(entry.separable_rewrites) - rewritten
        assert not missing, f"separable did not rewrite {sorted(missing)}: {[reasons[n] for n in sorted(missing)]}"

    # ---- the rewritten model runs and keeps the output shapes
    with torch.no_grad():
        rewritten_output = inputs.call(model)
    assert shapes_of(rewritten_output) == shapes_of(reference)
    assert shapes_of(result.after.output) == shapes_of(reference)

    # ---- counts: params and MACs against the oracles, rows sum to the totals
    assert report.before.params == params_before
    assert report.before.macs == macs_before
    assert report.after.params == sum(p.numel() for p in model.parameters())
    expected_after = flop_counter_macs(model, inputs) + unseen_elementwise_products(result)
    assert report.after.macs == expected_after - filter_transforms_under_grad(model, inputs)
    rows = report.layers
    assert sum(row.params_before or 0 for row in rows) == report.before.params
    assert sum(row.params_after or 0 for row in rows) == report.after.params
    assert sum(row.macs_before or 0 for row in rows) == report.before.macs
    assert sum(row.macs_after or 0 for row in rows) == report.after.macs

    # ---- tracing: the expected mode, and the untraceable submodules named as leaves
    assert report.trace["mode"] == entry.trace, report.trace
    assert sorted(leaf["name"] for leaf in report.trace["leaves"]) == sorted(entry.leaves)
    for leaf in entry.leaves:
        inside = [name for name in inventory.conv_names if name.startswith(leaf + ".")]
        for name in inside:
            assert name in rewritten or reasons.get(name), name
        if rule == "separable":
            # Every conv inside the leaves is a dense 3x3: the fallback must not stop the rewrite.
            assert set(inside) <= rewritten, f"convs inside untraceable leaves not rewritten: {set(inside) - rewritten}"

    # ---- a module called twice is rewritten once and still called twice
    for name, calls in inventory.called.items():
        if calls > 1 and name in rewritten:
            records = [r for r in result.rewrites if name == r.name or name in r.aliases]
            assert len(records) == 1, f"{name} rewritten {len(records)} times"
            assert records[0].calls == calls
            if entry.trace == "fx":  # no value-dependent control flow: the same calls happen after
                assert len([r for r in result.after.by_name(records[0].name) if r.called]) == calls
    # ---- the same module under several names stays one module
    for names in inventory.aliases:
        modules = {id(model.get_submodule(n)) for n in names}
        assert len(modules) == 1, f"{names} no longer one module"
    # ---- tied weights stay tied: one shared replacement, or left as they were (each with its reason)
    for names in inventory.tied:
        if any(n in rewritten for n in names):
            assert all(n in rewritten for n in names), f"tie {names} partly rewritten"
            assert len({id(model.get_submodule(n)) for n in names}) == 1, f"tie {names} broken"
        else:
            assert len({id(model.get_submodule(n).weight) for n in names}) == 1, f"tie {names} broken"
    if rule == "separable" and entry.name == "tied":
        # Every one of these convs is a dense 3x3 that separable rewrites when nothing else stops it.
        assert {"left", "right"} <= rewritten
        assert "own bias" in reasons["branch_a"][0] and "own bias" in reasons["branch_b"][0]
        assert "decode (ConvTranspose2d)" in reasons["encode"][0]

    # ---- apply: written, and the written model.py + weights reload to the same output; a rule
    # that rewrote nothing writes nothing (exit 3, one line that sums up the skip reasons)
    out = tmp_path / "out"
    if not result.rewrites:
        with pytest.raises(NothingRewritten, match=f"no layer was rewritten, so nothing was written: {rule}"):
            write_apply_output(result, report, out)
        assert not out.exists() and list(tmp_path.iterdir()) == []
        return
    write_apply_output(result, report, out)
    assert (out / "model.py").is_file() and (out / "weights.safetensors").is_file()
    fresh = load_model(str(out))
    with torch.no_grad():
        reloaded_output = inputs.call(fresh.model)
    assert_same_outputs(rewritten_output, reloaded_output, f"{entry.name}: reloaded model.py differs")
    fresh_model = fresh.model
    for names in inventory.aliases:
        assert len({id(fresh_model.get_submodule(n)) for n in names}) == 1, f"{names} not shared in model.py"
    for name, calls in inventory.called.items():
        if calls > 1 and name in rewritten and entry.trace == "fx":
            counted: list[str] = []
            handle = fresh_model.get_submodule(name).register_forward_pre_hook(
                lambda m, a, n=name, seen=counted: seen.append(n)
            )
            with torch.no_grad():
                inputs.call(fresh_model)
            handle.remove()
            assert len(counted) == calls, f"{name}: called {len(counted)} times in model.py, {calls} before"
    for names in inventory.tied:
        if all(n in rewritten for n in names):
            assert len({id(fresh_model.get_submodule(n)) for n in names}) == 1, f"tie {names} lost in model.py"
        elif not any(n in rewritten for n in names):
            weights = {id(fresh_model.get_submodule(n).weight) for n in names}
            assert len(weights) == 1, f"tie {names} lost in model.py"


EXACT_RULE = "group-shuffle:groups=1"


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("entry", zoo.ZOO, ids=[entry.name for entry in zoo.ZOO])
def test_a_rewrite_that_should_be_exact_keeps_the_output(entry: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """One group and a shuffle of one channel group compute the original conv exactly: whatever a
    conv really computes (its own forward included), the rewritten model must give the same output,
    and every dense conv must be rewritten or skipped with the reason."""
    loaded = load_entry(entry, monkeypatch)
    model, inputs = loaded.model, loaded.inputs
    with torch.no_grad():
        reference = inputs.call(model)
    dense = [
        name
        for name, module in model.named_modules()
        if isinstance(module, CONV_TYPES) and "Transpose" not in type(module).__name__ and module.groups == 1
    ]
    result = analyse(loaded, [make_rule(EXACT_RULE)])
    rewritten, reasons = rewritten_names(result), skip_reasons(result)
    for name in dense:
        assert name in rewritten or reasons.get(name), f"{name} neither rewritten nor skipped with a reason"
    with torch.no_grad():
        assert_same_outputs(reference, inputs.call(model), f"{entry.name}: {EXACT_RULE} changed the output")
    for record in result.rewrites:
        assert record.kernel_error is not None and record.kernel_error < 1e-6, (record.name, record.kernel_error)


def _zoo_file(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"convrewrite_zoo_{name}", zoo.ZOO_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.mark.parametrize(
    ("factory", "params"),
    [("resnet18", 11_689_512), ("resnet50", 25_557_032), ("wide_resnet101_2", 126_886_696)],
)
def test_residual_networks_have_the_well_known_sizes(factory: str, params: int) -> None:
    """The published parameter counts of ResNet-18/50 and Wide ResNet-101-2 (the benchmarks' models)."""
    resnet = _zoo_file("resnet")
    assert tuple(resnet.INPUT_SHAPE) == (1, 3, 224, 224)
    with torch.device("meta"):
        model = getattr(resnet, factory)()
    assert sum(p.numel() for p in model.parameters()) == params


def test_every_zoo_file_is_listed() -> None:
    listed = {entry.spec.partition(":")[0] for entry in zoo.ZOO}
    files = {path.name for path in zoo.ZOO_DIR.glob("*.py") if path.name != "__init__.py"}
    assert files == listed


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("entry", zoo.ZOO, ids=[entry.name for entry in zoo.ZOO])
def test_report_without_rules(entry: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without rules the graph is checked by its module calls (no second forward): same trace mode."""
    loaded = load_entry(entry, monkeypatch)
    params, macs = sum(p.numel() for p in loaded.model.parameters()), flop_counter_macs(loaded.model, loaded.inputs)
    report = build_report(analyse(loaded))
    assert report.trace["mode"] == entry.trace, report.trace
    assert report.trace["checked"] == ("" if entry.trace == "eager" else "module calls")
    assert (report.before.params, report.before.macs) == (params, macs)
    assert sum(row.params_before or 0 for row in report.layers) == params
    assert sum(row.macs_before or 0 for row in report.layers) == macs


def _calibration_batches(inputs: ExampleInputs, count: int = 8) -> list[Any]:
    """Batches shaped like the example input: floating tensors with noise added, the rest as is."""
    generator = torch.Generator().manual_seed(7)

    def jitter(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value + 0.5 * torch.randn(value.shape, generator=generator, dtype=value.dtype)
        return value

    from torch.utils._pytree import tree_map

    batches = []
    for _ in range(count):
        args, kwargs = tree_map(jitter, (inputs.args, inputs.kwargs))
        batches.append(kwargs if not args else args if not kwargs else args)
    return batches


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("entry", zoo.ZOO, ids=[entry.name for entry in zoo.ZOO])
def test_fitting_on_calibration_data(entry: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every zoo model rewritten with ``separable`` and fitted on calibration data: the fitted
    model is measured on held-out batches, does not drift from the transfer, and writes out."""
    from convrewrite.recovery.data import calibration_data_from

    monkeypatch.setattr(torch, "get_num_threads", torch.get_num_threads)  # keep fixtures' thread choice
    loaded = load_entry(entry, monkeypatch)
    if loaded.inputs.args and loaded.inputs.kwargs:
        pytest.skip("positional and keyword inputs together: not a calibration batch form")
    data = calibration_data_from(_calibration_batches(loaded.inputs), example=loaded, holdout=0.25)
    result = analyse(loaded, [make_rule("separable")], data=data, settings={"fit-steps": 3})
    if not result.originals:
        assert "fitting" not in result.sections or not result.sections["fitting"].fit.layers
        return
    fitting = result.sections["fitting"]
    assert fitting.transfer is not None and fitting.fitted is not None
    assert fitting.fitted.samples == fitting.transfer.samples > 0
    assert fitting.fitted.output_relative_error <= fitting.transfer.output_relative_error * 1.1 + 1e-6
    assert result.fidelity is not None and result.fidelity.measured_on.endswith("held-out calibration samples")
    write_apply_output(result, build_report(result), tmp_path / "out")  # reloads and compares
