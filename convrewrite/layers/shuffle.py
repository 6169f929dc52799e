"""Group convolution followed by a channel shuffle (ShuffleNet), and the channel permutations it uses.

``ChannelShuffle`` is ShuffleNet's operation: view the C channels as (groups, C/groups), transpose
and flatten, so output channel ``i * groups + j`` is channel ``i`` of group ``j``. A following
grouped layer then reads every group. (The Keras ``_shuffle`` of the seed document reshapes to
(C/groups, groups) instead, which is the inverse permutation; the two agree only when
groups * groups == C.) ``ChannelPermutation`` is any fixed reordering of channels.

``GroupShuffleConv1d`` / ``2d`` / ``3d`` are an ``nn.Sequential`` of a grouped conv named
``conv`` and a permutation named ``shuffle`` (the fixed ShuffleNet shuffle, or a general
permutation). The rewrite rule lays the grouped conv's output channels out so that, after the
permutation, every channel sits at its original index: downstream layers keep their meaning. This
file depends on torch alone: ``convrewrite apply`` copies it into generated ``model.py``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle: reshape channels to (groups, C/groups), transpose, flatten."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        if groups < 1:
            raise ValueError(f"groups must be a positive integer, got {groups}")
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, (self.groups, -1)).transpose(1, 2).flatten(1, 2)

    def source_indices(self, channels: int) -> list[int]:
        """For each output channel p, the input channel it is: ``(p % groups) * (C/groups) + p // groups``."""
        per_group = channels // self.groups
        return [(p % self.groups) * per_group + p // self.groups for p in range(channels)]

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


class ChannelPermutation(nn.Module):
    """A fixed channel reordering: output channel p is input channel ``permutation[p]``."""

    def __init__(self, permutation: tuple[int, ...] | list[int]) -> None:
        super().__init__()
        self.permutation = tuple(int(index) for index in permutation)
        if sorted(self.permutation) != list(range(len(self.permutation))):
            raise ValueError("permutation must hold each channel index 0..C-1 exactly once")
        # Not persistent: the constructor argument rebuilds it, so weights files stay plain.
        self.index: torch.Tensor
        self.register_buffer("index", torch.tensor(self.permutation, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.index)

    def source_indices(self, channels: int) -> list[int]:
        """For each output channel p, the input channel it is."""
        return list(self.permutation)

    def extra_repr(self) -> str:
        return f"channels={len(self.permutation)}"


class _GroupShuffleConvNd(nn.Sequential):
    conv_class: type[nn.Module] = nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        permutation: tuple[int, ...] | None = None,
    ) -> None:
        conv = self.conv_class(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
        )
        if permutation is not None and len(permutation) != out_channels:
            raise ValueError(f"permutation has {len(permutation)} entries for {out_channels} channels")
        shuffle: nn.Module = ChannelShuffle(groups) if permutation is None else ChannelPermutation(permutation)
        super().__init__(OrderedDict(conv=conv, shuffle=shuffle))
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = conv.kernel_size
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.groups = groups
        self.bias = bias
        self.padding_mode = padding_mode
        self.permutation = None if permutation is None else tuple(int(i) for i in permutation)

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dense (weight, bias) this block computes: the grouped kernel with its rows permuted."""
        from convrewrite.layers.dense import dense_kernel

        weight, bias = dense_kernel(self[0])
        index = self[1].source_indices(int(weight.shape[0]))
        return weight[index], (bias[index] if bias is not None else None)


class GroupShuffleConv1d(_GroupShuffleConvNd):
    """Grouped Conv1d followed by a channel shuffle (or a general channel permutation)."""

    conv_class = nn.Conv1d


class GroupShuffleConv2d(_GroupShuffleConvNd):
    """Grouped Conv2d followed by a channel shuffle (or a general channel permutation)."""

    conv_class = nn.Conv2d


class GroupShuffleConv3d(_GroupShuffleConvNd):
    """Grouped Conv3d followed by a channel shuffle (or a general channel permutation)."""

    conv_class = nn.Conv3d
