"""Budgets for ``convrewrite check``: metrics, limits with units, levels, and the models they gate.

A budget names one metric of the model as it ends up (after the rules), a limit and a level:

* an absolute limit (``limit = "1M"``): the metric may not exceed it;
* a relative limit against a baseline report (``max-increase = "2%"`` or ``"10k"``): the metric may
  not grow more than that over the baseline's value.

Besides the counted metrics (params, MACs, bytes), a budget can hold a metric that the run
measured (``output-error``, ``cosine``, ``agreement``, ``speedup``, ``eval:NAME`` from the model
file's ``evaluate()``): ``limit`` is a ceiling, ``minimum`` a floor (``minimum = 0.98`` or
``"98%"``), and ``max-drop`` a floor below the original model's own value in the same run
(``max-drop = 0.01``, or ``"1%"`` of the original's value).

Units are exact and documented: counts take ``k``, ``M``, ``G`` (decimal: 1k = 1,000); byte sizes
take ``B``, ``KB``/``kB``, ``MB``, ``GB`` (decimal: 1 MB = 1,000,000 bytes) or ``KiB``, ``MiB``,
``GiB`` (binary: 1 MiB = 1,048,576 bytes). Anything else, including ``m`` (milli or mega?) and
``kb`` (bits or bytes?), is rejected with a one-line message that names the key.

This module only parses and validates (no torch): a malformed ``[tool.convrewrite]`` fails in
milliseconds, before any model is loaded.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from convrewrite.config import schema
from convrewrite.config.project import ProjectConfig, _validate_common, display_path, normalized_keys
from convrewrite.errors import UsageError

LEVELS = ("error", "warn")


@dataclass(frozen=True)
class Metric:
    """A quantity of the final model that a budget can limit."""

    name: str
    attribute: str  # on report.Totals, or the key of Totals.metrics for a measured metric
    kind: str  # "count", "bytes", or "ratio" (a measured number without unit)
    label: str
    #: The per-layer column whose shares explain this metric ("params" or "macs"; "" for none).
    layer_column: str
    #: Measured by a stage (Totals.metrics) rather than counted.
    measured: bool = False
    #: Which way is worse when there is no explicit choice: "max" (higher is worse) or "min".
    worse: str = "max"
    #: What the run needs to measure it, for the message when it was not measured.
    needs: str = ""


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("params", "params", "count", "params", "params"),
        Metric("trainable-params", "trainable_params", "count", "trainable params", "params"),
        Metric("macs", "macs", "count", "MACs", "macs"),
        Metric("param-bytes", "param_bytes", "bytes", "parameter bytes", "params"),
    )
}

#: Metrics the pipeline measures (``Totals.metrics``); ``eval:NAME`` is any metric of ``evaluate()``.
MEASURED_METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("output-error", "output-error", "ratio", "output relative error", "", True, "max"),
        Metric("cosine", "cosine", "ratio", "output cosine similarity", "", True, "min"),
        Metric("agreement", "agreement", "ratio", "top-1 agreement", "", True, "min", "calibration data (--data)"),
        Metric("speedup", "speedup", "ratio", "measured speedup", "", True, "min", "--latency"),
    )
}

COUNT_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9}
BYTE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "kB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
}
COUNT_UNITS_TEXT = "k, M or G (decimal: 1k = 1,000)"
BYTE_UNITS_TEXT = "B, KB, MB, GB (decimal: 1 KB = 1,000 B) or KiB, MiB, GiB (binary: 1 KiB = 1,024 B)"

BUDGET_KEYS = ("name", "metric", "limit", "minimum", "max-increase", "max-drop", "level")
#: Keys a named target takes: every setting of the schema that a config may hold, and budgets.
TARGET_KEYS = (*(s.name for s in schema.SCHEMA if s.toml), "budgets")
#: Settings a named target takes from the top-level table when it does not set them: they select
#: layers, say how to use calibration data or name a baseline file, which can serve every model.
#: Model, input shape, weights, data and rules belong to one model and are never inherited.
INHERITED_KEYS = schema.inherited_keys()

_NUMBER = re.compile(r"^\s*(-?)\s*(\d[\d_]*(?:\.\d+)?|\.\d+)\s*([A-Za-z%]*)\s*$")
_TARGET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class Amount:
    """A parsed limit: ``value`` in the metric's base unit (count or bytes), or a percentage."""

    text: str
    value: float | None = None
    percent: Decimal | None = None

    def resolve(self, baseline: float) -> float:
        """The allowed change from ``baseline``, in the metric's unit (counts stay whole)."""
        if self.percent is not None:
            change = baseline * float(self.percent) / 100
            return math.floor(change) if isinstance(baseline, int) else change
        assert self.value is not None
        return self.value


