"""Stage ``export-check``: prove, right after the rewrite, that ``apply`` will be able to write it.

The written structure (``model.py``, and ``model.onnx`` with ``--export onnx``) depends on the
rewritten model's layers, not on the values fitting and distillation give their weights. So
before the ``fit`` stage (500) and any distillation, ``apply`` runs every exporter it will run at
the end into a temporary directory: ``model.py`` is generated, imported afresh, given the
current weights and compared with the rewritten model (the reload check), and the ONNX file is
exported and run in ONNX Runtime. A model whose export cannot work then fails in seconds (exit
3, naming this stage) instead of after the fitting, and nothing is written: the temporary
directory is removed either way.

Planned only when the run will write (``settings.export_check``, which ``apply`` sets to the
directory that will hold its output, where the scratch directory goes: the same file system as
the real write) and a rule is given.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from convrewrite.engine.stages.base import Stage, StageOutcome, register_stage
from convrewrite.engine.state import RunState
from convrewrite.errors import ModelError


@register_stage
class ExportCheckStage(Stage):
    name = "export-check"
    requires = ("rewritten_trace", "after")

    @classmethod
    def plan(cls, state: RunState) -> list[Stage]:
        return [cls()] if state.rules and state.settings.export_check else []

    def run(self, state: RunState) -> StageOutcome:
        if not state.rewrites:
            return StageOutcome(False, "nothing was rewritten: nothing to export")
        where = state.settings.export_check
        beside = Path(where) if isinstance(where, str) and Path(where).is_dir() else None
        written = trial_export(state, list(state.settings.export), beside)
        return StageOutcome(False, f"{', '.join(written)} written, reloaded and matched in a scratch directory")


def trial_export(state: RunState, exports: list[str], beside: Path | None = None) -> list[str]:
    """Run the exporters ``apply`` will run (``exports``: its ``--export`` values) into a scratch
    directory and remove it; returns the files they wrote. Raises ``ModelError`` when one fails.

    ``beside``: the directory that will hold the output (an existing one), so the trial writes on
    the same file system as the real write; otherwise the system's temporary directory."""
    from convrewrite.engine.report_builder import build_report
    from convrewrite.export.base import ExportContext, exporters_for

    scratch = Path(tempfile.mkdtemp(prefix=".convrewrite-export-check-", dir=beside))
    try:
        context = ExportContext(state, build_report(state))
        files: list[str] = []
        for exporter in exporters_for(exports):
            try:
                files += exporter.write(context, scratch)
                exporter.verify(context, scratch)
            except ModelError as exc:
                raise ModelError(
                    f"the rewritten model cannot be written ({exporter.name} export, checked before "
                    f"any fitting): {exc.message}",
                    hint=exc.hint,
                ) from exc
        return files
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
