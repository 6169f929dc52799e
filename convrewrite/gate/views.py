"""Views of a ``CheckResult``: a table, markdown for a job summary, GitHub annotations, JSON.

Every view is a pure function of the result and returns text, so golden files can pin them at a
fixed width with no colour. Numbers are exact with thousands separators; byte sizes say "B".
"""

from __future__ import annotations

import io
import json

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from convrewrite.gate.check import CheckedTarget, CheckResult, Outcome
from convrewrite.report.registry import register_view, render_view, view_names
from convrewrite.report.views.text import md_row, shape_text

STATUS_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}
STATUS_WORD = {"pass": "pass", "warn": "WARN", "fail": "FAIL", "skip": "skip"}


def amount(value: float | None, outcome: Outcome) -> str:
    if value is None:
        return "--"
    if outcome.budget.metric.kind == "ratio":
        return f"{value:.4g}"
    text = f"{value:,}"
    return f"{text} B" if outcome.budget.metric.kind == "bytes" else text


def signed(value: float, outcome: Outcome) -> str:
    return ("+" if value >= 0 else "-") + amount(abs(value), outcome)


def percent(value: float | None, signed_: bool = False) -> str:
    if value is None:
        return "--"
    return f"{value:+.1f}%" if signed_ else f"{value:.1f}%"


def metric_cell(outcome: Outcome) -> str:
    increase = outcome.budget.max_increase
    label = outcome.budget.metric.label
    return label if increase is None else f"{label}, baseline +{increase.text}"


def headroom_cell(outcome: Outcome) -> str:
    if outcome.limit is None:
        return "no baseline"
    if outcome.exceeded:
        over = outcome.over
        pct = "over" if outcome.limit == 0 else f"{100.0 * over / outcome.limit:.1f}% over"
        return f"-{amount(over, outcome)} ({pct})"
    return f"{amount(outcome.headroom, outcome)} ({percent(outcome.headroom_percent)})"


def change_cell(outcome: Outcome) -> str:
    if outcome.change is None:
        return "--"
    return f"{signed(outcome.change, outcome)} ({percent(outcome.change_percent, signed_=True)})"


def breach_sentence(outcome: Outcome) -> str:
    """What was measured against what: "params 881,450 > limit 860,000: over by 21,450 (+2.5%)"."""
    over = outcome.over
    pct = "" if not outcome.limit else f" ({100.0 * over / outcome.limit:+.1f}%)"
    limit = amount(outcome.limit, outcome)
    increase = outcome.budget.max_increase
    if increase is not None and outcome.baseline is not None:
        limit += f" (baseline {amount(outcome.baseline, outcome)} + {increase.text})"
    drop = outcome.budget.max_drop
    if drop is not None and outcome.original is not None:
        limit += f" (the original's {amount(outcome.original, outcome)} - {drop.text})"
    if outcome.floor:
        return (
            f"{outcome.budget.metric.label} {amount(outcome.measured, outcome)} < minimum {limit}: "
            f"under by {amount(over, outcome)}{pct.replace('+', '-')}"
        )
    return (
        f"{outcome.budget.metric.label} {amount(outcome.measured, outcome)} > limit {limit}: "
        f"over by {amount(over, outcome)}{pct}"
    )


def where_sentence(outcome: Outcome, code: bool = False) -> str:
    budget = outcome.budget
    kind, amount = budget.bound
    written = amount.text if kind == "limit" else f"{kind} {amount.text}"
    if code:
        return f"limit `{written}` set by `{budget.source}`"
    return f"limit {written} set by {budget.source}"


def contributors_sentence(outcome: Outcome, code: bool = False) -> str:
    if not outcome.contributors:
        return ""
    parts = []
    for c in outcome.contributors:
        name = f"`{c.layer}`" if code else c.layer
        share = "" if c.share is None else f" ({100.0 * c.share:.1f}%)"
        if c.delta is not None:
            parts.append(f"{name} {c.delta:+,}{share}")
        else:
            parts.append(f"{name} {c.value:,}{share}")
    return f"largest contributors ({outcome.contributors_basis}): " + ", ".join(parts)


