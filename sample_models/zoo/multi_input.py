"""A forward with several positional inputs: an RGB image and a depth map, fused mid-way.

``example_inputs()`` returns a tuple, which convrewrite passes as positional arguments (on the
command line: ``--input-shape`` twice). Input 1x3x64x64 and 1x1x64x64.
"""

from __future__ import annotations

import torch
from torch import nn


def example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, 64, 64, generator=generator), torch.randn(1, 1, 64, 64, generator=generator)


class RGBDNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.rgb = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU())
        self.depth = nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fuse = nn.Conv2d(48, 64, 3, padding=1)
        self.fc = nn.Linear(64, classes)

    def forward(self, image: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.rgb(image), self.depth(depth)], dim=1)
        return self.fc(torch.relu(self.fuse(x)).mean((2, 3)))


def build_model() -> RGBDNet:
    return RGBDNet()
