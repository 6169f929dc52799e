"""``convrewrite check``: measure each target model, hold it to its budgets, diff against a baseline.

The flow fails fast on everything that is the user's configuration (budgets, units, rules, baseline
files) before any model is loaded, then analyses each target once, however many budgets it has.
The result is a ``CheckResult`` data object; the table, markdown and GitHub views render it, and
``to_dict`` is the JSON contract (``convrewrite.check/1``), which also serves as a baseline.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convrewrite.commands.run import build_rules
from convrewrite.config.job import Job, make_job
from convrewrite.config.project import ProjectConfig, Value
from convrewrite.errors import ConvRewriteError, UsageError
from convrewrite.gate.budgets import (
    Budget,
    Metric,
    TableConfig,
    Target,
    config_targets,
    display_path,
    with_command_line,
)
from convrewrite.report.model import Report

CHECK_SCHEMA = "convrewrite.check/1"
TOP_CONTRIBUTORS = 3


@dataclass
class CheckOptions:
    """What the command line gave: ``settings`` maps the schema's setting names to raw values
    (None or empty: not given, the config decides), plus the command line's budgets."""

    settings: dict[str, Any] = field(default_factory=dict)
    budgets: list[Budget] = field(default_factory=list)
    exit_zero: bool = False
    #: ``--plan PLAN.toml``: check the rewrite of a saved plan (its rules replace the configured ones).
    plan_file: Path | None = None

    @property
    def model(self) -> str | None:
        return self.settings.get("model")


@dataclass
class PlannedTarget:
    target: Target
    job: Job
    model_text: str
    baseline: Value
    budgets: list[Budget]


@dataclass
class Contributor:
    layer: str
    value: int
    share: float | None
    delta: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "value": self.value, "share": self.share, "delta": self.delta}


@dataclass
class Outcome:
    """One budget held against one measured model."""

    budget: Budget
    measured: float
    #: None for a relative budget that had no baseline to compare with: it is skipped, visibly.
    #: A ceiling, or for a floor budget (minimum, max-drop) the floor.
    limit: float | None
    baseline: float | None
    contributors: list[Contributor]
    contributors_basis: str
    #: For max-drop: the original model's own value in the same run.
    original: float | None = None

    @property
    def floor(self) -> bool:
        return self.budget.floor

    @property
    def skipped(self) -> bool:
        return self.limit is None

    @property
    def exceeded(self) -> bool:
        if self.limit is None:
            return False
        return self.measured < self.limit if self.floor else self.measured > self.limit

    @property
    def status(self) -> str:
        if self.skipped:
            return "skip"
        if not self.exceeded:
            return "pass"
        return "fail" if self.budget.level == "error" else "warn"

    @property
    def headroom(self) -> float | None:
        if self.limit is None:
            return None
        return self.measured - self.limit if self.floor else self.limit - self.measured

    @property
    def headroom_percent(self) -> float | None:
        """Headroom as a share of the limit (negative when over)."""
        if self.limit is None or self.limit == 0 or self.headroom is None:
            return None
        return 100.0 * self.headroom / self.limit

    @property
    def over(self) -> float:
        """How far past the limit (above a ceiling, below a floor); 0 within it."""
        return 0 if self.headroom is None else max(0, -self.headroom)

    @property
    def change(self) -> float | None:
        return None if self.baseline is None else self.measured - self.baseline

    @property
    def change_percent(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return 100.0 * (self.measured - self.baseline) / self.baseline

    def to_dict(self) -> dict[str, Any]:
        budget = self.budget
        return {
            "name": budget.name,
            "qualified_name": budget.qualified_name,
            "target": budget.target,
            "metric": budget.metric.name,
            "level": budget.level,
            "kind": "relative" if budget.relative else "absolute",
            "limit_text": budget.limit.text if budget.limit else None,
            "minimum_text": budget.minimum.text if budget.minimum else None,
            "max_increase_text": budget.max_increase.text if budget.max_increase else None,
            "max_drop_text": budget.max_drop.text if budget.max_drop else None,
            "bound": "floor" if budget.floor else "ceiling",
            "original": self.original,
            "limit": self.limit,
            "measured": self.measured,
            "baseline": self.baseline,
            "change": self.change,
            "change_percent": _rounded(self.change_percent),
            "headroom": self.headroom,
            "headroom_percent": _rounded(self.headroom_percent),
            "over": self.over,
            "status": self.status,
            "source": budget.source,
            "contributors_basis": self.contributors_basis,
            "contributors": [c.to_dict() for c in self.contributors],
        }


@dataclass
class CheckedTarget:
    planned: PlannedTarget
    report: Report
    baseline_report: Report | None
    baseline_path: str | None

    @property
    def name(self) -> str | None:
        return self.planned.target.name

    def to_dict(self) -> dict[str, Any]:
        job = self.planned.job
        return {
            "name": self.name,
            "model": self.planned.model_text,
            "rules": [r["spec"] for r in self.report.rules],
            "baseline": self.baseline_path,
            "settings": {
                key: {"value": _jsonable(setting.value), "source": setting.source}
                for key, setting in [*job.settings().items(), ("baseline", self.planned.baseline)]
            },
            "report": self.report.to_dict(),
        }


@dataclass
class CheckResult:
    targets: list[CheckedTarget]
    outcomes: list[Outcome]
    exit_zero: bool = False

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "fail"]

    @property
    def warnings(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "warn"]

    @property
    def skipped(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "skip"]

    @property
    def status(self) -> str:
        return "fail" if self.failures else ("warn" if self.warnings else "pass")

    @property
    def exit_code(self) -> int:
        return 1 if self.failures and not self.exit_zero else 0

    @property
    def has_baseline(self) -> bool:
        return any(o.baseline is not None for o in self.outcomes)

    def check_dict(self) -> dict[str, Any]:
        return {
            "schema": CHECK_SCHEMA,
            "status": self.status,
            "exit_code": self.exit_code,
            "exit_zero": self.exit_zero,
            "summary": {
                "budgets": len(self.outcomes),
                "passed": sum(o.status == "pass" for o in self.outcomes),
                "warnings": len(self.warnings),
                "failures": len(self.failures),
                "skipped": len(self.skipped),
            },
            "units": {
                "params": "count",
                "trainable-params": "count",
                "macs": "multiply-accumulates (FLOPs = 2 x MACs)",
                "param-bytes": "bytes",
                "percent": "percent of the limit (headroom) or of the baseline (change)",
            },
            "budgets": [o.to_dict() for o in self.outcomes],
            "targets": [t.to_dict() for t in self.targets],
        }

    def to_dict(self) -> dict[str, Any]:
        """The JSON document: with one model it is that model's report plus a ``check`` section.

        So any reader of ``report --format json`` (``Report.from_dict`` included) reads it, and it
        serves as a ``--baseline``. With several models the top level is ``{"schema":
        "convrewrite.check/1", "check": ...}``; every model's report is in ``check.targets[].report``
        either way.
        """
        check = self.check_dict()
        if len(self.targets) == 1:
            return {**self.targets[0].report.to_dict(), "check": check}
        from convrewrite import __version__

        return {"schema": CHECK_SCHEMA, "tool": {"name": "convrewrite", "version": __version__}, "check": check}


