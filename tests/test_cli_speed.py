"""--latency, --export onnx, the speedup budget and min-speedup, through the command line.

Timings are not asserted (a shared machine is noisy); what is checked is that they are measured,
reported where the JSON contract says and used by check and by min-speedup.
"""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

import pytest

from .conftest import ASSETS

TINY = ASSETS / "tiny.py"


def test_latency_is_reported_with_a_speedup_metric_and_per_layer_column(cli) -> None:
    result = cli("report", TINY, "--rule", "separable", "--latency", "--format", "json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    latency = report["latency"]
    assert latency["settings"]["threads"] == 1 and latency["settings"]["backend"] == "torch"
    assert latency["settings"]["batch"] == 1
    assert latency["speedup"] == pytest.approx(
        latency["model"]["before"]["median_ms"] / latency["model"]["after"]["median_ms"]
    )
    assert report["after"]["metrics"]["speedup"] == latency["speedup"]
    assert {layer["name"] for layer in latency["layers"]} == {"conv1", "conv2"}
    table = cli("report", TINY, "--rule", "separable", "--latency")
    assert "Speedup" in table.out and "Latency (torch, 1 thread(s), batch 1, interleaved)" in table.out


def test_a_speedup_budget_measures_latency_by_itself(cli, tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [tool.convrewrite]
            model = "{TINY}"
            rules = ["separable"]

            [[tool.convrewrite.budgets]]
            metric = "speedup"
            minimum = 0.01
            """
        )
    )
    result = cli("check", "--format", "json", "--verbose")
    assert result.code == 0, result.err
    assert "implied by the speedup budget speedup" in result.err
    outcome = json.loads(result.out)["check"]["budgets"][0]
    assert outcome["metric"] == "speedup" and outcome["measured"] > 0.01


def test_min_speedup_skips_rewrites_that_do_not_pay_off(cli) -> None:
    result = cli("report", TINY, "--rule", "separable:min-speedup=1000", "--format", "json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["rewrites"] == []
    reasons = {skip["name"]: skip["reason"] for skip in report["skipped"]}
    assert reasons["conv1"].startswith("measured speedup") and "< min-speedup 1000" in reasons["conv1"]


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="the onnx extra is not installed")
def test_apply_exports_onnx_checked_in_onnx_runtime(cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli("apply", TINY, "--rule", "separable", "--export", "onnx", "--out", out, "--format", "json")
    assert result.code == 0, result.err
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.py", "report.json", "weights.safetensors"]
    section = json.loads((out / "report.json").read_text())["export"]["onnx"]
    assert section["path"] == "model.onnx" and section["max_abs_diff"] < 1e-4 and section["opset"] > 0
    assert "ONNX Runtime max abs diff" in result.err


def test_missing_onnx_extra_is_exit_2_before_any_work(cli, tmp_path: Path, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith("onnx") else real(name, *a)
    )
    result = cli("report", TINY, "--rule", "separable", "--latency", "--latency-backend", "onnxruntime")
    assert result.code == 2 and "convrewrite[onnx]" in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_unknown_export_format_is_a_usage_error(cli, tmp_path: Path) -> None:
    result = cli("apply", TINY, "--rule", "separable", "--export", "tflite", "--out", tmp_path / "o")
    assert result.code == 2 and "must be one of onnx" in result.err
    assert not (tmp_path / "o").exists()
