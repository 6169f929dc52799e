"""What a long-running distillation or fit shows while it runs, on stderr and on rank 0 only.

``bar``: a rich progress bar with the step, the training loss, the last held-out fidelity and the
time left. ``lines``: one plain line per held-out evaluation (for logs and CI, where stderr is
not a terminal). ``none``: silence. ``auto`` picks ``bar`` on a terminal and ``lines`` otherwise;
ranks other than 0 are always silent, so a data-parallel run prints once.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Literal

ProgressMode = Literal["auto", "bar", "lines", "none"]
PROGRESS_MODES: tuple[str, ...] = ("auto", "bar", "lines", "none")


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def describe_fidelity(fidelity: Any, compact: bool = False) -> str:
    """``held-out error 0.0312 cos 0.9995 agree 0.986`` for a held-out fidelity object (or ``--``);
    ``compact`` (for the bar) leaves out the cosine."""
    if fidelity is None:
        return "held-out --"
    if compact:
        text = f"held-out err {fidelity.output_relative_error:.4f}"
    else:
        text = f"held-out error {fidelity.output_relative_error:.4f} cos {fidelity.cosine_similarity:.4f}"
    if fidelity.top1_agreement is not None:
        text += f" agree {fidelity.top1_agreement:.3f}"
    return text


def display_mode(mode: str, is_main: bool) -> str:
    """``bar``, ``lines`` or ``none``: ``auto`` is a bar on a terminal and lines otherwise; only rank 0 shows."""
    if mode not in PROGRESS_MODES:
        raise ValueError(f"progress must be one of {', '.join(PROGRESS_MODES)}, got {mode!r}")
    if not is_main:
        return "none"
    if mode == "auto":
        return "bar" if sys.stderr.isatty() else "lines"
    return mode


def rich_bar(fields: tuple[str, ...]) -> Any:
    """A rich progress bar on stderr: description, bar, i/N, the task's ``fields``, time left."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=16),
        MofNCompleteColumn(),
        *(TextColumn(field) for field in fields),
        TimeRemainingColumn(),
        TextColumn("left"),
        console=Console(stderr=True),
        transient=False,
    )


class DistillProgress:
    """Step-by-step display of one distillation run."""

    def __init__(self, mode: str, total: int, start: int, *, is_main: bool = True, label: str = "distill") -> None:
        self.mode = display_mode(mode, is_main)
        self.total = total
        self.start_step = start
        self.label = label
        self.started = time.perf_counter()
        self.fidelity_text = "held-out --"
        self._bar: Any = None
        self._task: Any = None
        if self.mode == "bar":
            self._bar = rich_bar(fields=("loss {task.fields[loss]}", "{task.fields[fidelity]}"))
            self._bar.start()
            self._task = self._bar.add_task(label, total=total, completed=start, loss="--", fidelity=self.fidelity_text)

    def _left(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0:
            return "--"
        elapsed = time.perf_counter() - self.started
        return _duration(elapsed / done * (self.total - step))

    def step(self, step: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=f"{loss:.4g}")

    def evaluated(self, step: int, loss: float | None, fidelity: Any) -> None:
        self.fidelity_text = describe_fidelity(fidelity)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, fidelity=describe_fidelity(fidelity, compact=True))
        elif self.mode == "lines":
            loss_text = f"loss {loss:.4g}" if loss is not None else "loss --"
            elapsed = _duration(time.perf_counter() - self.started)
            self.message(
                f"{self.label}: step {step}/{self.total}  {loss_text}  {self.fidelity_text}  "
                f"({elapsed}, about {self._left(step)} left)"
            )

    def message(self, text: str) -> None:
        """One line on stderr (above the bar when there is one); silent in ``none`` mode."""
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        elif self.mode != "none":
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class FitLayersProgress:
    """Layer-by-layer display of fitting: ``bar`` (layer i of L, its name, passes so far, time
    left) on a terminal, one plain line per fitted layer in ``lines`` mode, nothing in ``none``.

    Fed with ``recovery.fit.FitProgress`` updates (the ``progress`` callback of ``fit_layers``).
    """

    def __init__(self, mode: str, *, is_main: bool = True, label: str = "fit") -> None:
        self.mode = display_mode(mode, is_main)
        self.label = label
        self.started = time.perf_counter()
        self.passes = 0.0
        self._bar: Any = None
        self._task: Any = None

    def _open(self, total: int) -> None:
        self._bar = rich_bar(fields=("{task.fields[layer]}", "{task.fields[passes]} passes"))
        self._bar.start()
        self._task = self._bar.add_task(self.label, total=total, completed=0, layer="", passes="0.0")

    def __call__(self, update: Any) -> None:
        if self.mode == "none":
            return
        if self.mode == "bar" and self._bar is None:
            self._open(update.total)
        if update.phase == "start":
            if self._bar is not None:
                self._bar.update(self._task, completed=update.index, layer=update.layer)
            return
        record = update.layer_fit
        if record is not None:
            self.passes += float(getattr(record, "passes", 0.0) or 0.0)
        if self._bar is not None:
            self._bar.update(self._task, completed=update.index + 1, passes=f"{self.passes:.1f}")
            if update.index + 1 >= update.total:
                self.close()
            return
        before = getattr(record, "holdout_error_before", None)
        after = getattr(record, "holdout_error_after", None)
        errors = f"held-out error {before:.4g} -> {after:.4g}" if before is not None and after is not None else "--"
        method = getattr(record, "method", "") if record is not None else ""
        seconds = getattr(record, "seconds", 0.0) if record is not None else 0.0
        print(
            f"{self.label}: layer {update.index + 1}/{update.total} {update.layer}  {errors}  "
            f"({method}, {self.passes:.1f} passes so far, {_duration(seconds)})",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