# -- planning: which models, which settings, which budgets ------------------------------------------


def _no_budgets(target: Target) -> UsageError:
    where = "[tool.convrewrite]" if target.name is None else f"[tool.convrewrite.targets.{target.name}]"
    return UsageError(
        f"no budgets to check for {target.label}",
        hint=f"pass --max-params/--max-macs/--max-size, or add budgets = [...] to {where} in pyproject.toml",
    )


def plan(project: ProjectConfig, options: CheckOptions) -> tuple[list[PlannedTarget], list[str]]:
    """The targets to check, with resolved settings; also notes for ``--verbose``."""
    top, named = config_targets(project)
    notes: list[str] = []
    if options.model is not None:
        # The command line names the model: check it against the top-level budgets only.
        if top is None:
            top = Target(None, TableConfig(project.path, dict(project.data), table="tool.convrewrite"), [])
        if named:
            notes.append(
                "MODEL given on the command line: named targets not checked (" + ", ".join(t.label for t in named) + ")"
            )
        targets = [top]
    else:
        targets = ([top] if top is not None else []) + named
    if not targets:
        raise UsageError(
            "no MODEL given",
            hint="pass one (path/file.py[:NAME]) or set model (or [tool.convrewrite.targets.NAME]) "
            "in [tool.convrewrite] of pyproject.toml",
        )
    plan_tables = _plan_tables(options, targets)
    planned: list[PlannedTarget] = []
    for target in targets:
        budgets = with_command_line(target.budgets, options.budgets, target.name)
        if not budgets:
            raise _no_budgets(target)
        cli = dict(options.settings)
        if target.name is not None:
            cli["model"] = None  # a named target's model comes from its table
        job = make_job("check", cli, project, table=target.config)
        measured = {budget.metric.name for budget in budgets}
        if "speedup" in measured and not job.get("latency"):
            # A speedup budget needs the latency stage: measuring it is implied, and said where.
            names = ", ".join(b.qualified_name for b in budgets if b.metric.name == "speedup")
            job.values["latency"] = Value(True, f"implied by the speedup budget {names}")
        if plan_tables is not None:
            job.values["rules"] = dataclasses.replace(
                job.values["rules"], value=plan_tables, source=f"--plan {display_path(options.plan_file)}"
            )
        model_setting = job.values["model"]
        baseline = job.values["baseline"]
        build_rules(job)  # rule names and options are configuration: fail before loading any model
        planned.append(PlannedTarget(target, job, str(model_setting.value), baseline, budgets))
    return planned, notes


