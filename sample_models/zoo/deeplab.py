"""DeepLab-style atrous spatial pyramid pooling (Chen et al., 2017) on a small dilated backbone.

ASPP runs a 1x1 conv, three 3x3 convs with dilation 6 / 12 / 18 and an image-level pooling branch
in parallel, concatenates them and projects with a 1x1 conv; the logits are upsampled back to the
input size with ``F.interpolate``. The backbone's last stage trades stride for dilation (output
stride 8). Input 1x3x224x224.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SHAPE = (1, 3, 224, 224)


def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1):
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ASPPPooling(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        for module in self:
            x = module(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    def __init__(self, in_channels: int, channels: int = 128, rates: tuple[int, ...] = (6, 12, 18)) -> None:
        super().__init__()
        branches: list[nn.Module] = [conv_bn(in_channels, channels, 1)]
        branches += [conv_bn(in_channels, channels, 3, dilation=rate) for rate in rates]
        branches.append(ASPPPooling(in_channels, channels))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(conv_bn(channels * len(branches), channels, 1), nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class DeepLab(nn.Module):
    def __init__(self, classes: int = 21) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            conv_bn(3, 32, stride=2),
            conv_bn(32, 64, stride=2),
            conv_bn(64, 128, stride=2),
            conv_bn(128, 128, dilation=2),
            conv_bn(128, 256, dilation=2),
        )
        self.aspp = ASPP(256)
        self.classifier = nn.Sequential(conv_bn(128, 128), nn.Conv2d(128, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        logits = self.classifier(self.aspp(self.backbone(x)))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def build_model() -> DeepLab:
    return DeepLab()
