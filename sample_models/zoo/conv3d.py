"""A small video model with Conv3d layers (C3D / R(2+1)D style) and a 2D head.

The rules rewrite Conv1d and Conv2d only: every Conv3d must be skipped with that reason, while
the Conv2d after the temporal pooling is rewritten. Input 1x3x8x32x32 (batch, channels, frames,
height, width).
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
        self.spatial = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x)).mean(2)
        return self.fc(torch.relu(self.spatial(x)).mean((2, 3)))


def build_model() -> Video3D:
    return Video3D()