def _plan_tables(options: CheckOptions, targets: list[Target]) -> list[Any] | None:
    """The rule tables of ``--plan`` (checked before any model is loaded), or None without it."""
    if options.plan_file is None:
        return None
    if options.settings.get("rules"):
        raise UsageError("--plan chooses the rules itself: drop --rule")
    if len(targets) > 1:
        raise UsageError(
            f"--plan holds the plan of one model, and {len(targets)} targets are configured",
            hint="name the model on the command line (convrewrite check MODEL --plan PLAN.toml)",
        )
    from convrewrite.planning.plan import rule_tables_from_file

    return rule_tables_from_file(options.plan_file)


# -- baselines ------------------------------------------------------------------------------------


@dataclass
class BaselineFile:
    """A saved JSON report, or a ``check --format json`` document, read back."""

    path: Path
    by_target: dict[str | None, Report]
    only: Report | None

    def report_for(self, target: Target, users: int) -> Report:
        if target.name in self.by_target:
            return self.by_target[target.name]
        if self.only is not None and users == 1:
            return self.only
        held = ", ".join(sorted(str(name or "(top level)") for name in self.by_target)) or "one model's report"
        raise UsageError(
            f"baseline {display_path(self.path)} has no report for target {target.label} (it holds {held})",
            hint="make the baseline with `convrewrite check --format json` on the same config, "
            "or set baseline per target",
        )


def load_baseline_file(path: Path) -> BaselineFile:
    shown = display_path(path)
    if not path.is_file():
        raise UsageError(
            f"baseline {shown} does not exist",
            hint="make one with `convrewrite check --format json > baseline.json` (for example on the main branch)",
        )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"baseline {shown} is not readable JSON: {exc}") from None
    if not isinstance(document, dict):
        raise UsageError(f"baseline {shown} is not a convrewrite JSON report")
    by_target: dict[str | None, Report] = {}
    only: Report | None = None
    try:
        check = document.get("check")
        if isinstance(check, dict):
            for entry in check.get("targets", []):
                if isinstance(entry, dict) and isinstance(entry.get("report"), dict):
                    by_target[entry.get("name")] = Report.from_dict(entry["report"])
        if str(document.get("schema", "")).startswith("convrewrite.report/"):
            only = Report.from_dict(document)
        elif len(by_target) == 1:
            only = next(iter(by_target.values()))
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"baseline {shown} is not a convrewrite JSON report: {exc}") from None
    if not by_target and only is None:
        raise UsageError(
            f"baseline {shown} is not a convrewrite JSON report (no 'schema': 'convrewrite.report/...')",
            hint="use the output of `convrewrite report --format json` or `convrewrite check --format json`",
        )
    return BaselineFile(path, by_target, only)


def resolve_baselines(planned: list[PlannedTarget]) -> list[tuple[Report | None, str | None]]:
    """Each target's baseline report (or None), failing early on missing or mismatched files."""
    files: dict[Path, BaselineFile] = {}
    users: dict[Path, int] = {}
    for item in planned:
        if item.baseline.value is not None:
            path = Path(str(item.baseline.value))
            users[path] = users.get(path, 0) + 1
    results: list[tuple[Report | None, str | None]] = []
    for item in planned:
        if item.baseline.value is None:
            # Relative budgets from the config are skipped, visibly, without a baseline: the job
            # that makes the baseline (on main) runs the same config. One asked for on this
            # command line, though, cannot mean anything without one.
            asked = [b for b in item.budgets if b.relative and b.source.startswith("command line")]
            if asked:
                raise UsageError(
                    f"budget {asked[0].qualified_name} ({asked[0].source}) is relative but there is no baseline",
                    hint="pass --baseline report.json",
                )
            results.append((None, None))
            continue
        path = Path(str(item.baseline.value))
        if path not in files:
            files[path] = load_baseline_file(path)
        results.append((files[path].report_for(item.target, users[path]), display_path(path)))
    return results


# -- measuring and holding to budgets --------------------------------------------------------------


def _layer_values(report: Report, column: str) -> dict[str, int]:
    """Per-layer values of the final model; a module called twice holds its params once."""
    values: dict[str, int] = {}
    for row in report.layers:
        if report.after is not None:
            value = row.params_after if column == "params" else row.macs_after
        else:
            value = row.params_before if column == "params" else row.macs_before
        value = value or 0
        if column == "params":
            values[row.name] = max(values.get(row.name, 0), value)
        else:
            values[row.name] = values.get(row.name, 0) + value
    return values


