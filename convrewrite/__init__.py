"""convrewrite: rewrite dense convolutions of trained PyTorch models into cheaper structures.

The package root stays lean (no torch import) so that ``convrewrite --help`` is instant; the
Python API (``convrewrite.rewrite``, ``convrewrite.report``) loads the engine when first used.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["RewriteResult", "__version__", "plan", "report", "rewrite"]


def __getattr__(name: str) -> Any:
    if name in ("rewrite", "report", "plan", "RewriteResult"):
        from convrewrite import api

        return getattr(api, name)
    raise AttributeError(f"module 'convrewrite' has no attribute {name!r}")
