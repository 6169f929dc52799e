"""``convrewrite report`` and ``apply --rule separable`` on ResNet-50 (1x3x224x224) vs torchinfo.

    python benchmarks/bench_report.py [--runs 5]

Each measurement is a whole process, start to finish, and the three commands are interleaved run
by run so that they share the same machine conditions; the best of N is compared.

* report: ``convrewrite report sample_models/zoo/resnet.py:resnet50`` (the default table);
* torchinfo: ``python benchmarks/torchinfo_summary.py resnet.py:resnet50 1,3,224,224``;
* apply: ``convrewrite apply ... --rule separable --out DIR`` (SVD weight transfer, writing
  model.py / weights.safetensors / report.json and reloading them to check).

Targets (the issue): report no slower than torchinfo; apply at most 3x the report time.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from common import CONVREWRITE, PYTHON, ROOT, ZOO, Run, best, compile_bytecode, machine, run_process, summarize

MODEL = "resnet.py:resnet50"
SHAPE = "1,3,224,224"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model", default=MODEL, help="zoo spec (file.py[:factory]); default %(default)s")
    parser.add_argument("--input-shape", default=SHAPE)
    args = parser.parse_args()
    compile_bytecode()

    model_path = str(ZOO / args.model)
    work = Path(tempfile.mkdtemp(prefix="convrewrite-bench-"))
    commands = {
        "torchinfo summary": [PYTHON, str(ROOT / "benchmarks" / "torchinfo_summary.py"), args.model, args.input_shape],
        "convrewrite report": [*CONVREWRITE, "report", model_path, "--input-shape", args.input_shape],
        "convrewrite apply --rule separable": [
            *CONVREWRITE,
            "apply",
            model_path,
            "--input-shape",
            args.input_shape,
            "--rule",
            "separable",
            "--out",
            str(work / "out"),
            "--force",
        ],
    }
    runs: dict[str, list[Run]] = {name: [] for name in commands}
    try:
        # One untimed round first: the page cache then holds torch's libraries for everyone.
        for command in commands.values():
            run_process(command, cwd=work)
        for _ in range(args.runs):
            for name, command in commands.items():
                runs[name].append(run_process(command, cwd=work))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{args.model} at {args.input_shape}; {machine()}")
    for name, measured in runs.items():
        print(f"  {name:<36} {summarize(measured)}")
    report, torchinfo = best(runs["convrewrite report"]), best(runs["torchinfo summary"])
    apply = best(runs["convrewrite apply --rule separable"])
    print(f"  report / torchinfo = {report / torchinfo:.2f} (target <= 1.00)")
    print(f"  apply / report     = {apply / report:.2f} (target <= 3.00)")


if __name__ == "__main__":
    main()
