"""Stage ``evaluate``: the user's own task metric, on the original and on the result.

A model file may define ``evaluate(model) -> float | dict[str, float]`` (their metric on their
own labelled data). With rules, it runs on the original model and on the rewritten one; both go
into the report (``evaluation``) and into the metrics as ``eval:NAME`` (the result) and
``before:eval:NAME`` (the original), so ``convrewrite check`` can hold a maximum drop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from convrewrite.engine.stages.base import Stage, StageOutcome, register_stage
from convrewrite.engine.state import RunState
from convrewrite.recovery.data import model_function
from convrewrite.recovery.metrics import run_evaluate


@dataclass
class EvaluationSection:
    original: dict[str, float]
    result: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"original": dict(self.original), "result": dict(self.result)}


@register_stage
class EvaluateStage(Stage):
    name = "evaluate"
    requires = ("reference",)
    needs_reference = True

    @classmethod
    def plan(cls, state: RunState) -> list[Stage]:
        return [cls()] if state.rules and model_function(state.loaded, "evaluate") is not None else []

    def run(self, state: RunState) -> StageOutcome:
        assert state.reference is not None
        evaluate = model_function(state.loaded, "evaluate")
        assert evaluate is not None
        original = run_evaluate(evaluate, state.reference, "the original model")
        result = run_evaluate(evaluate, state.model, "the rewritten model")
        state.sections["evaluation"] = EvaluationSection(original, result)
        for name, value in original.items():
            state.metrics[f"before:eval:{name}"] = value
        for name, value in result.items():
            state.metrics[f"eval:{name}"] = value
        shown = ", ".join(f"{name} {original[name]:.4g} -> {result.get(name, float('nan')):.4g}" for name in original)
        return StageOutcome(False, f"evaluate(): {shown}")
