"""A small video model with Conv3d layers (C3D / R(2+1)D / X3D style) and a 2D head.

A 3x7x7 stem, a (2+1)D block (1x3x3 spatial then 3x1x1 temporal), a 3x3x3 conv, a 1x1x1
expansion and projection around a depthwise 3x3x3 conv (already depthwise: left alone), then
temporal pooling and a Conv2d. Every rule rewrites the 3-D convs its structure applies to, with the
same weight transfer as in 1-D and 2-D. Input 1x3x8x32x32 (batch, channels, frames, height, width).
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (1, 3, 8, 32, 32)


class Video3D(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(3, 16, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3)), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv3d(16, 32, (1, 3, 3), padding=(0, 1, 1)), nn.ReLU(), nn.Conv3d(32, 32, (3, 1, 1), padding=(1, 0, 0))
        )
        self.cube = nn.Conv3d(32, 32, 3, stride=(1, 2, 2), padding=1)
        self.expand = nn.Conv3d(32, 64, 1)
        self.depthwise = nn.Conv3d(64, 64, 3, padding=1, groups=64)
        self.project = nn.Conv3d(64, 32, 1, bias=False)
        self.spatial = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.cube(torch.relu(self.block(self.stem(x)))))
        x = x + self.project(torch.relu(self.depthwise(torch.relu(self.expand(x)))))
        x = x.mean(2)
        return self.fc(torch.relu(self.spatial(x)).mean((2, 3)))


def build_model() -> Video3D:
    return Video3D()
