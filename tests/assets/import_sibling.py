"""Imports a sibling module, as real projects do."""

from sibling_layers import make_block
from torch import nn

INPUT_SHAPE = (1, 3, 8, 8)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = make_block()

    def forward(self, x):
        return self.block(x)
