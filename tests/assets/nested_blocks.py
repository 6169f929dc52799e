"""Three nn.Module classes and no build_model(): two blocks and the network that uses them."""

import torch
from torch import nn


class ConvBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class Stage(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(ConvBlock(channels), ConvBlock(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Network(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage = Stage(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(self.stem(x))


INPUT_SHAPE = (1, 3, 8, 8)
