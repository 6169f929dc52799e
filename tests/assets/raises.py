from torch import nn

CHANNELS = {"a": 3}
WIDTH = CHANNELS["b"]


class Net(nn.Module):
    pass
