"""Channel-wise convolutions (ChannelNets, Gao, Wang and Ji, NeurIPS 2018).

A channel-wise convolution slides one small kernel of ``dc`` shared weights along the *channel*
axis, at every spatial position: output channel o is ``sum_t w[t] * x[o * s + t - pad]`` where
s = in/out is the channel stride and the channel axis is zero-padded "same" style (TensorFlow's
split: the extra pad goes after). It replaces a dense 1x1 conv (in*out weights) with dc weights
and costs dc x out x positions MACs.

``ChannelwiseConv1d`` / ``ChannelwiseConv2d`` also take ``groups`` g: g independent kernels, each
with stride g*in/out and out/g outputs, concatenated (ChannelNets' group channel-wise convolution;
g = 1 is the plain channel-wise convolution). They run as one conv over the channel axis treated
as a spatial axis (Conv2d for 1-D inputs, Conv3d for 2-D), and keep the spatial stride, padding
and padding mode of the 1x1 conv they replace. ``ChannelwiseConv3d`` (torch has no 4-D conv)
pads and strides the positions first and runs the channel kernel over the flattened positions.

``GroupChannelwiseConv1d`` / ``2d`` / ``3d`` are ChannelNets' group channel-wise module:
a grouped 1x1 conv whose outputs are interleaved (channel shuffle) and fused across groups by a
group channel-wise convolution with g kernels and stride g, so each output reads the matching
channel of every group. This file depends on torch alone: ``convrewrite apply`` copies it into
generated ``model.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _channelwise_tuple(value, dims: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    return tuple(int(v) for v in value)


class _ChannelwiseConvNd(nn.Module):
    spatial_dims = 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channel_kernel_size: int,
        groups: int = 1,
        stride=1,
        padding=0,
        dilation=1,
        padding_mode: str = "zeros",
        bias: bool = True,
    ) -> None:
        super().__init__()
        dims = self.spatial_dims
        if groups < 1 or out_channels % groups:
            raise ValueError(f"out_channels={out_channels} is not divisible by groups={groups}")
        per_kernel = out_channels // groups
        if (in_channels * groups) % out_channels or in_channels * groups < out_channels:
            raise ValueError(
                f"{in_channels} -> {out_channels} channels with {groups} kernel(s) need an integer channel "
                f"stride groups*in/out >= 1"
            )
        if channel_kernel_size < 1:
            raise ValueError(f"channel_kernel_size must be a positive integer, got {channel_kernel_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channel_kernel_size = channel_kernel_size
        self.groups = groups
        self.kernel_size = (1,) * dims
        self.stride = _channelwise_tuple(stride, dims)
        self.padding = padding if isinstance(padding, str) else _channelwise_tuple(padding, dims)
        self.dilation = _channelwise_tuple(dilation, dims)
        self.padding_mode = padding_mode
        self.channel_stride = in_channels * groups // out_channels
        total = max((per_kernel - 1) * self.channel_stride + channel_kernel_size - in_channels, 0)
        self.channel_padding = (total // 2, total - total // 2)
        # A 1x1 kernel: 'same' and 'valid' both mean no spatial padding.
        self._spatial_padding = (0,) * dims if isinstance(padding, str) else _channelwise_tuple(padding, dims)
        self.weight = nn.Parameter(torch.empty(groups, channel_kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.channel_kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = self.spatial_dims
        if dims == 3:
            return self._forward_flattened(x)
        spatial_padding = self._spatial_padding
        if self.padding_mode != "zeros" and any(spatial_padding):
            pads = [p for p in reversed(spatial_padding) for _ in range(2)]
            x = F.pad(x, pads, mode=self.padding_mode)
            spatial_padding = (0,) * dims
        x = x.unsqueeze(1)  # (batch, 1, channels, *spatial): channels become a convolved axis
        if any(self.channel_padding):
            x = F.pad(x, [0, 0] * dims + list(self.channel_padding))
        weight = self.weight.view(self.groups, 1, self.channel_kernel_size, *self.kernel_size)
        conv = F.conv2d if dims == 1 else F.conv3d
        y = conv(x, weight, None, (self.channel_stride, *self.stride), (0, *spatial_padding))
        y = y.flatten(1, 2)  # kernel j's outputs are channels j*out/g .. (j+1)*out/g - 1
        if self.bias is not None:
            y = y + self.bias.view(1, -1, *self.kernel_size)
        return y

    def _forward_flattened(self, x: torch.Tensor) -> torch.Tensor:
        """3-D inputs: torch has no 4-D convolution to slide over (channels, D, H, W). The kernel is
        1x1x1, so positions never mix: pad and stride the positions first, then run the channel
        kernel over all of them at once as a 2-D conv on (channels, positions)."""
        pads = [p for p in reversed(self._spatial_padding) for _ in range(2)]
        if any(pads):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, pads, mode=mode)
        x = x[:, :, :: self.stride[0], :: self.stride[1], :: self.stride[2]]
        batch, channels, depth, height, width = x.shape
        flat = x.reshape(batch, 1, channels, depth * height * width)
        if any(self.channel_padding):
            flat = F.pad(flat, [0, 0, *self.channel_padding])
        weight = self.weight.view(self.groups, 1, self.channel_kernel_size, 1)
        y = F.conv2d(flat, weight, None, (self.channel_stride, 1))
        y = y.reshape(batch, self.out_channels, depth, height, width)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1, 1)
        return y

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dense 1x1 (weight, bias): w[j, t] at row j*out/g + o, column o*s + t - pad."""
        per_kernel = self.out_channels // self.groups
        taps = self.channel_kernel_size
        kernel = torch.arange(self.groups).repeat_interleave(per_kernel * taps)
        position = torch.arange(per_kernel).repeat_interleave(taps).repeat(self.groups)
        tap = torch.arange(taps).repeat(per_kernel * self.groups)
        rows = kernel * per_kernel + position
        columns = position * self.channel_stride + tap - self.channel_padding[0]
        valid = (columns >= 0) & (columns < self.in_channels)
        weight = self.weight.detach().new_zeros((self.out_channels, self.in_channels))
        weight.index_put_((rows[valid], columns[valid]), self.weight.detach()[kernel[valid], tap[valid]])
        bias = self.bias.detach().clone() if self.bias is not None else None
        return weight.reshape(self.out_channels, self.in_channels, *self.kernel_size), bias

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, channel_kernel_size={self.channel_kernel_size}, "
            f"channel_stride={self.channel_stride}"
        )
        if self.groups != 1:
            text += f", groups={self.groups}"
        if any(s != 1 for s in self.stride):
            text += f", stride={self.stride}"
        if isinstance(self.padding, str) or any(self.padding):
            text += f", padding={self.padding}"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode}"
        if self.bias is None:
            text += ", bias=False"
        return text


