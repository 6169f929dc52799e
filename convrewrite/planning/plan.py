"""The plan: per layer the chosen rule and options (or keep), with what it costs and risks.

Torch-free data, like the ``Report``: it renders itself (``render(fmt)``: table, json, markdown
with a Mermaid chart, html with an SVG chart of the front and the chosen point), serializes to
the JSON of ``report/schema/plan-1.json`` (``to_dict`` / ``from_dict``), and saves itself as
``PLAN.toml`` (``save``): ordinary rule specs with ``include`` lists under ``[tool.convrewrite]``,
readable, editable and usable as a project's configuration. ``rules_from_file`` loads such a file
back; it resolves only registered rule names (``make_rule``), never an import path.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from convrewrite.errors import UsageError

SCHEMA_ID = "convrewrite.plan/1"
FORMATS = ("table", "json", "markdown", "html")


@dataclass
class PlanBudget:
    """One budget: ``metric`` (params, macs, latency) at most ``limit`` for the whole model.

    ``text`` is how the user wrote it (``params=0.25x``); ``original`` is the original model's
    figure (params, MACs, or milliseconds for latency); ``planned`` is the plan's.
    """

    metric: str
    text: str
    limit: float
    original: float
    planned: float = 0.0

    @property
    def met(self) -> bool:
        return self.planned <= self.limit * (1 + 1e-9)


@dataclass
class PlanOption:
    """One candidate of a layer: ``spec`` is ``keep`` or a rule spec (``separable:multiplier=2``)."""

    spec: str
    rule: str | None
    options: dict[str, Any]
    params: int
    macs: int
    error: float
    loss: float
    latency_ms: float | None = None


@dataclass
class PlanLayer:
    """One layer: its original figures, the chosen option, and why it was protected (if it was)."""

    name: str
    type: str
    params_before: int
    macs_before: int
    chosen: PlanOption
    candidates: int = 1
    sensitivity: float = 0.0
    protected: str | None = None
    latency_ms_before: float | None = None


@dataclass
class LatencyIteration:
    """One plan tried: the internal speedup target, the predicted and the measured speedup."""

    target_speedup: float
    predicted_speedup: float
    measured_speedup: float | None = None
    predicted_ms: float = 0.0
    measured_ms: float | None = None


@dataclass
class PlanLatency:
    """How a latency budget was planned and checked (``Plan.latency``; JSON ``latency``)."""

    backend: str
    threads: int
    batch: int | None
    original_ms: float
    fixed_ms: float
    budget_speedup: float
    iterations: list[LatencyIteration] = field(default_factory=list)
    #: Index of the iteration the plan is (the first that met the budget, else the fastest measured).
    chosen: int = -1
    notes: list[str] = field(default_factory=list)

    @property
    def final(self) -> LatencyIteration | None:
        return self.iterations[self.chosen] if self.iterations else None

    @property
    def predicted_speedup(self) -> float | None:
        return self.final.predicted_speedup if self.final else None

    @property
    def measured_speedup(self) -> float | None:
        return self.final.measured_speedup if self.final else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["predicted_speedup"] = self.predicted_speedup
        data["measured_speedup"] = self.measured_speedup
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanLatency:
        fields = {k: v for k, v in data.items() if k not in ("predicted_speedup", "measured_speedup", "iterations")}
        return cls(**fields, iterations=[LatencyIteration(**i) for i in data.get("iterations", [])])

    def lines(self) -> list[str]:
        """The table footer: the setting, then each plan tried with its predicted and measured speedup."""
        backend = "torch eager" if self.backend == "torch" else "ONNX Runtime (CPU)"
        batch = f", batch {self.batch}" if self.batch is not None else ""
        setting = f"{backend}, {self.threads} thread{'s' if self.threads != 1 else ''}{batch}"
        out = [
            f"latency ({setting}): original {self.original_ms:.3f} ms, "
            f"of it {self.fixed_ms:.3f} ms outside the planned layers"
        ]
        chosen = self.chosen % len(self.iterations) if self.iterations else -1
        for number, it in enumerate(self.iterations, 1):
            measured = "--" if it.measured_speedup is None else f"{it.measured_speedup:.2f}x"
            gap = ""
            if it.measured_speedup:
                gap = f" (prediction off by {it.predicted_speedup / it.measured_speedup - 1:+.1%})"
            out.append(
                f"  plan {number}: target {it.target_speedup:.2f}x, predicted {it.predicted_speedup:.2f}x, "
                f"measured {measured}{gap}{'  <- this plan' if number - 1 == chosen else ''}"
            )
        out += [f"  note: {note}" for note in self.notes]
        return out


@dataclass
class Plan:
    """A whole plan; see the module doc. ``front``: a handful of explored (params, MACs, loss) points."""

    model: str
    budgets: list[PlanBudget]
    layers: list[PlanLayer]
    original_params: int
    original_macs: int
    fixed_params: int = 0
    fixed_macs: int = 0
    front: list[dict[str, float]] = field(default_factory=list)
    sensitivity: str = "hutchinson"
    scoring: str = ""
    samples: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    optimal: bool = False
    notes: list[str] = field(default_factory=list)
    #: Under a latency budget: ``planning.latency.PlanLatency.to_dict()`` (setting, original time,
    #: each plan tried with its target, predicted and measured speedup); None otherwise.
    latency: dict[str, Any] | None = None
    #: Every scored option per layer (not serialized): what benchmarks sample other plans from.
    options: dict[str, list[PlanOption]] = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ totals

    @property
    def params(self) -> int:
        return self.fixed_params + sum(layer.chosen.params for layer in self.layers)

    @property
    def macs(self) -> int:
        return self.fixed_macs + sum(layer.chosen.macs for layer in self.layers)

    @property
    def predicted_loss(self) -> float:
        """Predicted squared relative output error (the sum of the layers' weighted losses)."""
        return sum(layer.chosen.loss for layer in self.layers)

    @property
    def predicted_error(self) -> float:
        """Predicted relative output error: sqrt of ``predicted_loss``."""
        return math.sqrt(max(self.predicted_loss, 0.0))

    @property
    def rewritten(self) -> list[PlanLayer]:
        return [layer for layer in self.layers if layer.chosen.rule is not None]

    @property
    def met(self) -> bool:
        return all(budget.met for budget in self.budgets)

    def rule_tables(self) -> list[dict[str, Any]]:
        """The plan as rule tables ``{name, options..., include=[layers]}``, one per distinct spec."""
        grouped: dict[str, dict[str, Any]] = {}
        for layer in self.rewritten:
            option = layer.chosen
            assert option.rule is not None
            table = grouped.setdefault(option.spec, {"name": option.rule, **option.options, "include": []})
            table["include"].append(_exact_glob(layer.name))
        return list(grouped.values())

    def rules(self) -> list[Any]:
        """The configured rules (``convrewrite.rules.api.Rule``) that carry out the plan."""
        from convrewrite.rules.api import make_rule

        return [make_rule(dict(table)) for table in self.rule_tables()]

    # ------------------------------------------------------------------ serialization

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_ID,
            "model": self.model,
            "budgets": [{**asdict(b), "met": b.met} for b in self.budgets],
            "original": {"params": self.original_params, "macs": self.original_macs},
            "planned": {
                "params": self.params,
                "macs": self.macs,
                "predicted_error": self.predicted_error,
                "predicted_loss": self.predicted_loss,
            },
            "fixed": {"params": self.fixed_params, "macs": self.fixed_macs},
            "layers": [asdict(layer) for layer in self.layers],
            "rules": self.rule_tables(),
            "front": list(self.front),
            "sensitivity": self.sensitivity,
            "scoring": self.scoring,
            "samples": dict(self.samples),
            "seconds": dict(self.seconds),
            "optimal": self.optimal,
            "notes": list(self.notes),
            "latency": self.latency,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if data.get("schema") != SCHEMA_ID:
            raise UsageError(f"not a convrewrite plan (schema {data.get('schema')!r}, expected {SCHEMA_ID})")
        layers = [PlanLayer(**{**layer, "chosen": PlanOption(**layer["chosen"])}) for layer in data.get("layers", [])]
        budgets = [PlanBudget(**{k: v for k, v in b.items() if k != "met"}) for b in data.get("budgets", [])]
        return cls(
            model=data["model"],
            budgets=budgets,
            layers=layers,
            original_params=int(data["original"]["params"]),
            original_macs=int(data["original"]["macs"]),
            fixed_params=int(data["fixed"]["params"]),
            fixed_macs=int(data["fixed"]["macs"]),
            front=list(data.get("front", [])),
            sensitivity=data.get("sensitivity", ""),
            scoring=data.get("scoring", ""),
            samples=dict(data.get("samples", {})),
            seconds=dict(data.get("seconds", {})),
            optimal=bool(data.get("optimal", False)),
            notes=list(data.get("notes", [])),
            latency=data.get("latency"),
        )

    def to_toml(self) -> str:
        """``PLAN.toml``: the plan as ``[tool.convrewrite]`` rule tables, with a commented summary."""
        lines = [
            f"# convrewrite plan for {self.model}",
            "# budgets: "
            + ", ".join(
                f"{b.text} ({_figure(b.metric, b.planned)} of {_figure(b.metric, b.limit)})" for b in self.budgets
            ),
            f"# predicted relative output error {self.predicted_error:.4f} ({self.sensitivity} sensitivity)",
            f"# params {self.original_params:,} -> {self.params:,}; MACs {self.original_macs:,} -> {self.macs:,}",
            "# Edit freely: every entry is an ordinary rule spec; layers not listed are kept.",
            "[tool.convrewrite]",
            "rules = [",
        ]
        for table in self.rule_tables():
            items = [f"name = {_toml_value(table['name'])}"]
            items += [
                f"{key.replace('_', '-')} = {_toml_value(value)}"
                for key, value in table.items()
                if key not in ("name", "include")
            ]
            items.append(f"include = {_toml_value(table['include'])}")
            lines.append("  { " + ", ".join(items) + " },")
        lines.append("]")
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write ``to_toml()`` to ``path`` atomically; an existing file only with ``force``."""
        from convrewrite.export.writer import write_file_atomic

        target = Path(path)
        if target.exists() and not force:
            raise UsageError(f"{target} exists", hint="pass --force to replace it, or choose another --save path")
        write_file_atomic(target, self.to_toml().encode())
        return target

    def apply(self, module: Any, *, example_inputs: Any, data: Any = None, **options: Any) -> Any:
        """Carry out the plan on ``module`` with ``convrewrite.rewrite`` (fit/distill options pass through)."""
        from convrewrite.api import rewrite

        return rewrite(module, self.rules(), example_inputs=example_inputs, data=data, **options)

    # ------------------------------------------------------------------ views

    def render(self, fmt: str = "table", width: int = 120) -> str:
        if fmt == "table":
            return render_table(self)
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2) + "\n"
        if fmt == "markdown":
            return render_markdown(self)
        if fmt == "html":
            return render_html(self)
        raise UsageError(f"unknown plan format {fmt!r}", hint=f"choose one of {', '.join(FORMATS)}")

    def __str__(self) -> str:
        return render_table(self)

    def _repr_html_(self) -> str:
        return render_html(self)


def _exact_glob(name: str) -> str:
    """A glob that matches exactly ``name`` (fnmatch escapes ``[`` as ``[[]``)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def _figure(metric: str, value: float) -> str:
    if metric == "latency":
        return f"{value:.3f} ms"
    return f"{value:,.0f} {'MACs' if metric == 'macs' else 'params'}"


def rule_tables_from_file(path: str | Path) -> list[Any]:
    """The ``[tool.convrewrite] rules`` entries of a saved plan (or any pyproject-style file), checked:
    every entry names a registered rule with known options (a usage error otherwise, before any work)."""
    import tomllib

    from convrewrite.rules.api import make_rule

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"plan file {file} does not exist")
    try:
        data = tomllib.loads(file.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{file} is not valid TOML: {exc}") from None
    tables = data.get("tool", {}).get("convrewrite", {}).get("rules")
    if not isinstance(tables, list) or not tables:
        raise UsageError(f"{file} has no [tool.convrewrite] rules list", hint="write it with `convrewrite plan --save`")
    for entry in tables:
        make_rule(entry if isinstance(entry, str) else dict(entry))
    return tables


def rules_from_file(path: str | Path) -> list[Any]:
    """The rules of a saved plan (or any pyproject-style file with ``[tool.convrewrite] rules``)."""
    from convrewrite.rules.api import make_rule

    return [make_rule(entry if isinstance(entry, str) else dict(entry)) for entry in rule_tables_from_file(path)]


# ---------------------------------------------------------------------- table view


def _format_rows(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _layer_rows(plan: Plan) -> tuple[list[str], list[list[str]]]:
    latency = any(layer.chosen.latency_ms is not None for layer in plan.layers)
    headers = ["layer", "type", "choice", "params before", "params", "MACs before", "MACs", "layer error", "weight"]
    if latency:
        headers += ["ms before", "ms"]
    rows = []
    for layer in plan.layers:
        choice = layer.chosen.spec + (f" (protected: {layer.protected})" if layer.protected else "")
        row = [
            layer.name,
            layer.type,
            choice,
            f"{layer.params_before:,}",
            f"{layer.chosen.params:,}",
            f"{layer.macs_before:,}",
            f"{layer.chosen.macs:,}",
            "--" if layer.chosen.rule is None else f"{layer.chosen.error:.4f}",
            f"{layer.sensitivity:.3g}",
        ]
        if latency:
            row += [
                "--" if layer.latency_ms_before is None else f"{layer.latency_ms_before:.3f}",
                "--" if layer.chosen.latency_ms is None else f"{layer.chosen.latency_ms:.3f}",
            ]
        rows.append(row)
    return headers, rows


def _budget_lines(plan: Plan) -> list[str]:
    lines = []
    for b in plan.budgets:
        ratio = b.planned / b.original if b.original else 0.0
        verdict = "met" if b.met else "MISSED"
        lines.append(
            f"budget {b.text}: {_figure(b.metric, b.planned)} of at most {_figure(b.metric, b.limit)} "
            f"({ratio:.3f}x of the original {_figure(b.metric, b.original)}) -- {verdict}"
        )
    return lines


def _front_rows(plan: Plan) -> tuple[list[str], list[list[str]]]:
    headers = ["params", "params x", "MACs", "MACs x", "predicted error"]
    rows = [
        [
            f"{p['params']:,.0f}",
            f"{p['params'] / plan.original_params:.3f}" if plan.original_params else "--",
            f"{p['macs']:,.0f}",
            f"{p['macs'] / plan.original_macs:.3f}" if plan.original_macs else "--",
            f"{math.sqrt(max(p['loss'], 0.0)):.4f}",
        ]
        for p in plan.front
    ]
    return headers, rows


def render_table(plan: Plan) -> str:
    headers, rows = _layer_rows(plan)
    out = [f"plan for {plan.model}: {len(plan.rewritten)} of {len(plan.layers)} layers rewritten", ""]
    out += _format_rows(headers, rows, set(range(3, len(headers))))
    out += [
        "",
        f"total params {plan.original_params:,} -> {plan.params:,} ({plan.params / max(plan.original_params, 1):.3f}x)",
        f"total MACs   {plan.original_macs:,} -> {plan.macs:,} ({plan.macs / max(plan.original_macs, 1):.3f}x)",
        *_budget_lines(plan),
        f"predicted relative output error {plan.predicted_error:.4f} "
        f"({plan.sensitivity} sensitivity x {plan.scoring} layer errors; "
        f"{'proven optimal' if plan.optimal else 'best found, not proven optimal'} for these predictions)",
    ]
    protected = [layer for layer in plan.layers if layer.protected]
    if protected:
        out += ["", "protected layers (kept):"] + [f"  {layer.name}: {layer.protected}" for layer in protected]
    if plan.front:
        front_headers, front_rows = _front_rows(plan)
        out += ["", "explored front (Lagrangian sweep):"] + [
            "  " + r for r in _format_rows(front_headers, front_rows, set(range(5)))
        ]
    if plan.latency is not None:
        out += ["", *_latency_lines(plan.latency)]
    if plan.seconds:
        out += ["", "planning time: " + ", ".join(f"{k} {v:.2f} s" for k, v in plan.seconds.items())]
    out += [f"note: {note}" for note in plan.notes]
    return "\n".join(out) + "\n"


def _latency_lines(latency: dict[str, Any]) -> list[str]:
    return PlanLatency.from_dict(latency).lines()


# ---------------------------------------------------------------------- markdown view


def render_markdown(plan: Plan) -> str:
    headers, rows = _layer_rows(plan)
    out = [f"## Plan for `{plan.model}`", ""]
    out += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    out += [
        "",
        f"- params {plan.original_params:,} -> {plan.params:,}; MACs {plan.original_macs:,} -> {plan.macs:,}",
        *(f"- {line}" for line in _budget_lines(plan)),
        f"- predicted relative output error {plan.predicted_error:.4f}",
    ]
    if plan.latency is not None:
        out += [f"- {line.strip()}" for line in _latency_lines(plan.latency)]
    if plan.front:
        xs = [p["params"] / max(plan.original_params, 1) for p in plan.front]
        ys = [math.sqrt(max(p["loss"], 0.0)) for p in plan.front]
        out += [
            "",
            "```mermaid",
            "xychart-beta",
            '    title "Explored front: params (x of original) vs predicted output error"',
            "    x-axis [" + ", ".join(f'"{x:.2f}"' for x in xs) + "]",
            f'    y-axis "predicted error" 0 --> {max(ys + [plan.predicted_error]) * 1.1 or 1:.4g}',
            "    line [" + ", ".join(f"{y:.4g}" for y in ys) + "]",
            "```",
        ]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------- html view


def front_svg(plan: Plan, width: int = 560, height: int = 300) -> str:
    """The front (params vs predicted error) as points and a line, the chosen plan highlighted."""
    points = [(p["params"] / max(plan.original_params, 1), math.sqrt(max(p["loss"], 0.0))) for p in plan.front]
    chosen = (plan.params / max(plan.original_params, 1), plan.predicted_error)
    every = points + [chosen]
    x_max = max(x for x, _ in every) or 1.0
    y_max = max(y for _, y in every) or 1.0
    left, bottom, pad = 56, 36, 12

    def place(x: float, y: float) -> tuple[float, float]:
        return (left + x / x_max * (width - left - pad), height - bottom - y / y_max * (height - bottom - pad))

    parts = [
        f'<svg class="front" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="explored front" xmlns="http://www.w3.org/2000/svg">',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - pad}" y2="{height - bottom}" stroke="#888"/>',
        f'<line x1="{left}" y1="{pad}" x2="{left}" y2="{height - bottom}" stroke="#888"/>',
        f'<text x="{width / 2}" y="{height - 6}" text-anchor="middle" font-size="12">params (x of original)</text>',
        f'<text x="14" y="{height / 2}" font-size="12" transform="rotate(-90 14 {height / 2})" '
        f'text-anchor="middle">predicted output error</text>',
        f'<text x="{left - 4}" y="{pad + 4}" text-anchor="end" font-size="10">{y_max:.3g}</text>',
        f'<text x="{width - pad}" y="{height - bottom + 14}" text-anchor="end" font-size="10">{x_max:.2f}</text>',
    ]
    if points:
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in (place(x, y) for x, y in sorted(points)))
        parts.append(f'<polyline points="{path}" fill="none" stroke="#4a7ab5" stroke-width="1.5"/>')
        for x, y in points:
            cx, cy = place(x, y)
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="#4a7ab5"/>')
    cx, cy = place(*chosen)
    parts.append(
        f'<circle class="chosen" cx="{cx:.1f}" cy="{cy:.1f}" r="6" fill="#d9534f"><title>chosen plan</title></circle>'
    )
    parts.append("</svg>")
    return "".join(parts)


def render_html(plan: Plan) -> str:
    headers, rows = _layer_rows(plan)
    esc = html.escape
    table = "<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead><tbody>"
    table += "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    table += "</tbody></table>"
    latency = _latency_lines(plan.latency) if plan.latency is not None else []
    items = "".join(f"<li>{esc(line.strip())}</li>" for line in _budget_lines(plan) + latency)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>convrewrite plan: {esc(plan.model)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child,td:nth-child(2),"
        "td:nth-child(3){text-align:left}</style></head><body>"
        f"<h1>Plan for {esc(plan.model)}</h1>{table}"
        f"<ul><li>params {plan.original_params:,} &rarr; {plan.params:,}; MACs {plan.original_macs:,} &rarr; "
        f"{plan.macs:,}</li>{items}<li>predicted relative output error {plan.predicted_error:.4f}</li></ul>"
        f"<h2>Explored front</h2>{front_svg(plan)}</body></html>\n"
    )


__all__ = [
    "FORMATS",
    "Plan",
    "PlanBudget",
    "PlanLayer",
    "PlanOption",
    "front_svg",
    "rule_tables_from_file",
    "rules_from_file",
]
