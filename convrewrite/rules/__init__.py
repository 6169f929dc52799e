"""The built-in rule plugins, installed under the import name ``convrewrite.rules``.

One file per rule. Each registers in the entry-point group ``convrewrite.rules`` (see
pyproject.toml), exactly as a third-party rule would.

The plugin API lives in ``convrewrite.rules.api``. Before the restructure a plugin imported it
from ``convrewrite.rules`` (and ``convrewrite.rule_api``); those names still resolve for one
release, each with a ``DeprecationWarning`` that names the new module (see CHANGELOG.md).
"""

from __future__ import annotations

import warnings
from typing import Any

#: The plugin API's public names, importable from here until the next release (deprecated).
DEPRECATED_API_NAMES = (
    "ENTRY_POINT_GROUP",
    "Consumer",
    "ConvSite",
    "Cost",
    "Replacement",
    "Rule",
    "RuleConfig",
    "build_config",
    "common_skip_reason",
    "config_as_dict",
    "format_spec",
    "is_explicit",
    "load_rule_class",
    "make_rule",
    "matches_any",
    "option_table",
    "rule_registry",
    "selection_reason",
    "split_rule_spec",
)


def deprecated_api_name(old_module: str, name: str) -> Any:
    """``name`` from ``convrewrite.rules.api``, with the warning that says where it moved."""
    import sys

    from convrewrite.rules import api

    caller = sys._getframe(2)  # 0: here, 1: the module's __getattr__, 2: who asked
    if caller.f_code.co_filename.startswith("<frozen importlib"):
        # ``from convrewrite.rules import X`` asks twice: the import system's hasattr (here),
        # then the import statement itself, which gets the warning (once, at the user's line).
        return getattr(api, name)
    warnings.warn(
        f"importing {name} from {old_module} is deprecated and will stop working in the next release; "
        f"import it from convrewrite.rules.api",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(api, name)


def __getattr__(name: str) -> Any:
    # Only the API's names: anything else (a rule submodule such as ``separable``) must raise
    # AttributeError, so that ``from convrewrite.rules import separable`` imports the submodule.
    if name in DEPRECATED_API_NAMES:
        return deprecated_api_name(__name__, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
