"""A hybrid conv/attention network (LeViT / EfficientFormer style) with a cached attention bias.

The attention adds a learned bias per head and relative offset, gathered from a parameter by an
index buffer (``attention_biases[:, attention_bias_idxs]``). In eval mode the gathered bias is
cached per device in a plain dict, keyed by ``str(x.device)``, as those libraries do. During
symbolic tracing the key is the text of a proxy, so the cache stores a proxy of that trace. The
gate after the attention branches on a tensor value (untraceable, a leaf), which makes the tracer
try again; a second trace that reused the first one's cached proxy failed with "Argument
'getitem_...' of Node 'add' does not belong to this Graph". Input 1x3x64x64.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (1, 3, 64, 64)


class ConvStem(nn.Sequential):
    def __init__(self, channels: int) -> None:
        super().__init__(
            nn.Conv2d(3, channels // 2, 3, stride=2, padding=1),
            nn.BatchNorm2d(channels // 2),
            nn.ReLU(),
            nn.Conv2d(channels // 2, channels, 3, stride=2, padding=1),
            nn.BatchNorm2d(channels),
        )


class BiasedAttention(nn.Module):
    """Multi-head self-attention over an HxW token grid with a relative-position bias per head."""

    def __init__(self, channels: int, resolution: int, heads: int = 4, key_dim: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.key_dim = key_dim
        self.value_dim = channels // heads
        self.scale = key_dim**-0.5
        self.qkv = nn.Linear(channels, heads * (2 * key_dim + self.value_dim))
        self.proj = nn.Linear(heads * self.value_dim, channels)
        rows, cols = torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing="ij")
        points = torch.stack((rows.flatten(), cols.flatten()))
        offsets = (points[:, :, None] - points[:, None, :]).abs()
        self.attention_biases = nn.Parameter(torch.randn(heads, resolution * resolution) * 0.1)
        self.register_buffer("attention_bias_idxs", offsets[0] * resolution + offsets[1], persistent=False)
        self.attention_bias_cache: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True) -> BiasedAttention:
        super().train(mode)
        if mode:
            self.attention_bias_cache = {}
        return self

    def attention_bias(self, device: torch.device) -> torch.Tensor:
        if self.training:
            return self.attention_biases[:, self.attention_bias_idxs]
        key = str(device)
        if key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.attention_biases[:, self.attention_bias_idxs]
        return self.attention_bias_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, self.heads, -1).permute(0, 2, 1, 3)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=3)
        attention = (q @ k.transpose(-2, -1)) * self.scale
        attention = attention + self.attention_bias(x.device)
        attention = attention.softmax(dim=-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(batch, tokens, -1))


class TokenGate(nn.Module):
    """Refines the feature map with a conv only when its activations are large (data-dependent)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.refine = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.abs().mean()) > 0.1:
            return x + self.refine(x)
        return x


class HybridNet(nn.Module):
    def __init__(self, channels: int = 32, resolution: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvStem(channels)
        self.attention = BiasedAttention(channels, resolution)
        self.mix = nn.Conv2d(channels, channels, 3, padding=1)
        self.gate = TokenGate(channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + self.attention(tokens)
        x = tokens.transpose(1, 2).reshape(batch, channels, height, width)
        x = self.gate(torch.relu(self.mix(x)))
        return self.head(x.mean((2, 3)))


def build_model() -> HybridNet:
    return HybridNet()
