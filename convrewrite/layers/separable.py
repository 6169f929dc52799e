"""Depthwise-separable convolution: a depthwise conv followed by a 1x1 pointwise conv (MobileNet).

The block is an ``nn.Sequential`` of two ordinary convs named ``depthwise`` and ``pointwise``, so
the state_dict is plain conv weights, torchsummary lists the two convs as its own rows (exactly the
layout of the CRNN document), and a later rule can replace ``pointwise`` in place. Like the conv it
stands for, it exposes ``in_channels``, ``out_channels`` and the geometry of its depthwise part.
This file depends on torch alone: ``convrewrite apply`` copies it into generated ``model.py``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class _SeparableConvNd(nn.Sequential):
    conv_class: type[nn.Module] = nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        padding_mode: str = "zeros",
        multiplier: int = 1,
        depthwise_bias: bool = True,
        pointwise_bias: bool = True,
    ) -> None:
        conv = self.conv_class
        mid_channels = in_channels * multiplier
        super().__init__(
            OrderedDict(
                depthwise=conv(
                    in_channels,
                    mid_channels,
                    kernel_size,
                    stride=stride,
                    padding=padding,
                    dilation=dilation,
                    groups=in_channels,
                    bias=depthwise_bias,
                    padding_mode=padding_mode,
                ),
                pointwise=conv(mid_channels, out_channels, 1, bias=pointwise_bias),
            )
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        depthwise = self[0]
        self.kernel_size = depthwise.kernel_size
        self.stride = depthwise.stride
        self.padding = depthwise.padding
        self.dilation = depthwise.dilation
        self.padding_mode = padding_mode
        self.multiplier = multiplier
        self.depthwise_bias = depthwise_bias
        self.pointwise_bias = pointwise_bias

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dense (weight, bias) this block computes: pointwise @ depthwise."""
        from convrewrite.layers.dense import compose_pointwise, dense_kernel

        return compose_pointwise(dense_kernel(self[1]), dense_kernel(self[0]))


class SeparableConv1d(_SeparableConvNd):
    """Depthwise Conv1d (groups=in_channels, channel multiplier) then a pointwise Conv1d."""

    conv_class = nn.Conv1d


class SeparableConv2d(_SeparableConvNd):
    """Depthwise Conv2d (groups=in_channels, channel multiplier) then a pointwise Conv2d."""

    conv_class = nn.Conv2d


class SeparableConv3d(_SeparableConvNd):
    """Depthwise Conv3d (groups=in_channels, channel multiplier) then a pointwise Conv3d."""

    conv_class = nn.Conv3d
