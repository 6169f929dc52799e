"""``convrewrite plan MODEL --data SPEC --budget params=0.25x``: choose rules, options and layers.

The body behind the CLI command: parse and check every option (budgets, candidates, format, the
``--save`` destination) before loading anything, profile and cost the candidates (a budget no
choice can meet is refused here, before any data pass), then collect statistics and plan
(``convrewrite.planning.planner``), print the plan and optionally save it as ``PLAN.toml``.
torch is imported only when the command runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from convrewrite.errors import UsageError


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--input-shape {text!r} is not a list of integers", hint="write 1,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape {text!r} must be positive integers, batch first")
    return shape


def run_plan(
    model: str,
    *,
    data: str | None,
    budgets: list[str],
    candidates: list[str],
    include: list[str],
    exclude: list[str],
    input_shapes: list[str],
    weights: str | None,
    holdout: float,
    batch_size: int | None,
    device: str,
    sensitivity: str,
    save: Path | None,
    force: bool,
    fmt: str,
    latency_backend: str = "torch",
    threads: int = 1,
) -> Any:
    """Plan ``model``; print it in ``fmt`` on stdout; save it when asked. Returns the Plan."""
    from convrewrite.planning.budgets import parse_budgets
    from convrewrite.planning.candidates import parse_candidates
    from convrewrite.planning.plan import FORMATS

    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}", hint=f"choose one of {', '.join(FORMATS)}")
    specs = parse_budgets(budgets)
    if not specs:
        raise UsageError("plan needs at least one --budget", hint="for example --budget params=0.25x")
    if any(spec.metric == "latency" for spec in specs):
        from convrewrite.speed.latency import check_backend

        check_backend(latency_backend)
        if threads < 1:
            raise UsageError(f"--threads must be a positive integer, got {threads}")
    if sensitivity not in ("hutchinson", "isotropic", "uniform"):
        raise UsageError(f"unknown --sensitivity {sensitivity!r}", hint="hutchinson, isotropic or uniform")
    chosen = parse_candidates(candidates) if candidates else None
    if save is not None and save.exists() and not force:
        raise UsageError(f"{save} exists", hint="pass --force to replace it, or choose another --save path")
    if not 0.0 < holdout < 1.0:
        raise UsageError("--holdout must be between 0 and 1 (exclusive): the plan scores on held-out samples")
    shapes = [parse_shape(s) for s in input_shapes] or None

    from convrewrite.core.loading import load_model
    from convrewrite.planning.planner import finish_plan, prepare_plan
    from convrewrite.recovery.data import open_calibration_data

    loaded = load_model(model, input_shapes=shapes, weights=Path(weights) if weights else None)
    setup = prepare_plan(
        loaded,
        specs,
        candidates=chosen,
        include=include,
        exclude=exclude,
        latency_backend=latency_backend,
        threads=threads,
    )
    source = open_calibration_data(data, loaded, holdout=holdout, batch_size=batch_size)
    if source is None:
        raise UsageError("plan needs calibration data", hint="pass --data SPEC (or define calibration_data())")
    plan = finish_plan(setup, source, device=device, sensitivity=sensitivity)
    sys.stdout.write(plan.render(fmt))
    if save is not None:
        plan.save(save, force=force)
        print(f"wrote {save}", file=sys.stderr)
    return plan


def rules_for_apply(job: Any, plan_file: Path | None, budgets: list[str]) -> None:
    """``apply --plan PLAN.toml`` / ``apply --budget ...``: put the plan's rules into ``job``.

    A saved plan is read with ``rules_from_file`` (registered rule names only); a budget is
    planned now from the job's model, data and layer selection, and the plan is printed on stderr.
    """
    import dataclasses

    if plan_file is None and not budgets:
        return
    if plan_file is not None and budgets:
        raise UsageError("give --plan or --budget, not both")
    if job.get("rules"):
        raise UsageError("--plan and --budget choose the rules themselves: drop --rule")
    if plan_file is not None:
        import tomllib

        from convrewrite.planning.plan import rules_from_file

        rules_from_file(plan_file)  # validates: registered names, known options
        tables = tomllib.loads(plan_file.read_text())["tool"]["convrewrite"]["rules"]
        source = f"--plan {plan_file}"
    else:
        from convrewrite.commands.run import load_job_model, open_data
        from convrewrite.planning.budgets import parse_budgets
        from convrewrite.planning.planner import finish_plan, prepare_plan

        specs = parse_budgets(budgets)
        loaded = load_job_model(job, str(job["model"]))
        setup = prepare_plan(loaded, specs, include=job.get("include", ()), exclude=job.get("exclude", ()))
        data = open_data(job, loaded)
        if data is None:
            raise UsageError("--budget needs calibration data", hint="pass --data SPEC (or define calibration_data())")
        plan = finish_plan(setup, data, device=job.get("device"))
        sys.stderr.write(plan.render("table"))
        tables = plan.rule_tables()
        if not tables:
            raise UsageError("the plan keeps every layer: nothing to apply", hint="lower the --budget")
        source = "--budget " + " ".join(budgets)
    job.values["rules"] = dataclasses.replace(job.values["rules"], value=tables, source=source)


__all__ = ["parse_shape", "rules_for_apply", "run_plan"]
