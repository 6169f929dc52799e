"""Stage ``fidelity``: how close the rewritten model is to the original.

Each rewritten layer's relative kernel error (``||W_new - W||_F / ||W||_F``, from ``to_dense()``),
and the model's output against the original's: on the held-out calibration samples when the run
has data (never on samples anything was fitted on), otherwise on the example input.
"""

from __future__ import annotations

import torch

from convrewrite.engine.compare import OutputAgreement, agreement_of
from convrewrite.engine.stages.base import Stage, StageOutcome, register_stage
from convrewrite.engine.state import RunState
from convrewrite.layers.dense import kernel_error
from convrewrite.report.log import Fidelity, LayerFidelity


def layer_fidelity(state: RunState) -> list[LayerFidelity]:
    layers = []
    for name, original in state.originals.items():
        touching = [r for r in state.rewrites if r.name == name or r.name.startswith(name + ".")]
        error: float | None
        if len(touching) == 1 and touching[0].name == name and touching[0].kernel_error is not None:
            error = touching[0].kernel_error  # one rule, already measured against the original
        else:
            try:
                error = kernel_error(state.model.get_submodule(name), original)
            except (TypeError, ValueError, AttributeError):
                error = None
        layers.append(LayerFidelity(name, [r.rule for r in touching], error))
    return layers


def holdout_agreement(state: RunState) -> OutputAgreement | None:
    """The rewritten model against the original on every held-out batch (None without data)."""
    if state.data is None or state.reference is None or not state.data.count("holdout"):
        return None
    device = next((p.device for p in state.model.parameters()), torch.device("cpu"))
    result = OutputAgreement()
    state.model.eval()
    with torch.no_grad():
        for batch in state.data.batches("holdout"):
            batch = batch.to(device)
            result.add(batch.call(state.reference), batch.call(state.model), batch.size)
    return result


@register_stage
class FidelityStage(Stage):
    name = "fidelity"
    order = 700
    requires = ("before", "after")
    ensures = ("fidelity",)

    @classmethod
    def plan(cls, state: RunState) -> list[Stage]:
        return [cls()] if state.rules else []

    def run(self, state: RunState) -> StageOutcome:
        assert state.before is not None and state.after is not None
        measured = holdout_agreement(state)
        if measured is not None:
            assert state.data is not None
            where = f"{measured.samples:,} held-out calibration samples"
        else:
            measured = agreement_of(state.before.output, state.after.output)
            measured.top1_same = measured.top1_total = 0  # one example says nothing about top-1 agreement
            where = "the example input"
        state.fidelity = Fidelity(
            measured.relative_error,
            measured.cosine_similarity,
            measured.max_abs,
            layer_fidelity(state),
            measured_on=where,
            samples=max(measured.samples, 1),
            agreement=measured.agreement,
        )
        state.metrics["output-error"] = measured.relative_error
        state.metrics["cosine"] = measured.cosine_similarity
        if measured.agreement is not None:
            state.metrics["agreement"] = measured.agreement
        return StageOutcome(False, f"output relative error {measured.relative_error:.3g} on {where}")
