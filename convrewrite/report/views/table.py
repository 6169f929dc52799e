"""The default view: the per-layer table (before and after side by side), totals and outcome."""

from __future__ import annotations

from convrewrite.report.model import LayerRow, Report
from convrewrite.report.registry import register_view
from convrewrite.report.views.sections import report_section_lines
from convrewrite.report.views.text import (
    MACS_NOTE,
    fidelity_lines,
    fixed_width_table,
    header_lines,
    mib,
    number,
    ratio,
    shape_text,
)


def _layer_table(report: Report) -> list[str]:
    with_rules = report.has_rules
    headers = ["Layer", "Type", "Output\nshape" if with_rules else "Output shape"]
    if with_rules:
        headers += ["Params\nbefore", "Params\nafter", "MACs\nbefore", "MACs\nafter", "Kernel\nerror"]
    else:
        headers += ["Params", "MACs"]
    rows = [layer_cells(row, with_rules) for row in report.layers]
    speedups = layer_speedups(report)
    if speedups:  # measured with --latency: which rewrites pay off, each layer timed alone
        headers.append("Speedup\n(alone)")
        for row, cells in zip(report.layers, rows):
            value = speedups.get(row.name) if row.status == "rewritten" and row.call == 0 else None
            cells.append("--" if value is None else f"{value:.2f}x")
    return fixed_width_table(headers, rows, right=set(range(3, len(headers))))


def layer_speedups(report: Report) -> dict[str, float]:
    """Per-layer measured speedups from the latency section (empty without --latency)."""
    section = report.sections.get("latency") or {}
    return {layer["name"]: layer["speedup"] for layer in section.get("layers", []) if layer.get("speedup")}


def layer_cells(row: LayerRow, with_rules: bool) -> list[str]:
    name = row.name + (f" (call {row.call + 1})" if row.call else "")
    if not with_rules:
        return [
            name,
            row.type_before or "--",
            shape_text(row.output_shape),
            number(row.params_before),
            number(row.macs_before),
        ]
    if row.status == "rewritten":
        kind = f"{row.type_before}->{row.type_after}"
    elif row.status == "added":
        kind = f"(new) {row.type_after}"
    else:
        kind = row.type_before or "--"
    error = "--" if row.kernel_error is None else f"{row.kernel_error:.3f}"
    return [
        name,
        kind,
        shape_text(row.output_shape),
        number(row.params_before),
        number(row.params_after),
        number(row.macs_before),
        number(row.macs_after),
        error,
    ]


def _totals_table(report: Report) -> list[str]:
    before, after = report.before, report.after
    reduction = report.reduction()
    lines: list[tuple[str, str, str | None, str | None]] = [
        ("Params", number(before.params), number(after.params) if after else None, ratio(reduction["params"])),
        ("Trainable params", number(before.trainable_params), number(after.trainable_params) if after else None, ""),
        ("MACs", number(before.macs), number(after.macs) if after else None, ratio(reduction["macs"])),
        ("FLOPs (2 x MACs)", number(before.flops), number(after.flops) if after else None, ""),
        ("Parameter size", mib(before.param_bytes), mib(after.param_bytes) if after else None, ""),
    ]
    if after is None:
        return fixed_width_table(["Totals", "model"], [[label, b] for label, b, _, _ in lines], right={1})
    rows = [[label, b, a or "", r or ""] for label, b, a, r in lines]
    return fixed_width_table(["Totals", "before", "after", "reduction"], rows, right={1, 2, 3})


@register_view("report", "table", "per-layer table with before and after side by side")
def render_table(report: Report, width: int = 120, color: bool = False) -> str:
    lines = list(header_lines(report))
    for leaf in report.trace.get("leaves") or []:
        lines.append(f"  leaf {leaf['name']} ({leaf['type']}): {leaf['reason']}")
    lines += _layer_table(report)
    lines += _totals_table(report)
    lines += ["", MACS_NOTE]
    if report.has_rules:
        lines += _rule_outcome(report)
    # Plain text at its natural width (``width`` and ``color`` are accepted for a uniform view
    # signature): nothing is wrapped or cut, and what a terminal shows pastes back identically.
    return "\n".join(lines) + "\n"


def _rule_outcome(report: Report) -> list[str]:
    lines = [f"Rewritten: {len(report.rewrites)} layer rewrite(s); skipped: {len(report.skipped)}"]
    for skip in report.skipped:
        rule = "" if skip.rule == "*" else f"[{skip.rule}] "
        lines.append(f"  skipped {rule}{skip.name} ({skip.type}): {skip.reason}")
    lines += fidelity_lines(report)
    lines += report_section_lines(report)
    return lines
