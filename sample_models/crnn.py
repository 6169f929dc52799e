"""The CNN part of a CRNN, as in the depthwise-separable rewrite document (CNN0).

imageHeight 32, one input channel, input 1x1x32x320. ``convrewrite report
sample_models/crnn.py --rule separable --format torchsummary`` reproduces the document's tables:
5,551,360 parameters before and 781,450 after.
"""

import torch
from torch import nn

INPUT_SHAPE = (1, 1, 32, 320)


class CNN0(nn.Module):
    def __init__(self, imageHeight: int, nChannel: int) -> None:
        super().__init__()
        if imageHeight % 32 != 0:
            raise ValueError("image height has to be a multiple of 32")
        self.conv0 = nn.Conv2d(nChannel, 64, kernel_size=3, stride=1, padding=1)
        self.relu0 = nn.ReLU(inplace=True)
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)

        self.conv1 = nn.Conv2d(64, 128, kernel_size=3, stride=1, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)

        self.conv2 = nn.Conv2d(128, 256, kernel_size=3, stride=1, padding=1)
        self.batchNorm2 = nn.BatchNorm2d(256)
        self.relu2 = nn.ReLU(inplace=True)

        self.conv3 = nn.Conv2d(256, 256, kernel_size=3, stride=1, padding=1)
        self.relu3 = nn.ReLU(inplace=True)
        self.pool3 = nn.MaxPool2d(kernel_size=(2, 2), stride=(2, 1), padding=(0, 1))

        self.conv4 = nn.Conv2d(256, 512, kernel_size=3, stride=1, padding=1)
        self.batchNorm4 = nn.BatchNorm2d(512)
        self.relu4 = nn.ReLU(inplace=True)

        self.conv5 = nn.Conv2d(512, 512, kernel_size=3, stride=1, padding=1)
        self.relu5 = nn.ReLU(inplace=True)
        self.pool5 = nn.MaxPool2d(kernel_size=(2, 2), stride=(2, 1), padding=(0, 1))

        self.conv6 = nn.Conv2d(512, 512, kernel_size=2, stride=1, padding=0)
        self.batchNorm6 = nn.BatchNorm2d(512)
        self.relu6 = nn.ReLU(inplace=True)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.relu0(self.conv0(input)))
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.relu2(self.batchNorm2(self.conv2(x)))
        x = self.pool3(self.relu3(self.conv3(x)))
        x = self.relu4(self.batchNorm4(self.conv4(x)))
        x = self.pool5(self.relu5(self.conv5(x)))
        return self.relu6(self.batchNorm6(self.conv6(x)))


def build_model() -> CNN0:
    return CNN0(imageHeight=32, nChannel=1)