#: The four kinds of bound a budget sets, as the rule ``describe`` writes after the metric's name.
BOUND_KINDS = {
    "limit": "<= {}",
    "minimum": ">= {}",
    "max-drop": ">= original - {}",
    "max-increase": "<= baseline + {}",
}


@dataclass(frozen=True)
class Budget:
    """One named budget of one target, and where it was configured."""

    name: str
    metric: Metric
    level: str
    limit: Amount | None = None
    max_increase: Amount | None = None
    source: str = "command line"
    target: str | None = None
    minimum: Amount | None = None
    max_drop: Amount | None = None

    @property
    def relative(self) -> bool:
        return self.max_increase is not None

    @property
    def floor(self) -> bool:
        """True when the budget is a lower bound (minimum, max-drop); else an upper bound."""
        return self.minimum is not None or self.max_drop is not None

    @property
    def qualified_name(self) -> str:
        return self.name if self.target is None else f"{self.target}/{self.name}"

    @property
    def bound(self) -> tuple[str, Amount]:
        """Which of the four kinds of bound this budget sets (``BOUND_KINDS``), and its amount.

        The one place the four are told apart; parsing guarantees exactly one is set.
        """
        for kind, amount in (
            ("limit", self.limit),
            ("minimum", self.minimum),
            ("max-drop", self.max_drop),
            ("max-increase", self.max_increase),
        ):
            if amount is not None:
                return kind, amount
        raise AssertionError(f"budget {self.qualified_name} sets no bound")

    def describe(self) -> str:
        kind, amount = self.bound
        return f"{self.metric.name} {BOUND_KINDS[kind].format(amount.text)}, level {self.level}"


def _unit_problem(unit: str, metric: Metric) -> str:
    """Why ``unit`` is not accepted for ``metric``, with the likely intent."""
    if metric.kind == "count":
        if unit.lower() in {u.lower() for u in BYTE_UNITS if u}:
            return f"{metric.name} is a count, not a size: use {COUNT_UNITS_TEXT}"
        if unit == "m":
            return f"unit 'm' is ambiguous (milli or mega?): use M for million; counts take {COUNT_UNITS_TEXT}"
        return f"unknown unit {unit!r}: counts take {COUNT_UNITS_TEXT}"
    if unit in ("k", "M", "G"):
        return f"{metric.name} is a size in bytes: write {unit}B, or use {BYTE_UNITS_TEXT}"
    if unit.lower() in ("kb", "mb", "gb", "b"):
        return f"unit {unit!r} is ambiguous (bits or bytes?): use {BYTE_UNITS_TEXT}"
    return f"unknown unit {unit!r}: sizes take {BYTE_UNITS_TEXT}"


