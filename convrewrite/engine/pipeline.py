"""The rewrite pipeline: plan the stages a run needs, then run them over one state.

The built-in stages run in the order of ``stages.base.STAGE_ORDER`` (``engine/stages/``, one file
each; ``tests/test_import_floors.py`` checks that this list names them all, in that order):

1. ``profile``: run the model once: shapes, parameters and MACs per module call.
2. ``trace``: torch.fx graph with the leaf fallback, checked against the model.
3. ``rewrite[RULE]``, once per rule: offer every site to the rule, install the replacements, and
   ensure the rewritten layers keep their output shapes.
4. ``verify``: re-trace the rewritten model (``graph.lint()``, ``recompile()``) and check that
   every node and the output keep their shapes.
   ``export-check`` (``apply`` only): write, reload and compare the export in a scratch
   directory now, so a model that cannot be written fails before any fitting.
5. ``fit`` (with calibration data): fit each rewritten layer to the original's outputs;
   ``fitted-weights`` instead of ``fit``: load what an earlier, failed ``apply`` fitted and kept;
   ``distill`` (``--distill N``): win the rest of the accuracy back.
6. ``fidelity``: output error against the original (on held-out data when there is data) and
   each rewritten layer's relative kernel error.
7. ``evaluate`` (when the model file defines ``evaluate()``): the user's metric, before and after.
8. ``latency`` (when asked): the original and the rewritten model timed side by side.

The runner checks each stage's ``requires`` before and ``ensures`` after it, times it, and names
it when it fails.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from convrewrite.config.stages import RunSettings
from convrewrite.core.loading import LoadedModel
from convrewrite.core.threads import forward_work
from convrewrite.engine.stages import Stage, discover_stages
from convrewrite.engine.state import EngineResult, RunState, StageRecord
from convrewrite.errors import ConvRewriteError, ModelError, describe
from convrewrite.recovery.batches import BatchSource
from convrewrite.rules.api import Rule

__all__ = ["EngineResult", "RunState", "analyse", "plan_stages", "run_stages"]


def plan_stages(state: RunState) -> list[Stage]:
    """Every registered stage that this state needs, in order."""
    planned: list[Stage] = []
    for stage_class in discover_stages():
        planned.extend(stage_class.plan(state))
    if any(getattr(stage, "needs_reference", False) for stage in planned):
        state.settings = replace(state.settings, keep_reference=True)
    return planned


def run_stages(state: RunState, stages: Sequence[Stage]) -> RunState:
    """Run ``stages`` in order over ``state``: requires, run, ensures; each one timed and logged."""
    for stage in stages:
        missing = [name for name in stage.requires if getattr(state, name, None) is None]
        if missing:
            raise ModelError(f"stage {stage.label} needs {', '.join(missing)}, which no earlier stage produced")
        start = time.perf_counter()
        try:
            outcome = stage.run(state)
            stage.check_ensures(state)
        except ConvRewriteError as exc:
            exc.stage = stage.label  # type: ignore[attr-defined]
            raise
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            raise ModelError(f"stage {stage.label} failed: {describe(exc)}") from exc
        state.stages.append(StageRecord(stage.label, time.perf_counter() - start, outcome.modified, outcome.summary))
    return state


@forward_work()  # forward passes on the idle cores; rules inside on one (core/threads.py)
def analyse(
    loaded: LoadedModel,
    rules: Sequence[Rule] = (),
    *,
    data: BatchSource | None = None,
    settings: RunSettings | Mapping[str, Any] | None = None,
) -> RunState:
    """Profile and trace ``loaded.model``; with rules, rewrite it in place, verify and measure.

    ``settings``: typed, or the schema's names and values (unset ones take the schema's default).
    """
    if not isinstance(settings, RunSettings):
        settings = RunSettings.from_values(settings)
    if data is not None:
        settings = replace(settings, keep_reference=True)
    state = RunState(loaded=loaded, rules=list(rules), data=data, settings=settings)
    return run_stages(state, plan_stages(state))
