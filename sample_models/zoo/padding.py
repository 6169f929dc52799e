"""Convs with padding_mode 'reflect' and 'circular', and ``padding='same'`` with an even kernel.

'same' with a 4x4 kernel pads asymmetrically (one more on the right/bottom); reflect and circular
padding are applied by the conv module itself. A separable rewrite must keep all three on its
depthwise part so the output is unchanged. Input 1x3x32x32.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (1, 3, 32, 32)


class Padding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.reflect = nn.Conv2d(3, 16, 3, padding=1, padding_mode="reflect")
        self.circular = nn.Conv2d(16, 16, 3, padding=2, dilation=2, padding_mode="circular")
        self.same_even = nn.Conv2d(16, 16, 4, padding="same")
        self.same_even_1d = nn.Conv1d(16, 16, 2, padding="same", padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.reflect(x))
        x = torch.relu(self.circular(x))
        x = self.same_even(x)
        return self.same_even_1d(x.flatten(2))


def build_model() -> Padding:
    return Padding()
