"""A forward with two positional inputs and one with a dict input."""

import torch
from torch import nn


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Conv2d(3, 8, 3, padding=1)
        self.depth = nn.Conv2d(1, 8, 3, padding=1)

    def forward(self, image: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        return self.image(image) + self.depth(depth)


def build_model() -> nn.Module:
    return TwoInputs()


def example_inputs():
    return torch.randn(1, 3, 12, 12), torch.randn(1, 1, 12, 12)
