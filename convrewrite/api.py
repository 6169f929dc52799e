"""The Python API (being rebuilt over the stage pipeline)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def report(
    model: str,
    rules: Sequence[str] = (),
    input_shapes: Sequence[tuple[int, ...]] | None = None,
    weights: str | None = None,
) -> Any:
    """Analyse ``model`` (optionally rewritten by ``rules``) and return the ``Report``."""
    from convrewrite.gate.config import ProjectConfig
    from convrewrite.gate.job import make_job, run_job
    from convrewrite.report.builder import build_report

    cli: dict[str, Any] = {"model": model, "rules": list(rules), "weights": weights}
    job = make_job("report", cli, ProjectConfig())
    if input_shapes:
        from convrewrite.gate.config import Value

        job.values["input-shape"] = Value([tuple(s) for s in input_shapes], "command line")
    return build_report(run_job(job))
