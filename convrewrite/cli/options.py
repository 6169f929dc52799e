"""Command-line options generated from the settings schema (``convrewrite/config/schema.py``).

``with_settings(command)`` wraps a command function whose first parameter is ``settings`` (a dict
of the raw command-line values of the schema's settings, None when not given): the wrapper's
signature, which typer reads, holds one option per setting of that command followed by the
function's own parameters. Every schema option defaults to None, so the resolution can tell
"not given" from "given as the default" and report where each value came from.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any

import typer

from convrewrite.config import schema

_PYTHON_TYPES: dict[str, type] = {"int": int, "float": float, "bool": bool}


def _default_text(setting: schema.Setting) -> str | bool:
    if setting.default is None or setting.default == [] or setting.kind == "bool":
        return False
    return str(setting.default)


def _parameter(setting: schema.Setting) -> inspect.Parameter:
    if setting.argument:
        info: Any = typer.Argument(metavar=setting.metavar, help=setting.help, show_default=False)
        annotation: Any = Annotated[str | None, info]
        return inspect.Parameter(
            setting.key, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=annotation
        )
    declarations = [setting.option]
    if setting.kind == "bool":
        declarations = [f"{setting.option}/{setting.negative_flag or '--no-' + setting.name}"]
    if setting.short:
        declarations.append(setting.short)
    base: Any = list[str] if setting.repeatable else _PYTHON_TYPES.get(setting.kind, str)
    help_text = setting.help
    if setting.choices:
        help_text = f"{help_text} [{' | '.join(setting.choices)}]"
    info = typer.Option(
        *declarations,
        help=help_text,
        metavar=setting.metavar,
        show_default=_default_text(setting),
        hidden=setting.hidden,
    )
    annotation = Annotated[base | None, info]
    return inspect.Parameter(setting.key, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


def with_settings(command: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: give ``function`` the schema's options for ``command`` (see the module doc)."""
    own_settings = schema.settings_for(command)

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(function)
        # The function's own annotations are strings (``from __future__ import annotations``) that
        # name objects of its module: resolve them there, before the wrapper moves them here.
        hints = typing.get_type_hints(function, include_extras=True)
        own = [p.replace(annotation=hints[name]) for name, p in signature.parameters.items() if name != "settings"]
        generated = [_parameter(setting) for setting in own_settings]
        arguments = [p for p in generated if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        options = [p for p in generated if p.kind is inspect.Parameter.KEYWORD_ONLY]
        keys = {setting.key: setting.name for setting in own_settings}

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {keys[key]: kwargs.pop(key) for key in list(kwargs) if key in keys}
            return function(values, *args, **kwargs)

        own_options = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        wrapper.__signature__ = inspect.Signature([*arguments, *options, *own_options])  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}  # type: ignore[attr-defined]
        del wrapper.__wrapped__  # typer must read the generated signature, not the function's
        return wrapper

    return decorate
