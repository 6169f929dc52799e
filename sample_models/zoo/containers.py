"""Convs inside an nn.ModuleList, an nn.ModuleDict and nested nn.Sequential containers.

The rewritten layers must land at the same qualified names (``stages.1.0.2``,
``heads["seg-out"]`` with a key that is not an identifier, ...). Input 1x3x64x64.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (1, 3, 64, 64)


class Containers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            [
                nn.Conv2d(3, 16, 3, padding=1),
                nn.Sequential(
                    nn.Sequential(
                        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)
                    ),
                    nn.Sequential(nn.ReLU(), nn.Sequential(nn.Conv2d(32, 32, 5, padding=2))),
                ),
            ]
        )
        self.heads = nn.ModuleDict(
            {
                "classes": nn.Conv2d(32, 10, 3, padding=1),
                "seg-out": nn.Sequential(nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 2, 1)),
            }
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for stage in self.stages:
            x = stage(x)
        return self.heads["classes"](x).mean((2, 3)), self.heads["seg-out"](x)


def build_model() -> Containers:
    return Containers()
