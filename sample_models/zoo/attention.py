"""A conv stem followed by self-attention over the feature map (non-local / ViT-hybrid style).

One block computes attention by hand (``q @ k.transpose``, softmax, ``@ v``), the other with
``F.scaled_dot_product_attention``; q, k and v are 1x1 conv projections, and a 3x3 conv mixes the
result spatially. The MAC counter must see every matmul and the fused attention. Input
1x3x224x224.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SHAPE = (1, 3, 224, 224)


class MatmulAttention(nn.Module):
    def __init__(self, channels: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        self.scale = (channels // heads) ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, 3, self.heads, channels // self.heads, height * width).unbind(1)
        attention = (q.transpose(-2, -1) @ k) * self.scale
        attention = attention.softmax(dim=-1)
        y = (v @ attention.transpose(-2, -1)).reshape(batch, channels, height, width)
        return x + self.out(y)


class SdpaAttention(nn.Module):
    def __init__(self, channels: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(8, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = t.shape
        return t.reshape(batch, self.heads, channels // self.heads, height * width).transpose(-2, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        y = F.scaled_dot_product_attention(self._split(self.q(h)), self._split(self.k(h)), self._split(self.v(h)))
        y = y.transpose(-2, -1).reshape(batch, channels, height, width)
        return x + self.out(y)


class AttentionNet(nn.Module):
    def __init__(self, channels: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, 4, 1)
        )
        self.attention1 = MatmulAttention(channels)
        self.mix = nn.Conv2d(channels, channels, 3, padding=1)
        self.attention2 = SdpaAttention(channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention2(torch.relu(self.mix(self.attention1(self.stem(x)))))
        return self.head(x.mean((2, 3)))


def build_model() -> AttentionNet:
    return AttentionNet()
