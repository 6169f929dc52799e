"""Latency budgets of ``convrewrite plan``: the layer table, the whole-model check, the re-plan.

The timers are replaced by a fake whose figures are known by hand: a module's time is its
parameter count times ``MS_PER_PARAM`` (plus a fixed ``OVERHEAD_MS`` for a whole model), and the
whole planned model can be made slower than its layers add up to (``PENALTY``), which is what
makes the first plan miss and the planner tighten. The oracles are those formulas, never the
planner's own figures. One CLI test times for real (torch eager) with a loose assertion.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import torch
from torch import nn

from convrewrite.core.loading import load_model
from convrewrite.planning.budgets import parse_budgets
from convrewrite.planning.candidates import parse_candidates
from convrewrite.planning.plan import Plan
from convrewrite.planning.planner import make_plan
from convrewrite.recovery.batches import TensorBatches
from convrewrite.speed import latency as timing

ROOT = Path(__file__).resolve().parents[1]
TDNN = ROOT / "sample_models" / "tdnn.py"
MS_PER_PARAM = 1e-3
OVERHEAD_MS = 0.5


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _timing(ms: float) -> timing.Timing:
    return timing.Timing(ms, 0.0, ms, ms, 10, 1)


class FakeTimer:
    """Stands in for ``measure_layers`` and ``measure_latency``; records the whole-model calls."""

    def __init__(self, penalty: float = 1.0) -> None:
        self.penalty = penalty
        self.model_calls: list[tuple[float, float]] = []

    def measure_layers(self, cases, *, backend="torch", threads=1, min_run_time=0.3, **_):
        return [
            timing.LayerLatency(
                c.name,
                type(c.original).__name__,
                type(c.replacement).__name__,
                [list(t.shape) for t in c.inputs],
                _timing(_params(c.original) * MS_PER_PARAM),
                _timing(_params(c.replacement) * MS_PER_PARAM),
            )
            for c in cases
        ]

    def measure_latency(self, original, rewritten, inputs, *, backend="torch", threads=1, **_):
        before = OVERHEAD_MS + _params(original) * MS_PER_PARAM
        after = OVERHEAD_MS + _params(rewritten) * MS_PER_PARAM
        if rewritten is not original:
            after *= self.penalty
        self.model_calls.append((before, after))
        settings = timing.LatencySettings(backend, threads, 1, 0.0, 0, 0)
        return timing.LatencyReport(settings, _timing(before), _timing(after))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeTimer:
        monkeypatch.setattr(timing, "measure_layers", self.measure_layers)
        monkeypatch.setattr(timing, "measure_latency", self.measure_latency)
        return self


def _data() -> TensorBatches:
    x = torch.randn(64, 39, 50, generator=torch.Generator().manual_seed(0))
    return TensorBatches((x,), batch_size=32, holdout=0.25)


def _plan(budget: str) -> Plan:
    torch.manual_seed(0)
    loaded = load_model(str(TDNN))
    candidates = parse_candidates(["separable:multiplier=1,low-rank"])
    return make_plan(loaded, _data(), parse_budgets([budget]), candidates=candidates, device="cpu")


def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(resources.files("convrewrite.report").joinpath("schema/plan-1.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def test_latency_plan_meets_the_budget_with_the_fake_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTimer().install(monkeypatch)
    plan = _plan("latency=2x")
    model = load_model(str(TDNN)).model
    original_ms = OVERHEAD_MS + _params(model) * MS_PER_PARAM
    assert plan.latency is not None
    assert plan.latency["original_ms"] == pytest.approx(original_ms)
    # the fixed share: everything but the planned layers' parameters (the oracle counts them itself)
    planned = sum(_params(model.get_submodule(layer.name)) for layer in plan.layers if layer.latency_ms_before)
    assert plan.latency["fixed_ms"] == pytest.approx(original_ms - planned * MS_PER_PARAM)
    # each layer's time in the table is its parameter count, for keep and for the chosen block
    for layer in plan.layers:
        if layer.latency_ms_before is not None:
            assert layer.latency_ms_before == pytest.approx(layer.params_before * MS_PER_PARAM)
            assert layer.chosen.latency_ms == pytest.approx(layer.chosen.params * MS_PER_PARAM)
    (only,) = plan.latency["iterations"]
    # no penalty: the whole model is exactly what the table predicts, and it meets 2x
    assert only["measured_speedup"] == pytest.approx(only["predicted_speedup"])
    assert only["measured_speedup"] >= 2.0
    before, after = fake.model_calls[-1]
    assert only["measured_speedup"] == pytest.approx(before / after)
    assert plan.met and [b.metric for b in plan.budgets] == ["latency"]
    _validator().validate(plan.to_dict())
    assert "measured" in plan.render("table") and "predicted" in plan.render("table")
    assert Plan.from_dict(json.loads(plan.render("json"))).latency == plan.latency
    assert "measured" in plan.render("markdown") and "measured" in plan.render("html")


def test_latency_plan_replans_when_the_whole_model_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTimer(penalty=1.25).install(monkeypatch)
    plan = _plan("latency=2x")
    assert plan.latency is not None
    steps = plan.latency["iterations"]
    assert len(steps) >= 2
    first, second = steps[0], steps[1]
    assert first["target_speedup"] == pytest.approx(2.0)
    assert first["measured_speedup"] < 2.0
    # the measured shortfall tightens the target: 2 * 2 / measured
    assert second["target_speedup"] == pytest.approx(2.0 * 2.0 / first["measured_speedup"])
    # the fake's whole-model figures are the measured ones
    rewritten_calls = [c for c in fake.model_calls if c[0] != c[1]]
    assert first["measured_speedup"] == pytest.approx(rewritten_calls[0][0] / rewritten_calls[0][1])
    chosen = steps[plan.latency["chosen"]]
    assert plan.met == (chosen["measured_speedup"] >= 2.0)
    if plan.met:
        assert plan.latency["chosen"] == next(i for i, s in enumerate(steps) if s["measured_speedup"] >= 2.0)
    _validator().validate(plan.to_dict())


def test_latency_budget_out_of_reach_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from convrewrite.errors import UsageError

    FakeTimer().install(monkeypatch)
    with pytest.raises(UsageError, match="smallest reachable is .* ms"):
        _plan("latency=1000x")


def test_cli_latency_budget_with_real_torch_timing(cli, tmp_path: Path) -> None:
    data = tmp_path / "calib.pt"
    torch.save(torch.randn(48, 39, 50, generator=torch.Generator().manual_seed(0)), data)
    result = cli(
        "plan",
        TDNN,
        "--data",
        data,
        "--budget",
        "latency=1.1x",
        "--candidates",
        "separable:multiplier=1",
        "--latency-backend",
        "torch",
        "--threads",
        "1",
        "--format",
        "json",
    )
    if result.code == 2:  # a loaded machine can put even 1.1x out of reach of the measured table
        assert "smallest reachable" in result.err
        return
    assert result.code == 0, result.err
    report = json.loads(result.out)
    _validator().validate(report)
    assert report["latency"]["measured_speedup"] > 0
    assert report["latency"]["backend"] == "torch" and report["latency"]["threads"] == 1


def test_cli_bad_latency_backend_is_exit_2(cli, tmp_path: Path) -> None:
    result = cli("plan", tmp_path / "missing.py", "--budget", "latency=2x", "--latency-backend", "tvm")
    assert result.code == 2 and "--latency-backend" in result.err


class RecordingTimer(FakeTimer):
    """The fake timer that also records the backend and thread count of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.options: list[tuple[str, int]] = []

    def measure_layers(self, cases, *, backend="torch", threads=1, min_run_time=0.3, **_):
        self.options.append((backend, threads))
        return super().measure_layers(cases, backend=backend, threads=threads, min_run_time=min_run_time)

    def measure_latency(self, original, rewritten, inputs, *, backend="torch", threads=1, **_):
        self.options.append((backend, threads))
        return super().measure_latency(original, rewritten, inputs, backend=backend, threads=threads)


def test_apply_budget_passes_the_latency_backend_and_threads_to_the_planner(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``apply --budget latency=...`` times with ``--latency-backend`` and ``--threads``, as ``plan`` does."""
    pytest.importorskip("onnxruntime")
    fake = RecordingTimer().install(monkeypatch)
    data = tmp_path / "calib.pt"
    torch.save(torch.randn(48, 39, 50, generator=torch.Generator().manual_seed(0)), data)
    flags = ("--budget", "latency=2x", "--latency-backend", "onnxruntime", "--threads", "3")
    result = cli("apply", TDNN, "--data", data, *flags, "--out", tmp_path / "out", "--format", "json")
    assert result.code == 0, result.err
    assert fake.options and set(fake.options) == {("onnxruntime", 3)}
    assert "measured" in result.err  # the plan, printed on stderr, has the measured whole-model check
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["after"]["params"] < report["before"]["params"]
