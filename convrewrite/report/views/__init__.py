"""Views of a ``Report`` (table, torchsummary, JSON, markdown...): each a pure function of the
report that returns text, so golden files can pin it at a fixed width with no colour.

Every module of this package registers its views on import (``registry.register_view``); this
package imports them all, so ``view_names("report")`` lists every format.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from convrewrite.report.registry import get_view, register_view, render_view, view_names
from convrewrite.report.views.text import MACS_NOTE, shape_text

# The built-in formats first, in the order --help lists them; then any other view module here.
_BUILT_IN = ("table", "torchsummary", "json_view", "markdown")
for _name in (*_BUILT_IN, *sorted(info.name for info in pkgutil.iter_modules(__path__))):
    if _name not in ("registry", "text", "sections"):
        importlib.import_module(f"{__name__}.{_name}")

from convrewrite.report.views.torchsummary import render_torchsummary_block  # noqa: E402

FORMATS = view_names("report")


def render(report: Any, fmt: str, width: int = 120, color: bool = False) -> str:
    """``report`` in format ``fmt`` (one of ``FORMATS``)."""
    return render_view("report", report, fmt, width=width, color=color)


__all__ = [
    "FORMATS",
    "MACS_NOTE",
    "get_view",
    "register_view",
    "render",
    "render_torchsummary_block",
    "render_view",
    "shape_text",
    "view_names",
]
