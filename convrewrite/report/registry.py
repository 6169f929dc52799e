"""The view registry: every output format of every kind of result, in one place.

A view is a pure function ``render(result, width=..., color=...) -> str`` registered for a
subject (``report`` for a ``Report``, ``check`` for a ``CheckResult``) under a format name. The
command line reads its ``--format`` choices from here, so a new format is one decorated function
in one new file. Nothing here imports torch.
"""

from __future__ import annotations

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


def register_view(subject: str, name: str, help: str = "") -> Callable[[Renderer], Renderer]:
    """Decorator: ``render`` becomes format ``name`` of ``subject``."""

    def decorate(render: Renderer) -> Renderer:
        _views[(subject, name)] = View(subject, name, render, help)
        return render

    return decorate


def view_names(subject: str) -> tuple[str, ...]:
    """The formats of ``subject``, in registration order."""
    return tuple(name for (kind, name) in _views if kind == subject)


def get_view(subject: str, name: str) -> View:
    from convrewrite.errors import UsageError

    view = _views.get((subject, name))
    if view is None:
        raise UsageError(f"unknown --format {name!r}", hint=f"choose one of {', '.join(view_names(subject))}")
    return view


def render_view(subject: str, result: Any, fmt: str, width: int = 120, color: bool = False) -> str:
    return get_view(subject, fmt).render(result, width=width, color=color)
