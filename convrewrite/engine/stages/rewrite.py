"""Stage ``rewrite[RULE]``, once per rule in command-line order: offer every site to the rule.

A site is a module of a type the rule accepts (``Rule.site_types``, convs by default). The rule
rewrites it or says why not. The replacement is installed at the same qualified name (every alias
of a shared module), so untouched layers keep their state_dict keys and a module called twice
stays one module. Later rules see the layers earlier rules produced. The stage ``ensures`` that
every layer it rewrote keeps its output shapes on the example input.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from convrewrite.core.modules import CONV_TYPES, install, module_aliases, parameter_users, tie_mismatch
from convrewrite.core.profiling import CallRecord, ModelProfile
from convrewrite.core.threads import small_work
from convrewrite.engine.consumers import conv_consumers, last_of_sequential
from convrewrite.engine.conv_subclasses import finish_replacement, original_module, resolve_conv_subclasses
from convrewrite.engine.stages.base import Stage, StageOutcome, register_stage
from convrewrite.engine.stages.profile import run_profile
from convrewrite.engine.state import RunState
from convrewrite.errors import ModelError, UsageError, describe
from convrewrite.layers.dense import kernel_error
from convrewrite.layers.registry import register_block, register_replacement
from convrewrite.report.log import RewriteRecord, SkipRecord
from convrewrite.rules.api import ConvSite, Replacement, Rule, is_explicit, selection_reason


def collect_sites(
    model: nn.Module, current: ModelProfile, site_types: tuple[type, ...] | None = None
) -> tuple[list[ConvSite], list[SkipRecord]]:
    """Every module of ``site_types`` (the rule's ``Rule.site_types``; default: the conv types) with
    the shapes of its first call on the example input.

    A conv subclass whose forward computes something else than its class's stock conv is offered
    as the plain conv it really computes, or left out with the reason (``conv_subclasses.py``).
    """
    aliases = module_aliases(model)
    sites: list[ConvSite] = []
    calls_of: dict[str, list[CallRecord]] = {}
    for record in current.records:
        if record.called:
            calls_of.setdefault(record.name, []).append(record)
    wanted = site_types if site_types is not None else CONV_TYPES
    for name, module in model.named_modules():
        if not isinstance(module, wanted):
            continue
        calls = calls_of.get(name, [])
        first = calls[0] if calls else None
        input_shape = tuple(first.input_shapes[0]) if first and first.input_shapes else None
        output_shape = tuple(first.output_shapes[0]) if first and first.output_shapes else None
        names = aliases.get(id(module), [name])
        sites.append(
            ConvSite(
                name=name,
                module=module,
                input_shape=input_shape,
                output_shape=output_shape,
                calls=len(calls),
                aliases=tuple(n for n in names if n != name),
            )
        )
    shapes = {n: [tuple(r.input_shapes[0]) for r in calls if r.input_shapes] for n, calls in calls_of.items()}
    sites, unresolved = resolve_conv_subclasses(model, sites, shapes)
    return sites, [SkipRecord(u.name, "*", u.type, u.reason) for u in unresolved]


def functional_conv_notes(model: nn.Module, current: ModelProfile) -> list[SkipRecord]:
    """Convolutions computed by ``F.conv*d`` inside a forward: reported, never rewritten."""
    conv_modules = {name for name, module in model.named_modules() if isinstance(module, CONV_TYPES)}
    notes: dict[tuple[str, str], SkipRecord] = {}
    for record in current.records:
        if record.macs_by_kind.get("convolution") and record.name not in conv_modules:
            owner = record.name or "(model)"
            notes[(owner, record.type)] = SkipRecord(
                owner, "*", record.type, "functional convolution (F.conv*d in forward), not a module: left as is"
            )
    return list(notes.values())


def weight_read_directly(model: nn.Module, name: str) -> str | None:
    """Why ``name`` cannot be swapped when its parent's forward reads ``<name>.weight`` itself.

    nn.TransformerEncoderLayer's fused fast path reads ``self.linear1.weight`` and hands it to one
    ATen op; a user module may tie or reuse a weight the same way. A replacement block has no
    ``weight``, so swapping such a child would break (or silently bypass) the parent's forward.
    """
    parent_name, _, attribute = name.rpartition(".")
    if not attribute:
        return None
    parent = model.get_submodule(parent_name) if parent_name else model
    source = _forward_source(type(parent))
    if source is not None and f"self.{attribute}.weight" in source:
        return f"{type(parent).__name__}.forward reads {attribute}.weight directly: replacing the module would break it"
    return None


_sources: dict[type, str | None] = {}


def _forward_source(cls: type) -> str | None:
    if cls not in _sources:
        try:
            _sources[cls] = inspect.getsource(cls.forward)  # type: ignore[attr-defined]
        except (OSError, TypeError, AttributeError):
            _sources[cls] = None
    return _sources[cls]


def _too_slow(
    model: nn.Module,
    module: nn.Module,
    new_module: nn.Module,
    replacement: Replacement,
    site: ConvSite,
    min_speedup: float,
    threads: int,
) -> str | None:
    """The ``min-speedup`` option: the skip reason when the replacement, timed alone on an input
    of the recorded shape, is not ``min_speedup`` times faster than what it replaces."""
    from convrewrite.speed.latency import layer_inputs, min_speedup_reason

    original = module
    for other_name in replacement.also_replace:  # fuse-bn: the conv and the BatchNorm it absorbs
        original = nn.Sequential(original, model.get_submodule(other_name))
    assert site.input_shape is not None
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    inputs = layer_inputs([site.input_shape], dtype=dtype)
    return min_speedup_reason(original, new_module, inputs, min_speedup, threads=threads)


@dataclass
class RuleOutcome:
    """What one rule did: the layers it rewrote, those it left alone, the originals it replaced."""

    rewrites: list[RewriteRecord] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    originals: dict[str, nn.Module] = field(default_factory=dict)
    #: Site name -> the module whose output its replacement now produces (see RunState.output_of).
    output_of: dict[str, str | None] = field(default_factory=dict)
    #: Convs no rule may touch (conv subclasses that compute something else), reported once.
    unresolved: list[SkipRecord] = field(default_factory=list)


def _refuse_if_named(rule: Rule, name: str, reason: str, hint: str) -> None:
    """A layer the rule cannot rewrite is a usage error when the user named it exactly in the
    rule's include (and did not exclude it); otherwise the caller skips it with ``reason``."""
    if is_explicit(name, rule.config.include) and selection_reason(name, rule.config) is None:
        raise UsageError(f"rule {rule.name!r} cannot rewrite {name}, which you named explicitly: {reason}", hint=hint)


@small_work()  # rule work is many small factorisations: one thread each (core/threads.py)
def apply_rule(
    rule: Rule,
    model: nn.Module,
    current: ModelProfile,
    earlier: list[RewriteRecord],
    graph_module: fx.GraphModule | None = None,
    threads: int = 1,
) -> RuleOutcome:
    """Offer every site to ``rule`` and install its replacements; returns what it did.

    ``graph_module`` (the original trace) tells each site who reads its output (``consumers``),
    for rules that rewrite beyond the conv (fuse-bn folds the BatchNorm that alone reads it).
    """
    outcome = RuleOutcome()
    for block in rule.blocks:
        register_block(block)
    users = parameter_users(model)
    done: dict[int, nn.Module] = {}
    sites, outcome.unresolved = collect_sites(model, current, rule.site_types)
    for record in outcome.unresolved:  # conv subclasses no rule may touch
        _refuse_if_named(rule, record.name, record.reason, hint="leave that layer out of include")
    # Rules replace modules in place, so the original trace's names still hold; modules are
    # looked up live (engine/consumers.py).
    consumers = conv_consumers(graph_module, model, current)
    for site in sites:
        site.consumers = consumers.get(site.name)
        holders = users.get(id(site.module.weight), [])
        site.tied_to = tuple(n for n, m in holders if m is not site.module)
    for site in sites:
        module = site.module
        if id(module) in done:
            continue
        site.explicit = is_explicit(site.name, rule.config.include)
        if not site.name:
            outcome.skipped.append(
                SkipRecord("(model)", rule.name, type(module).__name__, "the model itself is a single conv")
            )
            continue
        reason = weight_read_directly(model, site.name) or rule.skip_reason(site)
        # Tied weights: only rewrite when every holder is an identical conv (then one shared
        # replacement keeps the tie); otherwise rewriting would silently untie them.
        tied_with: list[nn.Module] = []
        if reason is None:
            holders = users.get(id(module.weight), [])
            others = [(n, m) for n, m in holders if m is not module]
            if others:
                mismatched = [tie_mismatch(module, n, m) for n, m in others]
                if any(mismatched):
                    reason = f"weight is tied to {', '.join(m for m in mismatched if m)}; rewriting would untie it"
                else:
                    tied_with = [m for _, m in others]
        if reason is not None:
            _refuse_if_named(
                rule, site.name, reason, hint="change the rule's options or leave that layer out of include"
            )
            outcome.skipped.append(SkipRecord(site.name, rule.name, type(original_module(site)).__name__, reason))
            continue
        try:
            cost = rule.cost(site)
            replacement = rule.build(site)
        except (ModelError, UsageError):
            raise
        except Exception as exc:
            raise ModelError(f"rule {rule.name!r} failed on layer {site.name}: {describe(exc)}") from exc
        new_module = finish_replacement(site, replacement.module, replacement.notes)
        if rule.config.min_speedup is not None and site.input_shape is not None:
            slow = _too_slow(model, module, new_module, replacement, site, rule.config.min_speedup, threads)
            if slow is not None:
                outcome.skipped.append(SkipRecord(site.name, rule.name, type(original_module(site)).__name__, slow))
                continue
        for part in new_module.modules():
            register_replacement(part)  # traced as a leaf, written out as a named layer
        if site.calls == 0:
            replacement.notes.setdefault(
                "unverified", "not called on the example input: shapes and output were not checked for this layer"
            )
        # A rule may name what the replacement must equal (fuse-bn: the conv and BN folded).
        reference = replacement.reference if replacement.reference is not None else module
        try:
            error = kernel_error(new_module, reference)
        except (TypeError, ValueError):
            error = None
        all_names = [site.name, *site.aliases]
        aliases = module_aliases(model)
        for tied in tied_with:
            all_names.extend(n for n in aliases.get(id(tied), []) if n not in all_names)
            done[id(tied)] = new_module
        params_before, macs_before = current.subtree_totals(site.name)
        for tied in tied_with:
            for tied_name in aliases.get(id(tied), []):
                macs_before += current.subtree_totals(tied_name)[1]
        if not any(site.name.startswith(previous.name + ".") for previous in earlier):
            outcome.originals[site.name] = reference
        for name in all_names:
            install(model, name, new_module)
        # Other modules the rule replaces (fuse-bn: the folded BatchNorm becomes nn.Identity).
        for other_name, other_module in replacement.also_replace.items():
            other = model.get_submodule(other_name)
            for alias in module_aliases(model).get(id(other), [other_name]):
                install(model, alias, other_module)
            replacement.notes.setdefault("also_replaced", {})[other_name] = (
                f"{type(other).__name__} -> {type(other_module).__name__}"
            )
        # Modules the replacement absorbed (they now run as Identity): its output is theirs.
        absorbed = [n for n, m in replacement.also_replace.items() if isinstance(m, nn.Identity)]
        if absorbed:
            outcome.output_of[site.name] = absorbed[0] if len(absorbed) == 1 else None
        done[id(module)] = new_module
        outcome.rewrites.append(
            RewriteRecord(
                name=site.name,
                rule=rule.name,
                type_before=type(original_module(site)).__name__,
                type_after=type(new_module).__name__,
                calls=site.calls,
                params_before=params_before,
                macs_before=macs_before,
                analytic_params=cost.params,
                analytic_macs=cost.macs * max(site.calls, 1),
                kernel_error=error,
                aliases=all_names[1:],
                notes=dict(replacement.notes),
            )
        )
    return outcome


@register_stage
class RewriteStage(Stage):
    name = "rewrite"
    requires = ("trace", "current")
    ensures = ("current",)

    def __init__(self, rule: Rule, first: bool) -> None:
        self.rule = rule
        self.first = first
        self.records: list[RewriteRecord] = []

    @property
    def label(self) -> str:
        return f"rewrite[{self.rule.name}]"

    @classmethod
    def plan(cls, state: RunState) -> list[Stage]:
        return [cls(rule, index == 0) for index, rule in enumerate(state.rules)]

    def run(self, state: RunState) -> StageOutcome:
        assert state.current is not None
        if self.first and state.settings.keep_reference and state.reference is None:
            state.reference = _frozen_copy(state.model)
        functional = functional_conv_notes(state.model, state.current) if self.first else []
        graph_module = state.trace.graph_module if state.trace is not None else None
        threads = state.settings.threads
        outcome = apply_rule(self.rule, state.model, state.current, state.log.rewrites, graph_module, threads)
        if self.first:
            state.log.skipped.extend([*outcome.unresolved, *functional])
        for name, module in outcome.originals.items():
            state.originals.setdefault(name, module)
        for name, target in outcome.output_of.items():
            state.output_of.setdefault(name, target)
            # The last conv of an earlier rule's block absorbed a module (separable then fuse-bn):
            # the block's output is now that module's output too.
            for outer in state.originals:
                if name.startswith(outer + ".") and last_of_sequential(state.model, outer) == name:
                    state.output_of.setdefault(outer, target)
        state.log.skipped.extend(outcome.skipped)
        current = run_profile(state.model, state.loaded.inputs, "the rewritten model")
        for record in outcome.rewrites:
            record.params_after, record.macs_after = current.subtree_totals(record.name)
            for alias in record.aliases:
                if current.first_call(alias) is not None:
                    record.macs_after += current.subtree_totals(alias)[1]
        state.log.rewrites.extend(outcome.rewrites)
        state.current = state.after = current
        self.records = outcome.rewrites
        return StageOutcome(
            bool(outcome.rewrites), f"{len(outcome.rewrites)} rewritten, {len(outcome.skipped)} skipped"
        )

    def check_ensures(self, state: RunState) -> None:
        super().check_ensures(state)
        assert state.before is not None and state.current is not None
        for record in self.records:
            old = state.before.first_call(record.name)
            new = state.current.first_call(record.name)
            if old and new and old.output_shapes != new.output_shapes and old.name == record.name:
                raise ModelError(
                    f"rule {record.rule!r} changed the output shape of {record.name}: "
                    f"{old.output_shapes} -> {new.output_shapes}"
                )


def _frozen_copy(model: nn.Module) -> nn.Module:
    """The original model, kept for fitting, distillation and fidelity on calibration data."""
    try:
        reference = copy.deepcopy(model)
    except Exception as exc:
        raise ModelError(
            f"the model cannot be copied (copy.deepcopy failed: {describe(exc)}), "
            "which fitting and distillation need to keep the original as a reference"
        ) from exc
    reference.eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    return reference
