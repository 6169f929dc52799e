"""Tracing: no side effects on the model, flags fixed to their defaults, the leaf fallback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convrewrite.core.loading import ExampleInputs
from convrewrite.core.tracing import default_arguments, trace


class CachingAttentionBias(nn.Module):
    """Caches a gathered bias in a dict and counts its calls in a plain attribute during forward."""

    def __init__(self) -> None:
        super().__init__()
        self.biases = nn.Parameter(torch.randn(3))
        self.register_buffer("index", torch.tensor([[0, 1], [2, 0]]))
        self.cache: dict[str, torch.Tensor] = {}
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.biases[self.index]
        return x + self.cache[key]


class Untraceable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if float(x.detach().sum()) > 0 else x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = CachingAttentionBias()
        self.after = Untraceable()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after(self.bias(x))


def test_tracing_leaves_the_model_state_as_it_was() -> None:
    """The retry with a leaf used to read the first attempt's cached proxy, and the graph pointed
    into the first graph ("Argument 'getitem' of Node 'add' does not belong to this Graph")."""
    model = Net().eval()
    x = torch.randn(2, 2)
    with torch.no_grad():
        expected = model(x)
    before = {name: dict(vars(module)) for name, module in model.named_modules()}
    cache_before = dict(model.bias.cache)
    for _ in range(2):  # the re-trace after a rewrite meets whatever the first trace left behind
        traced = trace(model)
        assert traced.mode == "fx+leaves" and traced.leaf_names == {"after"}
        assert traced.graph_module is not None
        traced.graph_module.graph.lint()
        with torch.no_grad():
            torch.testing.assert_close(traced.graph_module(x), expected)
    assert {name: dict(vars(module)) for name, module in model.named_modules()} == before
    assert model.bias.cache == cache_before and model.bias.calls == 1


class Flagged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(
        self, x: torch.Tensor, scale: torch.Tensor | None = None, embed: bool = False, mode: str = "sum"
    ) -> torch.Tensor:
        y = self.conv(x)
        if scale is not None:
            y = y * scale
        if embed:
            return y.flatten(1)
        return y.sum((2, 3)) if mode == "sum" else y.mean((2, 3))


def test_flags_without_an_example_input_are_traced_as_their_defaults() -> None:
    model = Flagged().eval()
    x = torch.randn(1, 3, 6, 6)
    assert trace(model).mode == "eager"  # ``if embed:`` on a proxy
    fixed = default_arguments(model, ExampleInputs((x,), {}))
    assert fixed == {"scale": None, "embed": False, "mode": "sum"}
    traced = trace(model, concrete_args=fixed)
    assert traced.mode == "fx" and traced.specialized == fixed
    assert "fixed to their defaults (scale=None, embed=False, mode='sum')" in traced.describe()
    graph_module = traced.graph_module
    assert graph_module is not None
    placeholders = [str(n.target) for n in graph_module.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["x", "scale", "embed", "mode"]  # the model's own names, not embed_1
    with torch.no_grad():
        torch.testing.assert_close(graph_module(x), model(x))
        torch.testing.assert_close(graph_module(x, embed=False), model(x))
        with pytest.raises(AssertionError, match="embed has been specialized"):
            graph_module(x, embed=True)


def test_arguments_the_example_input_gives_are_not_fixed() -> None:
    model = Flagged()
    x = torch.randn(1, 3, 6, 6)
    assert default_arguments(model, ExampleInputs((x, torch.ones(1)), {})) == {"embed": False, "mode": "sum"}
    assert default_arguments(model, ExampleInputs((x,), {"embed": True})) == {"scale": None, "mode": "sum"}
