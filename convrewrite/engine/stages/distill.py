"""Stage ``distill``: end-to-end knowledge distillation from the original model (the teacher).

With calibration data and ``--distill STEPS``, the rewritten model (after fitting) learns to
reproduce the original's outputs on the fit split (``recovery/distill.py``: KL with temperature
for logits, MSE or cosine otherwise, optional matching of the rewritten layers' outputs; AdamW,
warm-up and cosine schedule; the best state by held-out loss is kept). The report gets a
``distillation`` section.

``apply`` does not run this stage: it writes the fitted model first and distils the written
output, with resumable checkpoints inside it (``commands/distill.py``), so an interrupted run
continues with ``convrewrite distill DIR``.
"""

from __future__ import annotations

from typing import cast

from convrewrite.config.stages import DistillSettings
from convrewrite.engine.stages.base import StageOutcome, TrainingStage, register_stage
from convrewrite.engine.stages.profile import run_profile
from convrewrite.engine.state import RunState
from convrewrite.recovery.device import resolve_device
from convrewrite.recovery.distill import DistillConfig, LossName, distill


def distill_config(settings: DistillSettings) -> DistillConfig:
    """The distillation settings of a run (``--distill-loss`` and friends) as a checked config."""
    return DistillConfig(
        steps=settings.steps,
        loss=cast(LossName, settings.loss),
        temperature=settings.temperature,
        lr=settings.lr,
        layer_weight=settings.layer_weight,
    )


@register_stage
class DistillStage(TrainingStage):
    name = "distill"

    @classmethod
    def wanted(cls, state: RunState) -> bool:
        return state.settings.distill.steps > 0 and not state.settings.distill_after_write

    def train(self, state: RunState) -> StageOutcome:
        assert state.reference is not None and state.data is not None  # TrainingStage.run checked
        config = distill_config(state.settings.distill)
        # Hints compare each rewritten layer with the original module it stands for (fuse-bn: the
        # folded BatchNorm); a layer whose counterpart is ambiguous gets no hint.
        targets = state.output_of
        layers = [n for n in state.originals if targets.get(n, n)] if config.layer_weight > 0 else []
        result = distill(
            state.reference,
            state.model,
            state.data,
            config,
            device=resolve_device(state.settings.device),
            layers=layers,
            teacher_layers={n: t for n, t in targets.items() if t and n in layers},
            progress="none" if state.settings.quiet else "auto",
        )
        state.model.to("cpu").eval()
        state.sections["distillation"] = result
        state.after = state.current = run_profile(state.model, state.loaded.inputs, "the distilled model")
        return StageOutcome(True, result.summary())
