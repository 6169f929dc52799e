"""Measured speed: latency of the original and the rewritten model, whole and layer by layer."""

from convrewrite.speed.latency import (
    LatencyReport,
    LatencySettings,
    LayerCase,
    LayerLatency,
    Timing,
    check_backend,
    fixed_threads,
    layer_inputs,
    layer_speedup,
    measure_latency,
    measure_layers,
    min_speedup_reason,
    with_batch,
)

__all__ = [
    "LatencyReport",
    "LatencySettings",
    "LayerCase",
    "LayerLatency",
    "Timing",
    "check_backend",
    "fixed_threads",
    "layer_inputs",
    "layer_speedup",
    "measure_latency",
    "measure_layers",
    "min_speedup_reason",
    "with_batch",
]
