"""What a stage is, and the registry the pipeline plans its run from.

In the manner of torch.fx's pass infrastructure, a stage has a name, says which fields of the
``RunState`` it ``requires`` and which it ``ensures``, and runs over that one state, returning
whether it changed the model. A stage class registers itself with ``@register_stage``; its
``plan`` decides, from the state, whether it runs and how many times (the rewrite stage runs once
per rule). Adding a stage is adding one file to this package (every module in it is imported when
the pipeline plans) and its name to ``STAGE_ORDER``, or registering a class from a plugin through
the ``convrewrite.stages`` entry-point group (a plugin names the stage it runs ``after``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from convrewrite.errors import ModelError

if TYPE_CHECKING:
    from convrewrite.engine.state import RunState


@dataclass
class StageOutcome:
    """What ``Stage.run`` returns: whether the model changed, and one line for ``--verbose``."""

    modified: bool = False
    summary: str = ""


class Stage:
    """Base class of pipeline stages."""

    name: ClassVar[str] = ""
    #: A stage not in ``STAGE_ORDER`` (a plugin's) runs right after this one; None: last.
    after: ClassVar[str | None] = None
    requires: ClassVar[tuple[str, ...]] = ()
    ensures: ClassVar[tuple[str, ...]] = ()

    @property
    def label(self) -> str:
        """The name this instance is reported under (``rewrite[separable]`` for one rule)."""
        return self.name

    @classmethod
    def plan(cls, state: RunState) -> list[Stage]:
        """The instances of this stage that ``state`` needs (none to skip it)."""
        return [cls()]

    def run(self, state: RunState) -> StageOutcome:
        raise NotImplementedError

    def check_ensures(self, state: RunState) -> None:
        """Raise when the state lacks what this stage promised; stages add their own checks."""
        missing = [name for name in self.ensures if getattr(state, name, None) is None]
        if missing:
            raise ModelError(f"stage {self.label} did not produce {', '.join(missing)} (a bug: please report it)")


class TrainingStage(Stage):
    """A stage that trains the rewritten model against the reference on the calibration data
    (``fit``, ``distill``): planned only with data and rules, and when its settings ask for it."""

    requires = ("reference", "after", "data")
    ensures = ("after",)
    needs_reference = True

    @classmethod
    def wanted(cls, state: RunState) -> bool:
        """Whether the run's settings ask for this stage (given data and rules)."""
        raise NotImplementedError

    @classmethod
    def plan(cls, state: RunState) -> list[Stage]:
        return [cls()] if state.data is not None and bool(state.rules) and cls.wanted(state) else []

    def run(self, state: RunState) -> StageOutcome:
        assert state.reference is not None and state.data is not None
        if not state.originals:
            return StageOutcome(False, f"nothing was rewritten: nothing to {self.name}")
        return self.train(state)

    def train(self, state: RunState) -> StageOutcome:
        """The stage's work, on a run with reference, data and at least one rewritten layer."""
        raise NotImplementedError


#: The built-in stages in the order the pipeline runs them: the one place that order is written.
#: A name with no registered stage is skipped: ``plan`` is the planner's slot, ``export-check``
#: and ``fitted-weights`` are the slots of the apply path's early export check and of reusing an
#: earlier fit (both in progress on other branches).
STAGE_ORDER: tuple[str, ...] = (
    "profile",
    "trace",
    "plan",
    "rewrite",
    "verify",
    "export-check",
    "fit",
    "fitted-weights",
    "distill",
    "fidelity",
    "evaluate",
    "latency",
)

_registry: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: the pipeline plans every registered stage, in ``STAGE_ORDER``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _registry[cls.name] = cls
    return cls


def registered_stages() -> list[type[Stage]]:
    """Every registered stage in run order: ``STAGE_ORDER``, each plugin stage right after the
    stage it names (plugins after the same stage by name), the others last by name."""
    ordered = [name for name in STAGE_ORDER if name in _registry]
    plugins = sorted(name for name in _registry if name not in STAGE_ORDER)
    for name in plugins:
        after = _registry[name].after
        if after in ordered:
            position = ordered.index(after) + 1
            while position < len(ordered) and ordered[position] in plugins:
                position += 1
            ordered.insert(position, name)
    ordered += [name for name in plugins if name not in ordered]
    return [_registry[name] for name in ordered]
