"""A small CNN for scikit-learn's bundled 8x8 digits (upsampled to 16x16), with its own metric.

``train.py`` beside this file trains it and writes its weights and the unlabeled training images,
so that the README's accuracy walk-through runs on a trained model without any download::

    python sample_models/digits/train.py --out digits-run
    convrewrite apply sample_models/digits/model.py --weights digits-run/digits.safetensors \\
        --data digits-run/train-images.npz --rule separable --out digits-separable

``evaluate(model)`` is the user's own task metric (test accuracy on the 360 held-out test digits,
with their labels); convrewrite runs it on the original and on the result and reports both.
It needs scikit-learn (``pip install 'convrewrite[bench]'``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SHAPE = (1, 1, 16, 16)


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(64)
        self.mix = nn.Conv2d(64, 64, 1)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        x = torch.relu(self.bn3(self.conv3(x)))
        x = torch.relu(self.mix(x))
        return self.head(x.mean(dim=(2, 3)))


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels): a fixed 80/20 split of the 1,797 digits."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    split = int(0.8 * len(labels))
    return images[:split], labels[:split], images[split:], labels[split:]


def evaluate(model: nn.Module) -> dict[str, float]:
    """Test accuracy on the 360 test digits (never part of the calibration data)."""
    _, _, test_x, test_y = digits_split()
    with torch.no_grad():
        return {"accuracy": float((model(test_x).argmax(dim=1) == test_y).float().mean())}
