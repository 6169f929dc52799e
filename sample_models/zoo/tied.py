"""Tied weights: a fully tied pair of convs, a weight-only tie, and a conv tied to a transposed conv.

``left`` and ``right`` are distinct, identical Conv2d modules holding the same weight and bias
Parameters (a Siamese tie): a rewrite keeps it by giving both names one shared replacement.
``branch_a`` and ``branch_b`` share only their weight (each has its own bias): one shared
replacement would lose a bias, so they are skipped with that reason. ``encode`` and ``decode`` are
a Conv2d and a ConvTranspose2d sharing one weight, the tied autoencoder pattern: rewriting
``encode`` would untie it, so it is skipped too. Input 1x8x32x32.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (1, 8, 32, 32)


class Tied(nn.Module):
    def __init__(self, channels: int = 8, width: int = 16) -> None:
        super().__init__()
        self.left = nn.Conv2d(channels, width, 3, padding=1)
        self.right = nn.Conv2d(channels, width, 3, padding=1)
        self.right.weight = self.left.weight
        self.right.bias = self.left.bias
        self.branch_a = nn.Conv2d(width, width, 3, padding=1)
        self.branch_b = nn.Conv2d(width, width, 3, padding=1)
        self.branch_b.weight = self.branch_a.weight
        self.encode = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.decode = nn.ConvTranspose2d(width, width, 3, padding=1, bias=False)
        self.decode.weight = self.encode.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.left(x)) + torch.relu(self.right(x.flip(-1)))
        x = self.branch_a(x) + self.branch_b(x.flip(-2))
        return self.decode(torch.relu(self.encode(x)))


def build_model() -> Tied:
    return Tied()
