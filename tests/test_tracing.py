"""Tracing: no side effects on the model, flags fixed to their defaults, the leaf fallback."""

from __future__ import annotations

import torch
from torch import nn

from convrewrite.engine.tracing import trace


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
