"""The view registry: every output format of every kind of result, in one place.

A view is a pure function ``render(result, width=..., color=...) -> str`` registered for a
subject (``report`` for a ``Report``, ``check`` for a ``CheckResult``) under a format name. The
command line reads its ``--format`` choices from here, so a new format is one decorated function
in one new file. Nothing here imports torch.

The registry sits below the report model and its views: ``Report.render`` looks a view up here,
and the built-in report views (``convrewrite.report.views``) are imported by name the first time
a report view is asked for, the way plugins are, so the model never imports the views that import
it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Renderer = Callable[..., str]


@dataclass(frozen=True)
class View:
    subject: str
    name: str
    render: Renderer
    help: str


_views: dict[tuple[str, str], View] = {}

#: The package whose import registers the built-in views of each subject.
BUILT_IN_VIEWS = {"report": "convrewrite.report.views"}


def _load_built_in(subject: str) -> None:
    package = BUILT_IN_VIEWS.get(subject)
    if package is not None:
        importlib.import_module(package)


def register_view(subject: str, name: str, help: str = "") -> Callable[[Renderer], Renderer]:
    """Decorator: ``render`` becomes format ``name`` of ``subject``."""

    def decorate(render: Renderer) -> Renderer:
        _views[(subject, name)] = View(subject, name, render, help)
        return render

    return decorate


def view_names(subject: str) -> tuple[str, ...]:
    """The formats of ``subject``, in registration order."""
    _load_built_in(subject)
    return tuple(name for (kind, name) in _views if kind == subject)


def get_view(subject: str, name: str) -> View:
    from convrewrite.errors import UsageError

    _load_built_in(subject)
    view = _views.get((subject, name))
    if view is None:
        raise UsageError(f"unknown --format {name!r}", hint=f"choose one of {', '.join(view_names(subject))}")
    return view


def render_view(subject: str, result: Any, fmt: str, width: int = 120, color: bool = False) -> str:
    return get_view(subject, fmt).render(result, width=width, color=color)
