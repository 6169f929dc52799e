"""How many threads torch uses for each kind of work the engine does.

torch runs intra-op work on an OpenMP pool of one thread per core, whose threads spin while they
wait for each other at the end of every parallel operation. On a machine whose cores are busy with
other processes, the thread being waited for is often not running, and the spinning threads burn
the time it needs: on the 2-core development machine with a busy loop on one core,
``convrewrite report resnet50 --rule separable`` took 22 s with torch's default pool of 2 threads
against 4.6 s with 1, and every phase suffered: forward passes and the rules' many small SVDs
alike (figures in benchmarks/README.md, "Threads on a busy machine").

So the thread count is chosen per kind of work:

* rule work (skip decisions, costs, builds with their weight transfer, kernel errors) is many
  small factorisations, each too small to split: always one thread (``small_work``);
* forward passes (profiling, trace checks, verification) use the cores that are idle now: the
  cores this process may run on minus the 1-minute load average, rounded, at least 1, and never
  more than torch's own setting (``OMP_NUM_THREADS`` or ``torch.set_num_threads`` stay the upper
  bound) (``forward_work``). ``CONVREWRITE_THREADS=N`` sets the count for forward passes outright.

Both restore torch's setting when they finish, so a caller's own thread count is left as it was.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextlib import ContextDecorator
from typing import Any

import torch

from convrewrite.errors import UsageError

#: Threads for many small linear-algebra calls (the rules' factorisations and fits).
SMALL_WORK_THREADS = 1

#: Environment variable that fixes the thread count of forward passes.
THREADS_VARIABLE = "CONVREWRITE_THREADS"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def idle_cores(cores: int | None = None, load: float | None = None) -> int:
    """Cores not taken by other runnable processes: ``cores`` minus the 1-minute load average,
    rounded to the nearest integer, at least 1 (all of them where the OS has no load average)."""
    cores = usable_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average (Windows)
            return cores
    return max(1, min(cores, math.floor(cores - load + 0.5)))


def forward_thread_count() -> int:
    """Threads for a forward pass now: ``CONVREWRITE_THREADS`` if set, else the idle cores,
    never more than torch's current setting."""
    raw = os.environ.get(THREADS_VARIABLE, "").strip()
    if raw:
        try:
            count = int(raw)
        except ValueError:
            count = 0
        if count < 1:
            raise UsageError(f"{THREADS_VARIABLE}={raw!r} is not a positive integer", hint="unset it or give e.g. 2")
        return count
    return min(torch.get_num_threads(), idle_cores())


class torch_threads(ContextDecorator):  # noqa: N801  (reads like a function: ``with torch_threads(1):``)
    """Run a block (or, as a decorator, every call of a function) with torch's intra-op pool set to
    ``count`` threads (a number, or a function called on entry), then restore the previous
    setting. Nesting and re-entry are fine."""

    def __init__(self, count: int | Callable[[], int]) -> None:
        if isinstance(count, int) and count < 1:
            raise ValueError(f"thread count must be >= 1, got {count}")
        self.count = count
        self._previous: list[int] = []

    def __enter__(self) -> torch_threads:
        previous = torch.get_num_threads()
        self._previous.append(previous)
        wanted = self.count() if callable(self.count) else self.count
        if wanted != previous:
            torch.set_num_threads(wanted)
        return self

    def __exit__(self, *exc: Any) -> None:
        previous = self._previous.pop()
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def small_work() -> torch_threads:
    """One thread: for loops of small factorisations (the rules)."""
    return torch_threads(SMALL_WORK_THREADS)


def forward_work() -> torch_threads:
    """The idle cores (see ``forward_thread_count``), chosen when the block starts: for the
    engine's forward passes."""
    return torch_threads(lambda: forward_thread_count())  # looked up at entry (tests replace it)
