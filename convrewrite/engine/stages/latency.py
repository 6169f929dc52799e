"""Stage ``latency``: the original and the rewritten model timed side by side, and each layer alone.

With ``--latency``: both models run on the example input in one measurement, interleaved, after
warm-up (``speed/latency.py``), at ``--threads`` threads, in torch eager or, with
``--latency-backend onnxruntime``, as exported ONNX models in ONNX Runtime. Every rewritten layer
and its replacement are timed alone on inputs of the shapes it saw. The report gets a ``latency``
section and the ``speedup`` metric, which ``check`` can hold to a minimum: a ratio measured in one
run, so it stays comparable across machines where milliseconds do not.
"""

from __future__ import annotations

import torch
from torch import nn

from convrewrite.engine.stages.base import Stage, StageOutcome, register_stage
from convrewrite.engine.state import RunState
from convrewrite.speed.latency import LayerCase, layer_inputs, measure_latency


def layer_cases(state: RunState) -> list[LayerCase]:
    """Each rewritten layer (as it was, from the reference copy) and what replaced it."""
    assert state.before is not None and state.reference is not None
    cases = []
    for name in state.originals:
        record = state.before.first_call(name)
        if record is None or not record.input_shapes:
            continue
        original: nn.Module = state.reference.get_submodule(name)
        rewrite = state.log.rewrite_of(name)
        folded = rewrite.notes.get("batchnorm") if rewrite is not None else None
        if folded:  # fuse-bn: the conv and the BatchNorm it absorbed, against the folded conv
            original = nn.Sequential(original, state.reference.get_submodule(str(folded)))
        replacement = state.model.get_submodule(name)
        dtype = next((p.dtype for p in original.parameters() if p.is_floating_point()), torch.float32)
        inputs = layer_inputs(record.input_shapes, dtype=dtype)
        cases.append(LayerCase(name, original, replacement, inputs))
    return cases


@register_stage
class LatencyStage(Stage):
    name = "latency"
    requires = ("reference", "after")
    needs_reference = True

    @classmethod
    def plan(cls, state: RunState) -> list[Stage]:
        return [cls()] if state.rules and state.settings.latency.enabled else []

    def run(self, state: RunState) -> StageOutcome:
        assert state.reference is not None
        report = measure_latency(
            state.reference,
            state.model,
            state.loaded.inputs,
            backend=state.settings.latency.backend,
            threads=state.settings.latency.threads,
            layers=layer_cases(state),
        )
        state.sections["latency"] = report
        state.metrics["speedup"] = report.speedup
        return StageOutcome(False, report.lines()[0])
