"""Stage ``profile``: run the model once on the example input, recording every module call."""

from __future__ import annotations

from torch import nn

from convrewrite.core.loading import ExampleInputs
from convrewrite.core.profiling import ModelProfile, profile
from convrewrite.engine.stages.base import Stage, StageOutcome, register_stage
from convrewrite.engine.state import RunState
from convrewrite.errors import ModelError, describe


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


@register_stage
class ProfileStage(Stage):
    """Shapes, parameters and MACs of every module call of the original model."""

    name = "profile"
    requires = ("loaded",)
    ensures = ("before",)

    def run(self, state: RunState) -> StageOutcome:
        state.model.eval()
        state.before = state.current = run_profile(state.model, state.loaded.inputs)
        return StageOutcome(False, f"{state.before.params:,} params, {state.before.macs:,} MACs")
