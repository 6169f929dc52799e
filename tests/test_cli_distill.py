"""--distill and `convrewrite distill` through the command line, including 2 processes under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .conftest import ASSETS

TINY = ASSETS / "tiny.py"


def _calibration(tmp_path: Path) -> Path:
    path = tmp_path / "calib.pt"
    torch.save(torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(0)), path)
    return path


def test_apply_distils_and_the_distill_command_continues(cli, tmp_path: Path) -> None:
    data, out = _calibration(tmp_path), tmp_path / "out"
    args = ["apply", TINY, "--rule", "separable", "--data", data, "--fit-steps", "5", "--out", out]
    result = cli(*args, "--distill", "6", "--batch-size", "8")
    assert result.code == 0, result.err
    assert "Distillation: 6 steps" in result.out
    report = json.loads((out / "report.json").read_text())
    section = report["distillation"]
    assert section["completed_steps"] == 6 and section["best"]["samples"] == 5
    assert report["fidelity"]["output_relative_error"] == section["best"]["output_relative_error"]
    assert not (out / "distill-checkpoint").exists()  # removed once the result is written

    # `convrewrite distill` continues training the written student to 10 steps in all.
    more = cli("distill", out, "--teacher", TINY, "--data", data, "--steps", "10", "--batch-size", "8")
    assert more.code == 0, more.err
    again = json.loads((out / "report.json").read_text())["distillation"]
    assert again["steps"] == 10


def test_distill_needs_data_and_a_teacher(cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli("apply", TINY, "--rule", "separable", "--distill", "5", "--out", out)
    assert result.code == 2 and "--distill needs calibration data" in result.err
    assert not out.exists()
    missing = cli("distill", tmp_path, "--data", _calibration(tmp_path), "--steps", "3")
    assert missing.code == 2 and "--teacher" in missing.err


def test_apply_under_torchrun_with_two_processes(tmp_path: Path) -> None:
    data, out = _calibration(tmp_path), tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "convrewrite",
        "apply",
        str(TINY),
        "--rule",
        "separable",
        "--data",
        str(data),
        "--fit-steps",
        "5",
        "--distill",
        "4",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("Totals") == 1  # only rank 0 prints
    report = json.loads((out / "report.json").read_text())
    assert report["distillation"]["world_size"] == 2
    assert report["distillation"]["completed_steps"] == 4
    losses = [entry["loss"] for entry in report["distillation"]["history"] if entry["step"] > 0]
    assert losses and all(isinstance(loss, float) and loss == loss for loss in losses)  # finite, not NaN
