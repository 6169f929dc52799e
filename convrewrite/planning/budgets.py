"""``--budget`` specs: ``params=0.25x``, ``macs=0.3x``, ``params=200k``, ``latency=2x``.

A relative size budget (``0.25x``) is that fraction of the original model's figure; an absolute one
(``200k``, ``1.5M``, ``3G``) is the figure itself. ``latency=2x`` asks for a model two times
faster (at most half the original time); ``latency=5ms`` is an absolute time. Parsing needs no
model; ``resolve`` turns a spec into a limit once the original's figures are known.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from convrewrite.errors import UsageError

METRICS = ("params", "macs", "latency")
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
_PATTERN = re.compile(r"^\s*([a-z]+)\s*=\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(x|k|m|g|ms|s)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class BudgetSpec:
    """A parsed budget: ``relative`` (a factor of the original) or absolute ``value``."""

    metric: str
    value: float
    relative: bool
    text: str

    def limit(self, original: float) -> float:
        """The most the planned model's figure may be, given the original's."""
        if self.metric == "latency":
            return original / self.value if self.relative else self.value
        return original * self.value if self.relative else self.value


def parse_budget(text: str) -> BudgetSpec:
    match = _PATTERN.match(text)
    hint = "write params=0.25x, macs=0.3x, params=200k or latency=2x"
    if not match:
        raise UsageError(f"budget {text!r} is not METRIC=VALUE", hint=hint)
    metric, number, unit = match.group(1).lower(), float(match.group(2)), (match.group(3) or "").lower()
    if metric not in METRICS:
        raise UsageError(f"budget {text!r}: unknown metric {metric!r}", hint=f"metrics: {', '.join(METRICS)}")
    if number <= 0:
        raise UsageError(f"budget {text!r} must be positive")
    if metric == "latency":
        if unit == "x":
            return BudgetSpec(metric, number, True, text.strip())
        if unit in ("ms", "s"):
            return BudgetSpec(metric, number * (1000.0 if unit == "s" else 1.0), False, text.strip())
        raise UsageError(f"budget {text!r}: latency takes a speedup (2x) or a time (5ms)")
    if unit in ("ms", "s"):
        raise UsageError(f"budget {text!r}: {metric} takes a factor (0.25x) or a count (200k)")
    if unit == "x":
        return BudgetSpec(metric, number, True, text.strip())
    return BudgetSpec(metric, number * _SUFFIX[unit], False, text.strip())


def parse_budgets(texts: list[str] | tuple[str, ...]) -> list[BudgetSpec]:
    specs = [parse_budget(t) for t in texts]
    seen: set[str] = set()
    for spec in specs:
        if spec.metric in seen:
            raise UsageError(f"two budgets on {spec.metric}", hint="give each metric at most one --budget")
        seen.add(spec.metric)
    return specs


__all__ = ["METRICS", "BudgetSpec", "parse_budget", "parse_budgets"]
