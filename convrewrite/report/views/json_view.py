"""The JSON contract (``convrewrite.report/1``)."""

from __future__ import annotations

import json

from convrewrite.report.model import Report
from convrewrite.report.registry import register_view


@register_view("report", "json", "the JSON report (schema convrewrite.report/1)")
def render_json(report: Report, width: int = 120, color: bool = False) -> str:
    return json.dumps(report.to_dict(), indent=2) + "\n"
