"""The block registry: replacement layers that tracing keeps whole and ``apply`` writes out whole.

A registered block is an FX leaf (traced graphs call it as one module, so the written model keeps
it as one readable layer) and the source writer knows how to define it in the generated
``model.py``: by copying its module's source (when that module imports only torch and the
standard library, as every file of ``convrewrite.layers`` does) or, for a block whose module
needs more, by importing it from its package.

Blocks get here three ways: every block class exported by ``convrewrite.layers``; the blocks a
rule declares in ``Rule.blocks`` (registered when the rule loads); and the class of any
replacement a rule installs, so a third-party rule needs nothing special for its own block to
survive as a named layer.
"""

from __future__ import annotations

import ast
import inspect
import sys
from dataclasses import dataclass
from functools import cache

from torch import nn

#: Modules a copied block file may import: torch and the standard library.
_ALLOWED_TOP_LEVEL = {"torch", "__future__", "typing_extensions"}


@dataclass(frozen=True)
class BlockInfo:
    cls: type[nn.Module]
    #: True: ``model.py`` gets the defining module's source; False: it imports the class.
    copy_source: bool


_blocks: dict[type[nn.Module], BlockInfo] = {}


@cache
def module_is_standalone(module_name: str) -> bool:
    """True when a module's top-level imports are torch and the standard library only."""
    module = sys.modules.get(module_name)
    if module is None:
        return False
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError, SyntaxError):
        return False
    for statement in tree.body:
        if isinstance(statement, ast.Import):
            names = [alias.name for alias in statement.names]
        elif isinstance(statement, ast.ImportFrom):
            if statement.level:
                return False  # a relative import does not survive being copied
            names = [statement.module or ""]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top not in _ALLOWED_TOP_LEVEL and top not in sys.stdlib_module_names:
                return False
    return True


def register_block(cls: type[nn.Module], *, copy_source: bool | None = None) -> type[nn.Module]:
    """Register ``cls`` (usable as a class decorator). ``copy_source`` defaults to whether its
    module stands alone (imports torch and the standard library only)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"{cls!r} is not an nn.Module subclass")
    if copy_source is None:
        copy_source = module_is_standalone(cls.__module__)
    _blocks[cls] = BlockInfo(cls, copy_source)
    return cls


def is_block(cls: type) -> bool:
    return cls in _blocks


def block_info(cls: type) -> BlockInfo | None:
    return _blocks.get(cls)


def registered_blocks() -> tuple[type[nn.Module], ...]:
    return tuple(_blocks)


def register_replacement(module: nn.Module) -> None:
    """Register the class of a module a rule installed, unless torch itself defines it."""
    cls = type(module)
    if cls in _blocks or cls.__module__.startswith("torch."):
        return
    register_block(cls)
