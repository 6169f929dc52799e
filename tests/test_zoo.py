"""Every rule on every zoo model: rewritten or skipped with a reason, counted right, written and reloaded.

One parametrized test runs the engine the way ``convrewrite apply`` does (load, analyse, build the
report, write the output directory) on a small input, then checks the result against oracles that
share no code with convrewrite:

* parameters: ``sum(p.numel() for p in model.parameters())`` (which counts a tied parameter once);
* MACs: ``torch.utils.flop_counter.FlopCounterMode`` / 2, before and after the rewrite;
* the written ``model.py`` + ``weights.safetensors``, imported afresh, against the in-memory model;
* which module objects and parameters are shared, read from the model before the rewrite.

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
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop

from convrewrite.engine.loading import ExampleInputs, load_model
from convrewrite.engine.pipeline import CONV_TYPES, EngineResult, analyse
from convrewrite.errors import NothingRewritten
from convrewrite.export.writer import write_apply_output
from convrewrite.report.builder import build_report
from convrewrite.rules.api import make_rule, rule_registry

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

# FlopCounterMode in torch 2.13 has no formula for the CPU kernel of scaled-dot-product attention
# (it would count it as 0). Map it to torch's own SDPA formula: still an oracle independent of ours.
_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
FLOP_MAPPING = {_CPU_SDPA: sdpa_flop} if _CPU_SDPA is not None else {}


def flop_counter_macs(model: nn.Module, inputs: ExampleInputs) -> int:
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_MAPPING)
    with torch.no_grad(), counter:
        inputs.call(model)
    flops = counter.get_total_flops()
    assert flops % 2 == 0
    return flops // 2


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


def rewritten_names(result: EngineResult) -> set[str]:
    names: set[str] = set()
    for record in result.rewrites:
        names.add(record.name)
        names.update(record.aliases)
    return names


CASES = [pytest.param(rule, entry, id=f"{rule}-{entry.name}") for rule in RULES for entry in zoo.ZOO]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize(("rule", "entry"), CASES)
def test_rule_on_zoo_model(rule: str, entry: Any, tmp_path: Path) -> None:
    loaded = load_model(entry.path, input_shapes=list(entry.test_shapes) if entry.test_shapes else None)
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
    reasons: dict[str, list[str]] = defaultdict(list)
    for skip in result.skipped:
        reasons[skip.name].append(skip.reason)
    for name, kind in inventory.conv_names.items():
        if name not in rewritten:
            assert reasons.get(name), f"{name} ({kind}) neither rewritten nor skipped with a reason"
            assert all(reason.strip() for reason in reasons[name])
    conv_types = {t.__name__ for t in CONV_TYPES}
    for record in result.before.records:
        if record.macs_by_kind.get("convolution") and record.type not in conv_types:
            owner = record.name or "(model)"
            assert reasons.get(owner), f"functional conv in {owner} has no skip reason"

    # ---- the rewritten model runs and keeps the output shapes
    with torch.no_grad():
        rewritten_output = inputs.call(model)
    assert shapes_of(rewritten_output) == shapes_of(reference)
    assert shapes_of(result.after.output) == shapes_of(reference)

    # ---- counts: params and MACs against the oracles, rows sum to the totals
    assert report.before.params == params_before
    assert report.before.macs == macs_before
    assert report.after.params == sum(p.numel() for p in model.parameters())
    assert report.after.macs == flop_counter_macs(model, inputs)
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
        assert inside, f"zoo model {entry.name}: leaf {leaf} holds no conv"
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
def test_report_without_rules(entry: Any) -> None:
    """Without rules the graph is checked by its module calls (no second forward): same trace mode."""
    loaded = load_model(entry.path, input_shapes=list(entry.test_shapes) if entry.test_shapes else None)
    params, macs = sum(p.numel() for p in loaded.model.parameters()), flop_counter_macs(loaded.model, loaded.inputs)
    report = build_report(analyse(loaded))
    assert report.trace["mode"] == entry.trace, report.trace
    assert report.trace["checked"] == ("" if entry.trace == "eager" else "module calls")
    assert (report.before.params, report.before.macs) == (params, macs)
    assert sum(row.params_before or 0 for row in report.layers) == params
    assert sum(row.macs_before or 0 for row in report.layers) == macs
