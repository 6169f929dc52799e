"""The rewrite pipeline: profile, trace, apply rules, verify.

1. Run the model once (profiling.py): shapes, parameters and MACs per module call.
2. Trace it with torch.fx (tracing.py, with the leaf fallback) and propagate shapes through the
   graph, checking that the graph computes what the model computes.
3. Offer every Conv module to each rule in command-line order; the rule rewrites it or says why
   not. The replacement is installed at the same qualified name (every alias of a shared module),
   so untouched layers keep their state_dict keys and a module called twice stays one module.
   Later rules see the layers earlier rules produced.
4. Re-trace the rewritten model (``graph.lint()``, ``recompile()``), propagate shapes again, and
   verify that every rewritten node and the model's output keep their shapes.
5. Measure fidelity: relative output error and cosine similarity on the example input, and each
   rewritten layer's relative kernel error.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

import convrewrite.layers  # noqa: F401  (registers the replacement blocks as FX leaves)
from convrewrite.engine.loading import ExampleInputs, LoadedModel
from convrewrite.engine.profiling import CallRecord, ModelProfile, profile
from convrewrite.engine.threads import forward_work, small_work
from convrewrite.engine.tracing import LeafAwareTracer, TraceResult, placeholder_values, trace
from convrewrite.errors import ModelError, UsageError, describe, first_line
from convrewrite.layers.dense import kernel_error
from convrewrite.rules.api import ConvSite, Rule, is_explicit, selection_reason

CONV_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


@dataclass
class RewriteRecord:
    """One layer one rule rewrote; ``*_after`` are measured on the rewritten model."""

    name: str
    rule: str
    type_before: str
    type_after: str
    calls: int
    params_before: int
    macs_before: int
    params_after: int = 0
    macs_after: int = 0
    analytic_params: int = 0
    analytic_macs: int = 0
    kernel_error: float | None = None
    aliases: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class SkipRecord:
    name: str
    rule: str
    type: str
    reason: str


@dataclass
class LayerFidelity:
    name: str
    rules: list[str]
    kernel_relative_error: float | None


@dataclass
class Fidelity:
    output_relative_error: float
    output_cosine_similarity: float
    output_max_abs_error: float
    layers: list[LayerFidelity] = field(default_factory=list)


@dataclass
class EngineResult:
    """Everything a report or an ``apply`` needs; the model has been rewritten in place."""

    loaded: LoadedModel
    trace: TraceResult
    before: ModelProfile
    rules: list[Rule] = field(default_factory=list)
    after: ModelProfile | None = None
    rewritten_trace: TraceResult | None = None
    rewrites: list[RewriteRecord] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    fidelity: Fidelity | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def model(self) -> nn.Module:
        return self.loaded.model


# --------------------------------------------------------------------------- helpers


def run_profile(model: nn.Module, inputs: ExampleInputs, what: str = "the model") -> ModelProfile:
    """Profile, turning a failing forward into a message that names the layer where it broke."""
    try:
        return profile(model, inputs)
    except ModelError:
        raise
    except Exception as exc:
        layer = getattr(exc, "_convrewrite_layer", None)
        where = f" at layer {layer}" if layer else ""
        raise ModelError(
            f"running {what} on the example input ({inputs.describe()}) failed{where}: {describe(exc)}",
            hint="check --input-shape (batch first) or the file's example_inputs()",
        ) from exc


def outputs_close(a: Any, b: Any, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    left = [t for t in tree_leaves(a) if isinstance(t, torch.Tensor)]
    right = [t for t in tree_leaves(b) if isinstance(t, torch.Tensor)]
    if len(left) != len(right):
        return False
    for x, y in zip(left, right):
        if x.shape != y.shape:
            return False
        if x.is_floating_point() or x.is_complex():
            if not torch.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True):
                return False
        elif not torch.equal(x, y):
            return False
    return True


def output_shapes(value: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


class _ShapeRecorder(fx.Interpreter):
    """Run the graph and note each node's output shapes in ``node.meta['output_shapes']``.

    fx's own ShapeProp records more (strides, dtypes, quantization) and imports
    torch.fx.experimental.symbolic_shapes, which pulls in sympy: half a second of every run.
    """

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["output_shapes"] = output_shapes(result)
        return result


def propagate_shapes(graph_module: fx.GraphModule, inputs: ExampleInputs) -> Any:
    """Run the graph on the inputs: every node gets ``meta['output_shapes']``; returns the output."""
    values = placeholder_values(graph_module, inputs.args, inputs.kwargs)
    with torch.no_grad():
        return _ShapeRecorder(graph_module).run(*values)


def verified_trace(
    model: nn.Module,
    inputs: ExampleInputs,
    reference: Any,
    leaf_names: set[str] | None = None,
    *,
    calls: ModelProfile | None = None,
) -> TraceResult:
    """Trace, and check that the graph does what the model does on the example input.

    By default the graph runs (recording each node's output shapes, which the rewrite verification
    compares) and must reproduce the eager output. With ``calls``, the profile of that eager run,
    the graph is not run: it must call the same modules as often as the model did. A report
    without rules only describes the graph, and this saves it a second forward pass.
    """
    traced = trace(model, leaf_names)
    if traced.graph_module is None:
        return traced
    if calls is not None:
        mismatch = _call_mismatch(model, traced, calls)
        if mismatch is not None:
            return TraceResult(None, "eager", traced.leaves, failure=f"the traced graph {mismatch}")
        traced.checked = "module calls"
        return traced
    try:
        graph_output = propagate_shapes(traced.graph_module, inputs)
    except Exception as exc:
        return TraceResult(None, "eager", traced.leaves, failure=f"the traced graph does not run: {first_line(exc)}")
    if not outputs_close(graph_output, reference):
        return TraceResult(
            None, "eager", traced.leaves, failure="the traced graph computes a different output than the model"
        )
    traced.checked = "outputs"
    return traced


def _call_mismatch(model: nn.Module, traced: TraceResult, profile_: ModelProfile) -> str | None:
    """How the graph's module calls differ from the eager run's, or None when they agree."""
    assert traced.graph_module is not None
    graph_calls = Counter(str(n.target) for n in traced.graph_module.graph.nodes if n.op == "call_module")
    tracer = LeafAwareTracer(traced.leaf_names)
    modules = dict(model.named_modules())
    by_index = {r.index: r for r in profile_.records}
    eager_calls: Counter[str] = Counter()
    for record in profile_.records:
        if not record.called or not record.name:
            continue
        parent = record.parent
        while parent is not None and by_index[parent].name not in graph_calls:
            parent = by_index[parent].parent
        if parent is not None:
            continue  # inside a module the graph calls as one node
        module = modules.get(record.name)
        if record.name in graph_calls or (module is not None and tracer.is_leaf_module(module, record.name)):
            eager_calls[record.name] += 1
    for name in sorted(set(graph_calls) | set(eager_calls)):
        if graph_calls[name] != eager_calls[name]:
            return f"calls {name} {graph_calls[name]} time(s), the model {eager_calls[name]}"
    return None


def module_aliases(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every qualified name it is registered under."""
    aliases: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    return aliases


