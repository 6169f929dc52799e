"""Train the digits CNN of model.py and write what the README's walk-through needs.

    python sample_models/digits/train.py --out digits-run

writes ``digits-run/digits.safetensors`` (the trained weights) and ``digits-run/train-images.npz``
(the 1,437 training images, no labels: calibration data). Needs scikit-learn; about 30 s on one
CPU thread.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import DigitsCNN, digits_split, evaluate  # noqa: E402


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 1e-3) -> None:
    """Cross-entropy with Adam, batches of 64 in a seeded order; leaves the model in eval mode."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for first in range(0, len(y), 64):
            batch = order[first : first + 64]
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory to write into (created)")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    train_x, train_y, _, _ = digits_split()
    model = DigitsCNN()
    start = time.perf_counter()
    train(model, train_x, train_y, args.epochs)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out / "digits.safetensors"))
    np.savez(args.out / "train-images.npz", x=train_x.numpy())
    accuracy = evaluate(model)["accuracy"]
    print(
        f"trained for {args.epochs} epochs in {time.perf_counter() - start:.0f} s; test accuracy {accuracy:.3f}; "
        f"wrote {args.out}/digits.safetensors and {args.out}/train-images.npz ({len(train_x):,} images)"
    )


if __name__ == "__main__":
    main()
