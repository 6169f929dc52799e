"""An audio tagging CNN (PANNs style) whose forward takes flags with defaults.

``forward(x, mixup_lambda=None, embed=False)``: the flags pick what the network returns (clip
logits or the embedding) and whether mixup is applied in training. The example input gives only
``x``, so the flags are constants of the analysis: tracing them as inputs made ``if embed:``
untraceable and the whole root fell back to eager mode; they are now traced as their defaults
(fx ``concrete_args``), which the report states. Like the real package this imports numpy.
Input: a log-mel spectrogram, 1x1x64x32 (batch, channel, frames, mel bins).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INPUT_SHAPE = (1, 1, 64, 32)


class ConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, pool_size: tuple[int, int] = (2, 2)) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, pool_size)


class AudioTagger(nn.Module):
    def __init__(self, classes: int = 12, width: int = 16) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(32)
        self.block1 = ConvBlock(1, width)
        self.block2 = ConvBlock(width, 2 * width)
        self.block3 = ConvBlock(2 * width, 4 * width)
        self.embedding = nn.Linear(4 * width, 4 * width)
        self.classifier = nn.Linear(4 * width, classes)
        # PANNs-style constant kept as a numpy array at build time.
        self.register_buffer("mel_scale", torch.from_numpy(np.linspace(1.0, 0.5, 32, dtype=np.float32)))

    def forward(self, x: torch.Tensor, mixup_lambda: torch.Tensor | None = None, embed: bool = False) -> torch.Tensor:
        x = x * self.mel_scale
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        if self.training and mixup_lambda is not None:
            x = mixup_lambda * x + (1 - mixup_lambda) * x.flip(0)
        x = self.block3(self.block2(self.block1(x)))
        x = torch.mean(x, dim=3)
        x = x.max(dim=2).values + x.mean(dim=2)
        embedding = F.relu(self.embedding(x))
        if embed:
            return embedding
        return torch.sigmoid(self.classifier(embedding))


def build_model() -> AudioTagger:
    return AudioTagger()
