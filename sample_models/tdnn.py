"""A Conv1d TDNN as in the logarithmic-filter-groups document.

39 MFCC features x 50 frames in PyTorch's channel-first layout (batch, 39, 50). The first TDNN
layer has 40 channels and kernel 3; the second is the 40 -> 40, kernel-9 layer that the document
splits into logarithmic filter groups of 20 / 10 / 5 / 5 channels.
"""

import torch
from torch import nn

MFCC_FEATURES = 39
FRAMES = 50
INPUT_SHAPE = (1, MFCC_FEATURES, FRAMES)


class TDNN(nn.Module):
    def __init__(self, features: int = MFCC_FEATURES, channels: int = 40, classes: int = 10) -> None:
        super().__init__()
        self.tdnn1 = nn.Conv1d(features, channels, kernel_size=3, padding="same")
        self.relu1 = nn.ReLU()
        self.tdnn2 = nn.Conv1d(channels, channels, kernel_size=9, padding="same")
        self.relu2 = nn.ReLU()
        self.tdnn3 = nn.Conv1d(channels, channels, kernel_size=3, dilation=2, padding=2)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.classifier = nn.Linear(channels, classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.tdnn1(features))
        x = self.relu2(self.tdnn2(x))
        x = self.relu3(self.tdnn3(x))
        return self.classifier(self.pool(x).flatten(1))
