"""What each rule costs in accuracy on *trained* weights, and what a short fine-tune wins back.

The sample models have random weights, whose flat spectra make every rewrite look lossy and whose
outputs can barely depend on the input. This script trains a small CNN on scikit-learn's bundled
8x8 digits (no download), saves its weights, and then for each rule: loads the model through
convrewrite's API with those weights, rewrites it (weights transferred by the rule), and reports
params, MACs, mean kernel error, test accuracy right after the rewrite, after re-estimating the
BatchNorm statistics on unlabeled training images (forward passes only), and after a few epochs of
fine-tuning the rewritten model.

    pip install scikit-learn
    python benchmarks/bench_trained_digits.py [--epochs 30] [--finetune 5]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from convrewrite.core.loading import load_model
from convrewrite.engine.pipeline import analyse
from convrewrite.engine.report_builder import build_report
from convrewrite.rules.api import make_rule

# The README's digits sample (sample_models/digits): its network, its data split and its training.
DIGITS = Path(__file__).resolve().parents[1] / "sample_models" / "digits"
sys.path.insert(0, str(DIGITS))
import model as digits_model  # noqa: E402  (sample_models/digits/model.py)
import train as digits_train  # noqa: E402  (sample_models/digits/train.py)

#: The sample's network as a model file of its own, without the sample's evaluate(), which the
#: pipeline would otherwise run on both models of every rewrite the benchmarks time.
MODEL_SOURCE = (
    f"import torch\nfrom torch import nn\n\nINPUT_SHAPE = {digits_model.INPUT_SHAPE}\n\n\n"
    + inspect.getsource(digits_model.DigitsCNN)
)
digits = digits_model.digits_split
train = digits_train.train

RULES = [
    ["separable"],
    ["separable:multiplier=3"],
    ["group-shuffle:groups=4"],
    ["group-shuffle:groups=4,assign=energy"],
    ["log-group"],
    ["separable", "channelwise:groups=4"],
    ["low-rank"],
    ["low-rank:energy=0.9"],
]


def recalibrate_batchnorm(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Re-estimate BatchNorm running statistics on unlabeled data (forward passes only)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the passes below
    model.train()
    with torch.no_grad():
        for start in range(0, len(x), 128):
            model(x[start : start + 128])
    model.eval()


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30, help="training epochs of the original model")
    parser.add_argument("--finetune", type=int, default=5, help="fine-tuning epochs after each rewrite")
    parser.add_argument("--only", default="", help="only the rule lists whose specs contain this text")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(tempfile.mkdtemp(prefix="convrewrite-digits-"))
    model_file = work / "digits_cnn.py"
    model_file.write_text(MODEL_SOURCE)
    train_x, train_y, test_x, test_y = digits()

    start = time.perf_counter()
    original = load_model(str(model_file)).model
    train(original, train_x, train_y, args.epochs, 1e-3)
    weights = work / "digits.safetensors"
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(weights))
    base = accuracy(original, test_x, test_y)
    print(
        f"trained DigitsCNN for {args.epochs} epochs in {time.perf_counter() - start:.1f} s on 1,437 images; "
        f"test accuracy {base:.3f} on 360 images"
    )
    header = (
        f"{'rules':<42} {'params':>9} {'MACs':>11} {'kernel err':>10} {'acc rewritten':>13} "
        f"{'acc +BN':>8} {'acc +ft':>8}"
    )
    print(header)
    print("-" * len(header))
    loaded = load_model(str(model_file), weights=weights)
    report = build_report(analyse(loaded, []))
    print(
        f"{'(original)':<42} {report.before.params:>9,} {report.before.macs:>11,} {'--':>10} {base:>13.3f} "
        f"{'--':>8} {'--':>8}"
    )
    for specs in [r for r in RULES if args.only in " ".join(r)]:
        loaded = load_model(str(model_file), weights=weights)
        result = analyse(loaded, [make_rule(spec) for spec in specs])
        report = build_report(result)
        assert report.after is not None and report.fidelity is not None
        errors = [
            layer.kernel_relative_error for layer in report.fidelity.layers if layer.kernel_relative_error is not None
        ]
        mean_error = sum(errors) / len(errors) if errors else float("nan")
        rewritten = result.model
        after = accuracy(rewritten, test_x, test_y)
        recalibrated = copy.deepcopy(rewritten)
        recalibrate_batchnorm(recalibrated, train_x)
        tuned = copy.deepcopy(rewritten)
        train(tuned, train_x, train_y, args.finetune, 3e-4)
        print(
            f"{' then '.join(specs):<42} {report.after.params:>9,} {report.after.macs:>11,} {mean_error:>10.3f} "
            f"{after:>13.3f} {accuracy(recalibrated, test_x, test_y):>8.3f} {accuracy(tuned, test_x, test_y):>8.3f}"
        )


if __name__ == "__main__":
    main()
