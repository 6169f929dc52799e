"""ShuffleNet-style units: channel split, a branch of 1x1 / 3x3 depthwise / 1x1, concat, shuffle.

After Ma et al. (2018, ShuffleNet V2). The channel shuffle is the reshape-transpose-flatten of the
seed document on group convolution; the downsampling unit runs two branches on the full input.
Input 1x3x224x224.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (1, 3, 224, 224)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    return torch.transpose(x, 1, 2).contiguous().view(batch, -1, height, width)


def _branch(in_channels: int, channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False),
        nn.BatchNorm2d(channels),
        nn.Conv2d(channels, channels, 1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
    )


class ShuffleUnit(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = out_channels // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
                nn.BatchNorm2d(in_channels),
                nn.Conv2d(in_channels, half, 1, bias=False),
                nn.BatchNorm2d(half),
                nn.ReLU(inplace=True),
            )
            self.branch2 = _branch(in_channels, half, stride)
        else:
            self.branch2 = _branch(half, half, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            kept, processed = x.chunk(2, dim=1)
            out = torch.cat((kept, self.branch2(processed)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (48, 96, 192), repeats: tuple[int, ...] = (2, 3, 2)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 24, 3, 2, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        )
        units: list[nn.Module] = []
        in_channels = 24
        for width, repeat in zip(widths, repeats):
            units.append(ShuffleUnit(in_channels, width, 2))
            units += [ShuffleUnit(width, width, 1) for _ in range(repeat - 1)]
            in_channels = width
        self.stages = nn.Sequential(*units)
        self.head = nn.Sequential(
            nn.Conv2d(in_channels, 512, 1, bias=False), nn.BatchNorm2d(512), nn.ReLU(inplace=True)
        )
        self.fc = nn.Linear(512, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.stages(self.stem(x)))
        return self.fc(x.mean([2, 3]))


def build_model() -> ShuffleNet:
    return ShuffleNet()
