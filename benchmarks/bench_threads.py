"""Threads on a busy machine: ``report --rule separable`` on ResNet-50 with a busy loop beside it.

    python benchmarks/bench_threads.py [--runs 3] [--baseline-source DIR] [--idle]

Starts ``python -c "while True: pass"`` (one core busy, as when another job shares the machine),
then runs ``convrewrite report sample_models/zoo/resnet.py:resnet50 --rule separable`` (1x3x224x224)
as whole processes, interleaved run by run, in these configurations:

* ``this tree``: the engine's own choice (rules on one thread, forward passes on the idle cores);
* ``CONVREWRITE_THREADS=<cores>``: forward passes forced onto torch's default pool (rules still on
  one thread): what the forward passes cost without the idle-core choice;
* ``OMP_NUM_THREADS=1``: everything on one thread, the reference the issue compared with;
* with ``--baseline-source DIR`` (a checkout of an older convrewrite, e.g. ``git worktree add``),
  ``baseline``: that source (``PYTHONPATH=DIR``) with torch's default pool everywhere.

``--idle`` runs the same without the busy loop (what the choice costs on an idle machine). Prints
best and median wall time and CPU time of each. Wall times depend on whatever else the machine is
running: compare configurations within one run of this script.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from common import CONVREWRITE, ZOO, Run, compile_bytecode, machine, run_process, summarize

COMMAND = [*CONVREWRITE, "report", str(ZOO / "resnet.py") + ":resnet50", "--rule", "separable"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline-source", help="a checkout of an older convrewrite to compare with")
    parser.add_argument("--idle", action="store_true", help="no busy loop")
    args = parser.parse_args()
    compile_bytecode()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    base = {k: v for k, v in os.environ.items() if k not in {"OMP_NUM_THREADS", "CONVREWRITE_THREADS"}}
    configurations: dict[str, dict[str, str]] = {
        "this tree": base,
        f"CONVREWRITE_THREADS={cores}": {**base, "CONVREWRITE_THREADS": str(cores)},
        "OMP_NUM_THREADS=1": {**base, "OMP_NUM_THREADS": "1"},
    }
    if args.baseline_source:
        configurations["baseline"] = {**base, "PYTHONPATH": args.baseline_source}

    # The busy loop ends itself after an hour at most, and with this script when it is stopped.
    busy = None if args.idle else subprocess.Popen(["timeout", "3600", sys.executable, "-c", "while True: pass"])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        print(f"{machine()}; {'no busy loop' if args.idle else 'a busy loop on one core'}")
        runs: dict[str, list[Run]] = {name: [] for name in configurations}
        for _ in range(args.runs):
            for name, env in configurations.items():
                # Not from the checkout: ``python -m`` puts the working directory first on sys.path,
                # which would shadow --baseline-source.
                runs[name].append(run_process(COMMAND, env=env, cwd=Path(tempfile.gettempdir())))
        for name, measured in runs.items():
            print(f"{name:28s} {summarize(measured)}")
    finally:
        if busy is not None:
            busy.terminate()  # timeout passes SIGTERM on to the loop (a SIGKILL would orphan it)
            busy.wait()


if __name__ == "__main__":
    main()
