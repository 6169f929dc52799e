"""One conv module called twice, and one conv module registered under two names.

``refine`` is applied twice in a row (weight sharing across depth, as in recurrent conv nets);
``encoder_a`` and ``encoder_b`` are the same module object. A rewrite must produce one replacement
that is still called twice, and ``apply`` must keep the sharing in the generated source.
Input 1x16x32x32.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (1, 16, 32, 32)


class SharedConv(nn.Module):
    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.refine = nn.Conv2d(channels, channels, 3, padding=1)
        self.encoder_a = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.encoder_b = self.encoder_a
        self.head = nn.Conv2d(channels, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.refine(x))
        x = torch.relu(self.refine(x))
        x = self.encoder_a(x) + self.encoder_b(torch.flip(x, dims=[-1]))
        return self.head(x)


def build_model() -> SharedConv:
    return SharedConv()
