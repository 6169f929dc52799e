"""A multi-head model that returns a dict (detection-style: class logits, box map, a feature list).

The output is ``{"logits": ..., "boxes": ..., "features": [...]}``; output shapes are compared
leaf by leaf. Input 1x3x64x64.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (1, 3, 64, 64)


class DictOutput(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.body1 = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU())
        self.body2 = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU())
        self.cls_head = nn.Conv2d(64, classes, 3, padding=1)
        self.box_head = nn.Conv2d(64, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, object]:
        c1 = self.body1(x)
        c2 = self.body2(c1)
        return {"logits": self.cls_head(c2).mean((2, 3)), "boxes": self.box_head(c2), "features": [c1, c2]}


def build_model() -> DictOutput:
    return DictOutput()