def parameter_users(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """id(parameter) -> the (module name, module) pairs holding it directly."""
    users: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        for parameter in module._parameters.values():
            if parameter is not None:
                users.setdefault(id(parameter), []).append((name, module))
    return users


def install(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attribute, replacement)


def _conv_geometry(module: nn.Module) -> tuple[Any, ...]:
    return (
        type(module),
        module.in_channels,
        module.out_channels,
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        module.groups,
        module.padding_mode,
        id(module.bias) if module.bias is not None else None,
    )


def _tie_mismatch(module: nn.Module, other_name: str, other: nn.Module) -> str | None:
    """Why ``other`` (holding ``module``'s weight) cannot share one replacement with it, or None."""
    if not isinstance(other, CONV_TYPES) or type(other) is not type(module):
        return f"{other_name} ({type(other).__name__})"
    if _conv_geometry(other)[:-1] != _conv_geometry(module)[:-1]:
        return f"{other_name} (a conv of another shape)"
    if _conv_geometry(other) != _conv_geometry(module):
        return f"{other_name} (own bias: one shared replacement cannot keep both biases)"
    return None


# --------------------------------------------------------------------------- sites


def collect_sites(
    model: nn.Module, current: ModelProfile, site_types: tuple[type, ...] | None = None
) -> tuple[list[ConvSite], list[SkipRecord]]:
    """Every module of ``site_types`` (default: the conv types) with its shapes, plus skips for
    functional convs that cannot be swapped."""
    # [issue 12, low-rank] A rule declares the module types it takes (Rule.site_types, None = the
    # conv types); low-rank adds nn.Linear. Only this filter and the call in apply_rule changed.
    wanted = site_types if site_types is not None else CONV_TYPES
    aliases = module_aliases(model)
    sites: list[ConvSite] = []
    notes: list[SkipRecord] = []
    calls_of: dict[str, list[CallRecord]] = {}
    for record in current.records:
        if record.called:
            calls_of.setdefault(record.name, []).append(record)
    for name, module in model.named_modules():
        if not isinstance(module, wanted):
            continue
        calls = calls_of.get(name, [])
        first = calls[0] if calls else None
        input_shape = tuple(first.input_shapes[0]) if first and first.input_shapes else None
        output_shape = tuple(first.output_shapes[0]) if first and first.output_shapes else None
        names = aliases.get(id(module), [name])
        sites.append(
            ConvSite(
                name=name,
                module=module,
                input_shape=input_shape,
                output_shape=output_shape,
                calls=len(calls),
                aliases=tuple(n for n in names if n != name),
            )
        )
    for record in current.records:
        if record.macs_by_kind.get("convolution") and record.type not in {t.__name__ for t in CONV_TYPES}:
            owner = record.name or "(model)"
            notes.append(
                SkipRecord(
                    owner,
                    "*",
                    record.type,
                    "functional convolution (F.conv*d in forward), not a module: left as is",
                )
            )
    unique = {(n.name, n.type): n for n in notes}
    return sites, list(unique.values())


# --------------------------------------------------------------------------- pipeline


@small_work()  # [issue 12, threads] rule work is many small factorisations: one thread (engine/threads.py)
def apply_rule(
    rule: Rule,
    model: nn.Module,
    current: ModelProfile,
    originals: dict[str, nn.Module],
    result: EngineResult,
) -> list[RewriteRecord]:
    sites, functional = collect_sites(model, current, rule.site_types)  # [issue 12] the rule's module types
    if not result.skipped:
        result.skipped.extend(functional)
    users = parameter_users(model)
    done: dict[int, nn.Module] = {}
    records: list[RewriteRecord] = []
    for site in sites:
        module = site.module
        if id(module) in done:
            continue
        site.explicit = is_explicit(site.name, rule.config.include)
        if not site.name:
            result.skipped.append(
                SkipRecord("(model)", rule.name, type(module).__name__, "the model itself is a single conv")
            )
            continue
        reason = rule.skip_reason(site)
        # Tied weights: only rewrite when every holder is an identical conv (then one shared
        # replacement keeps the tie); otherwise rewriting would silently untie them.
        tied_with: list[nn.Module] = []
        if reason is None:
            holders = users.get(id(module.weight), [])
            others = [(n, m) for n, m in holders if m is not module]
            if others:
                mismatched = [_tie_mismatch(module, n, m) for n, m in others]
                if any(mismatched):
                    reason = f"weight is tied to {', '.join(m for m in mismatched if m)}; rewriting would untie it"
                else:
                    tied_with = [m for _, m in others]
        if reason is not None:
            if site.explicit and selection_reason(site.name, rule.config) is None:
                raise UsageError(
                    f"rule {rule.name!r} cannot rewrite {site.name}, which you named explicitly: {reason}",
                    hint="change the rule's options or leave that layer out of include",
                )
            result.skipped.append(SkipRecord(site.name, rule.name, type(module).__name__, reason))
            continue
        try:
            cost = rule.cost(site)
            replacement = rule.build(site)
        except (ModelError, UsageError):
            raise
        except Exception as exc:
            raise ModelError(f"rule {rule.name!r} failed on layer {site.name}: {describe(exc)}") from exc
        new_module = replacement.module
        if site.calls == 0:
            replacement.notes.setdefault(
                "unverified", "not called on the example input: shapes and output were not checked for this layer"
            )
        try:
            error = kernel_error(new_module, module)
        except (TypeError, ValueError):
            error = None
        all_names = [site.name, *site.aliases]
        for tied in tied_with:
            all_names.extend(n for n in module_aliases(model).get(id(tied), []) if n not in all_names)
            done[id(tied)] = new_module
        params_before, macs_before = current.subtree_totals(site.name)
        for tied in tied_with:
            for tied_name in module_aliases(model).get(id(tied), []):
                macs_before += current.subtree_totals(tied_name)[1]
        if site.name not in originals and not _created_by_rule(site.name, result):
            originals[site.name] = module
        for name in all_names:
            install(model, name, new_module)
        done[id(module)] = new_module
        records.append(
            RewriteRecord(
                name=site.name,
                rule=rule.name,
                type_before=type(module).__name__,
                type_after=type(new_module).__name__,
                calls=site.calls,
                params_before=params_before,
                macs_before=macs_before,
                analytic_params=cost.params,
                analytic_macs=cost.macs * max(site.calls, 1),
                kernel_error=error,
                aliases=all_names[1:],
                notes=dict(replacement.notes),
            )
        )
    return records


def _created_by_rule(name: str, result: EngineResult) -> bool:
    """True when ``name`` lives inside a block an earlier rule installed (composition)."""
    return any(name.startswith(previous.name + ".") for previous in result.rewrites)


def fidelity_of(before: Any, after: Any) -> tuple[float, float, float]:
    left = [t.detach().to(torch.float64).flatten() for t in tree_leaves(before) if isinstance(t, torch.Tensor)]
    right = [t.detach().to(torch.float64).flatten() for t in tree_leaves(after) if isinstance(t, torch.Tensor)]
    if not left:
        return 0.0, 1.0, 0.0
    a = torch.cat(left)
    b = torch.cat(right)
    norm = float(torch.linalg.vector_norm(a))
    diff = float(torch.linalg.vector_norm(b - a))
    relative = diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))
    denominator = norm * float(torch.linalg.vector_norm(b))
    cosine = float(torch.dot(a, b)) / denominator if denominator > 0 else (1.0 if diff == 0 else 0.0)
    max_abs = float((b - a).abs().max()) if a.numel() else 0.0
    return relative, cosine, max_abs


