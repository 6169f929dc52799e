"""Fitting from the stored frontiers (``recovery/frontier.py``) against the prefix passes."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from convrewrite.recovery.batches import TensorBatches
from convrewrite.recovery.fit import fit_layers
from tests.test_recovery_fit import rewrite, smooth_images


class Residual(nn.Module):
    """A residual stream that crosses every cut, in-place ops on it, a kwarg input, a side branch."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1 = nn.Conv2d(8, 8, 3, padding=1)
        self.a2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        x = self.relu(self.stem(x))
        side = x.mean(dim=(2, 3))
        out = self.relu(self.a1(x))
        out = self.a2(out)
        out += x
        x = self.relu(out)
        out = self.relu(self.bn(self.b1(x)))
        out += x
        return self.head(out.mean(dim=(2, 3)) * scale + side)


def _fit(model: nn.Module, x: torch.Tensor, spec: str, cache_mb: float, frontier: bool, monkeypatch) -> tuple:
    monkeypatch.setenv("CONVREWRITE_FIT_FRONTIER", "1" if frontier else "0")
    torch.manual_seed(0)
    original, rewritten, names = rewrite(model, x, [spec])
    data = TensorBatches((x,), batch_size=8, holdout=0.25, shuffle=False)
    result = fit_layers(original, rewritten, names, data, steps=0, cache_mb=cache_mb, product=torch.float64)
    return result, rewritten


@pytest.mark.parametrize("cache_mb", [512.0, 0.0])
@pytest.mark.parametrize("spec", ["separable", "group-shuffle:groups=2"])
def test_the_frontier_fit_equals_the_prefix_fit_on_a_residual_model(cache_mb: float, spec: str, monkeypatch) -> None:
    torch.manual_seed(3)
    model = Residual().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    x = smooth_images(40, 3, 8)
    spill = Path(tempfile.mkdtemp())
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    frontier, a = _fit(copy.deepcopy(model), x, spec, cache_mb, True, monkeypatch)
    prefix, b = _fit(copy.deepcopy(model), x, spec, cache_mb, False, monkeypatch)
    assert frontier.streaming.startswith("frontier"), frontier.streaming
    assert prefix.streaming.startswith("prefix passes")
    assert [layer.name for layer in frontier.layers] == [layer.name for layer in prefix.layers]
    assert len(frontier.layers) >= 3
    for one, other in zip(frontier.layers, prefix.layers):
        assert one.holdout_error_after == pytest.approx(other.holdout_error_after, rel=1e-6, abs=1e-9), one.name
        assert one.fit_error_after == pytest.approx(other.fit_error_after, rel=1e-6, abs=1e-9), one.name
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name
    # Each model runs once up to the last cut: under 2 passes, against two prefixes per layer.
    assert frontier.passes < 2.0 < prefix.passes
    # Spilled frontiers (no memory budget) went to a temporary directory, removed afterwards.
    assert list(spill.iterdir()) == []


def test_a_block_called_twice_keeps_the_prefix_passes_and_says_why(monkeypatch) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Conv2d(4, 8, 3, padding=1)
            self.shared = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.first(x))
            return self.shared(torch.relu(self.shared(x)))

    x = smooth_images(24, 4, 8)
    result, _ = _fit(Tied().eval(), x, "group-shuffle:groups=2", 512.0, True, monkeypatch)
    assert result.streaming.startswith("prefix passes"), result.streaming
    assert "called more than once" in result.streaming


def test_an_untraceable_model_keeps_the_prefix_passes(monkeypatch) -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.one = nn.Conv2d(4, 8, 3, padding=1)
            self.two = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.one(x))
            if float(x.mean()) > -1.0:  # data-dependent control flow: no fx graph of the whole model
                x = x + 1
            return self.two(x)

    x = smooth_images(24, 4, 8)
    result, _ = _fit(Branchy().eval(), x, "group-shuffle:groups=2", 512.0, True, monkeypatch)
    assert result.streaming.startswith("prefix passes"), result.streaming
    assert "no fx graph" in result.streaming
    assert len(result.layers) == 2
    assert all(layer.method.startswith("statistics") for layer in result.layers)
