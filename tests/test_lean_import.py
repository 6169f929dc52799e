"""``convrewrite --help`` must answer without importing torch (seconds of start-up)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("args", [["--help"], ["report", "--help"], ["apply", "--help"], ["--version"]])
def test_help_does_not_import_torch(args: list[str]) -> None:
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "convrewrite", *args], capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr
    assert "convrewrite" in completed.stdout
    # -X importtime writes one line per imported module to stderr: "import time: self | cumulative | name".
    imported = {line.rsplit("|", 1)[-1].strip() for line in completed.stderr.splitlines() if "|" in line}
    assert "typer" in imported  # the probe works
    assert not {name for name in imported if name == "torch" or name.startswith("torch.")}
