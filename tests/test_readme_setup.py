"""From the README's set-up to its first command, in order, as a new user types them.

The commands are read from the README itself: the set-up block (``python3 dev.py demo``), then the
Quick start's first block (activate ``.venv``, then ``convrewrite report ...``). They run in a
shell whose PATH does not have ``.venv/bin``, as on a fresh terminal, where ``convrewrite`` alone
is "command not found" until the environment is activated.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"

pytestmark = [
    pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash"),
    pytest.mark.skipif(
        Path(sys.prefix).resolve() != VENV.resolve(),
        reason="runs dev.py, which manages .venv: only from the .venv that `python3 dev.py test` made",
    ),
]


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}")
    return text[start : text.index("\n## ", start + 1)]


def _console_blocks(section: str) -> list[list[str]]:
    """The ``$ command`` lines of each console block (comments after two spaces dropped)."""
    blocks = re.findall(r"```console\n(.*?)```", section, flags=re.S)
    return [[line[2:].split("  #")[0].strip() for line in b.splitlines() if line.startswith("$ ")] for b in blocks]


def _fresh_shell_env() -> dict[str, str]:
    """A terminal's environment: no virtual environment active, .venv/bin not on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONHOME"}}
    paths = [p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != (VENV / "bin").resolve()]
    env["PATH"] = os.pathsep.join(paths)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _bash(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_readme_commands_from_set_up_to_the_first_report() -> None:
    stamp = VENV / ".convrewrite-installed"
    if not stamp.exists():
        pytest.skip(".venv was not made by dev.py (no install stamp)")
    env = _fresh_shell_env()
    set_up = _console_blocks(_section("Set-up"))
    assert set_up[0][0] == "python3 dev.py demo"
    assert set_up[1] == [". .venv/bin/activate"]
    quick = _console_blocks(_section("Quick start"))[0]
    assert quick[0] == ". .venv/bin/activate" and quick[1].startswith("convrewrite report ")

    # On a fresh terminal the command is not there: the reason for the activate line.
    assert _bash("command -v convrewrite", env).returncode != 0

    demo = _bash(set_up[0][0], env)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert "Total params: 5,551,360" in demo.stdout and "Total params: 781,450" in demo.stdout
    # dev.py ends by saying, in the README's words, how to get convrewrite on PATH.
    assert "\n    . .venv/bin/activate\n" in demo.stdout

    first = _bash(" && ".join(quick[:2]), env)
    assert first.returncode == 0, first.stderr[-2000:]
    transcript = re.search(
        r"```console\n\$ [^\n]*\n\$ convrewrite report [^\n]*\n(.*?)```", _section("Quick start"), re.S
    )
    assert transcript is not None
    expected = transcript.group(1).splitlines()
    assert first.stdout.splitlines()[:4] == expected[:4]  # Model, Input, Trace, Rules
    assert "Params                 5,551,360       781,450       7.10x" in first.stdout


def test_dev_shell_puts_convrewrite_on_path() -> None:
    if not (VENV / ".convrewrite-installed").exists():
        pytest.skip(".venv was not made by dev.py (no install stamp)")
    env = _fresh_shell_env()
    env["SHELL"] = "/bin/sh"
    found = subprocess.run(
        [sys.executable, "dev.py", "shell", "-c", "command -v convrewrite"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip().splitlines()[-1]).resolve() == (VENV / "bin" / "convrewrite").resolve()
