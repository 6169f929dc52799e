"""Inception-style parallel branches concatenated along channels (Szegedy et al., 2015/2016).

Each module runs a 1x1 branch, a 1x1 -> 3x3 branch, a 1x1 -> 3x3 -> 3x3 branch (the factorized
5x5) and a pool -> 1x1 branch side by side and concatenates them; the last module also uses the
asymmetric 1x7 / 7x1 factorization of Inception v3. Input 1x3x224x224.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SHAPE = (1, 3, 224, 224)


class ConvBN(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, **kwargs) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, bias=False, **kwargs),
            nn.BatchNorm2d(out_channels, eps=0.001),
            nn.ReLU(inplace=True),
        )


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch3x3 = nn.Sequential(ConvBN(in_channels, 48, 1), ConvBN(48, 64, 3, padding=1))
        self.branch5x5 = nn.Sequential(
            ConvBN(in_channels, 64, 1), ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, padding=1)
        )
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1))
        return torch.cat([self.branch1x1(x), self.branch3x3(x), self.branch5x5(x), pooled], 1)


class InceptionC(nn.Module):
    """Asymmetric 1x7 and 7x1 convolutions (Inception v3's factorized 7x7)."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 96, 1)
        self.branch7x7 = nn.Sequential(
            ConvBN(in_channels, channels, 1),
            ConvBN(channels, channels, (1, 7), padding=(0, 3)),
            ConvBN(channels, 96, (7, 1), padding=(3, 0)),
        )
        self.branch_pool = ConvBN(in_channels, 96, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1))
        return torch.cat([self.branch1x1(x), self.branch7x7(x), pooled], 1)


class Inception(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            ConvBN(3, 32, 3, stride=2),
            ConvBN(32, 64, 3, padding=1),
            nn.MaxPool2d(3, stride=2),
            ConvBN(64, 80, 1),
            ConvBN(80, 192, 3),
            nn.MaxPool2d(3, stride=2),
        )
        self.mixed_5b = InceptionA(192, 32)
        self.mixed_5c = InceptionA(256, 64)
        self.mixed_6a = nn.MaxPool2d(3, stride=2)
        self.mixed_6b = InceptionC(288, 64)
        self.fc = nn.Linear(288, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mixed_6b(self.mixed_6a(self.mixed_5c(self.mixed_5b(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_model() -> Inception:
    return Inception()
