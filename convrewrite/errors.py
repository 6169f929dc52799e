"""The one domain exception family, each carrying the documented exit code.

Exit codes: 0 ok, 1 a budget exceeded, 2 usage or configuration error, 3 the model could not be
loaded, traced or rewritten. Expected failures are raised as these and printed as one line by the
CLI; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

# Terminal control sequences (colours, cursor moves) that a library or a user's exception may carry:
# a one-line message goes to logs and CI annotations, where they show up as noise.
_ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")


def plain_text(text: str) -> str:
    """``text`` without terminal escape sequences (ANSI colours and the like)."""
    return _ANSI_ESCAPE.sub("", text)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    lines = plain_text(str(exc)).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def describe(exc: BaseException) -> str:
    """``TypeName: first line of the message`` for one-line reports of a foreign exception."""
    lines = plain_text(str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class ConvRewriteError(Exception):
    """An expected failure with a one-line, actionable message."""

    exit_code = 3

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message.rstrip(".")
        if self.hint:
            text = f"{text}; {self.hint}"
        return " ".join(plain_text(text).split())


class UsageError(ConvRewriteError):
    """Bad command line or configuration (exit 2)."""

    exit_code = 2


class ModelError(ConvRewriteError):
    """The model could not be loaded, traced or rewritten (exit 3)."""

    exit_code = 3


class BudgetExceeded(ConvRewriteError):
    """At least one error-level budget is exceeded (exit 1)."""

    exit_code = 1


class NothingRewritten(ModelError):
    """``apply``: the rules rewrote no layer, so nothing is written (exit 3, like any model that
    could not be rewritten). The message sums up the skip reasons."""
