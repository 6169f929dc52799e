"""Exporter ``report``: ``report.json``, the JSON contract, read back and compared."""

from __future__ import annotations

import json
from pathlib import Path

from convrewrite.errors import ModelError
from convrewrite.export.base import ExportContext, Exporter, register_exporter
from convrewrite.export.writer import write_file_atomic


@register_exporter
class ReportExporter(Exporter):
    name = "report"
    files = ("report.json",)
    always = True
    order = 1000  # last: the report can record what the other exporters wrote

    def write(self, context: ExportContext, staging: Path) -> list[str]:
        self.text = json.dumps(context.report.to_dict(), indent=2) + "\n"
        write_file_atomic(staging / "report.json", self.text.encode())
        return ["report.json"]

    def verify(self, context: ExportContext, staging: Path) -> None:
        if json.loads((staging / "report.json").read_text()) != json.loads(self.text):
            raise ModelError("report.json did not read back identically")
