"""What distillation wins back after each rewrite, on trained models and held-out labelled data.

Two trained models, both trained here from data that ships in a package or is generated (no
download):
- the digits CNN of bench_trained_digits.py on scikit-learn's 8x8 digits (upsampled to 16x16),
  1,437 training / 360 test images;
- a Conv1d TDNN on generated audio: log-spectrograms of noisy tones, chirps, chords and
  amplitude-modulated tones in 10 classes.

For each rule the rewritten model (weights transferred by the rule) is distilled from the original
with ``convrewrite.recovery.distill`` on the *training inputs only* (no labels; 10% of them held out
for the held-out fidelity the distiller selects its best state on). Accuracy is measured on the
test split, which nothing trains on. The baseline is a plain supervised fine-tuning loop written
here: the same optimiser, schedule and clipping, cross-entropy on the training *labels*, given the
same CPU time as the distillation took. So the table says what distillation adds over
training with labels, not only over doing nothing.

    pip install scikit-learn
    python benchmarks/bench_distill_digits.py [--steps 300] [--batchnorm train,frozen] [--model digits,tdnn]
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_trained_digits import MODEL_SOURCE as DIGITS_SOURCE
from bench_trained_digits import accuracy, digits, train
from common import machine
from safetensors.torch import load_file, save_file

from convrewrite.core.loading import load_model
from convrewrite.engine.pipeline import analyse
from convrewrite.engine.report_builder import build_report
from convrewrite.recovery.batches import TensorBatches
from convrewrite.recovery.distill import DistillConfig, distill
from convrewrite.rules.api import make_rule

DIGITS_RULES = [
    ["separable"],
    ["separable:multiplier=3"],
    ["group-shuffle:groups=4"],
    ["group-shuffle:groups=4,assign=energy"],
    ["log-group"],
    ["channelwise:groups=4"],
    ["separable", "channelwise:groups=4"],
]
TDNN_RULES = [["separable"], ["log-group"], ["separable", "log-group"]]

TDNN_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    INPUT_SHAPE = (1, 33, 48)


    class ToneTDNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tdnn1 = nn.Conv1d(33, 64, 3, padding=1)
            self.bn1 = nn.BatchNorm1d(64)
            self.tdnn2 = nn.Conv1d(64, 64, 9, padding=4)
            self.bn2 = nn.BatchNorm1d(64)
            self.tdnn3 = nn.Conv1d(64, 64, 3, dilation=2, padding=2)
            self.bn3 = nn.BatchNorm1d(64)
            self.head = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.bn1(self.tdnn1(x)))
            x = torch.relu(self.bn2(self.tdnn2(x)))
            x = torch.relu(self.bn3(self.tdnn3(x)))
            return self.head(x.mean(dim=2))
    """
)


