"""Shared fixtures: paths to the samples and test assets, and a CLI runner."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from convrewrite.cli import run

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"
SAMPLES = ROOT / "sample_models"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test runs on one torch thread, set again before each test so that no test can leave
    another count behind. The tests run tiny models, where a second thread only adds waits at
    every op's barrier, and on a shared 2-core machine those waits grow without bound
    (core/threads.py). The engine's own choice is tested in test_threads.py."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Run the CLI in-process from an empty directory (no pyproject config leaks in)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "120")

    def invoke(*args: str) -> CliResult:
        capsys.readouterr()
        code = run([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke
