"""A forward that takes one dict of named tensors (a batch from a multi-modal data loader).

``example_inputs()`` returns ``({...},)``: one positional argument that is a dict. The
spectrogram goes through Conv2d layers and the waveform through a Conv1d. Inputs: ``image``
1x3x64x64, ``audio`` 1x1x400.
"""

from __future__ import annotations

import torch
from torch import nn


def example_inputs() -> tuple[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return (
        {
            "image": torch.randn(1, 3, 64, 64, generator=generator),
            "audio": torch.randn(1, 1, 400, generator=generator),
        },
    )


class DictInput(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.image = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()
        )
        self.audio = nn.Sequential(nn.Conv1d(1, 16, 9, stride=4, padding=4), nn.ReLU(), nn.Conv1d(16, 32, 5))
        self.fc = nn.Linear(64, classes)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        image = self.image(batch["image"]).mean((2, 3))
        audio = self.audio(batch["audio"]).mean(2)
        return self.fc(torch.cat([image, audio], dim=1))


def build_model() -> DictInput:
    return DictInput()
