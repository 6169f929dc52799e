"""``[tool.convrewrite]`` in pyproject.toml, and where each setting came from.

The command line overrides the config file, which overrides the defaults. Every resolved value
is a ``Value`` that remembers its source, so ``--verbose`` can say where it came from. Unknown
keys are errors that name the key: a typo must never silently disable a budget. The keys and their
types come from the settings schema (``convrewrite/config/schema.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convrewrite.config import schema
from convrewrite.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

#: Keys of [tool.convrewrite]: the schema's settings, plus the budgets and targets of ``check``.
KNOWN_KEYS = schema.toml_keys() | {"budgets", "targets"}


@dataclass
class Value:
    """A resolved setting and where it came from (``command line``, a config table, ``default``)."""

    value: Any
    source: str

    def describe(self, name: str) -> str:
        return f"{name} = {self.value!r}  ({self.source})"


@dataclass
class ProjectConfig:
    """The ``[tool.convrewrite]`` table (keys normalised to dashes) and its file."""

    path: Path | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def where(self, key: str) -> str:
        if self.path is None:
            return "default"
        return f"{display_path(self.path)} [tool.convrewrite] {key}"

    def resolve(self, key: str, cli_value: Any, default: Any = None) -> Value:
        """Command line first (when given), then the config file, then the default."""
        if cli_value not in (None, [], ()):
            return Value(cli_value, "command line")
        if key in self.data:
            return Value(self.data[key], self.where(key))
        return Value(default, "default")


def display_path(path: Path | None) -> str:
    """A config path as messages show it: relative to the working directory when below it."""
    if path is None:
        return "command line"
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def find_pyproject(start: Path | None = None) -> Path | None:
    """The nearest pyproject.toml with a [tool.convrewrite] table, from ``start`` upwards."""
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            try:
                with candidate.open("rb") as handle:
                    data = tomllib.load(handle)
            except (OSError, tomllib.TOMLDecodeError):
                # A broken pyproject is reported when it is the one we use (load_project_config).
                return candidate
            if "convrewrite" in data.get("tool", {}):
                return candidate
    return None


def load_project_config(path: Path | None = None, start: Path | None = None) -> ProjectConfig:
    """Read and validate ``[tool.convrewrite]``; no file means an empty config."""
    explicit = path is not None
    path = path if path is not None else find_pyproject(start)
    if path is None:
        return ProjectConfig()
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}") from None
    table = document.get("tool", {}).get("convrewrite")
    if table is None:
        if explicit:
            raise UsageError(f"{path} has no [tool.convrewrite] table")
        return ProjectConfig()
    if not isinstance(table, dict):
        raise UsageError(f"{path}: [tool.convrewrite] must be a table")
    known = ", ".join(sorted(KNOWN_KEYS))
    data = normalized_keys(table, KNOWN_KEYS, str(path), hint=f"known keys: {known}", label="[tool.convrewrite] ")
    config = ProjectConfig(path, data)
    _validate_common(config)
    return config


def normalized_keys(
    table: dict[str, Any], allowed: Collection[str], where: str, *, hint: str, label: str = ""
) -> dict[str, Any]:
    """``table`` with keys spelled with dashes (``min_channels`` = ``min-channels``); an unknown key
    is a usage error that names it, so a typo never silently disables a setting or a budget."""
    data: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = raw_key.replace("_", "-")
        if key not in allowed:
            raise UsageError(f"{where}: unknown key {label}{raw_key!r}", hint=hint)
        data[key] = value
    return data


def _validate_common(config: ProjectConfig) -> None:
    schema.validate_table(config.data, config.where)


def config_input_shapes(value: Any) -> list[tuple[int, ...]]:
    if not value:
        return []
    if isinstance(value[0], list):
        return [tuple(v) for v in value]
    return [tuple(value)]
