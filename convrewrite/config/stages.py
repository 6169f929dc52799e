"""The settings the pipeline's stages read, typed: one frozen config per stage, built from the schema.

A run's settings arrive as the schema's names and values (``Job.settings_values()``, or the
keywords of ``convrewrite.rewrite``); ``RunSettings.from_values`` turns them into ``fit``,
``distill``, ``latency`` and ``plan`` configs plus the few settings several stages share, taking
every value a run leaves unset from the schema's default (``config/schema.py``), so each default is
written once. A stage reads ``state.settings.fit.steps``, never a string key. A new setting a
stage reads is its ``Setting(...)`` line in the schema and one field here. Nothing here imports
torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from convrewrite.config import schema

#: Keys a run may set that are not settings of the schema (no command-line flag): ``quiet``
#: silences the stages' progress output.
EXTRA_KEYS = ("quiet",)


def _value(values: Mapping[str, Any], name: str) -> Any:
    """``values[name]``, or the schema's default when the run leaves it unset (None)."""
    value = values.get(name)
    return schema.default(name) if value is None else value


@dataclass(frozen=True)
class FitSettings:
    """``fit``: whether the rewritten layers are fitted to the original's outputs, and how long."""

    enabled: bool = bool(schema.default("fit"))
    steps: int = int(schema.default("fit-steps"))
    #: ``statistics`` (closed form from one pass per layer) or ``gradient`` (the probing path).
    method: str = str(schema.default("fit-method"))

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> FitSettings:
        return cls(
            enabled=bool(_value(values, "fit")),
            steps=int(_value(values, "fit-steps")),
            method=str(_value(values, "fit-method")),
        )


@dataclass(frozen=True)
class DistillSettings:
    """``distill``: steps (0: no distillation) and the loss, temperature, learning rate, hint weight."""

    steps: int = int(schema.default("distill"))
    loss: str = str(schema.default("distill-loss"))
    temperature: float = float(schema.default("distill-temperature"))
    lr: float = float(schema.default("distill-lr"))
    layer_weight: float = float(schema.default("layer-weight"))

    @classmethod
    def from_values(cls, values: Mapping[str, Any], steps: int | None = None) -> DistillSettings:
        """``steps`` overrides ``distill`` (the ``distill`` command's ``--steps``)."""
        return cls(
            steps=int(_value(values, "distill") if steps is None else steps),
            loss=str(_value(values, "distill-loss")),
            temperature=float(_value(values, "distill-temperature")),
            lr=float(_value(values, "distill-lr")),
            layer_weight=float(_value(values, "layer-weight")),
        )


@dataclass(frozen=True)
class LatencySettings:
    """``latency``: whether the original and the result are timed, on which backend and threads."""

    enabled: bool = bool(schema.default("latency"))
    backend: str = str(schema.default("latency-backend"))
    threads: int = int(schema.default("threads"))

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> LatencySettings:
        return cls(
            enabled=bool(_value(values, "latency")),
            backend=str(_value(values, "latency-backend")),
            threads=int(_value(values, "threads")),
        )


def _strings(values: Mapping[str, Any], name: str) -> tuple[str, ...]:
    """A repeatable setting's values as a tuple (unset: empty)."""
    return tuple(str(item) for item in (values.get(name) or ()))


@dataclass(frozen=True)
class PlanSettings:
    """``plan`` (and ``apply --budget``): the budgets, the candidate rules, the layer selection and
    sensitivity, where the statistics run, what latency budgets time, and where the plan is saved."""

    budgets: tuple[str, ...] = ()
    candidates: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    sensitivity: str = str(schema.default("sensitivity"))
    holdout: float = float(schema.default("holdout"))
    device: str = str(schema.default("device"))
    latency_backend: str = str(schema.default("latency-backend"))
    threads: int = int(schema.default("threads"))
    #: ``--save PLAN.toml`` (None: the plan is only printed).
    save: str | None = None

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> PlanSettings:
        save = values.get("save")
        return cls(
            budgets=_strings(values, "budget"),
            candidates=_strings(values, "candidates"),
            include=_strings(values, "include"),
            exclude=_strings(values, "exclude"),
            sensitivity=str(_value(values, "sensitivity")),
            holdout=float(_value(values, "holdout")),
            device=str(_value(values, "device")),
            latency_backend=str(_value(values, "latency-backend")),
            threads=int(_value(values, "threads")),
            save=None if save is None else str(save),
        )


@dataclass(frozen=True)
class RunSettings:
    """Every setting the pipeline reads, per stage, plus what several stages share.

    ``keep_reference``: keep a frozen copy of the original (the teacher of fitting, distillation,
    fidelity and latency); the pipeline turns it on when a planned stage needs one.
    ``distill_after_write``: the caller distils the written output (``apply --distill``), so the
    pipeline's distill stage does not run.
    """

    fit: FitSettings = field(default_factory=FitSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    latency: LatencySettings = field(default_factory=LatencySettings)
    plan: PlanSettings = field(default_factory=PlanSettings)
    device: str = str(schema.default("device"))
    threads: int = int(schema.default("threads"))
    holdout: float = float(schema.default("holdout"))
    quiet: bool = False
    keep_reference: bool = False
    distill_after_write: bool = False
    #: ``apply``'s formats to write (``--export``): the early export check tries them all.
    export: tuple[str, ...] = ()
    #: ``--fitted-weights DIR``: load an earlier, failed apply's fitted weights instead of fitting.
    fitted_weights: str | None = None
    #: ``apply`` only: try the export right after the rewrite (stage ``export-check``); a string
    #: is the directory the scratch export goes in (beside the real output), True: a temporary one.
    export_check: str | bool = False

    @classmethod
    def from_values(
        cls,
        values: Mapping[str, Any] | None = None,
        *,
        keep_reference: bool = False,
        distill_after_write: bool = False,
        export_check: str | bool = False,
    ) -> RunSettings:
        """The typed settings of ``values`` (schema names; unset ones take the schema's default).

        A name that is neither a setting of the schema nor in ``EXTRA_KEYS`` is a ValueError: a
        misspelt key would otherwise be silently ignored.
        """
        values = dict(values or {})
        unknown = sorted(name for name in values if name not in schema.BY_NAME and name not in EXTRA_KEYS)
        if unknown:
            raise ValueError(
                f"unknown setting(s) {', '.join(unknown)}; the schema's names: {', '.join(schema.BY_NAME)}"
            )
        return cls(
            fit=FitSettings.from_values(values),
            distill=DistillSettings.from_values(values),
            latency=LatencySettings.from_values(values),
            plan=PlanSettings.from_values(values),
            device=str(_value(values, "device")),
            threads=int(_value(values, "threads")),
            holdout=float(_value(values, "holdout")),
            quiet=bool(values.get("quiet", False)),
            keep_reference=keep_reference,
            distill_after_write=distill_after_write,
            export=tuple(str(f) for f in (values.get("export") or ())),
            fitted_weights=None if values.get("fitted-weights") is None else str(values["fitted-weights"]),
            export_check=export_check,
        )
