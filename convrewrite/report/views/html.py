"""The HTML view of a ``Report``: one self-contained page to open in a browser or attach to a CI run.

Everything is in the one file: inline CSS and inline SVG charts drawn here in Python. No script, no
font, no stylesheet or image is fetched, so the page looks the same offline, in a CI artifact and
in a mail client's preview. It holds the summary (what was analysed, totals before and after, the
reductions, fidelity), charts of parameters and MACs per layer before and after, the kernel error
of each rewritten layer, charts for any extra report section that provides them (latency,
fitting, distillation: see ``SECTION_CHARTS``), the full per-layer table, and the skipped layers.

Charts are built from generic ``Chart``/``Bar`` data (a label with a before and an after value), so
a new report section only needs to say how its data becomes bars. Every bar and every total
carries its exact value in a ``data-*`` attribute, which is what the tests read back.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from convrewrite import __version__
from convrewrite.report.model import MIB, LayerRow, Report
from convrewrite.report.registry import register_view
from convrewrite.report.views.sections import report_section_lines
from convrewrite.report.views.text import weights_text

#: At most this many bars per per-layer chart (the largest layers); the table lists every layer.
MAX_BARS = 30


@dataclass(frozen=True)
class Bar:
    """One label of a chart with its value before and after (either may be missing)."""

    label: str
    before: float | None
    after: float | None = None


@dataclass
class Chart:
    """A horizontal bar chart: one group of (before, after) bars per label.

    ``unit`` names what the values count ("parameters", "ms"); ``integer`` values are shown with
    compact suffixes (1.2M), others with three significant digits. ``series`` names the two bars of
    a group (``("before", "after")``); a chart of single values sets ``after`` to None on every bar.
    """

    key: str
    title: str
    unit: str
    bars: list[Bar]
    integer: bool = True
    series: tuple[str, str] = ("before", "after")
    note: str = ""
    fixed_max: float | None = None


#: Report sections (attributes of the report, or keys of ``to_dict()``) that can be charted, each
#: with the function that turns the section's data into charts. The owner of a section registers
#: it here, e.g. ``SECTION_CHARTS["latency"] = latency_charts``.
SECTION_CHARTS: dict[str, Callable[[Any], list[Chart]]] = {}


# --------------------------------------------------------------------------- numbers


def compact(value: float, integer: bool = True) -> str:
    """1,234,567 -> 1.23M; 0.01234 -> 0.0123 (charts; the tables keep exact figures)."""
    if not integer:
        return f"{value:.3g}"
    magnitude = abs(value)
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:,.0f}"


def exact(value: int | None) -> str:
    return "--" if value is None else f"{value:,}"


def _ratio(value: float | None) -> str:
    return "--" if value is None else f"{value:.2f}x"


def _attr(value: float | None) -> str:
    """A value for a data-* attribute: exact integers stay integers; missing is empty."""
    if value is None:
        return ""
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 2**53):
        return str(int(value))
    return repr(float(value))


def nice_ticks(largest: float, target: int = 5) -> list[float]:
    """Axis ticks from 0: a step of 1, 2, 2.5 or 5 x 10^k, about ``target`` intervals, the last
    tick at or above ``largest``."""
    if largest <= 0:
        return [0.0, 1.0]
    raw = largest / target
    exponent = math.floor(math.log10(raw))
    step = 10.0 ** (exponent + 1)
    for factor in (1, 2, 2.5, 5):
        if factor * 10.0**exponent >= raw * (1 - 1e-12):
            step = factor * 10.0**exponent
            break
    intervals = max(1, math.ceil(largest / step - 1e-9))
    return [step * i for i in range(intervals + 1)]


# --------------------------------------------------------------------------- charts from the report


def _layer_label(row: LayerRow) -> str:
    return row.name + (f" (call {row.call + 1})" if row.call else "")


def layer_chart(report: Report, metric: str) -> Chart:
    """Parameters or MACs per layer, before and after (the largest ``MAX_BARS`` layers)."""
    with_rules = report.has_rules
    bars = []
    for row in report.layers:
        if metric == "params" and row.call:
            continue  # a module called twice holds its parameters once
        before = getattr(row, f"{metric}_before")
        after = getattr(row, f"{metric}_after") if with_rules else None
        if not (before or after):
            continue
        bars.append(Bar(_layer_label(row), before, after))
    total = len(bars)
    if total > MAX_BARS:
        largest = sorted(range(total), key=lambda i: -max(bars[i].before or 0, bars[i].after or 0))[:MAX_BARS]
        bars = [bars[i] for i in sorted(largest)]
    what = "parameters" if metric == "params" else "MACs"
    note = f"The {MAX_BARS} largest of {total} layers with {what}, in model order." if total > MAX_BARS else ""
    series = ("before", "after") if with_rules else ("model", "")
    title = "Parameters per layer" if metric == "params" else "MACs per layer (multiply-accumulates)"
    return Chart(metric, title, what, bars, series=series, note=note)


def kernel_error_chart(report: Report) -> Chart | None:
    """The relative kernel error of each rewritten layer (0 = exact transfer)."""
    layers = report.fidelity.layers if report.fidelity is not None else []
    bars = [Bar(layer.name, layer.kernel_relative_error) for layer in layers if layer.kernel_relative_error is not None]
    if not bars:
        return None
    top = max(1.0, max(bar.before or 0.0 for bar in bars))
    return Chart(
        "kernel_error",
        "Kernel error per rewritten layer",
        "||W_new - W||_F / ||W||_F",
        bars,
        integer=False,
        series=("kernel error", ""),
        note="How far each layer's transferred weights are from the trained ones: 0 is exact, 1 keeps nothing.",
        fixed_max=top,
    )


def section_charts(report: Report) -> list[Chart]:
    """Charts of the extra report sections registered in ``SECTION_CHARTS`` that this report has."""
    charts: list[Chart] = []
    data: dict[str, Any] | None = None
    for name, make in SECTION_CHARTS.items():
        section = getattr(report, name, None)
        if section is None:
            if data is None:
                data = report.to_dict()
            section = data.get(name)
        if section:
            charts.extend(make(section))
    return charts


def report_charts(report: Report) -> list[Chart]:
    charts = [layer_chart(report, "params"), layer_chart(report, "macs")]
    error = kernel_error_chart(report)
    if error is not None:
        charts.append(error)
    charts.extend(section_charts(report))
    return [chart for chart in charts if chart.bars]


# --------------------------------------------------------------------------- SVG

_WIDTH = 1100
_LABEL_WIDTH = 210
_VALUE_WIDTH = 150
_BAR_HEIGHT = 12
_GROUP_GAP = 9
_TOP = 34
_AXIS_HEIGHT = 24


def _truncate(text: str, limit: int = 28) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def chart_svg(chart: Chart) -> str:
    """A horizontal grouped bar chart as inline SVG (no script; tooltips are SVG <title>s)."""
    paired = any(bar.after is not None for bar in chart.bars) and bool(chart.series[1])
    per_group = 2 if paired else 1
    group_height = per_group * _BAR_HEIGHT + (per_group - 1) * 2 + _GROUP_GAP
    height = _TOP + len(chart.bars) * group_height + _AXIS_HEIGHT
    plot_left, plot_right = _LABEL_WIDTH, _WIDTH - _VALUE_WIDTH
    plot_width = plot_right - plot_left
    largest = max([abs(v) for bar in chart.bars for v in (bar.before, bar.after) if v is not None] or [0.0])
    ticks = nice_ticks(chart.fixed_max if chart.fixed_max is not None else largest)
    top = ticks[-1]

    def x_of(value: float) -> float:
        return plot_left + plot_width * (value / top if top else 0.0)

    esc = html.escape
    parts = [
        f'<svg class="chart" data-chart="{esc(chart.key)}" viewBox="0 0 {_WIDTH} {height}" '
        f'role="img" aria-label="{esc(chart.title)}" xmlns="http://www.w3.org/2000/svg">'
    ]
    # Legend.
    legend_x = plot_left
    names = chart.series if paired else (chart.series[0],)
    for index, name in enumerate(names):
        css = "after" if index == 1 or not paired else "before"
        parts.append(f'<rect class="bar {css}" x="{legend_x}" y="10" width="12" height="12" rx="2"/>')
        parts.append(f'<text class="legend" x="{legend_x + 18}" y="20">{esc(name)}</text>')
        legend_x += 30 + 7 * len(name)
    parts.append(f'<text class="unit" x="{_WIDTH - 8}" y="20" text-anchor="end">{esc(chart.unit)}</text>')
    # Grid and axis.
    axis_y = height - _AXIS_HEIGHT + 4
    for value in ticks:
        x = x_of(value)
        parts.append(f'<line class="grid" x1="{x:.1f}" y1="{_TOP - 4}" x2="{x:.1f}" y2="{axis_y}"/>')
        parts.append(
            f'<text class="tick" x="{x:.1f}" y="{axis_y + 14}" text-anchor="middle">'
            f"{esc(compact(value, chart.integer and top >= len(ticks)))}</text>"
        )
    # Bars.
    y = float(_TOP)
    for bar in chart.bars:
        values = [("before", bar.before)] + ([("after", bar.after)] if paired else [])
        center = y + (per_group * _BAR_HEIGHT + (per_group - 1) * 2) / 2
        parts.append(
            f'<g class="group" data-label="{esc(bar.label)}" data-before="{_attr(bar.before)}" '
            f'data-after="{_attr(bar.after)}">'
        )
        tooltip = f"{bar.label}: " + " → ".join(
            f"{name} {compact(v, chart.integer) if v is not None else '--'}"
            for name, v in zip(names, (bar.before, bar.after))
        )
        parts.append(f"<title>{esc(tooltip)}</title>")
        parts.append(
            f'<text class="label" x="{plot_left - 8}" y="{center + 4:.1f}" text-anchor="end">'
            f"{esc(_truncate(bar.label))}</text>"
        )
        for offset, (css, amount) in enumerate(values):
            css = css if paired else "after"  # a single series is drawn in the accent colour
            bar_y = y + offset * (_BAR_HEIGHT + 2)
            if amount is None:
                continue
            width = max(x_of(abs(amount)) - plot_left, 0.0)
            if amount:
                width = max(width, 1.5)  # a tiny value stays visible
            parts.append(
                f'<rect class="bar {css}" x="{plot_left}" y="{bar_y:.1f}" width="{width:.1f}" '
                f'height="{_BAR_HEIGHT}" rx="1.5"/>'
            )
        shown = " → ".join(compact(v, chart.integer) if v is not None else "--" for _, v in values)
        parts.append(f'<text class="value" x="{plot_right + 8}" y="{center + 4:.1f}">{esc(shown)}</text>')
        parts.append("</g>")
        y += group_height
    parts.append(f'<line class="axis" x1="{plot_left}" y1="{_TOP - 4}" x2="{plot_left}" y2="{axis_y}"/>')
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- page

_CSS = """
:root { --ink: #1f2933; --muted: #616e7c; --line: #e4e7eb; --panel: #f8f9fb; --before: #9aa5b1;
  --after: #2563eb; --good: #0f7b4f; --warn: #b45309; }
* { box-sizing: border-box; }
body { margin: 0; padding: 32px 40px 48px; color: var(--ink); background: #fff;
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; }
h1 { font-size: 22px; margin: 0 0 4px; font-weight: 650; }
h1 code { font-size: 20px; }
h2 { font-size: 16px; margin: 36px 0 10px; padding-bottom: 6px; border-bottom: 1px solid var(--line);
  font-weight: 650; }
h3 { font-size: 14px; margin: 22px 0 4px; font-weight: 600; }
code, .num, td, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "Liberation Mono", monospace; }
code { font-size: 13px; }
.sub { color: var(--muted); margin: 0 0 20px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0 0 24px; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(220px, 1fr)); gap: 14px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px; background: var(--panel); }
.card .what { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .big { font-size: 24px; font-weight: 650; margin: 2px 0; }
.card .big.good { color: var(--good); }
.card .detail { color: var(--muted); font-size: 13px; }
table { border-collapse: collapse; width: 100%; font-size: 12.5px; }
th { text-align: left; font-weight: 600; color: var(--muted); border-bottom: 2px solid var(--line);
  padding: 6px 10px; white-space: nowrap; font-family: inherit; }
td { padding: 4px 10px; border-bottom: 1px solid var(--line); white-space: nowrap; }
table.totals td:first-child { font-family: inherit; }
td.r, th.r { text-align: right; }
tr.rewritten td:first-child { border-left: 3px solid var(--after); }
tr.skipped td:first-child { border-left: 3px solid var(--warn); }
tr.unchanged td:first-child, tr.added td:first-child { border-left: 3px solid transparent; }
tbody tr:hover { background: var(--panel); }
.totals { max-width: 720px; }
.scroll { overflow-x: auto; }
.chart { display: block; width: 100%; height: auto; margin: 6px 0 2px; }
.chart text { font: 11.5px system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; fill: var(--ink); }
.chart .tick, .chart .unit { fill: var(--muted); font-size: 10.5px; }
.chart .value { fill: var(--muted); font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 10.5px; }
.chart .grid { stroke: var(--line); stroke-width: 1; }
.chart .axis { stroke: var(--before); stroke-width: 1; }
.chart .bar.before { fill: var(--before); }
.chart .bar.after { fill: var(--after); }
.note { color: var(--muted); font-size: 12.5px; margin: 2px 0 0; }
.pill { display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 11.5px; background: #e0e7ff;
  color: #1e3a8a; }
ul.skips { padding-left: 18px; font-size: 13px; }
ul.measurements { padding-left: 18px; font-size: 13px; }
ul.measurements li.detail { list-style: none; color: var(--muted); margin-left: 14px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; border-top: 1px solid var(--line); padding-top: 10px; }
"""


def _shape(shape: list[int] | None) -> str:
    return "--" if not shape else "x".join(str(d) for d in shape)


def _facts(report: Report) -> list[tuple[str, str]]:
    model = report.model
    inputs = ", ".join(f"{i['name']} {_shape(i['shape'])} {i['dtype']}" for i in model.get("inputs", []))
    facts = [("Model", f"{model.get('name')} ({model.get('origin')})")]
    facts.append(("Input", f"{inputs} (from {model.get('input_source')})"))
    facts.append(("Weights", weights_text(report)))
    facts.append(("Trace", str(report.trace.get("description", report.trace.get("mode", "")))))
    if report.rules:
        facts.append(("Rules", " then ".join(r["spec"] for r in report.rules)))
    for leaf in report.trace.get("leaves") or []:
        facts.append(("Leaf", f"{leaf['name']} ({leaf['type']}): {leaf['reason']}"))
    return facts


def _card(key: str, what: str, big: str, detail: str, value: float | None, good: bool = False) -> str:
    css = "big good" if good else "big"
    return (
        f'<div class="card" data-total="{html.escape(key)}" data-value="{_attr(value)}">'
        f'<div class="what">{html.escape(what)}</div><div class="{css}">{html.escape(big)}</div>'
        f'<div class="detail">{html.escape(detail)}</div></div>'
    )


def _cards(report: Report) -> str:
    before, after = report.before, report.after
    reduction = report.reduction()
    cards = []
    if after is None:
        cards.append(_card("params", "Parameters", exact(before.params), f"{before.param_bytes / MIB:,.2f} MiB", None))
        cards.append(_card("macs", "MACs", compact(before.macs), f"{exact(before.macs)} multiply-accumulates", None))
    else:
        # The two counts, each as the reduction with its before -> after figures.
        for key, what, was, now in (
            ("params", "Parameters", before.params, after.params),
            ("macs", "MACs", before.macs, after.macs),
        ):
            big = _ratio(reduction[key]) + " fewer"
            cards.append(_card(key, what, big, f"{exact(was)} → {exact(now)}", reduction[key], good=True))
        cards.append(
            _card(
                "param_bytes",
                "Parameter size",
                f"{after.param_bytes / MIB:,.2f} MiB",
                f"from {before.param_bytes / MIB:,.2f} MiB",
                after.param_bytes,
            )
        )
        evaluation = report.sections.get("evaluation") or {}
        original, result = evaluation.get("original") or {}, evaluation.get("result") or {}
        for name, value in original.items():  # the user's own metric first: it is what they care about
            if name in result:
                cards.append(
                    _card(
                        f"eval:{name}",
                        f"Your metric: {name}",
                        f"{result[name]:.4g}",
                        f"original {value:.4g} (evaluate() in the model file)",
                        result[name],
                    )
                )
        fidelity = report.fidelity
        if fidelity:
            cards.append(
                _card(
                    "cosine",
                    "Output cosine similarity",
                    f"{fidelity.output_cosine_similarity:.4f}",
                    f"relative error {fidelity.output_relative_error:.3g} on {fidelity.measured_on}",
                    fidelity.output_cosine_similarity,
                )
            )
        rewritten = len(report.rewrites)
        cards.append(_card("rewrites", "Layers rewritten", str(rewritten), f"{len(report.skipped)} skipped", rewritten))
    return '<div class="cards">' + "".join(cards) + "</div>"


def _totals_table(report: Report) -> str:
    before, after = report.before, report.after
    reduction = report.reduction()
    rows: list[tuple[str, str, int | None, int | None, str]] = [
        ("Params", "params", before.params, after.params if after else None, _ratio(reduction["params"])),
        (
            "Trainable params",
            "trainable_params",
            before.trainable_params,
            after.trainable_params if after else None,
            "",
        ),
        ("MACs", "macs", before.macs, after.macs if after else None, _ratio(reduction["macs"])),
        ("FLOPs (2 x MACs)", "flops", before.flops, after.flops if after else None, ""),
        ("Parameter bytes", "param_bytes", before.param_bytes, after.param_bytes if after else None, ""),
    ]
    head = "<tr><th>Totals</th><th class='r'>before</th><th class='r'>after</th><th class='r'>reduction</th></tr>"
    if after is None:
        head = "<tr><th>Totals</th><th class='r'>model</th></tr>"
    body = []
    for label, key, b, a, r in rows:
        cells = f'<td>{label}</td><td class="r" data-key="{key}" data-side="before" data-value="{b}">{exact(b)}</td>'
        if after is not None:
            cells += f'<td class="r" data-key="{key}" data-side="after" data-value="{a}">{exact(a)}</td>'
            cells += f'<td class="r">{r}</td>'
        body.append(f"<tr>{cells}</tr>")
    return f'<table class="totals"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'


def _layer_table(report: Report) -> str:
    with_rules = report.has_rules
    headers = ["Layer", "Type", "Output shape"]
    headers += (
        ["Params before", "Params after", "MACs before", "MACs after", "Kernel error"]
        if with_rules
        else ["Params", "MACs"]
    )
    head = "".join(f'<th class="{"r" if i >= 3 else ""}">{h}</th>' for i, h in enumerate(headers))
    body = []
    esc = html.escape
    for row in report.layers:
        if with_rules and row.status == "rewritten":
            kind = f"{row.type_before} → {row.type_after}"
        elif with_rules and row.status == "added":
            kind = f"(new) {row.type_after}"
        else:
            kind = row.type_before or "--"
        cells = [esc(_layer_label(row)), esc(kind), _shape(row.output_shape)]
        numbers = [row.params_before, row.params_after, row.macs_before, row.macs_after] if with_rules else []
        if not with_rules:
            numbers = [row.params_before, row.macs_before]
        cells += [exact(n) for n in numbers]
        if with_rules:
            cells.append("--" if row.kernel_error is None else f"{row.kernel_error:.3f}")
        tds = "".join(f'<td class="{"r" if i >= 3 else ""}">{c}</td>' for i, c in enumerate(cells))
        body.append(f'<tr class="{esc(row.status)}" data-layer="{esc(row.name)}" data-call="{row.call}">{tds}</tr>')
    table = f'<table class="layers"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    return f'<div class="scroll">{table}</div>'


def _skipped(report: Report) -> str:
    if not report.skipped:
        return ""
    items = []
    for skip in report.skipped:
        rule = "" if skip.rule == "*" else f'<span class="pill">{html.escape(skip.rule)}</span> '
        items.append(
            f"<li>{rule}<code>{html.escape(skip.name)}</code> ({html.escape(skip.type)}): "
            f"{html.escape(skip.reason)}</li>"
        )
    return f'<h2>Skipped layers ({len(report.skipped)})</h2><ul class="skips">{"".join(items)}</ul>'


def _measurements(report: Report) -> str:
    """The lines the table view prints for the optional sections (fitting, evaluation,
    distillation, latency, export), so the page says everything the terminal says."""
    lines = report_section_lines(report)
    if not lines:
        return ""
    items = []
    for line in lines:
        if line.startswith("  "):  # a detail of the line above
            items.append(f'<li class="detail">{html.escape(line.strip())}</li>')
        else:
            items.append(f"<li>{html.escape(line)}</li>")
    return f'<h2>Measurements</h2><ul class="measurements">{"".join(items)}</ul>'


@register_view("report", "html", "one self-contained page with charts (inline CSS and SVG, no script)")
def render_html(report: Report, width: int = 120, color: bool = False, charts: Sequence[Chart] | None = None) -> str:
    """The whole page. ``charts`` replaces the default charts (``report_charts(report)``);
    ``width`` and ``color`` are accepted for the uniform view signature and ignored."""
    esc = html.escape
    name = str(report.model.get("name"))
    title = f"convrewrite report: {name}"
    charts = list(charts) if charts is not None else report_charts(report)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta name="generator" content="convrewrite {esc(__version__)}">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>convrewrite report: <code>{esc(name)}</code></h1>",
        '<p class="sub">'
        + (
            "Before and after the rewrite: counted on the example input; fidelity on "
            + (report.fidelity.measured_on if report.fidelity is not None else "the example input")
            + "."
            if report.has_rules
            else "The model as it is, measured on the example input."
        )
        + "</p>",
        '<dl class="facts">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in _facts(report)) + "</dl>",
        _cards(report),
        "<h2>Totals</h2>",
        _totals_table(report),
        "<h2>Charts</h2>",
    ]
    for chart in charts:
        parts.append(f'<section class="figure" data-figure="{esc(chart.key)}"><h3>{esc(chart.title)}</h3>')
        parts.append(chart_svg(chart))
        if chart.note:
            parts.append(f'<p class="note">{esc(chart.note)}</p>')
        parts.append("</section>")
    parts.append(_measurements(report))
    parts += [f"<h2>Layers ({len(report.layers)} rows)</h2>", _layer_table(report), _skipped(report)]
    parts.append(
        "<footer>MACs are multiply-accumulates (FLOPs = 2 x MACs); shared or tied parameters are counted once. "
        f"Kernel error is ||W_new - W||_F / ||W||_F. Written by convrewrite {esc(__version__)}.</footer>"
    )
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


__all__ = ["MAX_BARS", "SECTION_CHARTS", "Bar", "Chart", "chart_svg", "layer_chart", "render_html", "report_charts"]


def _latency_charts(section: dict[str, Any]) -> list[Chart]:
    model = section.get("model", {})
    charts = [
        Chart(
            "latency",
            f"Latency of the whole model (median, {section.get('settings', {}).get('backend', 'torch')})",
            "ms",
            [Bar("model", model.get("before", {}).get("median_ms"), model.get("after", {}).get("median_ms"))],
            integer=False,
            note=f"speedup {section.get('speedup', 0.0):.2f}x, measured interleaved in one run",
        )
    ]
    layers = section.get("layers", [])
    if layers:
        bars = [Bar(l["name"], l["before"]["median_ms"], l["after"]["median_ms"]) for l in layers]  # noqa: E741
        charts.append(
            Chart("layer_latency", "Latency per rewritten layer, each timed alone", "ms", bars, integer=False)
        )
    return charts


def _fitting_charts(section: dict[str, Any]) -> list[Chart]:
    layers = section.get("layers", {}).get("layers", [])
    bars = [
        Bar(layer["name"], layer.get("holdout_error_before"), layer.get("holdout_error_after"))
        for layer in layers
        if layer.get("holdout_error_before") is not None
    ]
    if not bars:
        return []
    return [
        Chart(
            "fitting",
            "Held-out reconstruction error per layer: transferred, then fitted",
            "relative error",
            bars,
            integer=False,
            series=("transferred", "fitted"),
        )
    ]


def _distillation_charts(section: dict[str, Any]) -> list[Chart]:
    initial, best = section.get("initial"), section.get("best")
    if not initial or not best:
        return []
    bars = [Bar("output error", initial["output_relative_error"], best["output_relative_error"])]
    if initial.get("top1_agreement") is not None and best.get("top1_agreement") is not None:
        bars.append(Bar("top-1 agreement", initial["top1_agreement"], best["top1_agreement"]))
    return [
        Chart(
            "distillation",
            "Held out, before and after distillation",
            "",
            bars,
            integer=False,
            series=("before", "after"),
        )
    ]


SECTION_CHARTS.update(latency=_latency_charts, fitting=_fitting_charts, distillation=_distillation_charts)
