"""What a stage is, and the registry the pipeline plans its run from.

In the manner of torch.fx's pass infrastructure, a stage has a name, says which fields of the
``RunState`` it ``requires`` and which it ``ensures``, and runs over that one state, returning
whether it changed the model. A stage class registers itself with ``@register_stage`` and an
``order``; its ``plan`` decides, from the state, whether it runs and how many times (the rewrite
stage runs once per rule). Adding a stage is adding one file to this package (every module in it
is imported when the pipeline plans), or registering a class from a plugin through the
``convrewrite.stages`` entry-point group.

Orders of the built-in stages: profile 100, trace 200, rewrite 300, verify 400, export-check 450
(apply only), fit or fitted-weights 500, distill 600, fidelity 700, latency 800.
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
    order: ClassVar[int] = 0
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


_registry: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: the pipeline plans every registered stage, by ``order``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _registry[cls.name] = cls
    return cls


def registered_stages() -> list[type[Stage]]:
    return sorted(_registry.values(), key=lambda cls: (cls.order, cls.name))
