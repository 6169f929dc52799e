"""Views of a ``Report``: a rich table, torchsummary's layout, JSON and markdown.

Every view is a pure function of the report and returns text, so golden files can pin it at a
fixed width with no colour.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from convrewrite.report import MIB, LayerRow, Report, TorchSummary

FORMATS = ("table", "torchsummary", "json", "markdown")

MACS_NOTE = "MACs are multiply-accumulates (FLOPs = 2 x MACs); shared or tied parameters are counted once."


def number(value: int | None) -> str:
    return "--" if value is None else f"{value:,}"


def ratio(value: float | None) -> str:
    return "--" if value is None else f"{value:.2f}x"


def mib(value: int) -> str:
    return f"{value / MIB:,.2f} MiB"


def shape_text(shape: list[int] | None) -> str:
    return "--" if not shape else "x".join(str(d) for d in shape)


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


def header_lines(report: Report) -> list[str]:
    inputs = ", ".join(f"{i['name']} {shape_text(i['shape'])} {i['dtype']}" for i in report.model.get("inputs", []))
    lines = [f"Model: {report.model.get('name')} ({report.model.get('origin')})"]
    lines.append(f"Input: {inputs} (from {report.model.get('input_source')})")
    lines.append(f"Trace: {report.trace.get('description')}")
    if report.rules:
        lines.append("Rules: " + " then ".join(r["spec"] for r in report.rules))
    return lines


def _layer_table(report: Report) -> Table:
    with_rules = report.has_rules
    table = Table(box=box.SIMPLE_HEAD, show_footer=False, pad_edge=False, expand=False)
    table.add_column("Layer", overflow="fold")
    table.add_column("Type", no_wrap=True)
    table.add_column("Output\nshape" if with_rules else "Output shape", no_wrap=True)
    if with_rules:
        for header in ("Params\nbefore", "Params\nafter", "MACs\nbefore", "MACs\nafter", "Kernel\nerror"):
            table.add_column(header, justify="right", no_wrap=True)
    else:
        table.add_column("Params", justify="right", no_wrap=True)
        table.add_column("MACs", justify="right", no_wrap=True)
    for row in report.layers:
        table.add_row(*_cells(row, with_rules))
    return table


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


def _totals_table(report: Report) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("Totals")
    table.add_column("before" if report.after is not None else "model", justify="right")
    if report.after is not None:
        table.add_column("after", justify="right")
        table.add_column("reduction", justify="right")
    before, after = report.before, report.after
    reduction = report.reduction()
    lines: list[tuple[str, str, str | None, str | None]] = [
        ("Params", number(before.params), number(after.params) if after else None, ratio(reduction["params"])),
        ("Trainable params", number(before.trainable_params), number(after.trainable_params) if after else None, ""),
        ("MACs", number(before.macs), number(after.macs) if after else None, ratio(reduction["macs"])),
        ("FLOPs (2 x MACs)", number(before.flops), number(after.flops) if after else None, ""),
        ("Parameter size", mib(before.param_bytes), mib(after.param_bytes) if after else None, ""),
    ]
    for label, b, a, r in lines:
        if after is None:
            table.add_row(label, b)
        else:
            table.add_row(label, b, a or "", r or "")
    return table


def render_table(report: Report, width: int = 120, color: bool = False) -> str:
    console = _console(width, color)
    for line in header_lines(report):
        console.print(Text(line))
    if report.trace.get("leaves"):
        for leaf in report.trace["leaves"]:
            console.print(Text(f"  leaf {leaf['name']} ({leaf['type']}): {leaf['reason']}"))
    table = _layer_table(report)
    # Never truncate a number or a shape: a table wider than the terminal keeps its full width.
    needed = console.measure(table, options=console.options.update(width=10_000)).maximum
    wide = _console(max(width, needed), color)
    wide.file = console.file
    wide.print(table)
    console.print(_totals_table(report))
    console.print(Text(MACS_NOTE))
    if report.has_rules:
        _print_rule_outcome(console, report)
    out = console.file
    assert isinstance(out, io.StringIO)
    return out.getvalue()


def _print_rule_outcome(console: Console, report: Report) -> None:
    rewritten = len(report.rewrites)
    console.print(Text(f"Rewritten: {rewritten} layer rewrite(s); skipped: {len(report.skipped)}"))
    for skip in report.skipped:
        rule = "" if skip["rule"] == "*" else f"[{skip['rule']}] "
        console.print(Text(f"  skipped {rule}{skip['name']} ({skip['type']}): {skip['reason']}"))
    fidelity = report.fidelity
    if fidelity:
        console.print(
            Text(
                "Fidelity on the example input: output relative error "
                f"{fidelity['output_relative_error']:.3g}, cosine similarity "
                f"{fidelity['output_cosine_similarity']:.4f}"
            )
        )


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


RENDERERS: dict[str, Callable[..., str]] = {
    "table": render_table,
    "torchsummary": render_torchsummary,
    "json": render_json,
    "markdown": render_markdown,
}


def render(report: Report, fmt: str, width: int = 120, color: bool = False) -> str:
    return RENDERERS[fmt](report, width=width, color=color)
