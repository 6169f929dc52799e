"""The pipeline's stages, one file each; importing this package registers all of them."""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from convrewrite.engine.stages.base import Stage, StageOutcome, register_stage, registered_stages

ENTRY_POINT_GROUP = "convrewrite.stages"


@lru_cache(maxsize=1)
def discover_stages() -> tuple[type[Stage], ...]:
    """Import every module of this package and every ``convrewrite.stages`` plugin, then list them."""
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry.load()
        if isinstance(loaded, type) and issubclass(loaded, Stage):
            register_stage(loaded)
    return tuple(registered_stages())


__all__ = ["Stage", "StageOutcome", "discover_stages", "register_stage", "registered_stages"]
