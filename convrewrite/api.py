"""The Python API: rewrite an ``nn.Module`` you already hold, over the same pipeline as the CLI.

::

    import convrewrite

    result = convrewrite.rewrite(model, rules=["separable"], example_inputs=torch.randn(1, 3, 32, 32),
                                 data=calibration_images)   # optional: fit (and distill) on your data
    result.model         # the rewritten module (your own module is left untouched)
    result.report        # the Report: print() it, show it in Jupyter, .to_dict() is the JSON contract
    result.save("out/")  # model.py + weights.safetensors + report.json, like `convrewrite apply`

``report(path_or_spec, rules)`` is the same for a model file.
"""

from __future__ import annotations

import copy
import inspect
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convrewrite.config import schema

if TYPE_CHECKING:
    from torch import nn

    from convrewrite.engine.state import RunState
    from convrewrite.export.writer import WrittenOutput
    from convrewrite.report.model import Report
    from convrewrite.rules.api import Rule


@dataclass
class RewriteResult:
    """What ``rewrite`` returns: the rewritten model, its report, and the run behind them."""

    model: nn.Module
    report: Report
    state: RunState

    def save(self, directory: str | Path, *, force: bool = False, export: Sequence[str] = ()) -> WrittenOutput:
        """Write ``model.py``, ``weights.safetensors`` and ``report.json`` (and ``export`` formats)
        into ``directory``, atomically and verified, exactly as ``convrewrite apply`` does."""
        from convrewrite.export.writer import write_apply_output

        if not self.state.rules:
            from convrewrite.errors import UsageError

            raise UsageError("nothing to save: rewrite() ran without rules")
        return write_apply_output(self.state, self.report, Path(directory), force=force, exports=tuple(export))

    def __repr__(self) -> str:
        before, after = self.report.before, self.report.final
        return (
            f"<RewriteResult {type(self.model).__name__}: params {before.params:,} -> {after.params:,}, "
            f"MACs {before.macs:,} -> {after.macs:,}>"
        )


def _example_inputs(value: Any) -> Any:
    from convrewrite.core.loading import ExampleInputs

    if isinstance(value, ExampleInputs):
        return value
    import torch

    if isinstance(value, torch.Tensor):
        return ExampleInputs((value,), source="example_inputs")
    if isinstance(value, Mapping):
        return ExampleInputs((), dict(value), source="example_inputs")
    if isinstance(value, (tuple, list)):
        return ExampleInputs(tuple(value), source="example_inputs")
    from convrewrite.errors import UsageError

    raise UsageError(
        f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
        f"not {type(value).__name__}"
    )


def _loaded(module: nn.Module, example_inputs: Any, *, copy_module: bool, caller: str) -> Any:
    """``module`` (a copy, unless ``copy_module`` is False) as a ``LoadedModel`` the engine takes."""
    from convrewrite.core.loading import LoadedModel, forward_argument_names

    inputs = _example_inputs(example_inputs)
    model = copy.deepcopy(module) if copy_module else module
    model.eval()
    inputs.arg_names = forward_argument_names(model)
    try:
        source = inspect.getsourcefile(type(module))
    except TypeError:
        source = None
    return LoadedModel(
        model=model,
        inputs=inputs,
        spec=f"{type(module).__module__}:{type(module).__qualname__}",
        display_name=type(module).__name__,
        origin=f"passed to {caller}",
        source_file=Path(source) if source else None,
        user_module=sys.modules.get(type(module).__module__),
    )


