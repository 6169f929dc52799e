#!/usr/bin/env python3
"""Set-up and checks for a fresh machine that has only Python.

    python3 dev.py demo    create .venv, install convrewrite, print the CRNN before/after table
    python3 dev.py test    create .venv, install convrewrite with the test and onnx extras, run the whole suite

The virtual environment is created once and reinstalled only when pyproject.toml or
constraints.txt change. torch is pinned by constraints.txt (the CPU build, 2.13.0).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".convrewrite-installed"


def run(*command: str | Path) -> None:
    print("+", " ".join(str(c) for c in command), flush=True)
    completed = subprocess.run([str(c) for c in command], cwd=ROOT)
    if completed.returncode != 0:
        sys.exit(completed.returncode)


def ensure_environment() -> None:
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "constraints.txt"):
        digest.update((ROOT / name).read_bytes())
    wanted = digest.hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == wanted:
        return
    run(
        PYTHON,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "-c",
        "constraints.txt",
        "-e",
        ".[test,onnx]",
    )
    STAMP.write_text(wanted + "\n")


def demo() -> None:
    ensure_environment()
    run(BIN / "convrewrite", "report", "sample_models/crnn.py", "--rule", "separable", "--format", "torchsummary")


def test() -> None:
    ensure_environment()
    sources = ("convrewrite", "tests", "sample_models", "benchmarks", "dev.py")
    run(BIN / "ruff", "check", *sources)
    run(BIN / "ruff", "format", "--check", *sources)
    run(PYTHON, "-m", "mypy")
    run(PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider")


COMMANDS = {"demo": demo, "test": test}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in COMMANDS:
        print(__doc__)
        sys.exit(2)
    COMMANDS[sys.argv[1]]()
