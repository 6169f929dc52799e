"""The report: one data object that every view (table, torchsummary, JSON, markdown, ...) renders.

The JSON form is a contract (``schema: convrewrite.report/1``), written down in
``report/schema/report-1.json`` and held to it by ``tests/test_report_schema.py``; change it
deliberately, and only by adding keys. ``Report.from_dict`` reads it back, so a saved report can
serve as a baseline. Nothing here imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from convrewrite import __version__
from convrewrite.report.log import Fidelity, RewriteRecord, SkipRecord
from convrewrite.report.registry import render_view, view_names

SCHEMA = "convrewrite.report/1"
MACS_UNIT = "multiply-accumulates (1 MAC = one multiply + one add); FLOPs = 2 x MACs"
MIB = 1024.0**2


@dataclass
class Totals:
    """A model's totals, plus an open map of measured metrics.

    ``metrics`` holds figures that stages measure beyond counting (``output-error``,
    ``agreement``, ``speedup``, ``eval:NAME`` for a user's own task metric...); every one of them
    can be held to a budget by ``convrewrite check`` by its name.
    """

    params: int
    trainable_params: int
    macs: int
    param_bytes: int
    buffer_bytes: int
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def value(self, name: str) -> float | None:
        """A counted total (``params``, ``macs``...) or a measured metric by name; None if absent."""
        counted = {
            "params": self.params,
            "trainable_params": self.trainable_params,
            "macs": self.macs,
            "param_bytes": self.param_bytes,
            "buffer_bytes": self.buffer_bytes,
        }
        key = name.replace("-", "_")
        if key in counted:
            return counted[key]
        return self.metrics.get(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "trainable_params": self.trainable_params,
            "macs": self.macs,
            "param_bytes": self.param_bytes,
            "buffer_bytes": self.buffer_bytes,
            "metrics": dict(self.metrics),
            "flops": self.flops,
            "non_trainable_params": self.params - self.trainable_params,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Totals:
        return cls(
            params=int(data["params"]),
            trainable_params=int(data.get("trainable_params", data["params"])),
            macs=int(data["macs"]),
            param_bytes=int(data.get("param_bytes", 4 * int(data["params"]))),
            buffer_bytes=int(data.get("buffer_bytes", 0)),
            metrics={str(k): float(v) for k, v in (data.get("metrics") or {}).items() if v is not None},
        )


@dataclass
class LayerRow:
    """One row of the per-layer table: a module call, before and (with rules) after."""

    name: str
    call: int
    depth: int
    type_before: str | None
    type_after: str | None
    output_shape: list[int] | None
    params_before: int | None
    params_after: int | None
    macs_before: int | None
    macs_after: int | None
    status: str = "unchanged"
    rules: list[str] = field(default_factory=list)
    kernel_error: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "call": self.call,
            "depth": self.depth,
            "type_before": self.type_before,
            "type_after": self.type_after,
            "output_shape": self.output_shape,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "status": self.status,
            "rules": list(self.rules),
            "kernel_error": self.kernel_error,
            "note": self.note,
        }


@dataclass
class SummaryRow:
    key: str
    output_shape: str
    params: int


@dataclass
class TorchSummary:
    """torchsummary's figures for one model (4 bytes per number, batch of one)."""

    rows: list[SummaryRow]
    total_params: int
    trainable_params: int
    input_mb: float
    forward_backward_mb: float
    params_mb: float

    @property
    def non_trainable_params(self) -> int:
        return self.total_params - self.trainable_params

    @property
    def total_mb(self) -> float:
        return self.input_mb + self.forward_backward_mb + self.params_mb

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "non_trainable_params": self.non_trainable_params,
            "input_size_mb": round(self.input_mb, 4),
            "forward_backward_pass_size_mb": round(self.forward_backward_mb, 4),
            "params_size_mb": round(self.params_mb, 4),
            "estimated_total_size_mb": round(self.total_mb, 4),
        }


