"""What a rule plugin is, and how rules are found and configured.

A rule has a name, a validated config dataclass (its options), a decision per conv (rewrite, or
skip with a reason), a builder that returns the replacement module with its weights initialized,
and the analytic parameter and MAC counts of that replacement. Rules are plugins in the entry-point
group ``convrewrite.rules``; the built-in rules register through the same group. On the command
line a rule is ``NAME[:key=value,...]``; list values (globs) are separated by ``|``.

Replacement blocks and the statistics fit
------------------------------------------
Fitting solves each replacement from the statistics of the layer it replaces (no data pass per
step; ``convrewrite.recovery.solvers``, ``docs/solvers.md``). A block takes part when it declares
its linear structure:

- ``to_dense() -> (weight, bias)``: the single dense layer the block computes, with the original
  layer's geometry: ``weight`` of shape (out, in, *kernel) for a conv with the same kernel size,
  stride and dilation (padding applied the same way), (out, in) for a Linear; ``bias`` (out,) or
  None. That alone gives the block the generic path: exact least squares in every parameter
  tensor that ``to_dense()`` is linear in and that is small (its Jacobian is probed), L-BFGS on
  the statistics loss for larger tensors when ``to_dense()`` is differentiable, never worse than
  the transferred weights. A block without ``to_dense()`` is fitted by gradient steps.
- optionally an exact solver: ``@register_solver(MyBlock)`` on a function
  ``(block, stats, ridge, rounds) -> (method, losses) | None`` that sets the block's parameters
  from ``stats`` (a ``LayerStatistics``) in place; None hands it to the generic path.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar, Literal, get_args, get_origin

from convrewrite.errors import UsageError

ENTRY_POINT_GROUP = "convrewrite.rules"


@dataclass(frozen=True)
class RuleConfig:
    """Options every rule takes: which layers it may touch."""

    include: tuple[str, ...] = field(
        default=(), metadata={"help": "only layers whose qualified name matches one of these globs"}
    )
    exclude: tuple[str, ...] = field(
        default=(), metadata={"help": "never layers whose qualified name matches one of these globs"}
    )
    min_channels: int = field(default=0, metadata={"help": "skip convs with fewer input or output channels than this"})
    min_speedup: float | None = field(
        default=None,
        metadata={"help": "skip a rewrite whose replacement, timed alone, is not this many times faster"},
    )

    def __post_init__(self) -> None:
        if self.min_channels < 0:
            raise ValueError("min_channels must be >= 0")
        if self.min_speedup is not None and not self.min_speedup > 0:
            raise ValueError("min_speedup must be > 0")

    def with_defaults(self, include: Iterable[str], exclude: Iterable[str], min_channels: int) -> RuleConfig:
        """Fill options the rule spec left empty from the command-line wide selection."""
        changes: dict[str, Any] = {}
        if not self.include and include:
            changes["include"] = tuple(include)
        if exclude:
            changes["exclude"] = tuple(dict.fromkeys((*self.exclude, *exclude)))
        if self.min_channels == 0 and min_channels:
            changes["min_channels"] = min_channels
        return dataclasses.replace(self, **changes) if changes else self


@dataclass(frozen=True)
class Cost:
    """Parameters and MACs (per call) of a layer."""

    params: int
    macs: int


@dataclass(frozen=True)
class Consumer:
    """One use of a conv's output in the traced graph: the node that reads it.

    ``kind`` is ``module`` (a submodule call; ``module`` is that submodule), ``function``,
    ``method`` or ``output`` (the graph returns the value). ``calls`` is how often the model calls
    that submodule on the example input in all (every input, not only this conv's output);
    ``sole_input``: this conv's output is the node's only tensor input.
    """

    name: str
    kind: str
    type: str = ""
    module: Any = None
    calls: int = 1
    sole_input: bool = True


@dataclass
class ConvSite:
    """One module the engine offers to a rule, with the shapes seen on the example input.

    Usually a conv; an ``nn.Linear`` for rules whose ``site_types`` include it. A Linear reads as a
    1x1 conv over the last axis: its features are the channels, ``kernel_elements`` is 1 and every
    leading axis of the output counts as a position.
    ``consumers``: every node of the traced graph that reads the conv's output (one entry per
    use); None when the graph cannot tell (no traced graph, the conv called inside an FX leaf, or
    the conv called more than once), except for the last module of an ``nn.Sequential`` leaf (a
    separable block's pointwise conv), which has the leaf's consumers. Rules that rewrite beyond
    the conv (``fuse-bn``) need it.
    ``tied_to``: the other modules that hold this conv's weight (tied weights).
    """

    name: str
    module: Any
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    calls: int = 1
    aliases: tuple[str, ...] = ()
    explicit: bool = False
    #: For a conv subclass whose forward computes another conv than its attributes say (TF "SAME"
    #: padding at run time, weight standardization): ``module`` is a plain conv computing what it
    #: computes, and this (``engine.conv_subclasses.ComputedConv``) holds the model's own module
    #: and the padding the replacement needs in front.
    computed: Any = None
    consumers: tuple[Consumer, ...] | None = None
    tied_to: tuple[str, ...] = ()

    @property
    def is_linear(self) -> bool:
        """True for a Linear-like site (``in_features``/``out_features``, no kernel)."""
        return hasattr(self.module, "in_features") and not hasattr(self.module, "kernel_size")

    @property
    def conv_dims(self) -> int:
        """Spatial dimensions of the conv; 0 for a Linear."""
        return 0 if self.is_linear else len(self.module.kernel_size)

    @property
    def in_channels(self) -> int:
        return int(self.module.in_features if self.is_linear else self.module.in_channels)

    @property
    def out_channels(self) -> int:
        return int(self.module.out_features if self.is_linear else self.module.out_channels)

    @property
    def kernel_elements(self) -> int:
        return 1 if self.is_linear else int(math.prod(self.module.kernel_size))

    @property
    def output_elements_per_channel(self) -> int:
        """Output positions: batch x spatial for a conv, every axis but the last for a Linear.

        What one output channel costs, per kernel tap. 0 for a layer that never ran on the example
        input (it costs no MACs there).
        """
        if self.output_shape is None:
            return 0
        if self.is_linear:
            return int(math.prod(self.output_shape[:-1]))
        return int(self.output_shape[0]) * int(math.prod(self.output_shape[2:]))


@dataclass
class Replacement:
    """What a rule built: the module (weights initialized) and notes for the report.

    ``also_replace`` maps other qualified module names to the modules that take their place
    (``fuse-bn``: the folded BatchNorm becomes ``nn.Identity``); the engine installs them with the
    conv's replacement, under every name they are registered under. ``reference`` is what the
    kernel error compares the replacement with when that is not the original conv alone (an
    object with ``to_dense()``; ``fuse-bn``: the conv's kernel with the BatchNorm's affine map
    applied, computed in float64).
    """

    module: Any
    notes: dict[str, Any] = field(default_factory=dict)
    also_replace: dict[str, Any] = field(default_factory=dict)
    reference: Any = None


class Rule:
    """Base class of rule plugins. Subclasses set ``name``, ``summary`` and ``config_class``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    config_class: ClassVar[type[RuleConfig]] = RuleConfig
    #: The block classes this rule builds. Optional: the class of every replacement a rule
    #: installs is registered anyway (``convrewrite.layers.registry``); declaring them registers
    #: them before the first rewrite, for code that traces a model already holding them.
    blocks: ClassVar[tuple[type, ...]] = ()
    #: The module types (matched with isinstance) the engine offers this rule as sites. None means
    #: the conv types (Conv1d/2d/3d and the transposed convs); a rule that also handles Linear
    #: layers lists them, e.g. ``(nn.Linear, nn.Conv1d, nn.Conv2d, ...)``. Kept as plain types so
    #: this module does not import torch.
    site_types: ClassVar[tuple[type, ...] | None] = None

    def __init__(self, config: RuleConfig | None = None) -> None:
        self.config = config if config is not None else self.config_class()

    def skip_reason(self, site: ConvSite) -> str | None:
        """Why this rule leaves ``site`` alone, or None to rewrite it."""
        raise NotImplementedError

    def build(self, site: ConvSite) -> Replacement:
        """The replacement for ``site``, weights initialized from the original where possible."""
        raise NotImplementedError

    def cost(self, site: ConvSite) -> Cost:
        """Analytic params and MACs (per call) of the replacement ``build`` returns."""
        raise NotImplementedError

    def spec(self) -> str:
        """The command-line spec that reproduces this rule and its non-default options."""
        return format_spec(self.name, self.config)


# --------------------------------------------------------------------------- selection


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def is_explicit(name: str, patterns: Iterable[str]) -> bool:
    """True when a pattern names this layer exactly (no glob characters)."""
    return any(pattern == name and not any(c in pattern for c in "*?[") for pattern in patterns)


def selection_reason(site_name: str, config: RuleConfig) -> str | None:
    if config.include and not matches_any(site_name, config.include):
        return f"not selected by include={'|'.join(config.include)}"
    if config.exclude and matches_any(site_name, config.exclude):
        return f"excluded by exclude={'|'.join(config.exclude)}"
    return None


# --------------------------------------------------------------------------- options


def _field_types(config_class: type[RuleConfig]) -> dict[str, Any]:
    return typing.get_type_hints(config_class)


def _describe_type(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(annotation))
    if origin is tuple:
        return "glob|glob..."
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        return _describe_type(inner[0]) + " or none" if inner else "none"
    return getattr(annotation, "__name__", str(annotation))


def _coerce(rule: str, key: str, raw: str, annotation: Any) -> Any:
    origin = get_origin(annotation)
    problem = f"rule {rule!r}: option {key}={raw!r}"
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        if raw.lower() in {"none", ""}:
            return None
        return _coerce(rule, key, raw, inner[0])
    if origin is Literal:
        choices = get_args(annotation)
        for choice in choices:
            if str(choice) == raw:
                return choice
        raise UsageError(f"{problem} is not one of {', '.join(str(c) for c in choices)}")
    if origin is tuple:
        return tuple(part for part in raw.split("|") if part)
    if annotation is bool:
        lowered = raw.lower()
        if lowered in {"true", "yes", "1", "on"}:
            return True
        if lowered in {"false", "no", "0", "off"}:
            return False
        raise UsageError(f"{problem} is not a boolean (true/false)")
    if annotation is int:
        try:
            return int(raw)
        except ValueError:
            raise UsageError(f"{problem} is not an integer") from None
    if annotation is float:
        try:
            return float(raw)
        except ValueError:
            raise UsageError(f"{problem} is not a number") from None
    return raw


def build_config(rule_name: str, config_class: type[RuleConfig], options: dict[str, Any]) -> RuleConfig:
    """Validate ``options`` (strings from the command line, or typed values from TOML)."""
    hints = _field_types(config_class)
    fields = {f.name for f in dataclasses.fields(config_class)}
    values: dict[str, Any] = {}
    for raw_key, raw_value in options.items():
        key = raw_key.replace("-", "_")
        if key not in fields:
            known = ", ".join(sorted(f.replace("_", "-") for f in fields))
            raise UsageError(f"rule {rule_name!r} has no option {raw_key!r}", hint=f"its options: {known}")
        annotation = hints[key]
        if isinstance(raw_value, str):
            values[key] = _coerce(rule_name, raw_key, raw_value, annotation)
        elif isinstance(raw_value, list):
            values[key] = tuple(str(v) for v in raw_value)
        elif isinstance(raw_value, bool) and annotation is not bool:
            raise UsageError(f"rule {rule_name!r}: option {raw_key} must be {_describe_type(annotation)}")
        else:
            values[key] = raw_value
    try:
        return config_class(**values)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"rule {rule_name!r}: {exc}") from None


