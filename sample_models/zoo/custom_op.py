"""A model that imports an installed library which registers a torch operator at import time.

``zoo_custom_ops`` (in ``sample_models/zoo_site``, which the zoo test puts on ``sys.path`` like an
installed package) defines the operator namespace ``convrewrite_zoo_ops``; torch refuses a second
definition in the same process. Loading this file must therefore leave the library imported: the
generated ``model.py`` imports it again for ``SoftClip`` (an untraceable leaf) and for the
operator the traced forward calls (``torch.ops.convrewrite_zoo_ops.soft_clip``), and so does the
reload check of ``apply``. Input 1x3x32x32.
"""

from __future__ import annotations

import torch
from torch import nn
from zoo_custom_ops import SoftClip

INPUT_SHAPE = (1, 3, 32, 32)


class ClippedNet(nn.Module):
    def __init__(self, channels: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())
        self.clip = SoftClip(limit=0.5)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.clip(self.stem(x)))
        # Traced as a call of torch.ops: model.py must import the library for it to exist.
        x = torch.ops.convrewrite_zoo_ops.soft_clip(x, 4.0)
        return self.head(x.mean((2, 3)))


def build_model() -> ClippedNet:
    return ClippedNet()
