"""Logarithmic filter groups: channels split by recursive halving, one conv per group, concatenated.

With 4 groups a 40-channel layer splits 20 / 10 / 5 / 5, as in the logarithmic-filter-groups
document: the first group takes half the channels, the next half of the rest, and so on; the last
two groups share the final remainder. Channel counts that do not halve evenly round up at every
level (``log_group_sizes``), so 39 channels in 4 groups give 20 / 10 / 5 / 4. Input and output
channels are split independently by the same rule; group i reads input slice i and writes output
slice i with the original kernel, stride, padding, dilation and padding mode.

The block keeps its per-group convs in an ``nn.ModuleList`` named ``branches``. This file depends on
torch alone: ``convrewrite apply`` copies it into generated ``model.py``.
"""

from __future__ import annotations

import torch
from torch import nn


def log_group_sizes(channels: int, groups: int) -> list[int]:
    """Recursive halving: each level keeps ceil(rest / 2); the last group gets what remains."""
    if groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups}")
    sizes: list[int] = []
    remaining = channels
    for _ in range(groups - 1):
        half = (remaining + 1) // 2
        sizes.append(half)
        remaining -= half
    sizes.append(remaining)
    return sizes


class _LogGroupConvNd(nn.Module):
    conv_class: type[nn.Module] = nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 4,
        bias: bool = True,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        in_sizes = log_group_sizes(in_channels, groups)
        out_sizes = log_group_sizes(out_channels, groups)
        if min(in_sizes + out_sizes) < 1:
            raise ValueError(
                f"{in_channels} -> {out_channels} channels cannot be split into {groups} logarithmic groups "
                f"(inputs {in_sizes}, outputs {out_sizes})"
            )
        self.branches = nn.ModuleList(
            self.conv_class(
                cin,
                cout,
                kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                bias=bias,
                padding_mode=padding_mode,
            )
            for cin, cout in zip(in_sizes, out_sizes)
        )
        first = self.branches[0]
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = first.kernel_size
        self.stride = first.stride
        self.padding = first.padding
        self.dilation = first.dilation
        self.groups = groups
        self.bias = bias
        self.padding_mode = padding_mode
        self.in_sizes = in_sizes
        self.out_sizes = out_sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.in_sizes, dim=1)
        return torch.cat([branch(part) for branch, part in zip(self.branches, parts)], dim=1)

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dense (weight, bias) this block computes: the branch kernels on the block diagonal."""
        from convrewrite.layers.dense import dense_kernel

        kernels = [dense_kernel(branch) for branch in self.branches]
        first = kernels[0][0]
        weight = first.new_zeros((self.out_channels, self.in_channels, *first.shape[2:]))
        has_bias = any(bias is not None for _, bias in kernels)
        bias = first.new_zeros(self.out_channels) if has_bias else None
        row = column = 0
        for (kernel, branch_bias), cin, cout in zip(kernels, self.in_sizes, self.out_sizes):
            weight[row : row + cout, column : column + cin] = kernel
            if bias is not None and branch_bias is not None:
                bias[row : row + cout] = branch_bias
            row += cout
            column += cin
        return weight, bias


class LogGroupConv1d(_LogGroupConvNd):
    """Conv1d split into logarithmic filter groups (20 / 10 / 5 / 5 of 40 channels with 4 groups)."""

    conv_class = nn.Conv1d


class LogGroupConv2d(_LogGroupConvNd):
    """Conv2d split into logarithmic filter groups (recursive halving of the channels)."""

    conv_class = nn.Conv2d


class LogGroupConv3d(_LogGroupConvNd):
    """Conv3d split into logarithmic filter groups (recursive halving of the channels)."""

    conv_class = nn.Conv3d
