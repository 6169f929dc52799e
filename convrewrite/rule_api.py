"""Deprecated: the plugin API's module before the restructure; use ``convrewrite.rules.api``.

Every public name of ``convrewrite.rules.api`` resolves here for one release, with a
``DeprecationWarning`` naming the new module (see CHANGELOG.md).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    from convrewrite.rules import DEPRECATED_API_NAMES, deprecated_api_name

    if name in DEPRECATED_API_NAMES:
        return deprecated_api_name(__name__, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
