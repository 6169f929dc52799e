"""The blocks ``relpkg.net`` imports relatively."""

from torch import nn


def conv_block(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.ReLU())
