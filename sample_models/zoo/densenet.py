"""DenseNet-style concatenation: every layer sees the concatenated features of all before it.

After Huang et al. (2017): dense layers (BN-ReLU-1x1 bottleneck-BN-ReLU-3x3, growth rate k) whose
outputs are concatenated onto their input with ``torch.cat``, and transition layers (1x1 conv +
average pool) between dense blocks. A compact configuration (blocks of 4, 4, 4 layers). Input
1x3x224x224.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (1, 3, 224, 224)


class DenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth: int, bottleneck: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, bottleneck * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck * growth)
        self.conv2 = nn.Conv2d(bottleneck * growth, growth, 3, padding=1, bias=False)
        self.relu = nn.ReLU()

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu(self.norm1(x)))
        return self.conv2(self.relu(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, layers: int, in_channels: int, growth: int) -> None:
        super().__init__()
        for index in range(layers):
            self[f"denselayer{index + 1}"] = DenseLayer(in_channels + index * growth, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.AvgPool2d(2),
        )


class DenseNet(nn.Module):
    def __init__(
        self, blocks: tuple[int, ...] = (4, 4, 4), growth: int = 32, stem: int = 64, classes: int = 1000
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        channels = stem
        stages: list[nn.Module] = []
        for index, layers in enumerate(blocks):
            stages.append(DenseBlock(layers, channels, growth))
            channels += layers * growth
            if index < len(blocks) - 1:
                stages.append(Transition(channels, channels // 2))
                channels //= 2
        self.features = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(channels)
        self.classifier = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.features(self.stem(x))))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build_model() -> DenseNet:
    return DenseNet()
