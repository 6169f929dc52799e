"""Replacement blocks, one small torch-only file per concept, re-exported flat (timm style).

Every block class exported here is registered (``registry.register_block``): an FX leaf, so
traced graphs call it as one module, whose file ``convrewrite apply`` copies into the generated
``model.py``. The block files import nothing but torch, so the copy stands alone.
"""

from convrewrite.layers.channelwise import (
    ChannelwiseConv1d,
    ChannelwiseConv2d,
    ChannelwiseConv3d,
    GroupChannelwiseConv1d,
    GroupChannelwiseConv2d,
    GroupChannelwiseConv3d,
)
from convrewrite.layers.log_group import LogGroupConv1d, LogGroupConv2d, LogGroupConv3d, log_group_sizes
from convrewrite.layers.low_rank import LowRankConv1d, LowRankConv2d, LowRankLinear
from convrewrite.layers.padding import PaddedConv, same_padding
from convrewrite.layers.registry import is_block, register_block, registered_blocks
from convrewrite.layers.separable import SeparableConv1d, SeparableConv2d, SeparableConv3d
from convrewrite.layers.shuffle import (
    ChannelPermutation,
    ChannelShuffle,
    GroupShuffleConv1d,
    GroupShuffleConv2d,
    GroupShuffleConv3d,
)
from convrewrite.layers.winograd import WinogradConv2d

# Every block class a file of this package defines is registered: a new block file is one file
# plus its re-export here.
for _exported in list(globals().values()):
    _module = getattr(_exported, "__module__", "")
    if isinstance(_exported, type) and _module.startswith(__name__ + ".") and _module != __name__ + ".registry":
        register_block(_exported)

__all__ = [
    "ChannelPermutation",
    "ChannelShuffle",
    "ChannelwiseConv1d",
    "ChannelwiseConv2d",
    "ChannelwiseConv3d",
    "GroupChannelwiseConv1d",
    "GroupChannelwiseConv2d",
    "GroupChannelwiseConv3d",
    "GroupShuffleConv1d",
    "GroupShuffleConv2d",
    "GroupShuffleConv3d",
    "LogGroupConv1d",
    "LogGroupConv2d",
    "LogGroupConv3d",
    "PaddedConv",
    "LowRankConv1d",
    "LowRankConv2d",
    "LowRankLinear",
    "SeparableConv1d",
    "SeparableConv2d",
    "SeparableConv3d",
    "is_block",
    "WinogradConv2d",
    "log_group_sizes",
    "register_block",
    "registered_blocks",
    "same_padding",
]