def tones(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-magnitude spectrograms (33 bins x 48 frames) of 10 classes of noisy synthetic sounds
    (not standardised).

    0-3 steady tones in four bands, 4-5 rising chirps, 6-7 falling chirps, 8 a two-tone chord,
    9 an amplitude-modulated tone; random pitch (+-10%), phase, loudness, onset and white noise.
    """
    generator = torch.Generator().manual_seed(seed)
    rate, length = 8000.0, 768
    t = torch.arange(length, dtype=torch.float64) / rate
    labels = torch.randint(0, 10, (count,), generator=generator)

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    signals = []
    for label in labels.tolist():
        jitter = uniform(0.9, 1.1)
        phase = uniform(0, 2 * math.pi)
        if label < 4:
            frequency = (300.0, 700.0, 1400.0, 2600.0)[label] * jitter
            wave = torch.sin(2 * math.pi * frequency * t + phase)
        elif label < 8:
            low, high = ((400.0, 1500.0), (1200.0, 3200.0))[label % 2]
            start, end = (low, high) if label < 6 else (high, low)
            start, end = start * jitter, end * jitter
            duration = t[-1]
            wave = torch.sin(2 * math.pi * (start * t + (end - start) * t**2 / (2 * duration)) + phase)
        elif label == 8:
            wave = torch.sin(2 * math.pi * 500.0 * jitter * t + phase) + torch.sin(2 * math.pi * 1900.0 * jitter * t)
        else:
            envelope = 1 + torch.sin(2 * math.pi * 25.0 * jitter * t)
            wave = envelope * torch.sin(2 * math.pi * 1000.0 * jitter * t + phase)
        onset = int(uniform(0, 160))
        wave = torch.roll(wave, onset) * torch.cat([torch.zeros(onset), torch.ones(length - onset)]).double()
        wave = uniform(0.3, 1.0) * wave + 0.6 * torch.randn(length, generator=generator, dtype=torch.float64)
        signals.append(wave)
    batch = torch.stack(signals).float()
    spectrum = torch.stft(batch, n_fft=64, hop_length=16, window=torch.hann_window(64), return_complex=True)
    return torch.log1p(spectrum.abs())[:, :, :48], labels


def finetune_with_labels(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    seconds: float,
    batch_size: int,
    config: DistillConfig | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, float, int]:
    """The labelled baseline: cross-entropy on the labels with the distiller's optimiser, schedule
    and clipping (``config``, the distiller's defaults when None), as many steps as fit in
    ``seconds`` of ``clock`` (wall time by default; ``time.process_time`` counts this process's CPU
    time, which neighbours' load on a shared machine does not inflate). The step count for the
    schedule comes from the rate of the first 20 steps. Returns (wall seconds, CPU seconds, steps)."""
    config = config or DistillConfig()
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=config.lr
    )
    generator = torch.Generator().manual_seed(2)
    model.train()
    start, start_cpu, start_clock = time.perf_counter(), time.process_time(), clock()
    steps = probe = 20
    step = position = 0
    order = torch.randperm(len(y), generator=generator)
    schedule = DistillConfig(**{**config.to_dict(), "steps": 10 * probe})
    while step < steps:
        if position + batch_size > len(y):
            order, position = torch.randperm(len(y), generator=generator), 0
        batch = order[position : position + batch_size]
        position += batch_size
        for group in optimizer.param_groups:
            group["lr"] = schedule.learning_rate(step)
        optimizer.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        if config.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        optimizer.step()
        step += 1
        if step == probe:
            per_step = (clock() - start_clock) / probe
            steps = max(probe + 1, int(seconds / per_step))
            schedule = DistillConfig(**{**config.to_dict(), "steps": steps})
    model.eval()
    return time.perf_counter() - start, time.process_time() - start_cpu, steps


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_model(name: str, source: str, data: tuple[torch.Tensor, ...], rules: list[list[str]], args: argparse.Namespace):
    train_x, train_y, test_x, test_y = data
    work = Path(tempfile.mkdtemp(prefix=f"convrewrite-distill-{name}-"))
    model_file = work / f"{name}.py"
    model_file.write_text(source)
    start = time.perf_counter()
    original = load_model(str(model_file)).model
    # Training is deterministic (seeded initialisation and order): a cached result is the same model.
    weights = args.cache / f"{name}-{args.epochs}-epochs.safetensors"
    if weights.is_file():
        original.load_state_dict(load_file(str(weights)))
        trained = f"loaded the model trained for {args.epochs} epochs from {weights}"
    else:
        train(original, train_x, train_y, args.epochs, 1e-3)
        args.cache.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(weights))
        trained = f"trained for {args.epochs} epochs in {time.perf_counter() - start:.1f} s"
    base = accuracy(original, test_x, test_y)
    base_params = params(original)
    print(
        f"\n{name}: {trained} on {len(train_y):,} samples; test accuracy {base:.3f} on {len(test_y):,} "
        f"held-out samples; {base_params:,} params"
    )
    modes = [m.strip() for m in args.batchnorm.split(",") if m.strip()]
    columns = "".join(f" {'distill/' + m:>13} {'s':>5} {'cpu s':>5}" for m in modes)
    baseline = f" {'ft labels':>9} {'s':>5} {'cpu s':>5} {'steps':>6}"
    header = f"{'rules':<40} {'params':>8} {'ratio':>6} {'plain':>6}{columns}{baseline}"
    print(header)
    print("-" * len(header))
    for specs in rules:
        if args.only and " then ".join(specs) not in args.only:
            continue
        loaded = load_model(str(model_file), weights=weights)
        result = analyse(loaded, [make_rule(spec) for spec in specs])
        report = build_report(result)
        assert report.after is not None
        rewritten = result.model
        plain = accuracy(rewritten, test_x, test_y)
        teacher = load_model(str(model_file), weights=weights).model
        calibration = TensorBatches((train_x,), batch_size=args.batch, holdout=0.1, seed=0)
        cells = []
        budget = 0.0  # CPU seconds of the slowest distillation
        config = DistillConfig(steps=args.steps, lr=args.lr)
        for mode in modes:
            student = copy.deepcopy(rewritten)
            config = DistillConfig(steps=args.steps, lr=args.lr, batchnorm=mode)  # type: ignore[arg-type]
            begin, begin_cpu = time.perf_counter(), time.process_time()
            distilled = distill(teacher, student, calibration, config, device="cpu", progress="none")
            seconds, cpu = time.perf_counter() - begin, time.process_time() - begin_cpu
            budget = max(budget, cpu)
            cells.append(f" {accuracy(student, test_x, test_y):>13.3f} {seconds:>5.1f} {cpu:>5.1f}")
            if args.verbose:
                for entry in distilled.history:
                    fidelity = entry["fidelity"] or {}
                    print(
                        f"    {mode} step {entry['step']:>4}: loss {entry['loss'] or 0:.4f} "
                        f"error {fidelity.get('output_relative_error', 0):.4f} "
                        f"agree {fidelity.get('top1_agreement') or 0:.3f}"
                    )
                print(f"    {mode}: kept step {distilled.best_step}")
        tuned = copy.deepcopy(rewritten)
        fit = torch.tensor(calibration.indices["fit"])  # the labelled twin of what the distiller saw
        tuned_seconds, tuned_cpu, tuned_steps = finetune_with_labels(
            tuned, train_x[fit], train_y[fit], budget, args.batch, config, clock=time.process_time
        )
        print(
            f"{' then '.join(specs):<40} {report.after.params:>8,} {base_params / report.after.params:>5.2f}x "
            f"{plain:>6.3f}{''.join(cells)} {accuracy(tuned, test_x, test_y):>9.3f} {tuned_seconds:>5.1f} "
            f"{tuned_cpu:>5.1f} {tuned_steps:>6}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30, help="training epochs of the original models")
    parser.add_argument("--steps", type=int, default=300, help="distillation steps per rule")
    parser.add_argument("--lr", type=float, default=DistillConfig.lr, help="peak learning rate")
    parser.add_argument("--batch", type=int, default=64, help="batch size of distillation and fine-tuning")
    parser.add_argument("--batchnorm", default="train", help="BatchNorm modes to compare: train,frozen")
    parser.add_argument("--model", default="digits,tdnn", help="which models: digits,tdnn")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: these convolutions are too small for intra-op threads to pay on a shared "
        "2-core machine under load: 0.20 CPU s per digits step on 2 threads, 0.03 on 1)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "convrewrite-bench-cache",
        help="where the trained originals are kept between runs",
    )
    parser.add_argument("--only", action="append", help="run only this rule line (e.g. 'separable'); repeatable")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}")
    print(
        f"distillation: {args.steps} steps, batch {args.batch}, peak lr {args.lr:g}, unlabeled training inputs "
        f"(90% fit / 10% held out); 'ft labels': supervised fine-tuning with labels in the same CPU time"
    )
    models = {m.strip() for m in args.model.split(",")}
    if "digits" in models:
        run_model("digits", DIGITS_SOURCE, digits(), DIGITS_RULES, args)
    if "tdnn" in models:
        train_x, train_y = tones(2000, seed=0)
        test_x, test_y = tones(600, seed=1)
        # Standardised with the training set's statistics only.
        mean, std = train_x.mean(), train_x.std()
        train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
        run_model("tdnn", TDNN_SOURCE, (train_x, train_y, test_x, test_y), TDNN_RULES, args)


if __name__ == "__main__":
    main()
