"""Markdown for GitHub job summaries and pull-request comments."""

from __future__ import annotations

from convrewrite.report.model import Report
from convrewrite.report.views.registry import register_view
from convrewrite.report.views.sections import report_section_lines
from convrewrite.report.views.table import layer_cells
from convrewrite.report.views.text import MACS_NOTE, fidelity_lines, header_lines, number, ratio
from convrewrite.report.views.text import md_row as _md_row


@register_view("report", "markdown", "markdown for GitHub summaries and PR comments")
def render_markdown(report: Report, width: int = 120, color: bool = False) -> str:
    lines = [f"### convrewrite report: `{report.model.get('name')}`", ""]
    lines += [f"- {line}" for line in header_lines(report)[1:]]
    lines.append("")
    with_rules = report.has_rules
    if with_rules:
        lines.append(_md_row(["Totals", "before", "after", "reduction"]))
        lines.append("|---|---:|---:|---:|")
    else:
        lines.append(_md_row(["Totals", "value"]))
        lines.append("|---|---:|")
    reduction = report.reduction()
    after = report.after
    for label, b, a, r in [
        ("Params", report.before.params, after.params if after else None, ratio(reduction["params"])),
        ("MACs", report.before.macs, after.macs if after else None, ratio(reduction["macs"])),
        ("FLOPs (2 x MACs)", report.before.flops, after.flops if after else None, ""),
    ]:
        cells = [label, number(b)] + ([number(a), r] if with_rules else [])
        lines.append(_md_row(cells))
    lines += ["", "<details><summary>Per-layer table</summary>", ""]
    headers = ["Layer", "Type", "Output shape"]
    headers += (
        ["Params before", "Params after", "MACs before", "MACs after", "Kernel err"]
        if with_rules
        else ["Params", "MACs"]
    )
    lines.append(_md_row(headers))
    lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(headers) - 3)) + "|")
    for row in report.layers:
        lines.append(_md_row(layer_cells(row, with_rules)))
    lines += ["", "</details>", ""]
    if with_rules:
        if report.skipped:
            lines.append("Skipped convs:")
            lines.append("")
            for skip in report.skipped:
                lines.append(f"- `{skip.name}` ({skip.type}, {skip.rule}): {skip.reason}")
            lines.append("")
        if report.fidelity:
            for line in fidelity_lines(report):
                lines += [line if line.endswith(".") else f"{line}.", ""]
        for line in report_section_lines(report):
            lines += [f"- {line.strip()}" if line.startswith("  ") else line, ""]
    lines.append(f"_{MACS_NOTE}_")
    return "\n".join(lines) + "\n"
