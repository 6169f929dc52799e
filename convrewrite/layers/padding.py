"""Zero padding in front of a conv block, for convs whose padding a plain conv cannot express.

TensorFlow's "SAME" padding makes the output size ceil(input / stride); the total padding that
needs depends on the input size once a stride is above 1, and when it is odd the extra element goes
after (bottom / right). A plain ``nn.Conv2d`` pads both sides equally and by a fixed amount, so a
conv written that way (a ``Conv2dSame`` subclass in a model ported from TensorFlow) is rewritten as
``PaddedConv``: the padding, recomputed for every input size (``same=True``) or fixed amounts
(``F.pad`` order, last dimension first), followed by the block that replaces the conv (``conv``).
This file depends on torch alone: ``convrewrite apply`` copies it into generated ``model.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def same_padding(size, kernel_size, stride, dilation) -> tuple[tuple[int, int], ...]:
    """TensorFlow 'SAME' padding: (before, after) per spatial dimension, the odd element after."""
    pads = []
    for length, kernel, step, spread in zip(size, kernel_size, stride, dilation):
        outputs = math.ceil(int(length) / step)
        total = max((outputs - 1) * step + (kernel - 1) * spread + 1 - int(length), 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


class PaddedConv(nn.Module):
    """Zero padding (TensorFlow 'SAME' at run time, or fixed amounts), then the conv block ``conv``."""

    def __init__(
        self,
        kernel_size: tuple[int, ...],
        stride: tuple[int, ...],
        dilation: tuple[int, ...],
        same: bool = True,
        amounts: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.dilation = tuple(dilation)
        self.same = same
        self.amounts = tuple(amounts)
        # The block is assigned after construction (it is built from the original conv's weights).
        self.conv: nn.Module = nn.Identity()

    @property
    def in_channels(self) -> int:
        return int(getattr(self.conv, "in_channels", 0))

    @property
    def out_channels(self) -> int:
        return int(getattr(self.conv, "out_channels", 0))

    def padding_for(self, size) -> list[int]:
        """The F.pad amounts (last dimension first) for an input of this spatial size."""
        if not self.same:
            return list(self.amounts)
        pads = same_padding(size, self.kernel_size, self.stride, self.dilation)
        return [amount for before, after in reversed(pads) for amount in (before, after)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amounts = self.padding_for(x.shape[2:])
        if any(amounts):
            x = F.pad(x, amounts)
        return self.conv(x)

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dense (weight, bias) of the block; padding carries no weights."""
        from convrewrite.layers.dense import dense_kernel

        return dense_kernel(self.conv)

    def extra_repr(self) -> str:
        if self.same:
            return f"same, kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"
        return f"amounts={self.amounts}"
