"""A tiny classifier whose file brings its own calibration data and task metric."""

import torch
from torch import nn

INPUT_SHAPE = (1, 2, 12, 12)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


def calibration_data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(40, 2, 12, 12, generator=generator)


def evaluate(model: nn.Module) -> dict[str, float]:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(16, 2, 12, 12, generator=generator)
    return {"mean_logit": float(model(x).mean())}
