"""Residual blocks with stochastic depth wrapped by ``torch.fx.wrap``, on weight-standardized convs.

The EfficientNet / ConvNeXt / Swin pattern: torchvision's ``stochastic_depth`` is registered with
``torch.fx.wrap`` so tracing keeps it one call; fx then writes a ``wrap("...")`` statement that
torch accepts only at module level. The convs are BiT-style weight-standardized (``StdConv2d``,
each filter normalized in every call), so a rewrite must use the effective weight, and the
reload check compares two float paths of one function. Input 1x3x32x32.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

INPUT_SHAPE = (1, 3, 32, 32)


def stochastic_depth(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Drop whole residual branches with probability ``p`` in training; the identity in eval."""
    if not training or p == 0.0:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


torch.fx.wrap("stochastic_depth")


class StdConv2d(nn.Conv2d):
    """Weight standardization (Qiao et al., 2019; BiT): zero mean, unit variance per filter."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, eps: float = 1e-6) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.weight.flatten(1)
        mean = flat.mean(dim=1, keepdim=True)
        variance = flat.var(dim=1, unbiased=False, keepdim=True)
        weight = ((flat - mean) / torch.sqrt(variance + self.eps)).view_as(self.weight)
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)


class Block(nn.Module):
    def __init__(self, channels: int, drop: float) -> None:
        super().__init__()
        self.conv = StdConv2d(channels, channels, 3)
        self.norm = nn.GroupNorm(4, channels)
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + stochastic_depth(F.gelu(self.norm(self.conv(x))), self.drop, self.training)


class Net(nn.Module):
    def __init__(self, channels: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = StdConv2d(3, channels, 3)
        self.blocks = nn.Sequential(Block(channels, 0.1), Block(channels, 0.2))
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


def build_model() -> Net:
    return Net().eval()
