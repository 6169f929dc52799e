"""A CRNN text recogniser: the sample CRNN's CNN (``sample_models/crnn.py``, CNN0: seven convs,
three BatchNorms, the same kernels, strides and pools) at a quarter of its width, then a BiLSTM
and a per-column classifier trained with CTC, on synthetic digit strips generated here.

Input 1x32x128 (grey strips of 3 to 6 digits drawn from a 5x7 bitmap font, scaled 3x, with random
spacing, vertical jitter, contrast and noise); the CNN turns it into 33 columns of features, the
BiLSTM reads them, and the classifier gives 11 classes per column (blank + 10 digits). Sized so
that training takes minutes on one CPU thread (CNN0 at full width is 5.5 M parameters and ~0.8
GMACs per strip; this one is ~0.35 M parameters in the CNN).

    convrewrite report sample_models/crnn_bilstm/model.py --rule separable
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (1, 1, 32, 128)
CLASSES = 11  # blank + 10 digits

_FONT = {
    "0": ["01110", "10001", "10011", "10101", "11001", "10001", "01110"],
    "1": ["00100", "01100", "00100", "00100", "00100", "00100", "01110"],
    "2": ["01110", "10001", "00001", "00010", "00100", "01000", "11111"],
    "3": ["11111", "00010", "00100", "00010", "00001", "10001", "01110"],
    "4": ["00010", "00110", "01010", "10010", "11111", "00010", "00010"],
    "5": ["11111", "10000", "11110", "00001", "00001", "10001", "01110"],
    "6": ["00110", "01000", "10000", "11110", "10001", "10001", "01110"],
    "7": ["11111", "00001", "00010", "00100", "01000", "01000", "01000"],
    "8": ["01110", "10001", "10001", "01110", "10001", "10001", "01110"],
    "9": ["01110", "10001", "10001", "01111", "00001", "00010", "01100"],
}


def _glyphs(scale: int = 3) -> torch.Tensor:
    """(10, 7*scale, 5*scale) digit bitmaps."""
    rows = [torch.tensor([[float(c) for c in line] for line in _FONT[str(d)]]) for d in range(10)]
    return torch.stack(rows).repeat_interleave(scale, 1).repeat_interleave(scale, 2)


def make_strips(count: int, seed: int) -> tuple[torch.Tensor, list[list[int]]]:
    """``count`` strips (count, 1, 32, 128) and their digit sequences, deterministic in ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    glyphs = _glyphs()
    height, width = glyphs.shape[1:]
    images = torch.zeros(count, 1, 32, 128)
    labels: list[list[int]] = []
    for i in range(count):
        length = int(torch.randint(3, 7, (1,), generator=generator))
        digits = torch.randint(0, 10, (length,), generator=generator).tolist()
        x = int(torch.randint(0, 6, (1,), generator=generator))
        for d in digits:
            y = int(torch.randint(0, 32 - height + 1, (1,), generator=generator))
            images[i, 0, y : y + height, x : x + width] = torch.maximum(
                images[i, 0, y : y + height, x : x + width], glyphs[d]
            )
            x += width + int(torch.randint(1, 5, (1,), generator=generator))
        contrast = 0.5 + 0.5 * torch.rand(1, generator=generator)
        images[i] = images[i] * contrast + 0.15 * torch.randn(1, 32, 128, generator=generator)
        labels.append(digits)
    return images, labels


class CRNN(nn.Module):
    """CNN0's layers (names and geometry) at ``width`` x its channels, a BiLSTM, a classifier."""

    def __init__(self, width: float = 0.25, hidden: int = 64) -> None:
        super().__init__()
        c = [max(8, int(n * width)) for n in (64, 128, 256, 256, 512, 512, 512)]
        self.conv0 = nn.Conv2d(1, c[0], 3, 1, 1)
        self.pool0 = nn.MaxPool2d(2, 2)
        self.conv1 = nn.Conv2d(c[0], c[1], 3, 1, 1)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(c[1], c[2], 3, 1, 1)
        self.batchNorm2 = nn.BatchNorm2d(c[2])
        self.conv3 = nn.Conv2d(c[2], c[3], 3, 1, 1)
        self.pool3 = nn.MaxPool2d((2, 2), (2, 1), (0, 1))
        self.conv4 = nn.Conv2d(c[3], c[4], 3, 1, 1)
        self.batchNorm4 = nn.BatchNorm2d(c[4])
        self.conv5 = nn.Conv2d(c[4], c[5], 3, 1, 1)
        self.pool5 = nn.MaxPool2d((2, 2), (2, 1), (0, 1))
        self.conv6 = nn.Conv2d(c[5], c[6], 2, 1, 0)
        self.batchNorm6 = nn.BatchNorm2d(c[6])
        self.rnn = nn.LSTM(c[6], hidden, bidirectional=True, batch_first=True)
        self.classifier = nn.Linear(2 * hidden, CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(torch.relu(self.conv0(x)))
        x = self.pool1(torch.relu(self.conv1(x)))
        x = torch.relu(self.batchNorm2(self.conv2(x)))
        x = self.pool3(torch.relu(self.conv3(x)))
        x = torch.relu(self.batchNorm4(self.conv4(x)))
        x = self.pool5(torch.relu(self.conv5(x)))
        return torch.relu(self.batchNorm6(self.conv6(x)))  # (N, C, 1, 33)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 33, 11) per-column class logits."""
        columns = self.features(x).squeeze(2).transpose(1, 2)
        return self.classifier(self.rnn(columns)[0])


def decode(logits: torch.Tensor) -> list[list[int]]:
    """Greedy CTC decoding: best class per column, repeats merged, blanks dropped; digits 0-9."""
    best = logits.argmax(-1).tolist()
    sequences = []
    for row in best:
        out, last = [], 0
        for k in row:
            if k != last and k != 0:
                out.append(k - 1)
            last = k
        sequences.append(out)
    return sequences


def sequence_accuracy(model: nn.Module, images: torch.Tensor, labels: list[list[int]]) -> float:
    """Share of strips whose whole digit sequence is read exactly."""
    model.eval()
    with torch.no_grad():
        predicted = [s for first in range(0, len(images), 256) for s in decode(model(images[first : first + 256]))]
    return sum(p == t for p, t in zip(predicted, labels)) / len(labels)


def build_model() -> CRNN:
    return CRNN()
