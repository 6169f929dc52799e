"""The latency measurement: interleaving, statistics, threads, batch, backends, and bad input.

The oracle is work of known duration: modules that spin on the clock for a fixed time, so the
speedup a correct measurement must find is known (2 ms against 1 ms: 2x). The bounds are wide
because this machine is shared (a load of 9 on 2 cores stretches short calls unevenly); they still
fail on a swapped ratio, a wrong direction or per-block instead of per-call times. Small run times
keep these quick; they are not timed tests of convrewrite itself.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from convrewrite.core.loading import ExampleInputs
from convrewrite.errors import UsageError
from convrewrite.speed import latency
from convrewrite.speed.latency import (
    LayerCase,
    Timing,
    check_backend,
    fixed_threads,
    interleaved,
    layer_inputs,
    layer_speedup,
    measure_latency,
    min_speedup_reason,
    with_batch,
)

QUICK = {"min_run_time": 0.04, "min_rounds": 6}


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class Spin(nn.Module):
    """Takes ``seconds`` of wall time per call and records the thread count it ran under."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.threads_seen: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.threads_seen.add(torch.get_num_threads())
        spin(self.seconds)
        return x + 1


def test_interleaved_blocks_alternate_and_yield_median_and_iqr() -> None:
    calls: list[str] = []
    functions = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    result = interleaved(functions, threads=1, min_run_time=0.0, min_rounds=4, warmup_calls=2, block_time=0.0)
    # Warm-up (2 calls) and one sizing call each, then one call per block: a b, b a, a b, b a.
    assert calls == ["a", "a", "a", "b", "b", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(result["a"].raw_times) == 4 and result["a"].number_per_run == 1
    timing = Timing.from_measurement(result["a"])
    assert timing.blocks == 4 and timing.iqr_ms == pytest.approx(timing.p75_ms - timing.p25_ms)
    assert timing.p25_ms <= timing.median_ms <= timing.p75_ms


def test_a_known_2x_is_measured_as_about_2x_with_settings_restored() -> None:
    slow, fast = Spin(0.002), Spin(0.001)
    previous = torch.get_num_threads()
    report = measure_latency(slow, fast, ExampleInputs((torch.zeros(3, 2),)), threads=1, **QUICK)
    assert torch.get_num_threads() == previous
    assert slow.threads_seen == {1} and fast.threads_seen == {1}
    assert 1.2 < report.speedup < 4.5
    data = report.to_dict()
    assert (
        data["speedup"]
        == data["model"]["speedup"]
        == pytest.approx(data["model"]["before"]["median_ms"] / data["model"]["after"]["median_ms"])
    )
    assert data["settings"]["backend"] == "torch" and data["settings"]["threads"] == 1
    assert data["settings"]["batch"] == 3 and data["settings"]["versions"]["torch"] == torch.__version__
    assert data["model"]["before"]["median_ms"] > 1.9  # at least the 2 ms it spins (more on a busy machine)
    assert data["model"]["before"]["blocks"] >= QUICK["min_rounds"]
    assert report.lines()[0].startswith("Latency (torch eager, 1 thread, batch 3; median of")


def test_threads_are_set_for_the_measurement_and_restored() -> None:
    model = Spin(0.0002)
    previous = torch.get_num_threads()
    measure_latency(model, Spin(0.0001), ExampleInputs((torch.zeros(1),)), threads=2, **QUICK)
    assert model.threads_seen == {2}
    assert torch.get_num_threads() == previous
    with pytest.raises(UsageError, match="--threads must be a positive integer"), fixed_threads(0):
        pass


def test_layers_are_timed_alone_and_layer_speedup_decides() -> None:
    case = LayerCase("block", Spin(0.004), Spin(0.001), layer_inputs([[2, 3]]))
    inputs = ExampleInputs((torch.zeros(1),))
    report = measure_latency(Spin(0.001), Spin(0.001), inputs, layers=[case], layer_min_run_time=0.04, **QUICK)
    (layer,) = report.layers
    assert layer.name == "block" and layer.input_shapes == [[2, 3]]
    assert 2.0 < layer.speedup < 12.0
    assert 0.5 < report.speedup < 2.0
    assert "block" in report.lines()[1]
    assert 0.15 < layer_speedup(Spin(0.001), Spin(0.004), torch.zeros(2), min_run_time=0.04) < 0.6
    slower = min_speedup_reason(Spin(0.001), Spin(0.003), torch.zeros(2), 1.1, min_run_time=0.04)
    assert slower is not None and slower.startswith("measured speedup 0.") and slower.endswith("< min-speedup 1.1")
    assert min_speedup_reason(Spin(0.003), Spin(0.001), torch.zeros(2), 1.1, min_run_time=0.04) is None


def test_with_batch_repeats_samples_cyclically() -> None:
    x = torch.arange(6.0).reshape(3, 2)
    inputs = ExampleInputs((x, {"mask": torch.ones(3, 1)}), {"extra": torch.zeros(3)})
    bigger = with_batch(inputs, 8)
    assert bigger.args[0].shape == (8, 2)
    assert torch.equal(bigger.args[0][3], x[0]) and torch.equal(bigger.args[0][7], x[1])
    assert bigger.args[1]["mask"].shape == (8, 1) and bigger.kwargs["extra"].shape == (8,)
    assert latency.batch_of(bigger) == 8
    with pytest.raises(UsageError):
        with_batch(inputs, 0)


def test_backend_names_are_checked_before_any_work() -> None:
    with pytest.raises(UsageError, match="is not one of torch, onnxruntime") as caught:
        check_backend("tensorrt")
    assert caught.value.exit_code == 2


def test_onnxruntime_backend_times_both_exported_models_with_n_intra_op_threads(monkeypatch) -> None:
    pytest.importorskip("onnxruntime")
    from convrewrite.export import onnx as onnx_export

    monkeypatch.setattr(onnx_export, "_has_onnxscript", lambda: False)  # the quick exporter
    threads_asked: list[int] = []
    real_session = onnx_export.ort_session

    def recording_session(path, threads=1):  # noqa: ANN001, ANN202
        threads_asked.append(threads)
        return real_session(path, threads)

    monkeypatch.setattr(onnx_export, "ort_session", recording_session)
    torch.manual_seed(0)
    big = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 3, padding=1)).eval()
    small = nn.Sequential(nn.Conv2d(8, 8, 1)).eval()
    report = measure_latency(big, small, ExampleInputs((torch.randn(2, 8, 16, 16),)), backend="onnxruntime", **QUICK)
    assert threads_asked[-2:] == [1, 1]  # the two verification sessions (threads 1) then the timed ones
    assert report.settings.backend == "onnxruntime" and "onnxruntime" in report.settings.versions
    assert report.speedup > 1.5  # 9,216 vs 64 MACs per pixel
    assert any("ONNX opset" in note for note in report.notes)