class ChannelwiseConv1d(_ChannelwiseConvNd):
    """Channel-wise convolution standing in for a 1x1 Conv1d (dc shared weights per kernel)."""

    spatial_dims = 1


class ChannelwiseConv2d(_ChannelwiseConvNd):
    """Channel-wise convolution standing in for a 1x1 Conv2d (dc shared weights per kernel)."""

    spatial_dims = 2


class ChannelwiseConv3d(_ChannelwiseConvNd):
    """Channel-wise convolution standing in for a 1x1x1 Conv3d (dc shared weights per kernel)."""

    spatial_dims = 3


class _GroupChannelwiseConvNd(nn.Module):
    conv_class: type[nn.Module] = nn.Conv2d
    channelwise_class: type[nn.Module] = ChannelwiseConv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channel_kernel_size: int,
        groups: int = 2,
        stride=1,
        padding=0,
        dilation=1,
        padding_mode: str = "zeros",
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.group_conv = self.conv_class(
            in_channels,
            out_channels,
            1,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
            padding_mode=padding_mode,
        )
        self.channelwise = self.channelwise_class(out_channels, out_channels, channel_kernel_size, groups, bias=bias)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channel_kernel_size = channel_kernel_size
        self.groups = groups
        self.kernel_size = self.group_conv.kernel_size
        self.stride = self.group_conv.stride
        self.padding = self.group_conv.padding
        self.dilation = self.group_conv.dilation
        self.padding_mode = padding_mode
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group_conv(x)
        # Interleave the groups (ShuffleNet's shuffle), so a window of g channels holds one of each.
        y = y.unflatten(1, (self.groups, -1)).transpose(1, 2).flatten(1, 2)
        return self.channelwise(y)

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dense (weight, bias): channel-wise matrix @ interleave @ block-diagonal grouped kernel."""
        from convrewrite.layers.dense import compose_pointwise, dense_kernel

        weight, _ = dense_kernel(self.group_conv)
        channels, per_group = self.out_channels, self.out_channels // self.groups
        index = [(p % self.groups) * per_group + p // self.groups for p in range(channels)]
        return compose_pointwise(dense_kernel(self.channelwise), (weight[index], None))


class GroupChannelwiseConv1d(_GroupChannelwiseConvNd):
    """Grouped 1x1 Conv1d fused across groups by a group channel-wise convolution (ChannelNets)."""

    conv_class = nn.Conv1d
    channelwise_class = ChannelwiseConv1d


class GroupChannelwiseConv2d(_GroupChannelwiseConvNd):
    """Grouped 1x1 Conv2d fused across groups by a group channel-wise convolution (ChannelNets)."""

    conv_class = nn.Conv2d
    channelwise_class = ChannelwiseConv2d


class GroupChannelwiseConv3d(_GroupChannelwiseConvNd):
    """Grouped 1x1x1 Conv3d fused across groups by a group channel-wise convolution (ChannelNets)."""

    conv_class = nn.Conv3d
    channelwise_class = ChannelwiseConv3d