def option_table(config_class: type[RuleConfig]) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) for every option, for ``convrewrite rules``."""
    hints = _field_types(config_class)
    rows = []
    for f in dataclasses.fields(config_class):
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, tuple):
            shown = "|".join(default) if default else "(all)" if f.name == "include" else "(none)"
        else:
            shown = str(default).lower() if isinstance(default, bool) else str(default)
        rows.append((f.name.replace("_", "-"), _describe_type(hints[f.name]), shown, f.metadata.get("help", "")))
    return rows


def format_spec(name: str, config: RuleConfig) -> str:
    parts = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value == f.default:
            continue
        shown = (
            "|".join(value)
            if isinstance(value, tuple)
            else str(value).lower()
            if isinstance(value, bool)
            else str(value)
        )
        parts.append(f"{f.name.replace('_', '-')}={shown}")
    return name + (":" + ",".join(parts) if parts else "")


def config_as_dict(config: RuleConfig) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        result[f.name] = list(value) if isinstance(value, tuple) else value
    return result


# --------------------------------------------------------------------------- registry


@lru_cache(maxsize=1)
def rule_registry() -> dict[str, Any]:
    """Rule name -> entry point, from every installed distribution (built-ins included)."""
    from importlib.metadata import entry_points

    found: dict[str, Any] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, entry)
    return found


def load_rule_class(name: str) -> type[Rule]:
    registry = rule_registry()
    entry = registry.get(name)
    if entry is None:
        known = ", ".join(sorted(registry)) or "none installed"
        close = difflib.get_close_matches(name, list(registry), n=1, cutoff=0.6)
        guess = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(f"unknown rule {name!r}", hint=f"{guess}valid rules: {known}")
    try:
        loaded = entry.load()
    except Exception as exc:
        raise UsageError(f"rule {name!r} could not be loaded from {entry.value}: {exc}") from exc
    if not (isinstance(loaded, type) and issubclass(loaded, Rule)):
        raise UsageError(f"rule {name!r} ({entry.value}) is not a convrewrite.rules.api.Rule subclass")
    return loaded


def split_rule_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``NAME[:key=value,...]`` to (name, {key: value})."""
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if not name:
        raise UsageError(f"empty rule name in {spec!r}", hint="write NAME[:key=value,...]")
    options: dict[str, str] = {}
    if rest.strip():
        for item in rest.split(","):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise UsageError(
                    f"rule option {item!r} in {spec!r} is not key=value",
                    hint="write NAME:key=value,key=value",
                )
            options[key.strip()] = value.strip()
    return name, options


def make_rule(spec: str | dict[str, Any]) -> Rule:
    """A configured rule from a command-line spec or a config-file table ``{name=..., ...}``."""
    if isinstance(spec, str):
        name, options = split_rule_spec(spec)
        raw: dict[str, Any] = dict(options)
    else:
        raw = dict(spec)
        name = str(raw.pop("name", ""))
        if not name:
            raise UsageError("a rule table in the config needs a name")
    rule_class = load_rule_class(name)
    config = build_config(name, rule_class.config_class, raw)
    return rule_class(config)


# --------------------------------------------------------------------------- shared checks


def common_skip_reason(site: ConvSite, config: RuleConfig) -> str | None:
    """The reasons shared by every built-in rule, checked before rule-specific ones."""
    module = site.module
    kind = type(module).__name__
    if "Transpose" in kind:
        return f"transposed conv ({kind}) is not rewritten"
    reason = selection_reason(site.name, config)
    if reason:
        return reason
    if config.min_channels and min(site.in_channels, site.out_channels) < config.min_channels:
        return (
            f"fewer than min-channels={config.min_channels} channels ({site.in_channels} in, {site.out_channels} out)"
        )
    return None