def target_line(target: CheckedTarget) -> str:
    report = target.report
    inputs = ", ".join(shape_text(i["shape"]) for i in report.model.get("inputs", []))
    rules = " then ".join(r["spec"] for r in report.rules) or "none"
    name = target.planned.target.name
    label = "Model" if name is None else f"Target {name}"
    line = f"{label}: {report.model.get('name')}, rules: {rules}, input {inputs}"
    if target.baseline_path:
        line += f", baseline {target.baseline_path}"
    return line


def plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def verdict(result: CheckResult) -> str:
    total = len(result.outcomes)
    failures, warnings, skipped = len(result.failures), len(result.warnings), len(result.skipped)
    held = total - failures - warnings - skipped
    models = plural(len(result.targets), "model")
    skip_text = f", {skipped} skipped (relative, no baseline)" if skipped else ""
    if not failures and not warnings:
        if not skipped:
            if total == 1:
                return f"the 1 budget holds ({models})"
            return f"all {plural(total, 'budget')} hold ({models})"
        return f"{plural(total, 'budget')} ({models}): {held} within limits{skip_text}"
    parts = []
    if failures:
        parts.append(f"{failures} exceeded")
    if warnings:
        parts.append(f"{warnings} over at warn level")
    text = f"{plural(total, 'budget')} ({models}): {', '.join(parts)}, {held} within limits{skip_text}"
    if failures and result.exit_zero:
        text += " (--exit-zero: not failing)"
    return text


def failure_line(result: CheckResult) -> str:
    """The one line for stderr when error-level budgets are exceeded."""
    names = "; ".join(f"{o.budget.qualified_name} ({breach_sentence(o)})" for o in result.failures)
    return f"{plural(len(result.failures), 'budget')} exceeded: {names}"


def notes_for_stderr(result: CheckResult) -> list[str]:
    """Skipped relative budgets, warn-level breaches, and failures under --exit-zero."""
    lines = []
    if result.skipped:
        names = ", ".join(o.budget.qualified_name for o in result.skipped)
        count = plural(len(result.skipped), "relative budget")
        lines.append(f"note: {count} skipped, no baseline: {names} (pass --baseline FILE to compare)")
    for outcome in result.warnings:
        lines.append(
            f"warning: budget {outcome.budget.qualified_name} exceeded (level warn): {breach_sentence(outcome)}"
        )
    if result.failures and result.exit_zero:
        lines.append(f"{failure_line(result)} (--exit-zero: not failing)")
    return lines


def _console(width: int, color: bool) -> Console:
    return Console(
        file=io.StringIO(),
        width=width,
        color_system="auto" if color else None,
        force_terminal=color,
        no_color=not color,
        highlight=False,
        emoji=False,
        legacy_windows=False,
    )


@register_view("check", "table", "budget table")
def render_table(result: CheckResult, width: int = 120, color: bool = False) -> str:
    console = _console(width, color)
    for target in result.targets:
        console.print(Text(target_line(target)), soft_wrap=True)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    # Cells wrap at spaces, and fold rather than cut when a word is too long: a number in a
    # budget table is never shortened with an ellipsis.
    table.add_column("Budget", overflow="fold")
    table.add_column("Metric", overflow="fold")
    table.add_column("Limit", justify="right", overflow="fold")
    table.add_column("Measured", justify="right", overflow="fold")
    if result.has_baseline:
        table.add_column("vs baseline", justify="right", overflow="fold")
    table.add_column("Headroom", justify="right", overflow="fold")
    table.add_column("Status", overflow="fold")
    for outcome in result.outcomes:
        cells: list[str | Text] = [
            outcome.budget.qualified_name + ("" if outcome.budget.level == "error" else " (warn)"),
            metric_cell(outcome),
            amount(outcome.limit, outcome),
            amount(outcome.measured, outcome),
        ]
        if result.has_baseline:
            cells.append(change_cell(outcome))
        cells.append(headroom_cell(outcome))
        cells.append(Text(STATUS_WORD[outcome.status], style=STATUS_STYLE[outcome.status]))
        table.add_row(*cells)
    console.print(table)
    for outcome in result.outcomes:
        if not outcome.exceeded:
            continue
        head = Text(f"{STATUS_WORD[outcome.status]} ", style=STATUS_STYLE[outcome.status])
        head.append(f"{outcome.budget.qualified_name}: {breach_sentence(outcome)}")
        # Detail lines are not wrapped: they are read in CI logs and copied from.
        console.print(head, soft_wrap=True)
        console.print(Text(f"  {where_sentence(outcome)}"), soft_wrap=True)
        if outcome.contributors:
            console.print(Text(f"  {contributors_sentence(outcome)}"), soft_wrap=True)
    console.print(Text(f"Result: {verdict(result)}", style=STATUS_STYLE[result.status]), soft_wrap=True)
    out = console.file
    assert isinstance(out, io.StringIO)
    return out.getvalue()


