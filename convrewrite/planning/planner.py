"""Make a plan: sites, candidates, statistics, sensitivity, scores, knapsack, Plan.

The order keeps the expensive parts last: the model is profiled once on its example input, every
candidate's cost comes from ``Rule.cost`` (no weights touched), and a budget below what every
candidate allows is refused with the smallest reachable figure before any data pass. Then one
pass per split collects the layer statistics, a few fit batches give the Hutchinson sensitivity,
each candidate is built and scored from the statistics, and ``allocate`` picks the options.

Guardrails (each protected layer is kept and the plan says why): layers the user's
``include``/``exclude`` leave out; layers called more than once or sharing their weight (one
replacement would serve several uses); conv subclasses whose forward is not their class's conv;
layer types the statistics cannot unfold; layers that never ran on the data. Candidates whose
predicted error is not finite or reaches ``max_error`` (an empty or degenerate replacement that
explains almost nothing of the layer) are dropped.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from convrewrite.core.loading import LoadedModel
from convrewrite.engine.stages.profile import run_profile
from convrewrite.engine.stages.rewrite import collect_sites
from convrewrite.errors import UsageError
from convrewrite.planning import scoring
from convrewrite.planning.allocate import Infeasible, allocate
from convrewrite.planning.budgets import BudgetSpec
from convrewrite.planning.candidates import CandidateSpec, default_candidates, rules_for_site
from convrewrite.planning.plan import Plan, PlanBudget, PlanLayer, PlanOption
from convrewrite.recovery.batches import BatchSource
from convrewrite.recovery.statistics import PatchGeometry
from convrewrite.rules.api import ConvSite, Rule, config_as_dict, make_rule, selection_reason
from convrewrite.rules.low_rank import LowRankRule
from convrewrite.speed.latency import batch_of

#: Points of the explored front the plan keeps (evenly spread over the sweep).
FRONT_POINTS = 8
#: Exact rules offered under a latency budget. ``fuse-bn`` is not: it removes the BatchNorm after
#: the conv, which a per-layer case of the conv alone cannot time, and it would take the layer's
#: one slot from a structural rule.
LATENCY_EXACT_RULES = ("winograd",)


@dataclass
class _Candidate:
    """One option of one layer while planning (the knapsack reads ``costs`` and ``loss``)."""

    spec: str
    rule: Rule | None
    params: int
    macs: int
    error: float = 0.0
    loss: float = 0.0
    latency_ms: float | None = None
    exact: bool = False

    @property
    def costs(self) -> dict[str, float]:
        latency = self.latency_ms if self.latency_ms is not None else 0.0
        return {"params": float(self.params), "macs": float(self.macs), "latency": float(latency)}


@dataclass
class _Layer:
    site: ConvSite
    keep: _Candidate
    options: list[_Candidate]
    protected: str | None = None
    sensitivity: float = 0.0


def _protection(site: ConvSite, include: Sequence[str], exclude: Sequence[str]) -> str | None:
    from convrewrite.rules.api import RuleConfig

    reason = selection_reason(site.name, RuleConfig(include=tuple(include), exclude=tuple(exclude)))
    if reason:
        return reason
    if site.calls == 0:
        return "never called on the example input"
    if site.calls > 1 or site.aliases:
        return f"called {site.calls} times or registered under several names: one replacement would serve every use"
    if site.tied_to:
        return f"weight tied to {', '.join(site.tied_to)}"
    if site.computed is not None:
        return "conv subclass whose forward differs from its class's conv"
    return scoring.supported(site.module)


def _option_spec(rule: Rule) -> tuple[str, dict[str, Any]]:
    """The spec and the non-default, non-selection options of a configured rule."""
    import dataclasses

    options = {}
    defaults = {f.name: f.default for f in dataclasses.fields(rule.config)}
    for key, value in config_as_dict(rule.config).items():
        if key in ("include", "exclude", "min_channels", "min_speedup"):
            continue
        if value != defaults.get(key):
            options[key] = value
    spec = rule.name + (":" + ",".join(f"{k.replace('_', '-')}={v}" for k, v in options.items()) if options else "")
    return spec, options


def _layers(
    model: nn.Module,
    sites: list[ConvSite],
    specs: list[CandidateSpec],
    include: Sequence[str],
    exclude: Sequence[str],
    exact: Sequence[str] = (),
) -> list[_Layer]:
    layers = []
    for site in sites:
        module = site.module
        params = sum(p.numel() for p in module.parameters(recurse=False))
        positions = site.output_elements_per_channel
        groups = getattr(module, "groups", 1)
        macs = positions * site.out_channels * (site.in_channels // groups) * site.kernel_elements
        keep = _Candidate("keep", None, params, macs)
        layer = _Layer(site, keep, [keep], _protection(site, include, exclude))
        if layer.protected is None:
            seen: set[str] = set()
            for rule in rules_for_site(specs, site, (), ()):
                if site.is_linear and rule.site_types is None:
                    continue  # a conv-only rule offered a Linear
                if rule.skip_reason(site) is not None:
                    continue
                cost = rule.cost(site)
                spec, _ = _option_spec(rule)
                if spec in seen or (cost.params >= params and cost.macs >= macs):
                    continue
                seen.add(spec)
                layer.options.append(_Candidate(spec, rule, cost.params, cost.macs))
            for name in exact:  # latency budgets: exact rules are free wins where they measure faster
                rule = make_rule(name)
                rule.config = rule.config.with_defaults(include, exclude, 0)
                if (site.is_linear and rule.site_types is None) or rule.skip_reason(site) is not None:
                    continue
                cost = rule.cost(site)
                layer.options.append(_Candidate(_option_spec(rule)[0], rule, cost.params, cost.macs, exact=True))
            if len(layer.options) == 1:
                layer.protected = "no candidate rule applies or saves anything here"
        layers.append(layer)
    return layers


def _limits(
    budgets: Sequence[BudgetSpec], totals: dict[str, float], fixed: dict[str, float]
) -> tuple[dict[str, float], list[PlanBudget]]:
    limits, plan_budgets = {}, []
    for budget in budgets:
        if budget.metric == "latency":
            continue  # needs the measured layer table and the original's time (finish_plan)
        whole = budget.limit(totals[budget.metric])
        limits[budget.metric] = whole - fixed[budget.metric]
        plan_budgets.append(PlanBudget(budget.metric, budget.text, whole, totals[budget.metric]))
    return limits, plan_budgets


def check_feasible(
    layers: list[_Layer], limits: dict[str, float], plan_budgets: list[PlanBudget], fixed: dict[str, float]
) -> None:
    """A usage error, with the smallest reachable figure, when a budget is below every choice."""
    table = [layer.options for layer in layers]
    try:
        _smallest_check(table, limits)
    except Infeasible as exc:
        budget = next(b for b in plan_budgets if b.metric == exc.metric)
        smallest = exc.smallest + fixed[exc.metric]
        ratio = smallest / budget.original if budget.original else 0.0
        if exc.metric == "latency":
            reach = f"{smallest:.3f} ms, a {budget.original / smallest:.2f}x speedup of {budget.original:.3f} ms"
        else:
            reach = f"{smallest:,.0f} {exc.metric} ({ratio:.3f}x of {budget.original:,.0f})"
        raise UsageError(
            f"budget {budget.text} cannot be met: the smallest reachable is {reach} with these candidates",
            hint="raise the budget, or widen --candidates / --include",
        ) from None


def _smallest_check(table: list[list[_Candidate]], limits: dict[str, float]) -> None:
    from convrewrite.planning.allocate import smallest_reachable

    smallest = {k: smallest_reachable(table, k) for k in limits}
    for k, limit in limits.items():
        if smallest[k] > limit * (1 + 1e-9) + 1e-9:
            raise Infeasible(k, limit, smallest[k], smallest)


@dataclass
class PlanSetup:
    """What planning knows before any data: the sites, their candidates and costs, the limits."""

    loaded: LoadedModel
    layers: list[_Layer]
    totals: dict[str, float]
    fixed: dict[str, float]
    limits: dict[str, float]
    budgets: list[PlanBudget]
    seconds: dict[str, float]
    latency: BudgetSpec | None = None
    latency_backend: str = "torch"
    threads: int = 1


def prepare_plan(
    loaded: LoadedModel,
    budgets: Sequence[BudgetSpec],
    *,
    candidates: Sequence[CandidateSpec] | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    latency_backend: str = "torch",
    threads: int = 1,
) -> PlanSetup:
    """Profile the model and cost every candidate; a usage error now if a size budget cannot be met.

    A latency budget is checked once the layer table is measured (``finish_plan``).
    """
    if not budgets:
        raise UsageError("plan needs at least one --budget", hint="for example --budget params=0.25x")
    latency = next((b for b in budgets if b.metric == "latency"), None)
    if latency is not None:
        from convrewrite.speed.latency import check_backend, fixed_threads

        check_backend(latency_backend)
        fixed_threads(threads)  # validates the count
    start = time.perf_counter()
    model = loaded.model
    model.eval()
    profile = run_profile(model, loaded.inputs)
    sites, _ = collect_sites(model, profile, LowRankRule.site_types)
    specs = list(candidates) if candidates else default_candidates()
    exact = LATENCY_EXACT_RULES if latency is not None else ()
    layers = _layers(model, sites, specs, include, exclude, exact)
    totals = {"params": float(profile.params), "macs": float(profile.macs)}
    fixed = {
        "params": totals["params"] - sum(layer.keep.params for layer in layers),
        "macs": totals["macs"] - sum(layer.keep.macs for layer in layers),
    }
    limits, plan_budgets = _limits(budgets, totals, fixed)
    check_feasible(layers, limits, plan_budgets, fixed)
    seconds = {"candidates": time.perf_counter() - start}
    return PlanSetup(loaded, layers, totals, fixed, limits, plan_budgets, seconds, latency, latency_backend, threads)


def make_plan(
    loaded: LoadedModel,
    data: BatchSource,
    budgets: Sequence[BudgetSpec],
    *,
    candidates: Sequence[CandidateSpec] | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    device: str | None = "auto",
    sensitivity: str = "hutchinson",
    max_error: float = 0.95,
    sensitivity_batches: int = 4,
    latency_backend: str = "torch",
    threads: int = 1,
) -> Plan:
    """The plan for ``loaded.model`` under ``budgets`` (see the module doc). Leaves the model as it is."""
    setup = prepare_plan(
        loaded,
        budgets,
        candidates=candidates,
        include=include,
        exclude=exclude,
        latency_backend=latency_backend,
        threads=threads,
    )
    return finish_plan(
        setup,
        data,
        device=device,
        sensitivity=sensitivity,
        max_error=max_error,
        sensitivity_batches=sensitivity_batches,
    )


def finish_plan(
    setup: PlanSetup,
    data: BatchSource,
    *,
    device: str | None = "auto",
    sensitivity: str = "hutchinson",
    max_error: float = 0.95,
    sensitivity_batches: int = 4,
) -> Plan:
    """Statistics, sensitivity, scores and the knapsack over a prepared setup."""
    from convrewrite.recovery.device import resolve_device

    loaded, layers, fixed, limits = setup.loaded, setup.layers, setup.fixed, setup.limits
    plan_budgets, seconds = setup.budgets, dict(setup.seconds)
    model = loaded.model
    target = resolve_device(device)
    open_layers = [layer for layer in layers if layer.protected is None]
    names = [layer.site.name for layer in open_layers]
    moved = model.to(target)
    start = time.perf_counter()
    statistics = scoring.collect(moved, names, data, device=target)
    seconds["statistics"] = time.perf_counter() - start
    start = time.perf_counter()
    if sensitivity in ("hutchinson", "isotropic"):
        weights = scoring.hutchinson_sensitivity(
            moved, names, data, device=target, max_batches=sensitivity_batches, structured=sensitivity == "hutchinson"
        )
    elif sensitivity == "uniform":
        weights = scoring.uniform_sensitivity(names)
    else:
        raise UsageError(f"unknown sensitivity {sensitivity!r}", hint="hutchinson, isotropic or uniform")
    seconds["sensitivity"] = time.perf_counter() - start

    start = time.perf_counter()
    notes: list[str] = []
    dropped = 0
    for layer in open_layers:
        name = layer.site.name
        stats = statistics.get(name, {})
        if "fit" not in stats:
            layer.protected, layer.options = "never ran on the calibration data", [layer.keep]
            continue
        layer.sensitivity = weights.weight(name)
        reference = PatchGeometry.of(layer.site.module).dense_kernel(layer.site.module).to(target)
        kept = [layer.keep]
        scorer = scoring.LayerScorer(layer.site.module, stats)
        for option in layer.options[1:]:
            assert option.rule is not None
            if option.exact:  # computes the layer's function exactly: no error, no loss
                kept.append(option)
                continue
            with torch.no_grad():
                block = option.rule.build(layer.site).module.to(device=target, dtype=torch.float64)
                option.error, kernel = scorer.score(block)
            if not math.isfinite(option.error) or option.error >= max_error:
                dropped += 1
                continue
            option.loss = weights.loss(name, kernel, reference, option.error)
            kept.append(option)
        layer.options = kept
        # This layer's statistics and shared factorizations are no longer needed: freed now, so
        # that scoring holds at most one layer's factorizations on top of the statistics left.
        del scorer, stats
        statistics.pop(name, None)
        if len(kept) == 1:
            layer.protected = f"every candidate's predicted error reaches {max_error:g}: degenerate"
    if dropped:
        notes.append(f"{dropped} candidates dropped as degenerate (predicted layer error >= {max_error:g})")
    seconds["scoring"] = time.perf_counter() - start

    if setup.latency is not None:
        return _latency_plan(setup, layers, weights, data, notes, seconds, sensitivity)
    start = time.perf_counter()
    check_feasible(layers, limits, plan_budgets, fixed)  # dropped candidates may have raised the floor
    result = allocate([layer.options for layer in layers], limits)
    seconds["allocation"] = time.perf_counter() - start
    return _assemble(setup, layers, result, plan_budgets, weights.samples, data, notes, seconds, sensitivity)


def _assemble(
    setup: PlanSetup,
    layers: list[_Layer],
    result: Any,
    plan_budgets: list[PlanBudget],
    sensitivity_samples: int,
    data: BatchSource,
    notes: list[str],
    seconds: dict[str, float],
    sensitivity: str,
) -> Plan:
    """The ``Plan`` of one allocation over the scored layers."""
    loaded, totals, fixed = setup.loaded, setup.totals, setup.fixed
    plan_layers = []
    for layer, pick in zip(layers, result.picks):
        option = layer.options[pick]
        spec, options = _option_spec(option.rule) if option.rule is not None else ("keep", {})
        plan_layers.append(
            PlanLayer(
                name=layer.site.name,
                type=type(layer.site.module).__name__,
                params_before=layer.keep.params,
                macs_before=layer.keep.macs,
                chosen=PlanOption(
                    spec,
                    option.rule.name if option.rule else None,
                    options,
                    option.params,
                    option.macs,
                    option.error,
                    option.loss,
                    option.latency_ms,
                ),
                candidates=len(layer.options),
                sensitivity=layer.sensitivity,
                protected=layer.protected,
                latency_ms_before=layer.keep.latency_ms,
            )
        )
    step = max(1, math.ceil(len(result.front) / FRONT_POINTS))
    picked = result.front[::step] + ([result.front[-1]] if (len(result.front) - 1) % step else [])
    front = [_front_totals(layers, p.picks, fixed, p.loss) for p in picked]
    plan = Plan(
        model=loaded.display_name,
        budgets=[dataclasses.replace(b) for b in plan_budgets],
        layers=plan_layers,
        original_params=int(totals["params"]),
        original_macs=int(totals["macs"]),
        fixed_params=int(fixed["params"]),
        fixed_macs=int(fixed["macs"]),
        front=front,
        sensitivity=sensitivity,
        scoring=scoring.scoring_method(),
        samples={
            "fit": data.count("fit") or 0,
            "holdout": data.count("holdout") or 0,
            "sensitivity": sensitivity_samples,
        },
        seconds=dict(seconds),
        optimal=result.optimal,
        notes=list(notes),
    )
    for layer in layers:
        plan.options[layer.site.name] = [_plan_option(option) for option in layer.options]
    for budget in plan.budgets:
        if budget.metric != "latency":
            budget.planned = float(plan.params if budget.metric == "params" else plan.macs)
    return plan


def _latency_plan(
    setup: PlanSetup,
    layers: list[_Layer],
    weights: Any,
    data: BatchSource,
    notes: list[str],
    seconds: dict[str, float],
    sensitivity: str,
) -> Plan:
    """Measure the layer table and the original, allocate, build, time, tighten and re-plan."""
    import copy

    from convrewrite.planning import latency as planning_latency

    spec = setup.latency
    assert spec is not None
    backend, threads = setup.latency_backend, setup.threads
    original = copy.deepcopy(setup.loaded.model).to("cpu").eval()
    inputs = setup.loaded.inputs
    start = time.perf_counter()
    notes = notes + planning_latency.time_options(layers, backend=backend, threads=threads, exact=LATENCY_EXACT_RULES)
    seconds["latency_table"] = time.perf_counter() - start
    start = time.perf_counter()
    original_ms = planning_latency.measure_original(original, inputs, backend=backend, threads=threads)
    fixed = dict(setup.fixed)
    fixed["latency"] = max(0.0, original_ms - sum(layer.keep.latency_ms or 0.0 for layer in layers))
    whole = spec.limit(original_ms)
    wanted = original_ms / whole
    budget = PlanBudget("latency", spec.text, whole, original_ms)
    plan_budgets = [*setup.budgets, budget]
    outcome = planning_latency.PlanLatency(backend, threads, batch_of(inputs), original_ms, fixed["latency"], wanted)
    if fixed["latency"] >= whole:
        outcome.notes.append("the time outside the planned layers alone exceeds the budget")
    limits = dict(setup.limits)
    target = wanted
    plans: list[Plan] = []
    table = [layer.options for layer in layers]
    for iteration in range(planning_latency.MAX_ITERATIONS):
        limits["latency"] = original_ms / target - fixed["latency"]
        try:
            check_feasible(layers, limits, plan_budgets, fixed)
        except UsageError:
            if not plans:
                raise
            outcome.notes.append(f"the tightened target {target:.2f}x is out of reach of the layer table: stopped")
            break
        result = allocate(table, limits)
        predicted_ms = fixed["latency"] + sum(
            layer.options[p].latency_ms or 0.0 for layer, p in zip(layers, result.picks)
        )
        step = planning_latency.LatencyIteration(target, original_ms / predicted_ms, predicted_ms=predicted_ms)
        plan = _assemble(setup, layers, result, plan_budgets, weights.samples, data, notes, seconds, sensitivity)
        if plan.rewritten:

            def build(planned: Plan = plan) -> nn.Module:
                return planned.apply(original, example_inputs=inputs, fit=False).model

            report = planning_latency.verify(
                original,
                build,
                inputs,
                backend=backend,
                threads=threads,
            )
            step.measured_speedup = report.speedup
            step.measured_ms = original_ms / report.speedup
        else:
            step.measured_speedup, step.measured_ms = 1.0, original_ms
        outcome.iterations.append(step)
        plans.append(plan)
        if step.measured_speedup >= wanted or not plan.rewritten:
            break
        target = planning_latency.tightened(target, wanted, step.measured_speedup)
        outcome.notes.append(
            f"plan {iteration + 1} measured {step.measured_speedup:.2f}x < {wanted:.2f}x: "
            f"target tightened to {target:.2f}x"
        )
    met = [i for i, it in enumerate(outcome.iterations) if (it.measured_speedup or 0.0) >= wanted]
    outcome.chosen = (
        met[0] if met else max(range(len(plans)), key=lambda i: outcome.iterations[i].measured_speedup or 0.0)
    )
    plan = plans[outcome.chosen]
    seconds["latency_checks"] = time.perf_counter() - start
    plan.seconds = dict(seconds)
    final = outcome.final
    assert final is not None and final.measured_ms is not None
    for plan_budget in plan.budgets:
        if plan_budget.metric == "latency":
            plan_budget.planned = final.measured_ms
    plan.latency = outcome.to_dict()
    return plan


def _plan_option(option: _Candidate) -> PlanOption:
    spec, options = _option_spec(option.rule) if option.rule is not None else ("keep", {})
    rule = option.rule.name if option.rule is not None else None
    return PlanOption(spec, rule, options, option.params, option.macs, option.error, option.loss)


def _front_totals(layers: list[_Layer], picks: Sequence[int], fixed: dict[str, float], loss: float) -> dict[str, float]:
    params = fixed["params"] + sum(layer.options[p].params for layer, p in zip(layers, picks))
    macs = fixed["macs"] + sum(layer.options[p].macs for layer, p in zip(layers, picks))
    return {"params": float(params), "macs": float(macs), "loss": float(loss)}


__all__ = ["make_plan"]
