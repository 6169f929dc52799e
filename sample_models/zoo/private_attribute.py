"""A norm layer with a private flag cached at construction, inside a block tracing cannot enter.

timm's ``GroupNorm1`` keeps ``self._fast_norm`` (whether a fused kernel is available), set in
``__init__`` and read in ``forward``. Here it sits in a block whose forward has a data-dependent
guard (untraceable: a leaf), so model.py must rebuild both from their attributes, private ones
included; a rebuild that drops ``_`` attributes fails with "'GroupNorm1' object has no attribute
'_fast_norm'". Input 1x3x32x32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SHAPE = (1, 3, 32, 32)


class GroupNorm1(nn.GroupNorm):
    """Group normalization with one group (timm's layer of the same name)."""

    def __init__(self, channels: int) -> None:
        super().__init__(1, channels)
        self._fast_norm = False  # no fused kernel here: the plain path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast_norm:
            raise RuntimeError("the fused kernel was never asked for")
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class GuardedBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self._clip = 30.0
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = GroupNorm1(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().max() > self._clip:  # data-dependent: fx cannot trace this block
            x = x.clamp(-self._clip, self._clip)
        return F.relu(self.norm(self.conv(x)))


class Net(nn.Module):
    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.guard = GuardedBlock(channels)
        self.head = nn.Conv2d(channels, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.guard(F.relu(self.stem(x)))).mean(dim=(2, 3))


def build_model() -> Net:
    return Net()
