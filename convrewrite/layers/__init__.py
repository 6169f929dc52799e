"""Replacement blocks, one small torch-only file per concept, re-exported flat (timm style).

Each block is registered as an FX leaf, so traced graphs call it as one module and generated source
keeps it as one readable layer. The files here import nothing but torch: ``convrewrite apply``
copies their source into the generated ``model.py``.
"""

from convrewrite.engine.tracing import register_leaf_module
from convrewrite.layers.channelwise import (
    ChannelwiseConv1d,
    ChannelwiseConv2d,
    GroupChannelwiseConv1d,
    GroupChannelwiseConv2d,
)
from convrewrite.layers.log_group import LogGroupConv1d, LogGroupConv2d, log_group_sizes
from convrewrite.layers.low_rank import LowRankConv1d, LowRankConv2d, LowRankLinear
from convrewrite.layers.separable import SeparableConv1d, SeparableConv2d
from convrewrite.layers.shuffle import ChannelPermutation, ChannelShuffle, GroupShuffleConv1d, GroupShuffleConv2d

BLOCK_CLASSES = (
    SeparableConv1d,
    SeparableConv2d,
    GroupShuffleConv1d,
    GroupShuffleConv2d,
    ChannelShuffle,
    ChannelPermutation,
    LogGroupConv1d,
    LogGroupConv2d,
    ChannelwiseConv1d,
    ChannelwiseConv2d,
    GroupChannelwiseConv1d,
    GroupChannelwiseConv2d,
    LowRankLinear,
    LowRankConv1d,
    LowRankConv2d,
)

for _cls in BLOCK_CLASSES:
    register_leaf_module(_cls)

__all__ = [
    "BLOCK_CLASSES",
    "ChannelPermutation",
    "ChannelShuffle",
    "ChannelwiseConv1d",
    "ChannelwiseConv2d",
    "GroupChannelwiseConv1d",
    "GroupChannelwiseConv2d",
    "GroupShuffleConv1d",
    "GroupShuffleConv2d",
    "LogGroupConv1d",
    "LogGroupConv2d",
    "LowRankConv1d",
    "LowRankConv2d",
    "LowRankLinear",
    "SeparableConv1d",
    "SeparableConv2d",
    "log_group_sizes",
]
