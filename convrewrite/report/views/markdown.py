"""Markdown for GitHub job summaries and pull-request comments."""

from __future__ import annotations

from convrewrite.report.model import Report
from convrewrite.report.registry import register_view
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
    lines += mermaid_largest_layers(report)
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


#: Layers in the markdown view's Mermaid chart.
MERMAID_LAYERS = 10


def _mermaid_label(text: str) -> str:
    """A category label Mermaid accepts inside double quotes."""
    return text.replace('"', "'").replace("\n", " ")


def _axis_end(value: int) -> int:
    """The smallest 1, 2, 2.5 or 5 x 10^k at or above ``value``: a readable end for the y axis."""
    if value <= 0:
        return 1
    scale = 10 ** max(len(str(value)) - 1, 0)
    for step in (1, 2, 2.5, 5, 10):
        if step * scale >= value:
            return int(step * scale)
    return 10 * scale


def mermaid_largest_layers(report: Report, count: int = MERMAID_LAYERS) -> list[str]:
    """A Mermaid ``xychart-beta`` bar chart of the ``count`` layers with the most parameters.

    GitHub renders Mermaid in job summaries, pull-request comments and markdown files. With rules,
    two bar series: before (grey) and after (blue), drawn over each other (xychart has no grouped
    bars or legend, hence the sentence under the chart). Layers are sorted by parameters before.
    """
    rows = [row for row in report.layers if row.call == 0 and (row.params_before or row.params_after)]
    if not rows:
        return []
    rows = sorted(rows, key=lambda row: -(row.params_before or 0))[:count]
    with_rules = report.has_rules
    values = [row.params_before or 0 for row in rows]
    afters = [row.params_after or 0 for row in rows] if with_rules else []
    top = _axis_end(max(values + afters))
    labels = ", ".join(f'"{_mermaid_label(row.name)}"' for row in rows)
    what = f"{len(rows)} largest layers" if len(rows) > 1 else "the largest layer"
    lines = [
        "",
        "```mermaid",
        '%%{init: {"xyChart": {"width": 900, "height": 420}, '
        '"themeVariables": {"xyChart": {"plotColorPalette": "#9aa5b1, #2563eb"}}}}%%',
        "xychart-beta horizontal",
        f'    title "Parameters of the {what}"',
        f"    x-axis [{labels}]",
        f'    y-axis "parameters" 0 --> {top}',
        f"    bar [{', '.join(str(v) for v in values)}]",
    ]
    if with_rules:
        lines.append(f"    bar [{', '.join(str(v) for v in afters)}]")
    lines.append("```")
    if with_rules:
        lines += ["", "_Parameters per layer: before (grey bars) and after the rules (blue bars, in front)._"]
    return lines
