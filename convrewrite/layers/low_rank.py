"""Low-rank factorised layers: a Linear or a conv replaced by two thinner layers through rank r.

``LowRankLinear`` is ``Linear(in, r)`` then ``Linear(r, out)``; ``LowRankConv1d/2d`` is a KxK conv
from the input channels to r channels (the original kernel, stride, padding, dilation and padding
mode) followed by a 1x1 conv to the output channels: the channel decomposition of Zhang et al.,
"Accelerating Very Deep Convolutional Networks" (TPAMI 2016). The bias lives on the second part
only; a bias on the first part would fold into it.

Each block is an ``nn.Sequential`` of two ordinary layers named ``reduce`` and ``expand``, so the
state_dict holds plain weights and a later rule can rewrite either part in place. Like the layer it
stands for, it exposes ``in_features``/``out_features`` (Linear) or ``in_channels``/``out_channels``
and the conv geometry, plus ``rank``. ``to_dense()`` gives the equivalent single layer's (weight,
bias). This file depends on torch alone: ``convrewrite apply`` copies it into generated ``model.py``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class LowRankLinear(nn.Sequential):
    """``Linear(in_features, rank, bias=False)`` then ``Linear(rank, out_features, bias=bias)``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__(
            OrderedDict(
                reduce=nn.Linear(in_features, rank, bias=False),
                expand=nn.Linear(rank, out_features, bias=bias),
            )
        )
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (out_features, in_features) weight and the bias of the single Linear this block computes."""
        reduce, expand = self[0], self[1]
        weight = expand.weight.detach() @ reduce.weight.detach()
        bias = expand.bias.detach().clone() if expand.bias is not None else None
        return weight, bias


class _LowRankConvNd(nn.Sequential):
    conv_class: type[nn.Module] = nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        rank: int,
        stride=1,
        padding=0,
        dilation=1,
        padding_mode: str = "zeros",
        bias: bool = True,
    ) -> None:
        conv = self.conv_class
        super().__init__(
            OrderedDict(
                reduce=conv(
                    in_channels,
                    rank,
                    kernel_size,
                    stride=stride,
                    padding=padding,
                    dilation=dilation,
                    bias=False,
                    padding_mode=padding_mode,
                ),
                expand=conv(rank, out_channels, 1, bias=bias),
            )
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.rank = rank
        reduce = self[0]
        self.kernel_size = reduce.kernel_size
        self.stride = reduce.stride
        self.padding = reduce.padding
        self.dilation = reduce.dilation
        self.padding_mode = padding_mode

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dense (Cout, Cin, *kernel) weight and the bias of the single conv this block computes."""
        reduce, expand = self[0], self[1]
        matrix = expand.weight.detach().reshape(self.out_channels, self.rank)
        weight = torch.einsum("or,ri...->oi...", matrix, reduce.weight.detach())
        bias = expand.bias.detach().clone() if expand.bias is not None else None
        return weight, bias


class LowRankConv1d(_LowRankConvNd):
    """Conv1d to ``rank`` channels (original kernel and geometry), then a 1x1 Conv1d."""

    conv_class = nn.Conv1d


class LowRankConv2d(_LowRankConvNd):
    """Conv2d to ``rank`` channels (original kernel and geometry), then a 1x1 Conv2d."""

    conv_class = nn.Conv2d
