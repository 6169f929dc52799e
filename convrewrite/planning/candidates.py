"""The candidate options of each layer: every structural rule with a grid of its options, plus keep.

Built-in grids (``BUILT_IN_GRIDS``): separable multipliers, group-shuffle and log-group group
counts, channel-wise groups, low-rank ratios. A plugin rule takes part when its class has a
classmethod ``option_grid(site) -> list[dict]`` (option dicts as a rule table takes them). The
exact rules (``fuse-bn``, ``winograd``) change no parameter count and are not candidates of a
size budget. ``--candidates`` narrows the set: a rule name takes its whole grid, a full spec
(``separable:multiplier=2``) just that option.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from convrewrite.errors import UsageError
from convrewrite.rules.api import ConvSite, Rule, load_rule_class, make_rule, rule_registry, split_rule_spec

Grid = Callable[[ConvSite], list[dict[str, Any]]]

BUILT_IN_GRIDS: dict[str, Grid] = {
    "separable": lambda site: [{"multiplier": m} for m in (1, 2, 4)],
    "group-shuffle": lambda site: [{"groups": g} for g in (2, 4, 8, 16)],
    "log-group": lambda site: [{"groups": g} for g in (2, 3, 4)],
    "channelwise": lambda site: [{"groups": g} for g in (1, 2, 4)],
    "low-rank": lambda site: [{"ratio": q} for q in (0.1, 0.2, 0.35, 0.5, 0.7)],
}

#: Rules that never change a layer's size: free wins for latency, not candidates of a size budget.
EXACT_RULES = ("fuse-bn", "winograd")


@dataclass(frozen=True)
class CandidateSpec:
    """A rule name with fixed options (one grid point) or with its grid (``options`` None)."""

    rule: str
    options: tuple[tuple[str, Any], ...] | None = None


def default_candidates() -> list[CandidateSpec]:
    """Every registered rule with a grid: the built-ins first, then plugins with ``option_grid``."""
    specs = [CandidateSpec(name) for name in BUILT_IN_GRIDS]
    for name in sorted(rule_registry()):
        if name in BUILT_IN_GRIDS or name in EXACT_RULES:
            continue
        try:
            rule_class = load_rule_class(name)
        except UsageError:
            continue
        if callable(getattr(rule_class, "option_grid", None)):
            specs.append(CandidateSpec(name))
    return specs


def parse_candidates(texts: Sequence[str]) -> list[CandidateSpec]:
    """``--candidates`` values (comma-separated or repeated): names or full specs, checked now."""
    specs: list[CandidateSpec] = []
    for text in texts:
        for part in [p for p in _split_top(text) if p.strip()]:
            name, options = split_rule_spec(part)
            rule_class = load_rule_class(name)  # unknown names: a usage error with the valid ones
            if options:
                make_rule(part)  # validates the options
                specs.append(CandidateSpec(name, tuple(sorted(options.items()))))
                continue
            if name in EXACT_RULES:
                raise UsageError(f"{name} changes no layer's size: it is not a plan candidate")
            if name not in BUILT_IN_GRIDS and not callable(getattr(rule_class, "option_grid", None)):
                raise UsageError(
                    f"rule {name!r} has no option grid",
                    hint=f"give its options ({name}:key=value) or add a classmethod option_grid(site) to it",
                )
            specs.append(CandidateSpec(name))
    return specs


def _split_top(text: str) -> list[str]:
    """Split ``a,b:x=1,y=2,c`` into specs: a comma starts a new spec unless ``key=value`` follows."""
    parts: list[str] = []
    for piece in text.split(","):
        if parts and "=" in piece and ":" not in piece:
            parts[-1] += "," + piece
        else:
            parts.append(piece)
    return parts


def rules_for_site(
    specs: Sequence[CandidateSpec], site: ConvSite, include: Sequence[str], exclude: Sequence[str]
) -> list[Rule]:
    """The configured rules to try on ``site`` (every grid point of every spec)."""
    rules: list[Rule] = []
    for spec in specs:
        if spec.options is not None:
            grid = [dict(spec.options)]
        elif spec.rule in BUILT_IN_GRIDS:
            grid = BUILT_IN_GRIDS[spec.rule](site)
        else:
            grid = list(load_rule_class(spec.rule).option_grid(site))  # type: ignore[attr-defined]
        for options in grid:
            rule = make_rule({"name": spec.rule, **options})
            rule.config = rule.config.with_defaults(include, exclude, 0)
            rules.append(rule)
    return rules


__all__ = [
    "BUILT_IN_GRIDS",
    "EXACT_RULES",
    "CandidateSpec",
    "default_candidates",
    "parse_candidates",
    "rules_for_site",
]
