"""What data-aware fitting wins back on trained models, measured on held-out labelled test data.

Two trained models, no downloads:

- the digits CNN of ``bench_trained_digits.py`` (scikit-learn's bundled 8x8 digits, upsampled to
  16x16; 1,437 training images, 360 test images), for every rule of that benchmark;
- a Conv1d TDNN (``sample_models/tdnn.py``: 39 features x 50 frames) trained to classify
  generated signals (5 tones and 5 chirps with random phase, amplitude and noise, as 39-bin STFT
  magnitudes), for ``log-group`` and ``separable``.

For each rule: parameters, test accuracy of the original, of the plain transfer (what the rule
does alone), after BatchNorm re-estimation alone, after fitting (``fit_layers``), after fitting
then BatchNorm re-estimation, and after a plain labelled fine-tuning loop of the transferred model
(with labels, which the tool never sees) for comparison; the time fitting took, and the held-out
top-1 agreement with the original. In the +fit+BN column a ``*`` marks new BatchNorm statistics
that were kept: ``reestimate_batchnorm(..., reference=original)`` keeps them only when they bring
the output closer to the original's on the fit split (otherwise the column repeats +fit).
Calibration data is the *training* images without labels
(``calibration_data_from``, 10% of them held out for the agreement figure); accuracy is always on
the test images, which neither fitting nor BatchNorm re-estimation ever see.

    pip install scikit-learn
    python benchmarks/bench_fit_digits.py [--epochs 30] [--steps 500] [--lr 0.02] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from pathlib import Path

import torch
from bench_trained_digits import MODEL_SOURCE, RULES, accuracy, digits, train
from safetensors.torch import save_file

from convrewrite.core.loading import load_model
from convrewrite.engine.pipeline import analyse
from convrewrite.recovery.data import calibration_data_from
from convrewrite.recovery.fit import fit_layers, reestimate_batchnorm
from convrewrite.recovery.metrics import measure_fidelity
from convrewrite.rules.api import make_rule

ROOT = Path(__file__).resolve().parent.parent
TDNN_RULES = [["log-group"], ["separable"], ["separable:multiplier=2"]]


def chirps(samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated signals, 10 classes (5 tones, 5 linear chirps), as (N, 39, 50) log-STFT magnitudes."""
    generator = torch.Generator().manual_seed(seed)
    rate, length = 8000, 3200 + 11  # 50 frames of hop 64 with a 76-point window
    t = torch.arange(length, dtype=torch.float32) / rate
    labels = torch.randint(0, 10, (samples,), generator=generator)
    phase = torch.rand(samples, 1, generator=generator) * 2 * math.pi
    amplitude = 0.5 + torch.rand(samples, 1, generator=generator)
    jitter = 1.0 + 0.04 * torch.randn(samples, 1, generator=generator)
    tone = torch.tensor([400.0, 900.0, 1500.0, 2200.0, 3000.0])
    start = torch.tensor([300.0, 3500.0, 800.0, 2800.0, 1200.0])
    stop = torch.tensor([3500.0, 300.0, 2000.0, 1600.0, 1300.0])
    is_tone = labels < 5
    f0 = torch.where(is_tone, tone[labels.clamp(max=4)], start[(labels - 5).clamp(min=0)]).unsqueeze(1) * jitter
    f1 = torch.where(is_tone, tone[labels.clamp(max=4)], stop[(labels - 5).clamp(min=0)]).unsqueeze(1) * jitter
    duration = length / rate
    instantaneous = 2 * math.pi * (f0 * t + (f1 - f0) * t**2 / (2 * duration))
    signal = amplitude * torch.sin(instantaneous + phase) + 0.3 * torch.randn(samples, length, generator=generator)
    window = torch.hann_window(76)
    spectrum = torch.stft(signal, n_fft=76, hop_length=64, window=window, center=False, return_complex=True)
    features = torch.log1p(spectrum.abs())[:, :39, :50]
    features = (features - features.mean()) / features.std()
    return features, labels


