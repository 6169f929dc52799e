"""A VGG-style plain stack: 3x3 convs and max pooling, no shortcuts (Simonyan & Zisserman, 2015).

The VGG-11 conv configuration with batch norm; the classifier is global-pooled so the model stays
small at any input size. Input 1x3x224x224.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (1, 3, 224, 224)

#: Output channels of each 3x3 conv; "M" is a 2x2 max pool (VGG-11, configuration "A").
CONFIGURATION: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, configuration: tuple[int | str, ...] = CONFIGURATION, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in configuration:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            channels = int(item)
            layers += [nn.Conv2d(in_channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
            in_channels = channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(in_channels, 1024), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(1024, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def build_model() -> VGG:
    return VGG()
