"""Stage ``fit``: win the accuracy back from calibration data, layer by layer.

With calibration data (``--data``, or ``calibration_data()`` in the model file) and unless
``--no-fit``: every rewritten layer, in the order the model calls it, is fitted to reproduce the
original layer's output on the fit split, with its inputs taken from the partly rewritten model
(asymmetric reconstruction; ``recovery/fit.py``), then BatchNorm statistics are re-estimated
(kept only when they bring the output closer to the original's). The held-out fidelity of the
plain transfer and of the fitted model go into the report's ``fitting`` section.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from convrewrite.engine.stages.base import Stage, StageOutcome, TrainingStage, register_stage
from convrewrite.engine.stages.profile import run_profile
from convrewrite.engine.state import RunState
from convrewrite.recovery.device import resolve_device
from convrewrite.recovery.fit import BatchNormResult, FitResult, fit_layers, reestimate_batchnorm
from convrewrite.recovery.metrics import HoldoutFidelity, ReferenceOutputs, measure_fidelity
from convrewrite.recovery.progress import FitLayersProgress


@dataclass
class FittingSection:
    """The report's ``fitting`` section."""

    transfer: HoldoutFidelity | None
    fitted: HoldoutFidelity | None
    fit: FitResult
    batchnorm: BatchNormResult

    def to_dict(self) -> dict[str, Any]:
        return {
            "fidelity": {
                "transfer": self.transfer.to_dict() if self.transfer else None,
                "fitted": self.fitted.to_dict() if self.fitted else None,
            },
            "layers": self.fit.to_dict(),
            "batchnorm": self.batchnorm.to_dict(),
        }


def _progress(state: RunState) -> FitLayersProgress:
    """A bar on a terminal, one line per layer otherwise, nothing with ``--quiet``; rank 0 only."""
    from convrewrite.recovery.fit import distributed_world

    mode = "none" if state.settings.quiet else "auto"
    return FitLayersProgress(mode, is_main=distributed_world()[0] == 0)


@register_stage
class FitStage(TrainingStage):
    name = "fit"

    @classmethod
    def wanted(cls, state: RunState) -> bool:
        return state.settings.fit.enabled and not state.settings.fitted_weights

    def train(self, state: RunState) -> StageOutcome:
        assert state.reference is not None and state.data is not None  # TrainingStage.run checked
        device = resolve_device(state.settings.device)
        reference, model, data = state.reference, state.model, state.data
        # The original's outputs, computed once for the five comparisons below.
        outputs = ReferenceOutputs(reference)
        transfer = measure_fidelity(reference, model, data, device=device, outputs=outputs)
        # The transfer's weights, to come back to if the fitted model is worse on held-out data.
        transferred = {key: value.detach().clone() for key, value in model.state_dict().items()}
        progress = _progress(state)
        try:
            fit = fit_layers(
                reference,
                model,
                list(state.originals),
                data,
                device=device,
                steps=state.settings.fit.steps,
                progress=progress,
                targets=state.output_of,
                statistics=state.settings.fit.method != "gradient",
            )
        finally:
            progress.close()
        batchnorm = reestimate_batchnorm(model, data, device=device, reference=reference, outputs=outputs)
        fitted = measure_fidelity(reference, model, data, device=device, outputs=outputs)
        if transfer and fitted and fitted.output_relative_error > transfer.output_relative_error:
            # Each layer's fit was checked on held-out samples, but together they may still carry
            # worse to the output (little calibration data): the whole transfer is kept then.
            model.load_state_dict(transferred)
            fit.note = (
                f"fit reverted: held-out output error {transfer.output_relative_error:.3g} -> "
                f"{fitted.output_relative_error:.3g}"
            )
            fitted = measure_fidelity(reference, model, data, device=device, outputs=outputs)
        del transferred, outputs
        state.sections["fitting"] = FittingSection(transfer, fitted, fit, batchnorm)
        # The weights changed: the rewritten model's recorded output (which apply's reload check
        # and the fidelity on the example input compare against) must be measured again.
        state.after = state.current = run_profile(model, state.loaded.inputs, "the fitted model")
        summary = f"{len(fit.layers)} layer(s) fitted in {fit.seconds:.1f} s ({fit.passes:.1f} passes)"
        if transfer and fitted:
            before, after = transfer.output_relative_error, fitted.output_relative_error
            summary += f"; held-out output error {before:.3g} -> {after:.3g}"
        return StageOutcome(True, summary)


@register_stage
class FittedWeightsStage(Stage):
    """``apply --fitted-weights DIR``: the weights an earlier run fitted and kept when its write
    failed (``recovery/resume.py``) are loaded into the rewritten model instead of fitting."""

    name = "fitted-weights"
    requires = ("after",)
    ensures = ("after",)

    @classmethod
    def plan(cls, state: RunState) -> list[Stage]:
        return [cls()] if state.rules and state.settings.fitted_weights else []

    def run(self, state: RunState) -> StageOutcome:
        from pathlib import Path

        from convrewrite.recovery.resume import load_fitted

        directory = Path(str(state.settings.fitted_weights))
        count = load_fitted(directory, state.model)
        state.after = state.current = run_profile(state.model, state.loaded.inputs, "the fitted model")
        return StageOutcome(True, f"{count} tensor(s) loaded from {directory} (fitted by an earlier run)")
