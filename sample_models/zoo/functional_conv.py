"""A convolution written as ``F.conv2d`` on a registered parameter, next to an ordinary Conv2d.

No rule can swap a functional call (there is no module to replace): the report must count its
MACs, keep its parameters, and name it among the skipped layers with that reason.
Input 1x3x64x64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SHAPE = (1, 3, 64, 64)


class FunctionalConv(nn.Module):
    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(channels, channels, 3, 3) * 0.05)
        self.bias = nn.Parameter(torch.zeros(channels))
        self.out = nn.Conv2d(channels, 10, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = torch.relu(F.conv2d(x, self.weight, self.bias, stride=2, padding=1))
        return self.out(x).mean((2, 3))


def build_model() -> FunctionalConv:
    return FunctionalConv()