@register_view("check", "json", "the JSON document (a report with a check section, or convrewrite.check/1)")
def render_json(result: CheckResult, width: int = 120, color: bool = False) -> str:
    return json.dumps(result.to_dict(), indent=2) + "\n"


@register_view("check", "markdown", "markdown for a job summary")
def render_markdown(result: CheckResult, width: int = 120, color: bool = False) -> str:
    title = {"pass": "passed", "warn": "passed with warnings", "fail": "failed"}[result.status]
    if result.status == "fail" and result.exit_zero:
        title = "budgets exceeded (not failing: --exit-zero)"
    summary = verdict(result)
    lines = [f"### convrewrite check {title}", "", summary[0].upper() + summary[1:] + ".", ""]
    for target in result.targets:
        lines.append(f"- {target_line(target)}")
    lines.append("")
    headers = ["Budget", "Metric", "Limit", "Measured"]
    if result.has_baseline:
        headers.append("vs baseline")
    headers += ["Headroom", "Status"]
    lines.append(md_row(headers))
    lines.append("|" + "|".join(["---", "---"] + ["---:"] * (len(headers) - 3) + ["---"]) + "|")
    for outcome in result.outcomes:
        status = STATUS_WORD[outcome.status]
        cells = [
            f"`{outcome.budget.qualified_name}`" + ("" if outcome.budget.level == "error" else " (warn)"),
            metric_cell(outcome),
            amount(outcome.limit, outcome),
            amount(outcome.measured, outcome),
        ]
        if result.has_baseline:
            cells.append(change_cell(outcome))
        cells += [headroom_cell(outcome), status if outcome.status in ("pass", "skip") else f"**{status}**"]
        lines.append(md_row(cells))
    breaches = [o for o in result.outcomes if o.exceeded]
    if breaches:
        lines += ["", "#### Exceeded", ""]
        for outcome in breaches:
            lines.append(
                f"- **{STATUS_WORD[outcome.status]}** `{outcome.budget.qualified_name}`: {breach_sentence(outcome)}."
            )
            lines.append(f"  - {where_sentence(outcome, code=True)}")
            if outcome.contributors:
                lines.append(f"  - {contributors_sentence(outcome, code=True)}")
    lines += ["", "_MACs are multiply-accumulates (FLOPs = 2 x MACs); percentages of headroom are of the limit._"]
    return "\n".join(lines) + "\n"


def escape_data(text: str) -> str:
    """Workflow-command message escaping: %, CR and LF."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """Workflow-command property escaping: the message escapes plus ':' and ','."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def workflow_annotations(result: CheckResult) -> list[str]:
    lines = []
    for outcome in result.outcomes:
        if not outcome.exceeded:
            continue
        command = "error" if outcome.status == "fail" else "warning"
        title = f"convrewrite check: budget {outcome.budget.qualified_name} exceeded"
        message = f"{breach_sentence(outcome)}; {where_sentence(outcome)}"
        if outcome.contributors:
            message += f"; {contributors_sentence(outcome)}"
        lines.append(f"::{command} title={escape_property(title)}::{escape_data(message)}")
    return lines


@register_view("check", "github", "GitHub annotations plus the markdown job summary")
def render_github(result: CheckResult, width: int = 120, color: bool = False) -> str:
    """Annotations (lines starting with ``::``) first, then the markdown for the job summary."""
    notes = workflow_annotations(result)
    return "".join(line + "\n" for line in notes) + render_markdown(result)


CHECK_FORMATS = view_names("check")


def render(result: CheckResult, fmt: str, width: int = 120, color: bool = False) -> str:
    return render_view("check", result, fmt, width=width, color=color)
