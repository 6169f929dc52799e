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


def test_report_gate_planning_and_settings_never_import_torch() -> None:
    """The report package (data model, registry and views), the gate's planning, the configuration and
    the command modules' top levels stay torch-free: a saved report renders anywhere, and `check`
    fails fast on bad configuration before torch loads."""
    modules = [
        "convrewrite.report",
        "convrewrite.report.model",
        "convrewrite.report.log",
        "convrewrite.report.registry",
        "convrewrite.report.views",
        "convrewrite.engine.report_builder",
        "convrewrite.config.schema",
        "convrewrite.config.project",
        "convrewrite.config.job",
        "convrewrite.gate.budgets",
        "convrewrite.commands.run",
        "convrewrite.commands.apply",
        "convrewrite.gate.check",
        "convrewrite.gate.views",
        "convrewrite.rules.api",
        "convrewrite.cli",
    ]
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"
