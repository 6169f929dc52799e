"""Views of a ``Report``: a rich table, torchsummary's layout, JSON, markdown and HTML (``html.py``).

Every view is a pure function of the report and returns text, so golden files can pin it at a
fixed width with no colour.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from convrewrite.report.model import MIB, LayerRow, Report, TorchSummary
from convrewrite.report.views.html import render_html

FORMATS = ("table", "torchsummary", "json", "markdown", "html")

MACS_NOTE = "MACs are multiply-accumulates (FLOPs = 2 x MACs); shared or tied parameters are counted once."


def number(value: int | None) -> str:
    return "--" if value is None else f"{value:,}"


def ratio(value: float | None) -> str:
    return "--" if value is None else f"{value:.2f}x"


def mib(value: int) -> str:
    return f"{value / MIB:,.2f} MiB"


def shape_text(shape: list[int] | None) -> str:
    return "--" if not shape else "x".join(str(d) for d in shape)


def header_lines(report: Report) -> list[str]:
    inputs = ", ".join(f"{i['name']} {shape_text(i['shape'])} {i['dtype']}" for i in report.model.get("inputs", []))
    lines = [f"Model: {report.model.get('name')} ({report.model.get('origin')})"]
    lines.append(f"Input: {inputs} (from {report.model.get('input_source')})")
    lines.append(f"Trace: {report.trace.get('description')}")
    if report.rules:
        lines.append("Rules: " + " then ".join(r["spec"] for r in report.rules))
    return lines


def fixed_width_table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    """A plain table in the style of rich's SIMPLE_HEAD box, at its natural width.

    Hundreds of rows render in milliseconds (rich's layout engine took longer than the whole
    analysis of a ResNet-50), nothing is ever wrapped or truncated, and the text is deterministic.
    Headers may span two lines ("Params\\nbefore").
    """
    header_lines = [h.split("\n") for h in headers]
    depth = max(len(h) for h in header_lines)
    header_lines = [[""] * (depth - len(h)) + h for h in header_lines]
    widths = [max([len(line) for line in header_lines[i]] + [len(row[i]) for row in rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return (" " + "   ".join(parts)).rstrip()

    out = [""]
    out += [line([h[level] for h in header_lines]) for level in range(depth)]
    out.append(" " + "─" * (sum(widths) + 3 * (len(widths) - 1)))
    out += [line(row) for row in rows]
    return out


def _layer_table(report: Report) -> list[str]:
    with_rules = report.has_rules
    headers = ["Layer", "Type", "Output\nshape" if with_rules else "Output shape"]
    if with_rules:
        headers += ["Params\nbefore", "Params\nafter", "MACs\nbefore", "MACs\nafter", "Kernel\nerror"]
    else:
        headers += ["Params", "MACs"]
    rows = [_cells(row, with_rules) for row in report.layers]
    return fixed_width_table(headers, rows, right=set(range(3, len(headers))))


def _cells(row: LayerRow, with_rules: bool) -> list[str]:
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
        rule = "" if skip["rule"] == "*" else f"[{skip['rule']}] "
        lines.append(f"  skipped {rule}{skip['name']} ({skip['type']}): {skip['reason']}")
    fidelity = report.fidelity
    if fidelity:
        lines.append(
            "Fidelity on the example input: output relative error "
            f"{fidelity['output_relative_error']:.3g}, cosine similarity "
            f"{fidelity['output_cosine_similarity']:.4f}"
        )
    return lines


def render_torchsummary_block(summary: TorchSummary) -> str:
    """Exactly torchsummary's text layout."""
    rule = "-" * 64
    lines = [rule, "{:>20}  {:>25} {:>15}".format("Layer (type)", "Output Shape", "Param #"), "=" * 64]
    for row in summary.rows:
        lines.append("{:>20}  {:>25} {:>15}".format(row.key, row.output_shape, f"{row.params:,}"))
    lines += [
        "=" * 64,
        f"Total params: {summary.total_params:,}",
        f"Trainable params: {summary.trainable_params:,}",
        f"Non-trainable params: {summary.non_trainable_params:,}",
        rule,
        f"Input size (MB): {summary.input_mb:0.2f}",
        f"Forward/backward pass size (MB): {summary.forward_backward_mb:0.2f}",
        f"Params size (MB): {summary.params_mb:0.2f}",
        f"Estimated Total Size (MB): {summary.total_mb:0.2f}",
        rule,
    ]
    return "\n".join(lines) + "\n"


def render_torchsummary(report: Report, width: int = 120, color: bool = False) -> str:
    parts = []
    if report.torchsummary_before is not None:
        if report.has_rules:
            parts.append(f"Before: {report.model.get('name')}\n")
        parts.append(render_torchsummary_block(report.torchsummary_before))
    if report.torchsummary_after is not None:
        specs = " then ".join(r["spec"] for r in report.rules)
        parts.append(f"\nAfter: {specs}\n")
        parts.append(render_torchsummary_block(report.torchsummary_after))
    return "".join(parts)


def render_json(report: Report, width: int = 120, color: bool = False) -> str:
    return json.dumps(report.to_dict(), indent=2) + "\n"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


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
        lines.append(_md_row(_cells(row, with_rules)))
    lines += ["", "</details>", ""]
    if with_rules:
        if report.skipped:
            lines.append("Skipped convs:")
            lines.append("")
            for skip in report.skipped:
                lines.append(f"- `{skip['name']}` ({skip['type']}, {skip['rule']}): {skip['reason']}")
            lines.append("")
        if report.fidelity:
            f = report.fidelity
            lines.append(
                f"Fidelity: output relative error {f['output_relative_error']:.3g}, "
                f"cosine similarity {f['output_cosine_similarity']:.4f}."
            )
            lines.append("")
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


RENDERERS: dict[str, Callable[..., str]] = {
    "table": render_table,
    "torchsummary": render_torchsummary,
    "json": render_json,
    "markdown": render_markdown,
    "html": render_html,
}


def render(report: Report, fmt: str, width: int = 120, color: bool = False) -> str:
    return RENDERERS[fmt](report, width=width, color=color)