def verify_rewrite(result: EngineResult, before_trace: TraceResult, reference_output: Any) -> None:
    """Re-trace the rewritten model and check node and output shapes against the original."""
    model, inputs = result.model, result.loaded.inputs
    assert result.after is not None
    after_shapes = output_shapes(result.after.output)
    before_shapes = output_shapes(reference_output)
    if after_shapes != before_shapes:
        raise ModelError(f"the rewritten model's output shapes {after_shapes} differ from the original {before_shapes}")
    for record in result.rewrites:
        old = result.before.first_call(record.name)
        new = result.after.first_call(record.name)
        if old and new and old.output_shapes != new.output_shapes and old.name == record.name:
            raise ModelError(
                f"rule {record.rule!r} changed the output shape of {record.name}: "
                f"{old.output_shapes} -> {new.output_shapes}"
            )
    if before_trace.graph_module is None:
        result.rewritten_trace = TraceResult(None, "eager", before_trace.leaves, failure=before_trace.failure)
        return
    rewritten = trace(model, before_trace.leaf_names)
    if rewritten.graph_module is None:
        raise ModelError(f"the rewritten model no longer traces: {rewritten.failure}")
    graph_module = rewritten.graph_module
    graph_module.graph.lint()
    graph_module.recompile()
    graph_output = propagate_shapes(graph_module, inputs)
    if not outputs_close(graph_output, result.after.output):
        raise ModelError("the rewritten graph computes a different output than the rewritten model")
    old_nodes = {n.name: n for n in before_trace.graph_module.graph.nodes}
    for node in graph_module.graph.nodes:
        if node.op != "call_module":
            continue
        old = old_nodes.get(node.name)
        if old is None or "output_shapes" not in old.meta or "output_shapes" not in node.meta:
            continue
        old_shapes, new_shapes = old.meta["output_shapes"], node.meta["output_shapes"]
        if old_shapes != new_shapes:
            raise ModelError(f"node {node.format_node()} changed shape: {old_shapes} -> {new_shapes}")
    result.rewritten_trace = rewritten


