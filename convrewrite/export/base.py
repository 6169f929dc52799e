"""What an exporter is: the files it writes into ``apply``'s output directory, and how it proves them.

``apply`` stages its output in a temporary directory beside DIR. Each exporter in turn ``write``s
its files there and ``verify``s them (reads them back, reloads the model, compares outputs); only
when every exporter has verified does the directory move into place, so a failed export leaves
nothing behind. An exporter registers with ``@register_exporter``; ``pytorch`` (model.py and
weights) and ``report`` (report.json) always run, others (``onnx``) when ``--export`` names them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar


@dataclass
class ExportContext:
    """What exporters share: the run, its report, and what earlier exporters found."""

    result: Any
    report: Any
    #: Filled by exporters for those after them and for the summary line (``reload_max_abs_error``...).
    facts: dict[str, Any] = field(default_factory=dict)


class Exporter:
    """Base class: set ``name`` and ``files``; implement ``write`` and ``verify``."""

    name: ClassVar[str] = ""
    files: ClassVar[tuple[str, ...]] = ()
    #: Written whatever ``--export`` says.
    always: ClassVar[bool] = False
    #: Runs after exporters with a lower order (the report goes last, so it can record the others).
    order: ClassVar[int] = 100

    def check_available(self) -> None:
        """Raise a UsageError (before any work) when this exporter cannot run here."""

    def write(self, context: ExportContext, staging: Path) -> list[str]:
        """Write the files into ``staging``; returns the names written."""
        raise NotImplementedError

    def verify(self, context: ExportContext, staging: Path) -> None:
        """Prove the files: read back, reload, compare; raise ModelError when they do not hold."""


_exporters: dict[str, type[Exporter]] = {}


def register_exporter(cls: type[Exporter]) -> type[Exporter]:
    _exporters[cls.name] = cls
    return cls


def exporter_names(optional_only: bool = False) -> tuple[str, ...]:
    _load_builtins()
    return tuple(name for name, cls in _exporters.items() if not (optional_only and cls.always))


def exporters_for(requested: list[str] | tuple[str, ...]) -> list[Exporter]:
    """The exporters that run for ``--export`` values ``requested``, in order; unknown names are usage errors."""
    from convrewrite.errors import UsageError

    _load_builtins()
    for name in requested:
        if name not in _exporters or _exporters[name].always:
            choices = ", ".join(exporter_names(optional_only=True)) or "none"
            raise UsageError(f"unknown --export {name!r}", hint=f"choose one of {choices}")
    chosen = [cls() for name, cls in _exporters.items() if cls.always or name in requested]
    return sorted(chosen, key=lambda exporter: exporter.order)


def output_files() -> tuple[str, ...]:
    """Every file name any exporter writes (what ``--force`` may replace)."""
    _load_builtins()
    return tuple(name for cls in _exporters.values() for name in cls.files)


_NOT_EXPORTERS = {"base", "writer", "source"}


def _load_builtins() -> None:
    """Import every exporter module of this package (a new exporter is one new file)."""
    import importlib
    import pkgutil

    import convrewrite.export as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _NOT_EXPORTERS:
            importlib.import_module(f"{package.__name__}.{info.name}")
