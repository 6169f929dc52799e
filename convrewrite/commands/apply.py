"""``convrewrite apply``: rewrite (and fit) a model, write it, then distil the written output.

``apply_job`` is the work once settings are resolved (``convrewrite.config.job``) and the
destination checked: it runs the job, writes ``model.py``, ``weights.safetensors`` and
``report.json`` (rank 0 alone under torchrun), distils the written output in memory when
``--distill N`` asks for it, and returns the report and what it wrote, for the caller to show.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convrewrite.commands.run import run_job
from convrewrite.config.job import Job
from convrewrite.errors import UsageError


@dataclass
class ApplyOutcome:
    """What ``apply_job`` did: the final report, what it wrote, and the distillation, if any."""

    report: Any  # convrewrite.report.model.Report
    written: Any = None  # convrewrite.export.writer.WrittenOutput, on rank 0
    distilled: Any = None  # convrewrite.commands.distill.DistillJobResult


def apply_job(job: Job, out: Path, force: bool, session: Any) -> ApplyOutcome:
    """Rewrite (and fit), write into ``out``, then distil the written output (``--distill N``)."""
    from convrewrite.engine.report_builder import build_report
    from convrewrite.recovery.resume import write_or_keep_fitted
    from convrewrite.report.model import Report

    steps = int(job.get("distill", 0))
    result = run_job(job, distill_after_write=steps > 0, writes_to=out)
    if steps > 0 and result.data is None:
        raise UsageError("--distill needs calibration data", hint="pass --data SPEC (or define calibration_data())")
    outcome = ApplyOutcome(build_report(result))
    if session.is_main:
        # A failure after fitting keeps the fitted weights and prints the command that continues.
        outcome.written = write_or_keep_fitted(result, outcome.report, out, force=force, exports=job.get("export", []))
    session.barrier()
    if steps > 0 and result.rewrites:
        from convrewrite.commands.distill import distill_output
        from convrewrite.config.stages import DistillSettings
        from convrewrite.engine.stages.distill import distill_config

        outcome.distilled = distill_output(
            out,
            result.reference,
            result.data,
            distill_config(DistillSettings.from_values(job.settings_values())),
            device=session.device,
            layers=list(result.originals),
            resume_command=resume_command(job, out, steps),
            evaluate=user_evaluate(result.loaded),
            student=result.model,
            inputs=result.loaded.inputs,
        )
        if outcome.distilled.report is not None:
            outcome.report = Report.from_dict(outcome.distilled.report)
    return outcome


def user_evaluate(loaded: Any) -> Any:
    """The model file's ``evaluate()`` as ``model -> dict[str, float]``, or None."""
    from convrewrite.recovery.data import model_function
    from convrewrite.recovery.metrics import run_evaluate

    function = model_function(loaded, "evaluate")
    if function is None:
        return None
    return lambda model: run_evaluate(function, model, "the distilled model")


def resume_command(job: Job, out: Path, steps: int) -> str:
    """The command that continues an interrupted distillation of ``out``."""
    parts = ["convrewrite", "distill", str(out), "--teacher", str(job["model"]), "--steps", str(steps)]
    for name in ("data", "weights", "holdout", "batch-size", "distill-loss", "device"):
        if job.source(name) != "default" and job.get(name) is not None:
            parts += [f"--{name}", str(job.get(name))]
    for shape in job.get("input-shape", []):
        parts += ["--input-shape", ",".join(str(d) for d in shape)]
    return shlex.join(parts)
