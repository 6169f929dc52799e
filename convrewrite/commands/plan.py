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

from convrewrite.config.stages import PlanSettings
from convrewrite.errors import UsageError


def check_latency_options(settings: PlanSettings) -> None:
    """A latency budget needs its backend installed and a positive thread count (checked early)."""
    from convrewrite.planning.budgets import parse_budgets

    if any(spec.metric == "latency" for spec in parse_budgets(list(settings.budgets))):
        from convrewrite.speed.latency import check_backend

        check_backend(settings.latency_backend)
        if settings.threads < 1:
            raise UsageError(f"--threads must be a positive integer, got {settings.threads}")


def prepare(job: Any, settings: PlanSettings, candidates: Any = None) -> Any:
    """Load the job's model and cost the candidates for ``settings``' budgets (``prepare_plan``)."""
    from convrewrite.commands.run import load_job_model
    from convrewrite.planning.budgets import parse_budgets
    from convrewrite.planning.planner import prepare_plan

    loaded = load_job_model(job, str(job["model"]))
    return prepare_plan(
        loaded,
        parse_budgets(list(settings.budgets)),
        candidates=candidates,
        include=settings.include,
        exclude=settings.exclude,
        latency_backend=settings.latency_backend,
        threads=settings.threads,
    )


def finish(job: Any, setup: Any, settings: PlanSettings, option: str) -> Any:
    """Open the job's calibration data and plan (``finish_plan``); ``option`` names the budget flag."""
    from convrewrite.commands.run import open_data
    from convrewrite.planning.planner import finish_plan

    data = open_data(job, setup.loaded)
    if data is None:
        raise UsageError(f"{option} needs calibration data", hint="pass --data SPEC (or define calibration_data())")
    return finish_plan(setup, data, device=settings.device, sensitivity=settings.sensitivity)


def run_plan(job: Any, *, fmt: str = "table", force: bool = False) -> Any:
    """Plan the job's model (settings: ``PlanSettings`` of the job); print it in ``fmt`` on stdout;
    save it when ``save`` is set. Returns the Plan."""
    from convrewrite.planning.budgets import parse_budgets
    from convrewrite.planning.candidates import parse_candidates
    from convrewrite.planning.plan import FORMATS

    settings = PlanSettings.from_values(job.settings_values())
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}", hint=f"choose one of {', '.join(FORMATS)}")
    if not parse_budgets(list(settings.budgets)):
        raise UsageError("plan needs at least one --budget", hint="for example --budget params=0.25x")
    check_latency_options(settings)
    chosen = parse_candidates(list(settings.candidates)) if settings.candidates else None
    save = None if settings.save is None else Path(settings.save)
    if save is not None and save.exists() and not force:
        raise UsageError(f"{save} exists", hint="pass --force to replace it, or choose another --save path")
    if not 0.0 < settings.holdout < 1.0:
        raise UsageError("--holdout must be between 0 and 1 (exclusive): the plan scores on held-out samples")

    plan = finish(job, prepare(job, settings, chosen), settings, "plan")
    sys.stdout.write(plan.render(fmt))
    if save is not None:
        plan.save(save, force=force)
        print(f"wrote {save}", file=sys.stderr)
    return plan


def rules_for_apply(job: Any, plan_file: Path | None) -> None:
    """``apply --plan PLAN.toml`` / ``apply --budget ...``: put the plan's rules into ``job``.

    A saved plan is read with ``rule_tables_from_file`` (registered rule names only); a budget is
    planned now from the job's model, data and layer selection, and the plan is printed on stderr.
    """
    import dataclasses

    budgets = list(job.get("budget", ()))
    if plan_file is None and not budgets:
        return
    if plan_file is not None and budgets:
        raise UsageError("give --plan or --budget, not both")
    if job.get("rules"):
        raise UsageError("--plan and --budget choose the rules themselves: drop --rule")
    if plan_file is not None:
        from convrewrite.planning.plan import rule_tables_from_file

        tables = rule_tables_from_file(plan_file)  # validated: registered names, known options
        source = f"--plan {plan_file}"
    else:
        settings = PlanSettings.from_values(job.settings_values())
        check_latency_options(settings)
        plan = finish(job, prepare(job, settings), settings, "--budget")
        sys.stderr.write(plan.render("table"))
        tables = plan.rule_tables()
        if not tables:
            raise UsageError("the plan keeps every layer: nothing to apply", hint="lower the --budget")
        source = "--budget " + " ".join(budgets)
    job.values["rules"] = dataclasses.replace(job.values["rules"], value=tables, source=source)


__all__ = ["rules_for_apply", "run_plan"]
