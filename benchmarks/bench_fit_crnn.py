"""Fitting a trained CRNN (``sample_models/crnn_bilstm``: CNN0 at quarter width + BiLSTM, CTC) with
``separable`` on 1,024 unlabeled strips, through the real pipeline.

The model is trained on generated digit strips (seed 0) the first time and cached under
``benchmarks/.cache/crnn_bilstm/`` (gitignored). Calibration data: 1,024 fresh strips (seed 3,
unlabeled, 32x128, 10% held out by the tool). Accuracy: whole-sequence accuracy on 512 labelled
strips of seed 1 that the tool never sees.

``convrewrite.rewrite(model, ["separable"], data=strips, fit_steps=S, fit_method=M)`` is what
``convrewrite apply sample_models/crnn_bilstm/model.py --rule separable --data strips.pt`` does.
Printed: one forward of the original over the 1,024 strips, the fit stage's time and passes,
per-layer held-out error, and task accuracy (original, plain transfer, fitted).

One torch thread; the machine is shared with other work (load average printed).

    OMP_NUM_THREADS=1 python benchmarks/bench_fit_crnn.py [--samples 1024] [--fit-steps 0] [--fit-method statistics]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("crnn_bilstm_train", ROOT / "sample_models" / "crnn_bilstm" / "train.py")
assert _spec is not None and _spec.loader is not None
_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_train)
CRNN, make_strips, sequence_accuracy = _train.CRNN, _train.make_strips, _train.sequence_accuracy
train_and_save = _train.train_and_save

import convrewrite  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache" / "crnn_bilstm"


def trained() -> tuple[torch.nn.Module, str]:
    path = CACHE / "crnn.safetensors"
    how = f"loaded from {path}"
    if not path.is_file():
        began = time.perf_counter()
        train_and_save(CACHE)
        how = f"trained in {time.perf_counter() - began:.0f} s, cached in {path}"
    model = CRNN()
    model.load_state_dict(load_file(str(path)))
    return model.eval(), how


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--fit-steps", type=int, default=0)
    parser.add_argument("--fit-method", default="statistics", choices=("statistics", "gradient"))
    parser.add_argument("--rule", default="separable")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, how = trained()
    strips, _ = make_strips(args.samples, seed=3)
    test_x, test_y = make_strips(512, seed=1)
    print(
        f"CRNN (sample_models/crnn_bilstm, {sum(p.numel() for p in model.parameters()):,} params): {how}; "
        f"one torch thread; machine shared (load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores)"
    )
    began, began_cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for first in range(0, len(strips), args.batch_size):
            model(strips[first : first + args.batch_size])
    forward, forward_cpu = time.perf_counter() - began, time.process_time() - began_cpu
    print(
        f"one forward of the original over {args.samples} strips 1x32x128: {forward:.1f} s wall, "
        f"{forward_cpu:.1f} s CPU"
    )
    plain = convrewrite.rewrite(model, [args.rule], example_inputs=strips[:1])
    began, began_cpu = time.perf_counter(), time.process_time()
    fitted = convrewrite.rewrite(
        model,
        [args.rule],
        example_inputs=strips[:1],
        data=strips,
        batch_size=args.batch_size,
        fit_steps=args.fit_steps,
        fit_method=args.fit_method,
        device="cpu",
    )
    call, call_cpu = time.perf_counter() - began, time.process_time() - began_cpu
    stages = {stage["name"]: stage["seconds"] for stage in fitted.report.stages}
    fitting = fitted.report.sections["fitting"]
    layers = fitting["layers"]
    print(
        f"rule {args.rule}, fit method {args.fit_method}, {args.fit_steps} refinement steps: fit stage "
        f"{stages.get('fit', float('nan')):.1f} s (layers {layers['seconds']:.1f} s, {layers['passes']:.2f} passes "
        f"= {layers['passes'] * forward:.1f} s of forwards at the time measured above; BatchNorm "
        f"{fitting['batchnorm']['seconds']:.1f} s); whole call {call:.1f} s wall, {call_cpu:.1f} s CPU "
        f"(load average now {os.getloadavg()[0]:.2f})"
    )
    print(f"  {'layer':<8} {'method':<34} {'held-out before':>15} {'after':>8} {'passes':>7} {'s':>6} {'solve s':>7}")
    for layer in layers["layers"]:
        before, after = layer["holdout_error_before"], layer["holdout_error_after"]
        print(
            f"  {layer['name']:<8} {layer['method'][:34]:<34} "
            f"{'--' if before is None else f'{before:.4f}':>15} {'--' if after is None else f'{after:.4f}':>8} "
            f"{layer['passes']:>7.2f} {layer['seconds']:>6.1f} {layer.get('solve_seconds', 0.0):>7.1f}"
        )
    fidelity = fitting["fidelity"]
    print(
        f"held-out output error: transfer {fidelity['transfer']['output_relative_error']:.4f}, "
        f"fitted {fidelity['fitted']['output_relative_error']:.4f}"
    )
    print(
        f"sequence accuracy on 512 held-out labelled strips: original {sequence_accuracy(model, test_x, test_y):.3f}, "
        f"plain {sequence_accuracy(plain.model, test_x, test_y):.3f}, "
        f"fitted {sequence_accuracy(fitted.model, test_x, test_y):.3f}"
    )


if __name__ == "__main__":
    main()
