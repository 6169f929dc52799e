"""Several ways to name a model in one file: factory, instance and classes."""

import torch
from torch import nn


class Small(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Big(Small):
    def __init__(self) -> None:
        super().__init__(width=12)


model = Small(width=6)


def build_model() -> nn.Module:
    return Small(width=8)


def make_big() -> nn.Module:
    return Big()


def example_inputs():
    return torch.randn(1, 3, 8, 8)
