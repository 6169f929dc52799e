"""Latency of the original and the rewritten model, measured side by side in one run.

Fewer MACs is not the same as faster. This module times both models on the example input, in the
same process, interleaved: after a warm-up, blocks of calls alternate A, B, B, A, ... so that a
neighbour's load or a frequency change hits both alike. Each block runs enough calls to last
``block_time`` seconds; rounds continue until both sides have run ``min_run_time`` seconds and
at least ``min_rounds`` blocks (at most ``max_rounds``). The per-call times of the blocks become a
``torch.utils.benchmark`` ``Measurement``: median and interquartile range (IQR), and its warning
when the IQR is a large share of the median (a noisy machine). The speedup is
``median_before / median_after``, a ratio measured in one run, which is why it transfers across
machines better than milliseconds do.

Settings: a fixed thread count (``torch.set_num_threads``, restored afterwards; ONNX Runtime's
``intra_op_num_threads``), the batch of the example input (``with_batch`` makes another), gradients
off, models in eval mode. Backends: ``torch`` (eager) and ``onnxruntime`` (both models exported with
export/onnx.py into a temporary directory, verified, and run by an ``InferenceSession`` on the CPU
provider).

Per layer: each rewritten layer and its replacement, timed alone the same way on an input of the
shape recorded for its first call (``layer_inputs``). ``layer_speedup`` is the quick form of that
for a rule's ``min-speedup`` decision.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.benchmark.utils.common import Measurement, TaskSpec

from convrewrite.core.loading import ExampleInputs
from convrewrite.core.threads import torch_threads
from convrewrite.errors import UsageError

BACKENDS = ("torch", "onnxruntime")


# --------------------------------------------------------------------------- data


@dataclass
class Timing:
    """One side of a comparison: per-call time statistics in milliseconds."""

    median_ms: float
    iqr_ms: float
    p25_ms: float
    p75_ms: float
    blocks: int
    calls_per_block: int
    noisy: bool = False

    @classmethod
    def from_measurement(cls, measurement: Measurement) -> Timing:
        # The quartiles as Measurement computes its median and IQR (linear interpolation).
        times = torch.tensor(sorted(measurement.times), dtype=torch.float64)
        return cls(
            median_ms=measurement.median * 1e3,
            iqr_ms=measurement.iqr * 1e3,
            p25_ms=float(times.quantile(0.25)) * 1e3,
            p75_ms=float(times.quantile(0.75)) * 1e3,
            blocks=len(measurement.raw_times),
            calls_per_block=measurement.number_per_run,
            noisy=measurement.has_warnings,
        )

    @property
    def relative_iqr(self) -> float:
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_ms": self.median_ms,
            "iqr_ms": self.iqr_ms,
            "p25_ms": self.p25_ms,
            "p75_ms": self.p75_ms,
            "blocks": self.blocks,
            "calls_per_block": self.calls_per_block,
            "noisy": self.noisy,
        }

    def describe(self) -> str:
        return f"{self.median_ms:,.3g} ms (IQR {self.iqr_ms:.2g})"


def _ratio(before: Timing, after: Timing) -> float:
    return before.median_ms / after.median_ms if after.median_ms > 0 else math.inf


@dataclass
class LatencySettings:
    """How the figures were measured (part of every latency report: numbers need their setting)."""

    backend: str
    threads: int
    batch: int | None
    min_run_time_s: float
    min_rounds: int
    warmup_calls: int
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "threads": self.threads,
            "batch": self.batch,
            "min_run_time_s": self.min_run_time_s,
            "min_rounds": self.min_rounds,
            "warmup_calls": self.warmup_calls,
            "method": "interleaved blocks A,B,B,A..., per-call median and IQR (torch.utils.benchmark Measurement)",
            "versions": dict(self.versions),
        }

    def describe(self) -> str:
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        backend = "torch eager" if self.backend == "torch" else "ONNX Runtime (CPU)"
        batch = f", batch {self.batch}" if self.batch is not None else ""
        return f"{backend}, {threads}{batch}"


@dataclass
class LayerLatency:
    """One rewritten layer and its replacement, timed alone."""

    name: str
    type_before: str
    type_after: str
    input_shapes: list[list[int]]
    before: Timing
    after: Timing

    @property
    def speedup(self) -> float:
        return _ratio(self.before, self.after)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type_before": self.type_before,
            "type_after": self.type_after,
            "input_shapes": self.input_shapes,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "speedup": self.speedup,
        }


@dataclass
class LatencyReport:
    """Whole-model and per-layer latency, before and after, with the settings."""

    settings: LatencySettings
    before: Timing
    after: Timing
    layers: list[LayerLatency] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return _ratio(self.before, self.after)

    def layer(self, name: str) -> LayerLatency | None:
        return next((layer for layer in self.layers if layer.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings.to_dict(),
            "model": {"before": self.before.to_dict(), "after": self.after.to_dict(), "speedup": self.speedup},
            "speedup": self.speedup,
            "layers": [layer.to_dict() for layer in self.layers],
            "notes": list(self.notes),
        }

    def lines(self) -> list[str]:
        """The table footer: the setting, the whole-model figures and the speedup, then notes."""
        slower = f" ({1 / self.speedup:.2f}x slower)" if 0 < self.speedup < 1 else ""
        lines = [
            f"Latency ({self.settings.describe()}; median of {self.before.blocks} interleaved runs, IQR): "
            f"{self.before.describe()} -> {self.after.describe()}, speedup {self.speedup:.2f}x{slower}"
        ]
        if self.layers:
            shown = ", ".join(f"{layer.name} {layer.speedup:.2f}x" for layer in self.layers)
            lines.append(f"Per-layer speedup (each layer timed alone): {shown}")
        lines += [f"note: {note}" for note in self.notes]
        return lines


@dataclass
class LayerCase:
    """What ``measure_layers`` times: a layer, what replaced it, and an input for it."""

    name: str
    original: nn.Module
    replacement: nn.Module
    inputs: tuple[torch.Tensor, ...]


# --------------------------------------------------------------------------- settings helpers


def fixed_threads(threads: int) -> torch_threads:
    """``torch.set_num_threads(threads)`` for the duration, then the previous count again."""
    if threads < 1:
        raise UsageError(f"--threads must be a positive integer, got {threads}")
    return torch_threads(threads)


def with_batch(inputs: ExampleInputs, batch: int) -> ExampleInputs:
    """The example input with batch size ``batch``: samples repeated cyclically along dim 0."""
    if batch < 1:
        raise UsageError(f"batch must be a positive integer, got {batch}")

    def resize(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                return value
            index = torch.arange(batch, device=value.device) % int(value.shape[0])
            return value.index_select(0, index)
        if isinstance(value, tuple):
            return tuple(resize(v) for v in value)
        if isinstance(value, list):
            return [resize(v) for v in value]
        if isinstance(value, dict):
            return {k: resize(v) for k, v in value.items()}
        return value

    return ExampleInputs(
        tuple(resize(a) for a in inputs.args),
        {k: resize(v) for k, v in inputs.kwargs.items()},
        source=inputs.source,
        arg_names=inputs.arg_names,
    )


def batch_of(inputs: ExampleInputs) -> int | None:
    tensors = [t for _, t in inputs.tensors() if t.dim() > 0]
    return int(tensors[0].shape[0]) if tensors else None


def layer_inputs(
    shapes: Sequence[Sequence[int]],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Seeded random inputs of the recorded shapes (``CallRecord.input_shapes`` of the layer's first call)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return tuple(torch.randn(*shape, generator=generator, dtype=dtype).to(device) for shape in shapes)


def _versions(backend: str) -> dict[str, str]:
    versions: dict[str, str] = {"torch": str(torch.__version__)}
    if backend == "onnxruntime":
        import onnxruntime

        versions["onnxruntime"] = str(onnxruntime.__version__)
    return versions


def check_backend(backend: str) -> None:
    """Validate ``--latency-backend`` (and that the onnx extra is there) before any work."""
    if backend not in BACKENDS:
        raise UsageError(f"--latency-backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "onnxruntime":
        from convrewrite.export.onnx import require_onnx

        require_onnx("--latency-backend onnxruntime")


# --------------------------------------------------------------------------- the measurement


def _per_call_seconds(function: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls


def interleaved(
    functions: dict[str, Callable[[], Any]],
    *,
    threads: int,
    min_run_time: float = 1.0,
    min_rounds: int = 10,
    max_rounds: int = 200,
    block_time: float = 0.05,
    warmup_calls: int = 3,
) -> dict[str, Measurement]:
    """Time several functions side by side: warm-up, then alternating blocks of calls.

    The block order reverses every round (A B, B A, ...), so a slow drift of the machine
    weighs on every function alike. Returns one ``Measurement`` per function (per-call times).
    """
    names = list(functions)
    numbers: dict[str, int] = {}
    for name in names:
        for _ in range(warmup_calls):
            functions[name]()
        # Calls per block: enough for block_time, measured once after the warm-up.
        once = _per_call_seconds(functions[name], 1)
        numbers[name] = max(1, int(block_time / max(once, 1e-9)))
    raw: dict[str, list[float]] = {name: [] for name in names}
    spent: dict[str, float] = dict.fromkeys(names, 0.0)
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or min(spent.values()) < min_run_time):
        order = names if rounds % 2 == 0 else names[::-1]
        for name in order:
            number = numbers[name]
            start = time.perf_counter()
            for _ in range(number):
                functions[name]()
            elapsed = time.perf_counter() - start
            raw[name].append(elapsed)
            spent[name] += elapsed
        rounds += 1
    return {
        name: Measurement(
            number_per_run=numbers[name],
            raw_times=raw[name],
            task_spec=TaskSpec(stmt=name, setup="", num_threads=threads),
        )
        for name in names
    }


def _torch_runner(model: nn.Module, inputs: ExampleInputs) -> Callable[[], Any]:
    model.eval()

    def run() -> Any:
        with torch.no_grad():
            return inputs.call(model)

    return run


def _session_runner(session: Any, feed: dict[str, Any]) -> Callable[[], Any]:
    def run() -> Any:
        return session.run(None, feed)

    return run


def measure_latency(
    original: nn.Module,
    rewritten: nn.Module,
    inputs: ExampleInputs,
    *,
    backend: str = "torch",
    threads: int = 1,
    layers: Sequence[LayerCase] = (),
    min_run_time: float = 1.0,
    min_rounds: int = 10,
    layer_min_run_time: float = 0.3,
    warmup_calls: int = 3,
) -> LatencyReport:
    """Time ``original`` and ``rewritten`` on ``inputs`` (batch as given), interleaved; and each layer case.

    ``original`` must be a separate copy: the engine rewrites the loaded model in place, so keep a
    ``copy.deepcopy`` of it from before ``analyse``.
    """
    check_backend(backend)
    notes: list[str] = []
    with fixed_threads(threads):
        if backend == "torch":
            functions = {"before": _torch_runner(original, inputs), "after": _torch_runner(rewritten, inputs)}
            measured = interleaved(
                functions, threads=threads, min_run_time=min_run_time, min_rounds=min_rounds, warmup_calls=warmup_calls
            )
        else:
            from convrewrite.export.onnx import export_onnx, ort_feed, ort_session

            with tempfile.TemporaryDirectory(prefix="convrewrite-latency-") as directory:
                sessions = {}
                for label, model in (("before", original), ("after", rewritten)):
                    exported = export_onnx(model, inputs, Path(directory) / f"{label}.onnx")
                    sessions[label] = ort_session(exported.path, threads)
                    notes.append(f"{label}: ONNX opset {exported.opset} ({exported.exporter} exporter)")
                functions = {label: _session_runner(s, ort_feed(s, inputs)) for label, s in sessions.items()}
                measured = interleaved(
                    functions,
                    threads=threads,
                    min_run_time=min_run_time,
                    min_rounds=min_rounds,
                    warmup_calls=warmup_calls,
                )
        layer_results = measure_layers(
            layers, backend=backend, threads=threads, min_run_time=layer_min_run_time, _threads_fixed=True
        )
    before, after = Timing.from_measurement(measured["before"]), Timing.from_measurement(measured["after"])
    if before.noisy or after.noisy:
        worst = max(before.relative_iqr, after.relative_iqr)
        notes.append(f"noisy machine: the IQR is up to {worst:.0%} of the median; compare speedups, not milliseconds")
    settings = LatencySettings(
        backend=backend,
        threads=threads,
        batch=batch_of(inputs),
        min_run_time_s=min_run_time,
        min_rounds=min_rounds,
        warmup_calls=warmup_calls,
        versions=_versions(backend),
    )
    return LatencyReport(settings, before, after, layer_results, notes)


def measure_layers(
    cases: Sequence[LayerCase],
    *,
    backend: str = "torch",
    threads: int = 1,
    min_run_time: float = 0.3,
    min_rounds: int = 10,
    block_time: float = 0.01,
    _threads_fixed: bool = False,
) -> list[LayerLatency]:
    """Each case's original and replacement timed alone, interleaved, on the case's input.

    Blocks are shorter than for whole models (a layer is one of many: ``min-speedup`` measures
    every candidate layer, so each costs about ``min_run_time`` x 2 seconds).
    """
    if not cases:
        return []
    context = contextlib.nullcontext() if _threads_fixed else fixed_threads(threads)
    results = []
    with context:
        for case in cases:
            example = ExampleInputs(tuple(case.inputs))
            if backend == "torch":
                functions = {
                    "before": _torch_runner(case.original, example),
                    "after": _torch_runner(case.replacement, example),
                }
                measured = interleaved(
                    functions, threads=threads, min_run_time=min_run_time, min_rounds=min_rounds, block_time=block_time
                )
            else:
                from convrewrite.export.onnx import export_onnx, ort_feed, ort_session

                with tempfile.TemporaryDirectory(prefix="convrewrite-layer-") as directory:
                    sessions = {}
                    for label, module in (("before", case.original), ("after", case.replacement)):
                        exported = export_onnx(module, example, Path(directory) / f"{label}.onnx")
                        sessions[label] = ort_session(exported.path, threads)
                    functions = {label: _session_runner(s, ort_feed(s, example)) for label, s in sessions.items()}
                    measured = interleaved(
                        functions,
                        threads=threads,
                        min_run_time=min_run_time,
                        min_rounds=min_rounds,
                        block_time=block_time,
                    )
            results.append(
                LayerLatency(
                    name=case.name,
                    type_before=type(case.original).__name__,
                    type_after=type(case.replacement).__name__,
                    input_shapes=[list(t.shape) for t in case.inputs],
                    before=Timing.from_measurement(measured["before"]),
                    after=Timing.from_measurement(measured["after"]),
                )
            )
    return results


def layer_speedup(
    original: nn.Module,
    replacement: nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    threads: int = 1,
    min_run_time: float = 0.1,
) -> float:
    """Measured speedup of ``replacement`` over ``original`` on ``inputs`` (torch eager): the
    figure a rule's ``min-speedup`` option compares with."""
    tensors = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    case = LayerCase("layer", original, replacement, tensors)
    (result,) = measure_layers([case], threads=threads, min_run_time=min_run_time)
    return result.speedup


def min_speedup_reason(
    original: nn.Module,
    replacement: nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    min_speedup: float,
    *,
    threads: int = 1,
    min_run_time: float = 0.1,
) -> str | None:
    """The skip reason for a rule option ``min-speedup=X``: None when the replacement is at least
    X times faster than the original on ``inputs`` (torch eager, ``threads`` threads)."""
    speedup = layer_speedup(original, replacement, inputs, threads=threads, min_run_time=min_run_time)
    if speedup >= min_speedup:
        return None
    return f"measured speedup {speedup:.2f}x < min-speedup {min_speedup:g}"


__all__ = [
    "BACKENDS",
    "LatencyReport",
    "LatencySettings",
    "LayerCase",
    "LayerLatency",
    "Timing",
    "batch_of",
    "check_backend",
    "fixed_threads",
    "interleaved",
    "layer_inputs",
    "layer_speedup",
    "measure_latency",
    "measure_layers",
    "min_speedup_reason",
    "with_batch",
]
