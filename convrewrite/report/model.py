"""The report: one data object that every view (table, torchsummary, JSON, markdown) renders.

The JSON form is a contract (``schema: convrewrite.report/1``); change it deliberately, and only
by adding keys. ``Report.from_dict`` reads it back, so a saved report can serve as a baseline.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from convrewrite import __version__

SCHEMA = "convrewrite.report/1"
MACS_UNIT = "multiply-accumulates (1 MAC = one multiply + one add); FLOPs = 2 x MACs"
MIB = 1024.0**2


@dataclass
class Totals:
    params: int
    trainable_params: int
    macs: int
    param_bytes: int
    buffer_bytes: int

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["flops"] = self.flops
        data["non_trainable_params"] = self.params - self.trainable_params
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Totals:
        return cls(
            params=int(data["params"]),
            trainable_params=int(data.get("trainable_params", data["params"])),
            macs=int(data["macs"]),
            param_bytes=int(data.get("param_bytes", 4 * int(data["params"]))),
            buffer_bytes=int(data.get("buffer_bytes", 0)),
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
    rewrites: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    fidelity: dict[str, Any] | None = None
    torchsummary_before: TorchSummary | None = None
    torchsummary_after: TorchSummary | None = None
    timings: dict[str, float] = field(default_factory=dict)

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
            "layers": [asdict(row) for row in self.layers],
            "rewrites": self.rewrites,
            "skipped": self.skipped,
            "fidelity": self.fidelity,
            "torchsummary": {
                "before": self.torchsummary_before.to_dict() if self.torchsummary_before else None,
                "after": self.torchsummary_after.to_dict() if self.torchsummary_after else None,
            },
        }
        return _finite(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Read a saved JSON report (for baselines); views that need rows may be sparse."""
        if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("convrewrite.report/"):
            raise ValueError("not a convrewrite JSON report (no 'schema': 'convrewrite.report/...')")
        layers = [LayerRow(**row) for row in data.get("layers", [])]
        after = data.get("after")
        return cls(
            model=data.get("model", {}),
            trace=data.get("trace", {}),
            rules=data.get("rules", []),
            before=Totals.from_dict(data["before"]),
            after=Totals.from_dict(after) if after else None,
            layers=layers,
            rewrites=data.get("rewrites", []),
            skipped=data.get("skipped", []),
            fidelity=data.get("fidelity"),
        )


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