@forward_work()  # [issue 12, threads] forward passes on the idle cores; rules inside on one (engine/threads.py)
def analyse(loaded: LoadedModel, rules: Sequence[Rule] = ()) -> EngineResult:
    """Profile and trace ``loaded.model``; with rules, rewrite it in place and verify."""
    timings: dict[str, float] = {}
    model, inputs = loaded.model, loaded.inputs
    model.eval()
    start = time.perf_counter()
    before = run_profile(model, inputs)
    timings["profile"] = time.perf_counter() - start
    start = time.perf_counter()
    traced = verified_trace(model, inputs, before.output, calls=None if rules else before)
    timings["trace"] = time.perf_counter() - start
    result = EngineResult(loaded=loaded, trace=traced, before=before, rules=list(rules), timings=timings)
    if not rules:
        return result

    originals: dict[str, nn.Module] = {}
    current = before
    start = time.perf_counter()
    for rule in rules:
        records = apply_rule(rule, model, current, originals, result)
        current = run_profile(model, inputs, "the rewritten model")
        for record in records:
            record.params_after, record.macs_after = current.subtree_totals(record.name)
            for alias in record.aliases:
                if current.first_call(alias) is not None:
                    record.macs_after += current.subtree_totals(alias)[1]
        result.rewrites.extend(records)
    timings["rewrite"] = time.perf_counter() - start
    result.after = current

    start = time.perf_counter()
    verify_rewrite(result, traced, before.output)
    timings["verify"] = time.perf_counter() - start

    relative, cosine, max_abs = fidelity_of(before.output, current.output)
    layers = []
    for name, original in originals.items():
        touching = [r for r in result.rewrites if r.name == name or r.name.startswith(name + ".")]
        if len(touching) == 1 and touching[0].name == name and touching[0].kernel_error is not None:
            error: float | None = touching[0].kernel_error  # one rule, already measured against the original
        else:
            try:
                error = kernel_error(model.get_submodule(name), original)
            except (TypeError, ValueError, AttributeError):
                error = None
        layers.append(LayerFidelity(name, [r.rule for r in touching], error))
    result.fidelity = Fidelity(relative, cosine, max_abs, layers)
    return result
