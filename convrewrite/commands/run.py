"""Running a job: the rules it names, its model and calibration data, and the engine's run.

``run_job`` is what ``report``, ``apply`` and ``check`` run; ``load_job_model`` and ``open_data``
are shared with ``distill``. Settings were resolved before (``convrewrite.config.job``); nothing
here imports torch at module level: the engine is imported when a job runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from convrewrite.config import schema
from convrewrite.config.job import Job
from convrewrite.config.stages import RunSettings
from convrewrite.errors import UsageError


def check_job(job: Job) -> None:
    """What can be checked before any work: the latency backend is installed (torch-free check)."""
    if job.get("latency") and job.get("latency-backend") == "onnxruntime":
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
            raise UsageError(
                "--latency-backend onnxruntime needs onnx and onnxruntime",
                hint="pip install 'convrewrite[onnx]'",
            )


def build_rules(job: Job) -> list[Any]:
    """The configured rules, with the command's layer selection as their defaults."""
    return make_rules(job.get("rules", []), job.get("include", ()), job.get("exclude", ()), job.get("min-channels", 0))


def make_rules(specs: Sequence[Any], include: Sequence[str], exclude: Sequence[str], min_channels: int) -> list[Any]:
    """Rules from specs (``NAME[:key=value,...]`` or ``Rule`` objects), with a layer selection as
    their defaults (what a rule's own include/exclude/min_channels leave unset)."""
    from convrewrite.rules.api import Rule, make_rule

    rules = []
    for spec in specs:
        rule = spec if isinstance(spec, Rule) else make_rule(spec)
        rule.config = rule.config.with_defaults(include, exclude, min_channels)
        rules.append(rule)
    return rules


def input_source_label(job: Job) -> str:
    """How the report names where the example input's shape came from."""
    source = job.source("input-shape")
    return "--input-shape" if source == "command line" else f"input-shape in {source}"


def run_job(job: Job, *, distill_after_write: bool = False, writes_to: Path | None = None) -> Any:
    """Load and analyse (rewriting when the job has rules); returns the engine's run state.

    ``distill_after_write``: leave distillation to the caller (``apply`` distils the written output).
    ``writes_to``: the directory ``apply`` will write; its export is tried beside it first.
    """
    from convrewrite.engine.pipeline import analyse

    rules = build_rules(job)
    loaded = load_job_model(job, str(job["model"]))
    data = open_data(job, loaded) if rules else None
    settings = RunSettings.from_values(
        job.settings_values(),
        keep_reference=distill_after_write,  # the teacher of the distillation after writing
        distill_after_write=distill_after_write,
        # apply writes: its export is tried right after the rewrite, before fitting (stage export-check).
        export_check=(str(Path(writes_to).resolve().parent) if writes_to is not None else True)
        if job.command == "apply"
        else False,
    )
    return analyse(loaded, rules, data=data, settings=settings)


def load_job_model(job: Job, spec: str) -> Any:
    """Load ``spec`` with the job's weights and input shapes."""
    from convrewrite.core.loading import load_model

    weights = job.get("weights")
    return load_model(
        spec,
        input_shapes=job.get("input-shape") or None,
        weights=Path(weights) if weights else None,
        input_source=input_source_label(job),
    )


def open_data(job: Job, loaded: Any) -> Any:
    """The calibration data of ``--data`` (or ``calibration_data()`` in the model file), checked
    against the loaded, not yet rewritten, model; None when there is none."""
    from convrewrite.recovery.data import open_calibration_data

    return open_calibration_data(
        job.get("data"),
        loaded,
        holdout=job.get("holdout", schema.default("holdout")),
        # A DataLoader or stream keeps its own batches unless --batch-size is given.
        batch_size=job.get("batch-size") if job.source("batch-size") != "default" else None,
        mean=job.get("mean"),
        std=job.get("std"),
    )
