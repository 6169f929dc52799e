"""The typed rewrite log: what each rule did to each layer, and how faithful the result is.

The engine fills these records; the report serializes them. Every record writes its JSON by an
explicit ``to_dict``, so renaming a field here cannot silently change the ``convrewrite.report/1``
contract (``tests/test_report_schema.py`` holds every report to ``report/schema/report-1.json``).
Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RewriteRecord:
    """One layer one rule rewrote; ``*_after`` are measured on the rewritten model."""

    name: str
    rule: str
    type_before: str
    type_after: str
    calls: int
    params_before: int
    macs_before: int
    params_after: int = 0
    macs_after: int = 0
    analytic_params: int = 0
    analytic_macs: int = 0
    kernel_error: float | None = None
    aliases: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rule": self.rule,
            "type_before": self.type_before,
            "type_after": self.type_after,
            "calls": self.calls,
            "params_before": self.params_before,
            "macs_before": self.macs_before,
            "params_after": self.params_after,
            "macs_after": self.macs_after,
            "analytic_params": self.analytic_params,
            "analytic_macs": self.analytic_macs,
            "kernel_error": self.kernel_error,
            "aliases": list(self.aliases),
            "notes": dict(self.notes),
        }


@dataclass
class SkipRecord:
    """A layer a rule left alone, and why (``rule`` is ``*`` when no rule could touch it)."""

    name: str
    rule: str
    type: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rule": self.rule, "type": self.type, "reason": self.reason}


@dataclass
class RewriteLog:
    """Everything the rewrite stages did, in order."""

    rewrites: list[RewriteRecord] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)

    def rewrite_of(self, name: str) -> RewriteRecord | None:
        return next((r for r in self.rewrites if r.name == name), None)


@dataclass
class LayerFidelity:
    """How far a rewritten layer's kernel moved from the original (``||W_new - W||_F / ||W||_F``)."""

    name: str
    rules: list[str]
    kernel_relative_error: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rules": list(self.rules), "kernel_relative_error": self.kernel_relative_error}


@dataclass
class Fidelity:
    """The rewritten model's output against the original's, and each layer's kernel error.

    ``measured_on`` says which inputs: the example input, or the held-out calibration samples.
    ``agreement`` (top-1 agreement with the original) exists for outputs shaped (N, classes).
    """

    output_relative_error: float
    output_cosine_similarity: float
    output_max_abs_error: float | None
    layers: list[LayerFidelity] = field(default_factory=list)
    measured_on: str = "the example input"
    samples: int = 1
    agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "output_relative_error": self.output_relative_error,
            "output_cosine_similarity": self.output_cosine_similarity,
            "output_max_abs_error": self.output_max_abs_error,
            "layers": [layer.to_dict() for layer in self.layers],
            "measured_on": self.measured_on,
            "samples": self.samples,
            "agreement": self.agreement,
        }
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fidelity:
        return cls(
            output_relative_error=float(data["output_relative_error"]),
            output_cosine_similarity=float(data["output_cosine_similarity"]),
            output_max_abs_error=_float_or_none(data.get("output_max_abs_error")),
            layers=[
                LayerFidelity(layer["name"], list(layer.get("rules", [])), layer.get("kernel_relative_error"))
                for layer in data.get("layers", [])
            ],
            measured_on=str(data.get("measured_on", "the example input")),
            samples=int(data.get("samples", 1)),
            agreement=data.get("agreement"),
        )


def _float_or_none(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]
