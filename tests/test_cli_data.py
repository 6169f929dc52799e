"""--data on the command line: calibration data is checked before any work, fitting lowers the
held-out error, fidelity is measured on held-out samples, evaluate() runs on both models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .conftest import ASSETS

TINY = ASSETS / "tiny.py"


def _calibration(tmp_path: Path, count: int = 60, shape: tuple[int, ...] = (3, 16, 16)) -> Path:
    path = tmp_path / "calib.pt"
    torch.save(torch.randn(count, *shape, generator=torch.Generator().manual_seed(0)), path)
    return path


def test_fitting_lowers_the_held_out_error_and_is_reported(cli, tmp_path: Path) -> None:
    data = _calibration(tmp_path)
    result = cli("report", TINY, "--rule", "separable", "--data", data, "--fit-steps", "20", "--format", "json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    fitting = report["fitting"]
    transfer, fitted = fitting["fidelity"]["transfer"], fitting["fidelity"]["fitted"]
    assert transfer["samples"] == fitted["samples"] == 6  # ceil(10% of 60) held out
    assert fitted["output_relative_error"] < transfer["output_relative_error"]
    assert {layer["name"] for layer in fitting["layers"]["layers"]} == {"conv1", "conv2"}
    assert fitting["layers"]["fit_samples"] == 54
    assert report["fidelity"]["measured_on"] == "6 held-out calibration samples"
    assert report["fidelity"]["output_relative_error"] == pytest.approx(fitted["output_relative_error"], rel=1e-6)
    assert report["after"]["metrics"]["output-error"] == pytest.approx(fitted["output_relative_error"], rel=1e-6)
    assert [stage["name"] for stage in report["stages"]] == [
        "profile",
        "trace",
        "rewrite[separable]",
        "verify",
        "fit",
        "fidelity",
    ]


def test_no_fit_measures_the_plain_transfer_on_held_out_data(cli, tmp_path: Path) -> None:
    data = _calibration(tmp_path)
    result = cli("report", TINY, "--rule", "separable", "--data", data, "--no-fit", "--format", "json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert "fitting" not in report
    assert report["fidelity"]["samples"] == 6


def test_apply_writes_the_fitted_model(cli, tmp_path: Path) -> None:
    data = _calibration(tmp_path)
    out = tmp_path / "out"
    result = cli("apply", TINY, "--rule", "separable", "--data", data, "--fit-steps", "10", "--out", out)
    assert result.code == 0, result.err
    assert "Fitting: 2 layer(s) fitted" in result.out
    assert "reloaded model.py + weights and matched the rewritten model" in result.err
    saved = json.loads((out / "report.json").read_text())
    assert "fitting" in saved


@pytest.mark.parametrize(
    ("shape", "count", "message"),
    [
        ((4, 16, 16), 20, "does not fit the model"),
        ((3, 16, 16), 0, "empty"),
    ],
)
def test_bad_data_is_one_line_exit_2_and_nothing_written(cli, tmp_path: Path, shape, count, message) -> None:
    data = _calibration(tmp_path, count=count, shape=shape)
    out = tmp_path / "out"
    result = cli("apply", TINY, "--rule", "separable", "--data", data, "--out", out)
    assert result.code == 2, result.err
    assert len(result.err.strip().splitlines()) == 1 and message in result.err
    assert not out.exists()


def test_nan_data_is_refused(cli, tmp_path: Path) -> None:
    values = torch.randn(20, 3, 16, 16)
    values[3, 0, 0, 0] = float("nan")
    torch.save(values, tmp_path / "nan.pt")
    result = cli("report", TINY, "--rule", "separable", "--data", tmp_path / "nan.pt")
    assert result.code == 2 and "NaN" in result.err


def test_the_model_files_calibration_data_and_evaluate_are_used(cli, tmp_path: Path) -> None:
    result = cli("report", ASSETS / "calibrated.py", "--rule", "separable", "--fit-steps", "10", "--format", "json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["fitting"]["layers"]["fit_samples"] == 36  # 40 samples, 4 held out
    evaluation = report["evaluation"]
    assert set(evaluation["original"]) == set(evaluation["result"]) == {"mean_logit"}
    assert report["before"]["metrics"]["eval:mean_logit"] == evaluation["original"]["mean_logit"]
    assert report["after"]["metrics"]["eval:mean_logit"] == evaluation["result"]["mean_logit"]
    assert report["after"]["metrics"]["agreement"] == report["fidelity"]["agreement"]


def test_data_without_rules_is_not_opened(cli, tmp_path: Path) -> None:
    result = cli("report", TINY, "--data", tmp_path / "missing.pt")
    assert result.code == 0, result.err  # a plain report needs no calibration data
