"""convrewrite: rewrite dense convolutions of trained PyTorch models into cheaper structures.

The package root stays lean (no torch import) so that ``convrewrite --help`` is instant; the
engine, rules and reports are imported where they are used.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
