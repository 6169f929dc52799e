"""Conv subclasses whose forward computes something other than their attributes say.

Written the way models ported from TensorFlow and big-transfer / NFNet families write them:

* ``Conv2dSame``: TensorFlow "SAME" padding worked out from the input size in every call (the
  attribute ``padding`` stays 0). With stride 2 on an even size the padding is one row and column
  after, none before: a plain conv of the same attributes gives a smaller output.
* ``StdConv2d``: weight standardization, each filter normalized to zero mean and unit variance in
  every forward; ``ScaledStdConv2d`` adds a learned gain per filter; ``StdConv2dSame`` (the stem of
  the ViT-hybrid family) also pads "SAME". The raw ``weight`` is not what the layer applies.
* ``BandedLinear``: a Conv1d applied to a feature vector reshaped to one channel, i.e. a banded
  (Toeplitz) linear layer; its output is flattened back. Its input is not a conv input at all.

A rewrite must compute what each layer really computes (its effective weight and padding), or
leave the layer alone with a reason. Input 1x3x32x32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SHAPE = (1, 3, 32, 32)


Pair = tuple[int, ...]


def pad_same(x: torch.Tensor, kernel: Pair, stride: Pair, dilation: Pair) -> torch.Tensor:
    height, width = x.shape[-2:]
    pads = []
    for size, k, s, d in ((width, kernel[1], stride[1], dilation[1]), (height, kernel[0], stride[0], dilation[0])):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class Conv2dSame(nn.Conv2d):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def standardized(weight: torch.Tensor, eps: float) -> torch.Tensor:
    flat = weight.flatten(1)
    mean = flat.mean(dim=1, keepdim=True)
    variance = flat.var(dim=1, unbiased=False, keepdim=True)
    return ((flat - mean) / torch.sqrt(variance + eps)).view_as(weight)


class StdConv2d(nn.Conv2d):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, eps: float = 1e-6):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = standardized(self.weight, self.eps)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, eps: float = 1e-6) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.gain = nn.Parameter(torch.full((out_channels, 1, 1, 1), 1.5))
        self.scale = (in_channels * kernel_size * kernel_size) ** -0.5
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = standardized(self.weight, self.eps) * self.gain * self.scale
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConv2dSame(nn.Conv2d):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, eps: float = 1e-8):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, bias=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, standardized(self.weight, self.eps), None, self.stride, 0, self.dilation, self.groups)


class BandedLinear(nn.Conv1d):
    """out[b, c * F + i] = sum_t w[c, t] * x[b, i + t - pad]: a conv over the feature axis."""

    def __init__(self, features: int, copies: int, band: int) -> None:
        super().__init__(1, copies, band, padding=band // 2)
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.unsqueeze(1)).flatten(1)


class PortedNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = StdConv2dSame(3, 16, 3, stride=2)
        self.down = Conv2dSame(16, 32, 3, stride=2)
        self.even = Conv2dSame(32, 32, 4)
        self.body = nn.Sequential(StdConv2d(32, 32, 3), nn.ReLU(), ScaledStdConv2d(32, 32, 3))
        self.band = BandedLinear(32, 2, 5)
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.down(torch.relu(self.stem(x))))
        x = torch.relu(self.body(torch.relu(self.even(x))))
        return self.head(torch.relu(self.band(x.mean((2, 3)))))


def build_model() -> PortedNet:
    return PortedNet()
