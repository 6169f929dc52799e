"""A model whose own forward is untraceable: no graph at all, analysed by running it eagerly.

The root's forward branches on a tensor value and loops over a Python list built from the input,
so even with its submodules as leaves torch.fx cannot trace it. convrewrite still swaps every conv
module in place, counts by running the model, and ``apply`` writes a ``model.py`` that rebuilds the
original class (loaded from a copy of this file) with the layers replaced; its user blocks
(``ResidualConv``) run their own forward there too. Input 1x3x64x64.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (1, 3, 64, 64)


class ResidualConv(nn.Module):
    """A user block inside the eager root: model.py must rebuild it with its own forward."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.conv(x))


class EagerOnly(nn.Module):
    def __init__(self, channels: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.ReLU())
        self.blocks = nn.ModuleList(ResidualConv(channels) for _ in range(2))
        self.fallback = nn.Conv2d(channels, channels, 5, padding=2)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if float(x.std()) > 100.0:
            # Never taken on the example input: a conv no forward run reaches.
            x = self.fallback(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((2, 3)))


def build_model() -> EagerOnly:
    return EagerOnly()
