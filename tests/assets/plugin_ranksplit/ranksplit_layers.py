"""The plugin's own block: a rank-r KxK conv then a 1x1 conv. Imports only torch, so convrewrite
copies this file into a generated model.py and the block stays one named layer there."""

from __future__ import annotations

import torch
from torch import nn


class RankSplitConv2d(nn.Sequential):
    """``reduce`` (KxK, Cin -> rank) then ``expand`` (1x1, rank -> Cout)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank: int, stride=1, padding=0, bias=True):
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, rank, kernel_size, stride=stride, padding=padding, bias=False)
        self.expand = nn.Conv2d(rank, out_channels, 1, bias=bias)
        # Like the conv it stands for, the block keeps its constructor arguments as attributes: that
        # is how convrewrite writes the constructor call in model.py (and how code introspects it).
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.kernel_size, self.stride, self.padding, self.bias = kernel_size, stride, padding, bias

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        reduce = self.reduce.weight.reshape(self.rank, -1)
        expand = self.expand.weight.reshape(self.out_channels, self.rank)
        dense = (expand @ reduce).reshape(self.out_channels, self.in_channels, *self.reduce.kernel_size)
        return dense.detach(), None if self.expand.bias is None else self.expand.bias.detach()
