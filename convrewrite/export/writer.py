"""Write what ``apply`` produced, atomically, and prove it reads back.

Everything is first written to a temporary directory beside DIR, where each exporter
(``export/base.py``: model.py + weights, report.json, ONNX...) writes and verifies its files. Only
then does the directory move into place. A non-empty DIR is replaced only with ``--force``, and
only when it holds an earlier convrewrite output: a user's files are never lost.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convrewrite.errors import ModelError, NothingRewritten, UsageError
from convrewrite.export.base import output_files

#: The checkpoint an interrupted distillation leaves inside an output directory
#: (commands/distill.py): convrewrite's own, so ``--force`` may replace it with the rest.
_REASONS_SHOWN = 2

CHECKPOINT_DIR = "distill-checkpoint"


@dataclass
class WrittenOutput:
    directory: Path
    files: list[str]
    reload_max_abs_error: float
    user_source: str | None
    #: ``--export onnx``: what export/onnx.py wrote and verified.
    onnx: Any = None

    def summary(self) -> str:
        extra = f" (+ {self.user_source}, needed by model.py)" if self.user_source else ""
        text = (
            f"wrote {self.directory}/: {', '.join(self.files)}{extra}; reloaded model.py + weights "
            f"and matched the rewritten model (max abs diff {self.reload_max_abs_error:.3g})"
        )
        if self.onnx is not None:
            opset, difference = self.onnx.opset, self.onnx.max_abs_diff
            text += f"; model.onnx: ONNX opset {opset}, ONNX Runtime max abs diff {difference:.3g}"
        return text


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets here (0o666 less the umask), for files written under a temp name."""
    return 0o666 & ~umask()


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, then read it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(temporary, file_mode())
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        if Path(temporary).read_bytes() != data:
            raise ModelError(f"{path} did not read back identically")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def is_our_output(directory: Path) -> bool:
    report = directory / "report.json"
    if not report.is_file():
        return False
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("schema", "")).startswith("convrewrite.report/")


def check_destination(directory: Path, force: bool) -> None:
    """Refuse a DIR that would lose someone's files; called before any work is done."""
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"--out {directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()):
        if not force:
            raise UsageError(f"output directory {directory} exists and is not empty", hint="pass --force to replace it")
        if not is_our_output(directory):
            raise UsageError(
                f"output directory {directory} holds files that convrewrite did not write; "
                "not replacing it even with --force",
                hint="choose another --out",
            )
        unexpected = sorted(
            p.name
            for p in directory.iterdir()
            if p.name not in output_files() and p.name != CHECKPOINT_DIR and not p.name.startswith("original_")
        )
        if unexpected:
            raise UsageError(
                f"output directory {directory} also holds {', '.join(unexpected[:3])}; not replacing it",
                hint="move those files or choose another --out",
            )


def nothing_rewritten_message(result: Any) -> str:
    """Why no layer was rewritten, in one line: per rule, how many layers it skipped and the most
    common reasons (the full list is in ``convrewrite report``)."""
    rules = [rule.spec() for rule in result.rules]
    parts = []
    for rule in result.rules:
        skips = [s for s in result.skipped if s.rule == rule.name]
        if not skips:
            parts.append(f"{rule.spec()} found no layer it takes")
            continue
        counts = Counter(s.reason for s in skips)
        shown = [
            f"{reason} ({count}x)" if count > 1 else reason for reason, count in counts.most_common(_REASONS_SHOWN)
        ]
        more = len(counts) - len(shown)
        tail = f"; {more} other reason(s)" if more > 0 else ""
        layers = "layer" if len(skips) == 1 else "layers"
        parts.append(f"{rule.spec()} skipped {len(skips)} {layers}: {'; '.join(shown)}{tail}")
    if not rules:
        parts.append("no rules were given")
    return "no layer was rewritten, so nothing was written: " + " / ".join(parts)


def require_rewrites(result: Any) -> None:
    """Raise ``NothingRewritten`` (exit 3) when the rules rewrote no layer of the model.

    ``apply`` would otherwise write a copy of the unchanged model; called before anything is
    written, so the output directory is not created.
    """
    if result.rewrites:
        return
    raise NothingRewritten(
        nothing_rewritten_message(result),
        hint="`convrewrite report MODEL --rule ...` lists every layer with its reason; "
        "change the rules or their options",
    )


def write_apply_output(
    result: Any, report: Any, directory: Path, force: bool = False, exports: tuple[str, ...] | list[str] = ()
) -> WrittenOutput:
    """Run every exporter into a staging directory, verify each, then move it into place as ``directory``.

    Refuses (``NothingRewritten``, exit 3) when no rule rewrote anything: nothing is written.
    """
    from convrewrite.export.base import ExportContext, exporters_for

    require_rewrites(result)
    check_destination(directory, force)
    exporters = exporters_for(list(exports))
    for exporter in exporters:
        exporter.check_available()
    directory = Path(directory)
    parent = directory.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.convrewrite-", dir=parent))
    os.chmod(staging, 0o777 & ~umask())
    context = ExportContext(result, report)
    files: list[str] = []
    try:
        for exporter in exporters:
            files += exporter.write(context, staging)
            exporter.verify(context, staging)
        move_into_place(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    onnx = context.facts.get("onnx")
    if onnx is not None:
        onnx.path = directory / "model.onnx"
    return WrittenOutput(
        directory,
        files,
        float(context.facts.get("reload_max_abs_error", 0.0)),
        context.facts.get("user_source"),
        onnx,
    )


def move_into_place(staging: Path, directory: Path) -> None:
    if directory.exists():
        if any(directory.iterdir()):
            backup = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.resolve().parent))
            backup.rmdir()
            os.replace(directory, backup)
            try:
                os.replace(staging, directory)
            except BaseException:
                os.replace(backup, directory)
                raise
            shutil.rmtree(backup, ignore_errors=True)
            return
        directory.rmdir()
    os.replace(staging, directory)
