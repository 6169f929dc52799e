"""Thread counts per kind of work (core/threads.py): rules on one thread, forward passes on the
idle cores, the caller's setting restored afterwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convrewrite.core import threads
from convrewrite.core.threads import forward_thread_count, idle_cores, torch_threads
from convrewrite.errors import UsageError


@pytest.mark.parametrize(
    ("cores", "load", "expected"),
    [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 9.3, 1), (8, 2.2, 6), (8, 0.0, 8), (1, 0.0, 1)],
)
def test_idle_cores_are_the_cores_minus_the_load(cores: int, load: float, expected: int) -> None:
    assert idle_cores(cores, load) == expected


def test_forward_threads_never_exceed_torch_setting_and_follow_the_variable(monkeypatch) -> None:
    monkeypatch.delenv(threads.THREADS_VARIABLE, raising=False)
    monkeypatch.setattr(threads, "idle_cores", lambda: 8)
    with torch_threads(3):
        assert forward_thread_count() == 3  # the caller's (or OMP_NUM_THREADS') setting is the ceiling
    monkeypatch.setattr(threads, "idle_cores", lambda: 1)
    with torch_threads(3):
        assert forward_thread_count() == 1
    monkeypatch.setenv(threads.THREADS_VARIABLE, "2")
    assert forward_thread_count() == 2
    monkeypatch.setenv(threads.THREADS_VARIABLE, "two")
    with pytest.raises(UsageError, match="CONVREWRITE_THREADS='two' is not a positive integer"):
        forward_thread_count()


def test_the_setting_is_restored_nested_and_as_a_decorator() -> None:
    outer = torch.get_num_threads()
    seen: list[int] = []

    @torch_threads(1)
    def rule_work() -> None:
        seen.append(torch.get_num_threads())

    with torch_threads(2):
        seen.append(torch.get_num_threads())
        rule_work()
        seen.append(torch.get_num_threads())
        with pytest.raises(RuntimeError), torch_threads(1):
            raise RuntimeError("restored on errors too")
        seen.append(torch.get_num_threads())
    assert seen == [2, 1, 2, 2]
    assert torch.get_num_threads() == outer


def test_the_engine_runs_rules_on_one_thread(monkeypatch) -> None:
    """Rules see one thread; forward passes see the idle-core count."""
    from convrewrite.core.loading import ExampleInputs, LoadedModel
    from convrewrite.engine.pipeline import analyse
    from convrewrite.rules.separable import SeparableRule

    monkeypatch.setattr(threads, "forward_thread_count", lambda: 2)
    seen: dict[str, int] = {}

    class Watching(SeparableRule):
        def build(self, site):  # type: ignore[no-untyped-def]
            seen["build"] = torch.get_num_threads()
            return super().build(site)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.setdefault("forward", torch.get_num_threads())
            return self.conv(x)

    with torch_threads(4):
        analyse(LoadedModel(Net().eval(), ExampleInputs((torch.randn(1, 3, 6, 6),)), "n", "n", "t"), [Watching()])
        assert torch.get_num_threads() == 4
    assert seen == {"forward": 2, "build": 1}