def parse_ratio(raw: Any, where: str, *, percent_of_value: bool = False) -> Amount:
    """A measured metric's bound: a number (``0.98``), or a percentage (``"98%"`` = 0.98; with
    ``percent_of_value``, as for ``max-drop``, a percentage of the original's value instead)."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise UsageError(f'{where} must be a number such as 0.98, or a percentage such as "98%"')
    if isinstance(raw, (int, float)):
        if not math.isfinite(raw) or raw < 0:
            raise UsageError(f"{where} must be a finite number, zero or more, got {raw!r}")
        return Amount(str(raw), value=float(raw))
    text = raw.strip()
    number_text = text[:-1].strip() if text.endswith("%") else text
    try:
        number = float(number_text)
    except ValueError:
        raise UsageError(f'{where} = {raw!r} is not a number such as 0.98 or a percentage such as "98%"') from None
    if not math.isfinite(number) or number < 0:
        raise UsageError(f"{where} must be a finite number, zero or more, got {raw!r}")
    if text.endswith("%"):
        if percent_of_value:
            return Amount(text, percent=Decimal(number_text))
        return Amount(text, value=number / 100)
    return Amount(text, value=number)


def parse_amount(raw: Any, metric: Metric, where: str, *, allow_percent: bool = False) -> Amount:
    """A non-negative limit such as ``800000``, ``"1.5M"``, ``"3MB"``, ``"2.5MiB"`` or ``"2%"``."""
    if metric.kind == "ratio":
        return parse_ratio(raw, where, percent_of_value=allow_percent)
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise UsageError(f'{where} must be a number or a string with a unit, such as "1M" or "3MB"')
    if isinstance(raw, (int, float)):
        if not math.isfinite(raw):
            raise UsageError(f"{where} must be a finite number, got {raw!r}")
        if raw < 0:
            raise UsageError(f"{where} is negative ({raw!r}): a limit must be zero or more")
        return Amount(str(raw), value=math.floor(raw))
    match = _NUMBER.match(raw)
    if match is None:
        raise UsageError(
            f"{where} = {raw!r} is not a number with an optional unit",
            hint=f'write it like "1.5M" or "3MB"; {metric.name} takes '
            + (COUNT_UNITS_TEXT if metric.kind == "count" else BYTE_UNITS_TEXT),
        )
    sign, digits, unit = match.groups()
    if sign:
        raise UsageError(f"{where} is negative ({raw!r}): a limit must be zero or more")
    try:
        number = Decimal(digits.replace("_", ""))
    except InvalidOperation:  # pragma: no cover - the pattern only lets decimals through
        raise UsageError(f"{where} = {raw!r} is not a number") from None
    if unit == "%":
        if not allow_percent:
            raise UsageError(
                f"{where} = {raw!r}: a percentage needs a baseline",
                hint='use max-increase = "2%" (with a baseline report) for a relative budget',
            )
        return Amount(raw.strip(), percent=number)
    units = COUNT_UNITS if metric.kind == "count" else BYTE_UNITS
    if unit not in units:
        raise UsageError(f"{where} = {raw!r}: {_unit_problem(unit, metric)}")
    # Measured values are integers, so flooring a fractional limit changes no outcome.
    return Amount(raw.strip(), value=math.floor(number * units[unit]))


def metric_names() -> list[str]:
    return [*METRICS, *MEASURED_METRICS, "eval:NAME"]


def parse_metric(raw: Any, where: str) -> Metric:
    if not isinstance(raw, str):
        raise UsageError(f"{where} must be a string, one of {', '.join(metric_names())}")
    if raw.strip().startswith("eval:") and raw.strip()[5:]:
        name = raw.strip()
        return Metric(name, name, "ratio", f"evaluate() {name[5:]}", "", True, "min", "evaluate() in the model file")
    name = raw.strip().replace("_", "-").lower()
    aliases = {"size": "param-bytes", "bytes": "param-bytes", "trainable": "trainable-params"}
    name = aliases.get(name, name)
    if name in MEASURED_METRICS:
        return MEASURED_METRICS[name]
    if name not in METRICS:
        hint = " (MACs are the unit: FLOPs = 2 x MACs)" if name == "flops" else ""
        raise UsageError(f"{where}: unknown metric {raw!r}{hint}", hint=f"choose one of {', '.join(metric_names())}")
    return METRICS[name]


def parse_budget(raw: Any, where: str, target: str | None) -> Budget:
    """One entry of a ``budgets`` list; ``where`` names it in messages (file, table, index)."""
    if not isinstance(raw, dict):
        raise UsageError(f'{where} must be a table such as {{ name = "params", metric = "params", limit = "1M" }}')
    data = normalized_keys(raw, BUDGET_KEYS, where, hint=f"a budget takes {', '.join(BUDGET_KEYS)}")
    if "metric" not in data:
        raise UsageError(f"{where} has no metric", hint=f"add metric = one of {', '.join(METRICS)}")
    metric = parse_metric(data["metric"], f"{where} metric")
    level = data.get("level", "error")
    if level not in LEVELS:
        raise UsageError(f"{where} level = {level!r} is not one of {', '.join(LEVELS)}")
    if metric.measured:
        return _measured_budget(data, metric, level, where, target)
    for key in ("minimum", "max-drop"):
        if key in data:
            raise UsageError(
                f"{where}: {key} is for measured metrics (agreement, output-error, eval:NAME...), not {metric.name}",
                hint="use limit or max-increase",
            )
    has_limit, has_increase = "limit" in data, "max-increase" in data
    if has_limit == has_increase:
        raise UsageError(
            f"{where} needs exactly one of limit (absolute) and max-increase (relative to a baseline)",
            hint='for example limit = "1M", or max-increase = "2%"',
        )
    limit = parse_amount(data["limit"], metric, f"{where} limit") if has_limit else None
    increase = (
        parse_amount(data["max-increase"], metric, f"{where} max-increase", allow_percent=True)
        if has_increase
        else None
    )
    name = data.get("name", metric.name if has_limit else f"{metric.name}-increase")
    return Budget(_budget_name(name, where), metric, level, limit, increase, source=where, target=target)


def _budget_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise UsageError(f"{where} name must be a non-empty string without '/'")
    return name.strip()


def _measured_budget(data: dict[str, Any], metric: Metric, level: str, where: str, target: str | None) -> Budget:
    """A budget on a measured metric: exactly one of limit (ceiling), minimum, max-drop."""
    if "max-increase" in data:
        raise UsageError(
            f"{where}: max-increase compares with a baseline report's counts; {metric.name} is measured",
            hint="use limit (a ceiling), minimum (a floor) or max-drop (below the original model's value)",
        )
    given = [key for key in ("limit", "minimum", "max-drop") if key in data]
    if len(given) != 1:
        raise UsageError(
            f"{where} needs exactly one of limit, minimum and max-drop for the measured metric {metric.name}",
            hint="for example minimum = 0.98 (agreement) or limit = 0.05 (output-error)",
        )
    key = given[0]
    amount = parse_ratio(data[key], f"{where} {key}", percent_of_value=key == "max-drop")
    if key == "max-drop" and not metric.name.startswith("eval:"):
        raise UsageError(
            f"{where}: max-drop compares with the original model's own {metric.name}, which only evaluate() measures",
            hint='use it with metric = "eval:NAME", or use minimum',
        )
    name = _budget_name(data.get("name", metric.name), where)
    if key == "limit":
        return Budget(name, metric, level, limit=amount, source=where, target=target)
    if key == "minimum":
        return Budget(name, metric, level, minimum=amount, source=where, target=target)
    return Budget(name, metric, level, max_drop=amount, source=where, target=target)


def parse_budgets(raw: Any, where: str, target: str | None) -> list[Budget]:
    if not isinstance(raw, list):
        raise UsageError(
            f"{where} must be a list of tables",
            hint='write [[tool.convrewrite.budgets]] sections, or budgets = [{ metric = "params", limit = "1M" }]',
        )
    budgets = [parse_budget(entry, f"{where}[{index}]", target) for index, entry in enumerate(raw)]
    seen: dict[str, int] = {}
    for index, budget in enumerate(budgets):
        if budget.name in seen:
            raise UsageError(
                f"{where}[{index}]: budget name {budget.name!r} is already used by {where}[{seen[budget.name]}]",
                hint="give each budget its own name",
            )
        seen[budget.name] = index
    return budgets


# -- targets: the models that budgets gate ------------------------------------------------------


@dataclass
class TableConfig(ProjectConfig):
    """One table of ``[tool.convrewrite]`` (the top level or a named target) as a ``ProjectConfig``.

    ``where`` names the table a setting came from, including settings a target inherits.
    """

    table: str = "tool.convrewrite"
    inherited: dict[str, str] = field(default_factory=dict)

    def where(self, key: str) -> str:
        if self.path is None:
            return "default"
        return f"{display_path(self.path)} [{self.inherited.get(key, self.table)}] {key}"


@dataclass
class Target:
    """A model to check (spec, rules, input shape...) with its budgets.

    ``name`` is None for the model of the top-level table (or the command line's MODEL).
    """

    name: str | None
    config: TableConfig
    budgets: list[Budget]

    @property
    def label(self) -> str:
        return self.name or "(top level)"


def _table(project: ProjectConfig, name: str | None, data: dict[str, Any]) -> TableConfig:
    table = "tool.convrewrite" if name is None else f"tool.convrewrite.targets.{name}"
    return TableConfig(project.path, data, table=table)


def config_targets(project: ProjectConfig) -> tuple[Target | None, list[Target]]:
    """The top-level target and the named targets.

    The top-level table is a target when it has budgets, or a model and no named targets.
    """
    data = project.data
    top_data = {k: v for k, v in data.items() if k != "targets"}
    top_config = _table(project, None, top_data)
    top_budgets = parse_budgets(data["budgets"], f"{top_config.where('budgets')}", None) if "budgets" in data else []
    top = Target(None, top_config, top_budgets)

    named: list[Target] = []
    raw_targets = data.get("targets", {})
    if not isinstance(raw_targets, dict):
        raise UsageError(
            f"{top_config.where('targets')} must be a table of named targets",
            hint="write [tool.convrewrite.targets.NAME] sections with model = ... and budgets = [...]",
        )
    for name, raw in raw_targets.items():
        where = f"{display_path(project.path)} [tool.convrewrite.targets.{name}]"
        if not _TARGET_NAME.match(name):
            raise UsageError(f"{where}: a target name takes letters, digits, '-' and '_' only")
        if not isinstance(raw, dict):
            raise UsageError(f"{where} must be a table with model = ... and budgets = [...]")
        target_data = normalized_keys(raw, TARGET_KEYS, where, hint=f"a target takes {', '.join(TARGET_KEYS)}")
        if "model" not in target_data:
            raise UsageError(f"{where} has no model", hint='add model = "path/file.py[:NAME]"')
        config = _table(project, name, target_data)
        for key in INHERITED_KEYS:
            if key not in target_data and key in data:
                target_data[key] = data[key]
                config.inherited[key] = "tool.convrewrite"
        _validate_common(config)
        budgets = (
            parse_budgets(target_data["budgets"], config.where("budgets"), name) if "budgets" in target_data else []
        )
        named.append(Target(name, config, budgets))
    # With named targets, a top-level model without budgets is just the default of report/apply.
    has_top = bool(top_budgets) or ("model" in data and not named)
    return (top if has_top else None), named


# -- the command line's budgets ----------------------------------------------------------------


def command_line_budgets(
    max_params: str | None,
    max_macs: str | None,
    max_size: str | None,
    max_increase: list[str] | None,
) -> list[Budget]:
    """``--max-params`` / ``--max-macs`` / ``--max-size`` / ``--max-increase METRIC:AMOUNT``."""
    budgets: list[Budget] = []
    for option, value, metric in (
        ("--max-params", max_params, METRICS["params"]),
        ("--max-macs", max_macs, METRICS["macs"]),
        ("--max-size", max_size, METRICS["param-bytes"]),
    ):
        if value is not None:
            amount = parse_amount(value, metric, option)
            budgets.append(Budget(option.lstrip("-"), metric, "error", limit=amount, source=f"command line {option}"))
    for spec in max_increase or []:
        metric_text, sep, amount_text = spec.partition(":")
        if not sep or not amount_text.strip():
            raise UsageError(f"--max-increase {spec!r} is not METRIC:AMOUNT", hint="for example params:2% or macs:10M")
        metric = parse_metric(metric_text, f"--max-increase {spec!r}")
        amount = parse_amount(amount_text.strip(), metric, f"--max-increase {spec!r}", allow_percent=True)
        budgets.append(
            Budget(
                f"{metric.name}-increase",
                metric,
                "error",
                max_increase=amount,
                source=f"command line --max-increase {spec}",
            )
        )
    return budgets


def with_command_line(budgets: list[Budget], overrides: list[Budget], target: str | None) -> list[Budget]:
    """The command line overrides the config.

    A command-line limit replaces the limit of every error-level budget of the same metric and kind
    (absolute or relative) of this target, keeping its name; when the target has none, it is added
    as a budget of its own. Warn-level budgets stay: they are early warnings below the hard limit.
    """
    merged = list(budgets)
    for override in overrides:
        replaced = False
        for index, budget in enumerate(merged):
            if budget.metric == override.metric and budget.relative == override.relative and budget.level == "error":
                merged[index] = Budget(
                    budget.name,
                    budget.metric,
                    "error",
                    override.limit,
                    override.max_increase,
                    source=f"{override.source} (overrides {budget.source})",
                    target=target,
                )
                replaced = True
        if not replaced:
            merged.append(
                Budget(
                    override.name,
                    override.metric,
                    override.level,
                    override.limit,
                    override.max_increase,
                    source=override.source,
                    target=target,
                )
            )
    return merged
