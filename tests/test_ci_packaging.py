"""The CI packaging of ``convrewrite check``: the pre-commit hook, the GitHub Action and its step script.

The action's step script runs here under a fake runner environment (RUNNER_TEMP,
GITHUB_STEP_SUMMARY, GITHUB_OUTPUT): annotations reach the log, the markdown reaches the job
summary, and the step ends with convrewrite's exit code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONVREWRITE = Path(sys.executable).parent / "convrewrite"

needs_bash = pytest.mark.skipif(
    shutil.which("bash") is None or not CONVREWRITE.exists(), reason="needs bash and the convrewrite script"
)

MODEL = """\
from torch import nn

INPUT_SHAPE = (1, 3, 8, 8)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.conv(x)
"""


def test_pre_commit_hook_definition() -> None:
    text = (ROOT / ".pre-commit-hooks.yaml").read_text()
    assert "- id: convrewrite-check\n" in text
    assert "  entry: convrewrite check\n" in text
    assert "  pass_filenames: false\n" in text
    assert "  stages: [pre-push, manual]\n" in text


def test_action_is_a_composite_that_runs_the_step_script() -> None:
    text = (ROOT / "action.yml").read_text()
    assert "  using: composite\n" in text
    assert 'run: bash "$GITHUB_ACTION_PATH/action/check.sh"' in text
    assert "https://download.pytorch.org/whl/cpu" in text


def _run_step(tmp_path: Path, args: str) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    runner = tmp_path / "runner"
    runner.mkdir(exist_ok=True)
    summary, output = runner / "summary.md", runner / "output"
    env = {
        **os.environ,
        "CONVREWRITE": str(CONVREWRITE),
        "INPUT_ARGS": args,
        "RUNNER_TEMP": str(runner),
        "GITHUB_STEP_SUMMARY": str(summary),
        "GITHUB_OUTPUT": str(output),
    }
    completed = subprocess.run(
        ["bash", str(ROOT / "action" / "check.sh")], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    return completed, summary, output


@needs_bash
def test_action_step_fails_with_annotations_and_summary(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(MODEL)
    # net.py: 3*8*9 + 8 = 224 params.
    completed, summary, output = _run_step(tmp_path, "net.py --max-params 200 --format table")
    assert completed.returncode == 1, completed.stderr
    assert completed.stdout.startswith("::error title=convrewrite check%3A budget max-params exceeded::params 224 > ")
    assert "convrewrite: error: 1 budget exceeded" in completed.stderr
    written = summary.read_text()
    assert written.startswith("### convrewrite check failed\n")
    assert "::" not in written
    assert output.read_text() == "exit-code=1\n"


@needs_bash
def test_action_step_passes_and_reports_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(MODEL)
    completed, summary, output = _run_step(tmp_path, "net.py --max-params 1k")
    assert completed.returncode == 0, completed.stderr
    assert "### convrewrite check passed" in summary.read_text()
    assert output.read_text() == "exit-code=0\n"
    summary.unlink()
    output.unlink()
    completed, summary, output = _run_step(tmp_path, "net.py --max-params 1mb")
    assert completed.returncode == 2
    assert summary.read_text().startswith("### convrewrite check could not run (exit 2)\n")
    assert "--max-params = '1mb': params is a count" in summary.read_text()
    assert output.read_text() == "exit-code=2\n"
