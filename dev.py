#!/usr/bin/env python3
"""Set-up and checks for a fresh machine that has only Python.

    python3 dev.py demo    create .venv, install convrewrite, print the CRNN before/after table
    python3 dev.py test    create .venv, install convrewrite with the test, onnx and docs extras, run the whole
                           suite (ruff, mypy, pytest), then build the docs site with ``mkdocs build --strict``
    python3 dev.py docs    build the docs site into site/ (``--strict``: a broken link or anchor fails)
    python3 dev.py shell   a shell with .venv activated (``convrewrite`` on PATH); args go to the shell

``convrewrite`` lives in .venv, which is not on PATH until you activate it: ``. .venv/bin/activate``
(Windows: ``.venv\\Scripts\\activate``), or ``python3 dev.py shell``. ``demo`` and ``test`` end by printing that line.

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
        ".[test,onnx,docs]",
    )
    STAMP.write_text(wanted + "\n")


#: What to type to get ``convrewrite`` on PATH in the current shell (the README quotes this line).
ACTIVATE = ".venv\\Scripts\\activate" if os.name == "nt" else ". .venv/bin/activate"


def activation_hint() -> str:
    return (
        f"\nconvrewrite is installed in {VENV.name}/, which is not on your PATH yet. In this shell run:\n\n"
        f"    {ACTIVATE}\n\n"
        "then, for example: convrewrite report sample_models/crnn.py --rule separable\n"
        "(or start a shell that has it: python3 dev.py shell)"
    )


def demo(*_: str) -> None:
    ensure_environment()
    run(BIN / "convrewrite", "report", "sample_models/crnn.py", "--rule", "separable", "--format", "torchsummary")
    print(activation_hint(), flush=True)


def shell(*arguments: str) -> None:
    """Run the user's shell (or /bin/sh) with the virtual environment activated."""
    ensure_environment()
    environment = dict(os.environ, VIRTUAL_ENV=str(VENV), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    environment.pop("PYTHONHOME", None)
    program = os.environ.get("SHELL") or ("cmd.exe" if os.name == "nt" else "/bin/sh")
    if not arguments:
        print(f"{program} with {VENV.name}/ activated: convrewrite is on PATH; exit to leave", flush=True)
    sys.exit(subprocess.run([program, *arguments], cwd=ROOT, env=environment).returncode)


def test(*_: str) -> None:
    ensure_environment()
    sources = ("convrewrite", "tests", "sample_models", "benchmarks", "dev.py")
    run(BIN / "ruff", "check", *sources)
    run(BIN / "ruff", "format", "--check", *sources)
    run(PYTHON, "-m", "mypy")
    run(PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider")
    build_docs()
    print(activation_hint(), flush=True)


def build_docs() -> None:
    """The manual as a site, in site/ (gitignored); strict, so a broken link or anchor fails the build."""
    run(PYTHON, "-m", "mkdocs", "build", "--strict", "--site-dir", "site")


def docs(*_: str) -> None:
    ensure_environment()
    build_docs()
    print(f"wrote {ROOT / 'site'}/ (open site/index.html)", flush=True)


COMMANDS = {"demo": demo, "test": test, "docs": docs, "shell": shell}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS or (len(sys.argv) > 2 and sys.argv[1] != "shell"):
        print(__doc__)
        sys.exit(2)
    COMMANDS[sys.argv[1]](*sys.argv[2:])
