"""Latency budgets for the planner: a measured per-layer table, then the whole model checked.

``latency=2x`` (or ``latency=5ms``) is planned in three steps, all on one backend (``torch`` eager
or ``onnxruntime``), one thread count and the batch of the example input:

1. **Layer table** (``time_options``): every open layer's candidate blocks, each timed against the
   layer it replaces with the interleaved layer timing of ``speed/latency.py`` (``measure_layers``;
   no other timer). A case's ratio ``after / before`` is measured in one run, so an option's time
   is that ratio times the layer's own time (the median of its ``before`` figures over its cases).
   The exact rules (``winograd``; see ``candidates.EXACT_RULES``) join the table as free wins (no
   predicted error) and stay only where they measure faster than the layer they replace.
2. **Whole-model baseline** (``measure_original``): the original against itself with
   ``measure_latency``; the time the layer table does not explain (pooling, activations, the head,
   protected layers) is the fixed part of the latency budget.
3. **Verification** (``verify``): the planned model is built with ``Plan.apply`` (transfer only,
   the structure is what is timed) and timed against the original with ``measure_latency``. Layer
   times do not add up exactly (fusion, memory traffic, dispatch); when the measured speedup misses
   the target, the internal target is tightened by the measured shortfall (``target x wanted /
   measured``) and the allocation re-run, at most ``MAX_ITERATIONS`` times.

The result lands in ``Plan.latency``: the setting, the original time, and per iteration the
target, the predicted and the measured speedup ("how close the prediction was").
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from convrewrite.core.loading import ExampleInputs
from convrewrite.planning.plan import LatencyIteration, PlanLatency
from convrewrite.speed import latency as timing

#: Plans tried under a latency budget at most (the first, then re-plans with a tighter target).
MAX_ITERATIONS = 4
#: Seconds each layer case runs (per side); the whole-model runs take ``MODEL_RUN_TIME``.
LAYER_RUN_TIME = 0.1
MODEL_RUN_TIME = 1.0


def layer_input(site: Any) -> tuple[torch.Tensor, ...] | None:
    """A seeded input of the shape the layer saw on the example input (None if it never ran)."""
    if site.input_shape is None:
        return None
    dtype = next((p.dtype for p in site.module.parameters() if p.is_floating_point()), torch.float32)
    return timing.layer_inputs([site.input_shape], dtype=dtype)


def time_options(
    layers: Sequence[Any],
    *,
    backend: str,
    threads: int,
    min_run_time: float = LAYER_RUN_TIME,
    exact: Sequence[str] = (),
) -> list[str]:
    """Fill ``latency_ms`` of every option of every open layer (``planner._Layer``); returns notes.

    Protected layers are not timed (their time is part of the fixed share). Options of the
    ``exact`` rules that do not measure faster than their layer are dropped.
    """
    notes: list[str] = []
    for layer in layers:
        if layer.protected is not None or len(layer.options) < 2:
            continue
        inputs = layer_input(layer.site)
        if inputs is None:
            continue
        original = copy.deepcopy(layer.site.module).to("cpu")
        cases, options = [], []
        for option in layer.options[1:]:
            with torch.no_grad():
                block = option.rule.build(layer.site).module
            block = block.to(device="cpu", dtype=inputs[0].dtype)
            cases.append(timing.LayerCase(f"{layer.site.name}:{option.spec}", original, block, inputs))
            options.append(option)
        results = timing.measure_layers(cases, backend=backend, threads=threads, min_run_time=min_run_time)
        keep_ms = statistics.median(result.before.median_ms for result in results)
        layer.keep.latency_ms = keep_ms
        for option, result in zip(options, results):
            option.latency_ms = keep_ms / result.speedup if result.speedup > 0 else float("inf")
        slower = [o for o in options if o.rule is not None and o.rule.name in exact and o.latency_ms >= keep_ms]
        if slower:
            layer.options = [o for o in layer.options if o not in slower]
            notes.append(
                f"{layer.site.name}: {', '.join(o.spec for o in slower)} dropped (measured no faster than the layer)"
            )
    return notes


def measure_original(
    model: nn.Module, inputs: ExampleInputs, *, backend: str, threads: int, min_run_time: float = MODEL_RUN_TIME
) -> float:
    """The original model's median time in ms (timed against itself with ``measure_latency``)."""
    report = timing.measure_latency(model, model, inputs, backend=backend, threads=threads, min_run_time=min_run_time)
    return statistics.mean([report.before.median_ms, report.after.median_ms])


def verify(
    original: nn.Module,
    build: Callable[[], nn.Module],
    inputs: ExampleInputs,
    *,
    backend: str,
    threads: int,
    min_run_time: float = MODEL_RUN_TIME,
) -> timing.LatencyReport:
    """The planned model (``build()``) timed against ``original`` on ``inputs``."""
    return timing.measure_latency(
        original, build(), inputs, backend=backend, threads=threads, min_run_time=min_run_time
    )


def tightened(target: float, wanted: float, measured: float) -> float:
    """The next internal speedup target: the current one scaled by the measured shortfall."""
    return target * wanted / measured if measured > 0 else target * 2.0


__all__ = [
    "MAX_ITERATIONS",
    "LatencyIteration",
    "PlanLatency",
    "layer_input",
    "measure_original",
    "tightened",
    "time_options",
    "verify",
]
