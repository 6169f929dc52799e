"""A TDNN-style Conv1d stack (x-vector style, Snyder et al., 2018).

Five frame-level Conv1d layers with growing context (kernel 5 / 3 / 3 with dilation 1 / 2 / 3,
then two 1x1 layers), statistics pooling (mean and standard deviation over time) and a speaker
embedding layer. Input 1x40x200 (40 filterbank features, 200 frames).
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (1, 40, 200)


class TDNNLayer(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, context: int, dilation: int = 1) -> None:
        super().__init__(
            nn.Conv1d(in_channels, out_channels, context, dilation=dilation),
            nn.ReLU(),
            nn.BatchNorm1d(out_channels),
        )


class XVector(nn.Module):
    def __init__(self, features: int = 40, channels: int = 256, embedding: int = 128) -> None:
        super().__init__()
        self.frames = nn.Sequential(
            TDNNLayer(features, channels, 5),
            TDNNLayer(channels, channels, 3, dilation=2),
            TDNNLayer(channels, channels, 3, dilation=3),
            TDNNLayer(channels, channels, 1),
            TDNNLayer(channels, 3 * channels, 1),
        )
        self.embedding = nn.Linear(6 * channels, embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.frames(x)
        statistics = torch.cat([x.mean(dim=2), x.std(dim=2)], dim=1)
        return self.embedding(statistics)


def build_model() -> XVector:
    return XVector()
