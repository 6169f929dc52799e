"""Peak memory of ``convrewrite apply --rule separable`` on a 100M+ parameter network.

    python benchmarks/bench_memory.py

The network is the zoo's Wide ResNet-101-2 (126,886,696 parameters, 507.5 MB of float32
weights). The input is small (1x3x64x64) so that activations stay far below the weights: the
benchmark is about what the tool itself holds (original and rewritten layers, the generated
model, the written and re-read safetensors, the reloaded model).

Peak resident memory is the child's ``ru_maxrss`` (``os.wait4``). A process that has imported
torch and convrewrite already holds a few hundred MB that have nothing to do with the model, so
the same command on the zoo's tiny ``tied.py`` (5,808 parameters) is measured as the baseline and
subtracted: tool memory = peak(WRN) - peak(tiny). Target (the issue): at most 3x the weights.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from common import CONVREWRITE, ZOO, machine, mib, run_process

MODEL = "resnet.py:wide_resnet101_2"
SHAPE = "1,3,64,64"
PARAMS = 126_886_696


def apply_command(model: str, out: Path, shape: str | None) -> list[str]:
    command = [*CONVREWRITE, "apply", str(ZOO / model), "--rule", "separable", "--out", str(out), "--force"]
    return command + (["--input-shape", shape] if shape else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    weights = PARAMS * 4
    work = Path(tempfile.mkdtemp(prefix="convrewrite-bench-"))
    try:
        baseline = min(run_process(apply_command("tied.py", work / "tiny", None)).peak_rss_bytes for _ in range(2))
        report = min(
            run_process([*CONVREWRITE, "report", str(ZOO / MODEL), "--input-shape", SHAPE]).peak_rss_bytes
            for _ in range(args.runs)
        )
        runs = [run_process(apply_command(MODEL, work / "wrn", SHAPE)) for _ in range(args.runs)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    peak = min(r.peak_rss_bytes for r in runs)
    seconds = min(r.seconds for r in runs)
    print(f"{MODEL} ({PARAMS:,} params, weights {mib(weights)}), input {SHAPE}; {machine()}")
    rows = [
        ("baseline (apply on tied.py)", baseline),
        ("report (no rules)", report),
        (f"apply --rule separable ({seconds:.0f} s)", peak),
    ]
    for label, value in rows:
        tool = "" if value is baseline else f" -> tool {(value - baseline) / weights:.2f}x weights"
        print(f"  {label:<32} peak RSS {mib(value)}{tool}")
    print(f"  apply peak, baseline included:   {peak / weights:.2f}x weights (target <= 3.00 either way)")


if __name__ == "__main__":
    main()
