"""A CRNN for text lines (Shi, Bai, Yao, 2015): a conv stack, then a bidirectional LSTM per column.

The seed document's architecture at a small size: three 3x3 conv blocks with BatchNorm, pooling
that halves the height faster than the width, the feature map read column by column as a
sequence (N, width, channels x height) by ``nn.LSTM(..., bidirectional=True, batch_first=True)``
and a per-column classifier (CTC-style logits). The LSTM keeps private state (``_flat_weights``,
``_flat_weights_names``) that only its constructor builds: model.py must call it. Input 1x1x32x100
(a grey text line).
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (1, 1, 32, 100)


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class CRNN(nn.Module):
    def __init__(self, classes: int = 37, hidden: int = 32) -> None:
        super().__init__()
        self.cnn = nn.Sequential(
            conv_block(1, 16),
            nn.MaxPool2d(2),
            conv_block(16, 32),
            nn.MaxPool2d((2, 1)),
            conv_block(32, 32),
            nn.AdaptiveAvgPool2d((4, None)),
        )
        self.rnn = nn.LSTM(32 * 4, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.classifier = nn.Linear(2 * hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.cnn(x)  # (N, C, 4, W)
        sequence = features.permute(0, 3, 1, 2).flatten(2)  # (N, W, C * 4)
        encoded, _ = self.rnn(sequence)
        return self.classifier(encoded)  # (N, W, classes)


def build_model() -> CRNN:
    return CRNN()
