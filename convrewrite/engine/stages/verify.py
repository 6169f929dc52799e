"""Stage ``verify``: the rewritten model as a whole still does what the graph says it does.

It keeps the original's output shapes; its graph re-traces (with the original's leaves),
passes ``graph.lint()``, recompiles, reproduces the rewritten model's output, and every module
node keeps the output shapes it had before the rewrite.
"""

from __future__ import annotations

from convrewrite.core.compare import output_shapes, outputs_close
from convrewrite.core.tracing import TraceResult, trace
from convrewrite.engine.stages.base import Stage, StageOutcome, register_stage
from convrewrite.engine.stages.trace import propagate_shapes
from convrewrite.engine.state import RunState
from convrewrite.errors import ModelError


@register_stage
class VerifyStage(Stage):
    name = "verify"
    requires = ("trace", "before", "after")
    ensures = ("rewritten_trace",)

    @classmethod
    def plan(cls, state: RunState) -> list[Stage]:
        return [cls()] if state.rules else []

    def run(self, state: RunState) -> StageOutcome:
        assert state.trace is not None and state.before is not None and state.after is not None
        before_trace = state.trace
        after_shapes = output_shapes(state.after.output)
        before_shapes = output_shapes(state.before.output)
        if after_shapes != before_shapes:
            raise ModelError(
                f"the rewritten model's output shapes {after_shapes} differ from the original {before_shapes}"
            )
        if before_trace.graph_module is None:
            state.rewritten_trace = TraceResult(None, "eager", before_trace.leaves, failure=before_trace.failure)
            return StageOutcome(False, "no graph to verify (eager mode)")
        rewritten = trace(state.model, before_trace.leaf_names, before_trace.specialized)
        if rewritten.graph_module is None:
            raise ModelError(f"the rewritten model no longer traces: {rewritten.failure}")
        graph_module = rewritten.graph_module
        graph_module.graph.lint()
        graph_module.recompile()
        graph_output = propagate_shapes(graph_module, state.loaded.inputs)
        if not outputs_close(graph_output, state.after.output):
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
        state.rewritten_trace = rewritten
        return StageOutcome(False, "graph re-traced, linted and matched")
