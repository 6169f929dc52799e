"""Data-dependent Python control flow that torch.fx cannot trace.

``GatedBlock`` picks a branch with ``if x.mean() > 0``, and ``RepeatBlock`` applies its conv until
the activations fall below a threshold (three times on the example input): both raise during
symbolic tracing. convrewrite marks each of them as a leaf, traces the rest of the model, and still
rewrites the convs inside the leaves module by module, including the branch the example input does
not take. The root's own forward is plain, so the model keeps a graph (``fx+leaves``).
Input 1x3x64x64.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (1, 3, 64, 64)


class ConvBranch(nn.Module):
    """A user block inside a leaf: the leaf's forward calls it, so model.py needs its class."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class GatedBlock(nn.Module):
    """Runs one of two conv paths depending on the sign of the input's mean."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.positive = ConvBranch(channels)
        self.negative = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return self.positive(x)
        return self.negative(x)


class RepeatBlock(nn.Module):
    """Applies the same conv until the activations are small enough, at most three times."""

    def __init__(self, channels: int, threshold: float = 1e-3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            if x.abs().mean() < self.threshold:
                break
            x = torch.relu(self.conv(x))
        return x


class Untraceable(nn.Module):
    def __init__(self, channels: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.gate = GatedBlock(channels)
        self.repeat = RepeatBlock(channels)
        self.head = nn.Conv2d(channels, classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.repeat(self.gate(torch.relu(self.stem(x))))
        return self.head(x).mean((2, 3))


def build_model() -> Untraceable:
    return Untraceable()