@dataclass
class Report:
    model: dict[str, Any]
    trace: dict[str, Any]
    rules: list[dict[str, Any]]
    before: Totals
    after: Totals | None
    layers: list[LayerRow]
    rewrites: list[RewriteRecord] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    fidelity: Fidelity | None = None
    torchsummary_before: TorchSummary | None = None
    torchsummary_after: TorchSummary | None = None
    timings: dict[str, float] = field(default_factory=dict)
    #: Sections that optional stages add (``fitting``, ``distillation``, ``latency``, ``export``...),
    #: already in their JSON form; views show the ones they know.
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The pipeline's stages as they ran: name, seconds, whether it changed the model, a summary.
    stages: list[dict[str, Any]] = field(default_factory=list)

    def render(self, fmt: str = "table", width: int = 120) -> str:
        """This report in any registered format (``table``, ``markdown``, ``json``, ...)."""
        return render_view("report", self, fmt, width=width)

    def __str__(self) -> str:
        return self.render("table")

    def _repr_markdown_(self) -> str:  # Jupyter
        return self.render("markdown")

    def _repr_html_(self) -> str | None:  # Jupyter, when the html view is installed
        return self.render("html") if "html" in view_names("report") else None

    @property
    def has_rules(self) -> bool:
        return bool(self.rules)

    @property
    def final(self) -> Totals:
        """The totals of the model as it ends up (after the rules, if any)."""
        return self.after if self.after is not None else self.before

    def reduction(self) -> dict[str, float | None]:
        if self.after is None:
            return {"params": None, "macs": None}
        return {
            "params": _ratio(self.before.params, self.after.params),
            "macs": _ratio(self.before.macs, self.after.macs),
        }

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "schema": SCHEMA,
            "tool": {"name": "convrewrite", "version": __version__},
            "units": {"macs": MACS_UNIT, "bytes": "bytes", "kernel_relative_error": "||W_new - W||_F / ||W||_F"},
            "model": self.model,
            "trace": self.trace,
            "rules": self.rules,
            "before": self.before.to_dict(),
            "after": self.after.to_dict() if self.after is not None else None,
            "reduction": self.reduction(),
            "layers": [row.to_dict() for row in self.layers],
            "rewrites": [record.to_dict() for record in self.rewrites],
            "skipped": [record.to_dict() for record in self.skipped],
            "fidelity": self.fidelity.to_dict() if self.fidelity is not None else None,
            "torchsummary": {
                "before": self.torchsummary_before.to_dict() if self.torchsummary_before else None,
                "after": self.torchsummary_after.to_dict() if self.torchsummary_after else None,
            },
        }
        if self.stages:
            data["stages"] = [dict(stage) for stage in self.stages]
        for key, section in self.sections.items():
            data[key] = section
        return _finite(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Read a saved JSON report (for baselines); views that need rows may be sparse."""
        if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("convrewrite.report/"):
            raise ValueError("not a convrewrite JSON report (no 'schema': 'convrewrite.report/...')")
        layers = [LayerRow(**row) for row in data.get("layers", [])]
        after = data.get("after")
        fidelity = data.get("fidelity")
        return cls(
            model=data.get("model", {}),
            trace=data.get("trace", {}),
            rules=data.get("rules", []),
            before=Totals.from_dict(data["before"]),
            after=Totals.from_dict(after) if after else None,
            layers=layers,
            rewrites=[_rewrite_from_dict(r) for r in data.get("rewrites", [])],
            skipped=[SkipRecord(s["name"], s["rule"], s["type"], s["reason"]) for s in data.get("skipped", [])],
            fidelity=Fidelity.from_dict(fidelity) if fidelity else None,
            sections={key: data[key] for key in SECTION_KEYS if isinstance(data.get(key), dict)},
            stages=[dict(stage) for stage in data.get("stages", []) if isinstance(stage, dict)],
        )


#: Keys of optional sections that stages add to the JSON report (each documented in the schema).
SECTION_KEYS = ("calibration", "fitting", "distillation", "evaluation", "latency", "export")


def _rewrite_from_dict(data: dict[str, Any]) -> RewriteRecord:
    known = {f for f in RewriteRecord.__dataclass_fields__}
    return RewriteRecord(**{k: v for k, v in data.items() if k in known})


def _ratio(before: int, after: int) -> float | None:
    if after == 0:
        return None
    return before / after


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
