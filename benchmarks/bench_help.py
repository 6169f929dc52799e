"""``convrewrite --help`` answers without importing torch, and how long it takes.

    python benchmarks/bench_help.py

Runs ``python -X importtime -m convrewrite --help`` (the import log goes to stderr), lists any
torch module it imported (there must be none; tests/test_lean_import.py enforces it) and times
``--help`` as a whole process against ``python -c "import torch"``.
"""

from __future__ import annotations

import subprocess

from common import CONVREWRITE, PYTHON, best, machine, run_process


def main() -> None:
    command = [PYTHON, "-X", "importtime", "-m", "convrewrite", "--help"]
    completed = subprocess.run(command, capture_output=True, text=True)
    imported = [line.rsplit("|", 1)[-1].strip() for line in completed.stderr.splitlines() if "|" in line]
    torch_modules = [name for name in imported if name == "torch" or name.startswith("torch.")]
    help_time = best([run_process([*CONVREWRITE, "--help"]) for _ in range(5)])
    torch_time = best([run_process([PYTHON, "-c", "import torch"]) for _ in range(5)])
    print(machine())
    print(f"  convrewrite --help: {help_time:.2f} s (best of 5), {len(imported)} modules imported")
    print(f"  torch modules imported by --help: {len(torch_modules)} {torch_modules[:5]}")
    print(f"  python -c 'import torch': {torch_time:.2f} s (best of 5)")


if __name__ == "__main__":
    main()
