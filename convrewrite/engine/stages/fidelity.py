"""Stage ``fidelity``: how close the rewritten model is to the original.

Each rewritten layer's relative kernel error (``||W_new - W||_F / ||W||_F``, from ``to_dense()``),
and the model's output against the original's: on the held-out calibration samples when the run
has data (never on samples anything was fitted on), otherwise on the example input.
"""

from __future__ import annotations

from convrewrite.core.compare import agreement_of
from convrewrite.engine.stages.base import Stage, StageOutcome, register_stage
from convrewrite.engine.state import RunState
from convrewrite.layers.dense import kernel_error
from convrewrite.recovery.metrics import measure_fidelity
from convrewrite.report.log import Fidelity, LayerFidelity


def layer_fidelity(state: RunState) -> list[LayerFidelity]:
    # After fitting or distillation the weights moved since the rewrite measured them.
    changed_later = any(record.modified and not record.name.startswith("rewrite") for record in state.stages)
    layers = []
    for name, original in state.originals.items():
        touching = [r for r in state.rewrites if r.name == name or r.name.startswith(name + ".")]
        error: float | None
        one_rule = len(touching) == 1 and touching[0].name == name and touching[0].kernel_error is not None
        if one_rule and not changed_later:
            error = touching[0].kernel_error  # one rule, already measured against the original
        else:
            try:
                error = kernel_error(state.model.get_submodule(name), original)
            except (TypeError, ValueError, AttributeError):
                error = None
        layers.append(LayerFidelity(name, [r.rule for r in touching], error))
    return layers


@register_stage
class FidelityStage(Stage):
    name = "fidelity"
    requires = ("before", "after")
    ensures = ("fidelity",)

    @classmethod
    def plan(cls, state: RunState) -> list[Stage]:
        return [cls()] if state.rules else []

    def run(self, state: RunState) -> StageOutcome:
        assert state.before is not None and state.after is not None
        held_out = None
        if state.data is not None and state.reference is not None:
            held_out = measure_fidelity(state.reference, state.model, state.data)
        if held_out is not None:
            state.fidelity = Fidelity(
                held_out.output_relative_error,
                held_out.cosine_similarity,
                held_out.max_abs_error,
                layer_fidelity(state),
                measured_on=f"{held_out.samples:,} held-out calibration samples",
                samples=held_out.samples,
                agreement=held_out.agreement,
            )
        else:
            # One example says nothing about top-1 agreement: it is only measured on held-out data.
            measured = agreement_of(state.before.output, state.after.output)
            state.fidelity = Fidelity(
                measured.relative_error, measured.cosine_similarity, measured.max_abs, layer_fidelity(state)
            )
        fidelity = state.fidelity
        state.metrics["output-error"] = fidelity.output_relative_error
        state.metrics["cosine"] = fidelity.output_cosine_similarity
        if fidelity.agreement is not None:
            state.metrics["agreement"] = fidelity.agreement
        return StageOutcome(
            False, f"output relative error {fidelity.output_relative_error:.3g} on {fidelity.measured_on}"
        )
