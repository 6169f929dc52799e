"""Stage ``trace``: build the torch.fx graph (with the leaf fallback) and check it against the model.

With rules, the graph runs on the example input (each node records its output shapes, which the
verify stage compares after the rewrite) and must reproduce the eager output. Without rules, a
report only describes the graph: it must call the same modules as often as the eager run did,
which saves a second forward pass.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import fx, nn

from convrewrite.core.compare import output_shapes, outputs_close
from convrewrite.core.loading import ExampleInputs
from convrewrite.core.profiling import ModelProfile
from convrewrite.core.tracing import LeafAwareTracer, TraceResult, default_arguments, placeholder_values, trace
from convrewrite.engine.stages.base import Stage, StageOutcome, register_stage
from convrewrite.engine.state import RunState
from convrewrite.errors import first_line


class ShapeRecorder(fx.Interpreter):
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
        return ShapeRecorder(graph_module).run(*values)


def verified_trace(
    model: nn.Module,
    inputs: ExampleInputs,
    reference: Any,
    leaf_names: set[str] | None = None,
    *,
    calls: ModelProfile | None = None,
) -> TraceResult:
    """Trace, and check that the graph does what the model does on the example input."""
    # Forward flags without an example input are traced as their defaults (fx guards them).
    traced = trace(model, leaf_names, default_arguments(model, inputs))
    if traced.graph_module is None:
        return traced
    if calls is not None:
        mismatch = call_mismatch(model, traced, calls)
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


def call_mismatch(model: nn.Module, traced: TraceResult, profile_: ModelProfile) -> str | None:
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


@register_stage
class TraceStage(Stage):
    name = "trace"
    requires = ("before",)
    ensures = ("trace",)

    def run(self, state: RunState) -> StageOutcome:
        assert state.before is not None
        calls = None if state.rules else state.before
        state.trace = verified_trace(state.model, state.loaded.inputs, state.before.output, calls=calls)
        return StageOutcome(False, state.trace.describe())