def contributors(
    report: Report, metric: Metric, baseline: Report | None, top: int = TOP_CONTRIBUTORS
) -> tuple[list[Contributor], str]:
    """The layers that contribute most (or, against a baseline, that grew most), with their share."""
    column = metric.layer_column
    shown = {"params": "params", "macs": "MACs"}[column]
    current = _layer_values(report, column)
    total = getattr(report.final, column)
    if baseline is not None and baseline.layers:
        before = _layer_values(baseline, column)
        grown = {name: value - before.get(name, 0) for name, value in current.items()}
        growth = sum(d for d in grown.values() if d > 0)
        ranked = sorted(((d, n) for n, d in grown.items() if d > 0), key=lambda x: (-x[0], x[1]))
        if ranked:
            return [
                Contributor(name, current[name], delta / growth if growth else None, delta)
                for delta, name in ranked[:top]
            ], f"growth of {shown} since the baseline"
    ranked_total = sorted(((v, n) for n, v in current.items() if v > 0), key=lambda x: (-x[0], x[1]))
    return [
        Contributor(name, value, value / total if total else None) for value, name in ranked_total[:top]
    ], f"share of {shown}"


def _measured_outcome(budget: Budget, report: Report) -> Outcome:
    """A budget on a metric the run measured (agreement, output-error, speedup, eval:NAME)."""
    metric = budget.metric
    value = report.final.metrics.get(metric.attribute)
    if value is None:
        needs = f"; it needs {metric.needs}" if metric.needs else ""
        raise UsageError(
            f"budget {budget.qualified_name}: this run did not measure {metric.name}{needs}",
            hint=f"measured here: {', '.join(sorted(report.final.metrics)) or 'nothing'}",
        )
    original = None
    kind, amount = budget.bound
    if kind == "max-drop":
        original = report.before.metrics.get(metric.attribute)
        if original is None:
            raise UsageError(f"budget {budget.qualified_name}: the original model's {metric.name} was not measured")
        limit = original - amount.resolve(original)
    else:  # limit or minimum: a measured metric has no max-increase
        assert amount.value is not None
        limit = amount.value
    return Outcome(budget, value, limit, None, [], "", original)


def evaluate(budget: Budget, report: Report, baseline: Report | None) -> Outcome:
    if budget.metric.measured:
        return _measured_outcome(budget, report)
    measured = int(getattr(report.final, budget.metric.attribute))
    base = int(getattr(baseline.final, budget.metric.attribute)) if baseline is not None else None
    limit: int | None = None
    if budget.limit is not None:
        assert budget.limit.value is not None
        limit = int(budget.limit.value)
    elif base is not None:
        assert budget.max_increase is not None
        limit = base + int(budget.max_increase.resolve(base))
    layers, basis = contributors(report, budget.metric, baseline if budget.relative else None)
    return Outcome(budget, measured, limit, base, layers, basis)


def execute(
    planned: list[PlannedTarget],
    exit_zero: bool = False,
    progress: Callable[[str], None] | None = None,
) -> CheckResult:
    """Load baselines, analyse every target once and evaluate its budgets."""
    baselines = resolve_baselines(planned)
    from convrewrite.commands.run import run_job
    from convrewrite.engine.report_builder import build_report

    checked: list[CheckedTarget] = []
    outcomes: list[Outcome] = []
    for item, (baseline_report, baseline_path) in zip(planned, baselines):
        if progress is not None:
            progress(f"checking {item.target.label}: {item.model_text}")
        try:
            report = build_report(run_job(item.job))
        except ConvRewriteError as exc:
            if len(planned) > 1:
                exc.message = f"target {item.target.label}: {exc.message}"
            raise
        checked.append(CheckedTarget(item, report, baseline_report, baseline_path))
        outcomes.extend(evaluate(budget, report, baseline_report) for budget in item.budgets)
    return CheckResult(checked, outcomes, exit_zero)


def run_check(project: ProjectConfig, options: CheckOptions) -> CheckResult:
    """The Python API: plan, then execute."""
    planned, _ = plan(project, options)
    return execute(planned, options.exit_zero)


def describe_settings(planned: list[PlannedTarget], notes: list[str]) -> list[str]:
    """``--verbose``: every setting of every target and where it came from."""
    lines = [f"note: {note}" for note in notes]
    for item in planned:
        lines.append(f"target {item.target.label}:")
        for key, setting in item.job.settings().items():
            value = item.model_text if key == "model" else _jsonable(setting.value)
            lines.append(f"  {key} = {value!r}  ({setting.source})")
        for budget in item.budgets:
            lines.append(f"  budget {budget.qualified_name}: {budget.describe()}  ({budget.source})")
    return lines


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value
