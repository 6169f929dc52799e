"""Train the CRNN of model.py with CTC on generated digit strips.

    python sample_models/crnn_bilstm/train.py --out crnn-run

writes ``crnn-run/crnn.safetensors`` (the trained weights). Training strips come from seed 0,
held-out strips (what the benchmarks measure on) from seed 1. A few minutes on one CPU thread.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import CRNN, make_strips, sequence_accuracy  # noqa: E402


def train(model: CRNN, images: torch.Tensor, labels: list[list[int]], epochs: int, lr: float = 2e-3) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(2)
    steps = epochs * ((len(images) + 63) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator).tolist()
        for first in range(0, len(order), 64):
            batch = order[first : first + 64]
            targets = torch.tensor([d + 1 for i in batch for d in labels[i]])
            lengths = torch.tensor([len(labels[i]) for i in batch])
            log_probs = model(images[batch]).log_softmax(-1).transpose(0, 1)  # (T, N, C)
            inputs = torch.full((len(batch),), log_probs.shape[0], dtype=torch.long)
            loss = F.ctc_loss(log_probs, targets, inputs, lengths, zero_infinity=True)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


def train_and_save(out: Path, samples: int = 4096, epochs: int = 6) -> Path:
    torch.manual_seed(0)
    images, labels = make_strips(samples, seed=0)
    model = CRNN()
    start = time.perf_counter()
    train(model, images, labels, epochs)
    held_x, held_y = make_strips(512, seed=1)
    accuracy = sequence_accuracy(model, held_x, held_y)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "crnn.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    print(
        f"trained on {samples} strips for {epochs} epochs in {time.perf_counter() - start:.0f} s; "
        f"held-out sequence accuracy {accuracy:.3f} (512 strips); wrote {path}"
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory to write into (created)")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if (args.out / "crnn.safetensors").exists():
        raise SystemExit(f"{args.out / 'crnn.safetensors'} exists: not overwriting it (choose another --out)")
    train_and_save(args.out, args.samples, args.epochs)


if __name__ == "__main__":
    main()