def rewrite(
    module: nn.Module,
    rules: Sequence[str | Rule] = (),
    *,
    example_inputs: Any,
    data: Any = None,
    holdout: float = schema.default("holdout"),
    batch_size: int | None = None,
    fit: bool = schema.default("fit"),
    fit_steps: int = schema.default("fit-steps"),
    fit_method: str = schema.default("fit-method"),
    distill: int = schema.default("distill"),
    distill_loss: str = schema.default("distill-loss"),
    device: str = schema.default("device"),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    min_channels: int = schema.default("min-channels"),
    copy_module: bool = True,
) -> RewriteResult:
    """Rewrite ``module`` with ``rules`` (specs like ``"separable:multiplier=2"`` or Rule objects).

    ``example_inputs`` is one forward call's input: a tensor, a tuple of positional inputs, or a
    dict of keyword inputs. ``data`` is unlabeled calibration data: a tensor (samples along dim
    0), a tuple or dict of tensors, a DataLoader (an ``(inputs, labels)`` pair per batch works),
    or a ``--data`` SPEC string; with it the rewritten layers are fitted to the original's outputs
    (``fit``), optionally distilled for ``distill`` steps, and fidelity is measured on the
    ``holdout`` fraction that nothing is fitted on. With ``copy_module`` (the default) your
    module is deep-copied first and never changed. Errors are ``convrewrite.errors`` exceptions
    with one-line messages. The defaults are the settings schema's (``convrewrite.config.schema``),
    the same as the command line's.
    """
    from convrewrite.commands.run import make_rules
    from convrewrite.engine.pipeline import analyse
    from convrewrite.engine.report_builder import build_report

    loaded = _loaded(module, example_inputs, copy_module=copy_module, caller="convrewrite.rewrite()")
    built = make_rules(rules, include, exclude, min_channels)
    source = _calibration(data, loaded, holdout, batch_size) if data is not None and built else None
    settings = {
        "fit": fit,
        "fit-steps": fit_steps,
        "fit-method": fit_method,
        "distill": distill,
        "distill-loss": distill_loss,
        "device": device,
        "holdout": holdout,
    }
    state = analyse(loaded, built, data=source, settings=settings)
    return RewriteResult(model=state.model, report=build_report(state), state=state)


def _calibration(data: Any, loaded: Any, holdout: float, batch_size: int | None) -> Any:
    from convrewrite.recovery.batches import BatchSource
    from convrewrite.recovery.data import calibration_data_from, open_calibration_data

    if isinstance(data, BatchSource):
        return data
    if isinstance(data, (str, Path)):
        return open_calibration_data(str(data), loaded, holdout=holdout, batch_size=batch_size)
    return calibration_data_from(data, example=loaded, holdout=holdout, batch_size=batch_size)


def report(
    model: str,
    rules: Sequence[str] = (),
    input_shapes: Sequence[tuple[int, ...]] | None = None,
    weights: str | None = None,
) -> Report:
    """Analyse a model file or spec (as on the command line), optionally rewritten by ``rules``."""
    from convrewrite.commands.run import run_job
    from convrewrite.config.job import make_job
    from convrewrite.config.project import ProjectConfig, Value
    from convrewrite.engine.report_builder import build_report

    job = make_job("report", {"model": model, "rules": list(rules), "weights": weights}, ProjectConfig())
    if input_shapes:
        job.values["input-shape"] = Value([tuple(s) for s in input_shapes], "command line")
    return build_report(run_job(job))


def plan(
    module: nn.Module,
    *,
    data: Any,
    budget: Mapping[str, float | str] | Sequence[str],
    example_inputs: Any,
    candidates: Sequence[str] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    holdout: float = schema.default("holdout"),
    batch_size: int | None = None,
    device: str = schema.default("device"),
    sensitivity: str = "hutchinson",
    latency_backend: str = schema.default("latency-backend"),
    threads: int = schema.default("threads"),
) -> Any:
    """Choose rules, options and layers for ``module`` under ``budget``; returns the ``Plan``.

    ``budget`` maps a metric to a factor of the original (``{"params": 0.25}``) or to a spec
    string (``{"params": "200k"}``), or is a list of ``--budget`` specs (``["macs=0.3x"]``); every
    budget must hold. The plan renders itself (``print(plan)``, ``plan.render("markdown")``),
    ``plan.save("PLAN.toml")`` writes it as rule specs, ``plan.apply(module, example_inputs=...,
    data=...)`` carries it out with ``rewrite``. Your module is not changed.

    A ``latency`` budget (``{"latency": 2}`` or ``["latency=5ms"]``) is timed on
    ``latency_backend`` (torch or onnxruntime) at ``threads`` threads, batch of ``example_inputs``.
    """
    from convrewrite.planning.budgets import parse_budgets
    from convrewrite.planning.candidates import parse_candidates
    from convrewrite.planning.planner import make_plan

    if isinstance(budget, Mapping):
        texts = [f"{k}={v}x" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in budget.items()]
    else:
        texts = list(budget)
    specs = parse_budgets(texts)
    chosen = parse_candidates(candidates) if candidates else None
    loaded = _loaded(module, example_inputs, copy_module=True, caller="convrewrite.plan()")
    source = _calibration(data, loaded, holdout, batch_size)
    return make_plan(
        loaded,
        source,
        specs,
        candidates=chosen,
        include=include,
        exclude=exclude,
        device=device,
        sensitivity=sensitivity,
        latency_backend=latency_backend,
        threads=threads,
    )