def rewrite(model_file: Path, weights: Path, specs: list[str]):
    loaded = load_model(str(model_file), weights=weights)
    original = copy.deepcopy(loaded.model)
    result = analyse(loaded, [make_rule(spec) for spec in specs])
    names = [record.name for record in result.rewrites]
    return original, result.model, names


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_table(
    title: str,
    model_file: Path,
    weights: Path,
    rules: list[list[str]],
    calibration: torch.Tensor,
    train_xy: tuple[torch.Tensor, torch.Tensor],
    test_xy: tuple[torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
) -> None:
    test_x, test_y = test_xy
    reference = load_model(str(model_file), weights=weights)
    data = calibration_data_from(calibration, example=reference, batch_size=args.batch_size, holdout=0.1)
    base = accuracy(reference.model, test_x, test_y)
    print(f"\n{title}: calibration {data.description}; test accuracy of the original {base:.3f} on {len(test_y)}")
    header = (
        f"{'rules':<36} {'params':>8} {'transfer':>8} {'+BN':>6} {'+fit':>6} {'+fit+BN':>7} "
        f"{'ft(lbl)':>7} {'fit s':>6} {'agree tr':>8} {'agree fit':>9}"
    )
    print(header)
    print("-" * len(header))
    print(f"{'(original)':<36} {parameters(reference.model):>8,} {base:>8.3f}")
    for specs in rules:
        original, rewritten, names = rewrite(model_file, weights, specs)
        transfer = accuracy(rewritten, test_x, test_y)
        agree_transfer = measure_fidelity(original, rewritten, data)
        with_bn = copy.deepcopy(rewritten)
        reestimate_batchnorm(with_bn, data)
        fitted = copy.deepcopy(rewritten)
        start = time.perf_counter()
        fit = fit_layers(original, fitted, names, data, steps=args.steps, lr=args.lr)
        seconds = time.perf_counter() - start
        fitted_acc = accuracy(fitted, test_x, test_y)
        agree_fit = measure_fidelity(original, fitted, data)
        batchnorm = reestimate_batchnorm(fitted, data, reference=original)
        kept = "*" if batchnorm.kept and batchnorm.modules else " "
        fitted_bn = accuracy(fitted, test_x, test_y)
        tuned = copy.deepcopy(rewritten)
        train(tuned, train_xy[0], train_xy[1], args.finetune, 3e-4)
        assert agree_transfer is not None and agree_fit is not None
        print(
            f"{' then '.join(specs):<36} {parameters(rewritten):>8,} {transfer:>8.3f} "
            f"{accuracy(with_bn, test_x, test_y):>6.3f} {fitted_acc:>6.3f} {fitted_bn:>6.3f}{kept} "
            f"{accuracy(tuned, test_x, test_y):>7.3f} {seconds:>6.1f} {agree_transfer.agreement or 0:>8.3f} "
            f"{agree_fit.agreement or 0:>9.3f}"
        )
        if args.verbose:
            for layer in fit.layers:
                print(
                    f"    {layer.name:<12} {layer.kept:<22} holdout error {layer.holdout_error_before:.3f} -> "
                    f"{layer.holdout_error_after:.3f}  closed form {','.join(layer.closed_form) or '--'}  "
                    f"{layer.seconds:.1f} s"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30, help="training epochs of the original models")
    parser.add_argument("--finetune", type=int, default=5, help="epochs of the labelled fine-tuning comparison")
    parser.add_argument("--steps", type=int, default=500, help="gradient steps per layer")
    parser.add_argument("--lr", type=float, default=2e-2, help="fitting learning rate (relative to parameter RMS)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=["digits", "tdnn"], default=None)
    parser.add_argument("--verbose", action="store_true", help="per-layer errors")
    parser.add_argument("--rule", action="append", default=None, help="only these rule specs (comma: a composition)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="convrewrite-fit-"))

    if args.only in (None, "digits"):
        model_file = work / "digits_cnn.py"
        model_file.write_text(MODEL_SOURCE)
        train_x, train_y, test_x, test_y = digits()
        train_and_run_table(
            "DigitsCNN", "DigitsCNN (Conv2d)", model_file, RULES, (train_x, train_y), (test_x, test_y), args, work
        )

    if args.only in (None, "tdnn"):
        print()
        train_and_run_table(
            "TDNN",
            "TDNN (Conv1d) on generated tones and chirps",
            ROOT / "sample_models" / "tdnn.py",
            TDNN_RULES,
            chirps(2000, seed=1),
            chirps(500, seed=2),
            args,
            work,
        )


def train_and_run_table(
    name: str,
    title: str,
    model_file: Path,
    rules: list[list[str]],
    train_xy: tuple[torch.Tensor, torch.Tensor],
    test_xy: tuple[torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
    work: Path,
) -> None:
    """Train the model of ``model_file`` on the labelled training set, save its weights, and run its table."""
    torch.manual_seed(0)
    model = load_model(str(model_file)).model
    start = time.perf_counter()
    train(model, *train_xy, args.epochs, 1e-3)
    weights = work / f"{name.lower()}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    print(f"trained {name} for {args.epochs} epochs in {time.perf_counter() - start:.1f} s")
    specs = [r.split("+") for r in args.rule] if args.rule else rules
    run_table(title, model_file, weights, specs, train_xy[0], train_xy, test_xy, args)


if __name__ == "__main__":
    main()
