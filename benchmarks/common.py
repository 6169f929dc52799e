"""Shared helpers of the benchmark scripts: run a command as a fresh process, time it, read its peak memory.

Every measurement is a whole process, start to finish (interpreter start, imports, model build,
work, exit), timed with ``time.perf_counter`` around ``subprocess.Popen`` and reaped with
``os.wait4``, whose resource usage gives that one child's peak resident set size (Linux: KiB).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "sample_models" / "zoo"
PYTHON = sys.executable
CONVREWRITE = [PYTHON, "-m", "convrewrite"]


def compile_bytecode() -> None:
    """Compile convrewrite's modules once, as ``pip install`` does for an installed package.

    An editable checkout under ``PYTHONDONTWRITEBYTECODE=1`` (as on the development machines)
    would otherwise recompile every convrewrite module in every timed process, while torchinfo's
    modules were compiled at install time: an unfair handicap of about 0.1 s per run.
    """
    import compileall

    compileall.compile_dir(str(ROOT / "convrewrite"), quiet=1)


@dataclass
class Run:
    seconds: float
    peak_rss_bytes: int
    cpu_seconds: float


def run_process(
    command: list[str], *, cwd: Path | None = None, show_output: bool = False, env: dict[str, str] | None = None
) -> Run:
    """Run ``command`` to completion; fail loudly when it fails."""
    output = None if show_output else subprocess.DEVNULL
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=output, stderr=subprocess.PIPE, env=env)
    assert process.stderr is not None
    errors = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{errors.decode(errors='replace')}")
    return Run(seconds, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime)


def summarize(runs: list[Run]) -> str:
    times = [r.seconds for r in runs]
    cpu = [r.cpu_seconds for r in runs]
    return (
        f"wall best {min(times):6.2f} s, median {statistics.median(times):6.2f} s; "
        f"CPU best {min(cpu):6.2f} s ({len(times)} runs)"
    )


def best(runs: list[Run]) -> float:
    return min(r.seconds for r in runs)


def mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


def machine() -> str:
    import platform

    cores = os.cpu_count()
    try:
        load = "load average " + " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        load = "load average unknown"
    return f"{platform.processor() or platform.machine()}, {cores} cores, {load}, Python {platform.python_version()}"
