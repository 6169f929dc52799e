"""The comparison point of bench_report.py: torchinfo's ``summary`` on a zoo model, as one process.

    python benchmarks/torchinfo_summary.py resnet.py:resnet50 1,3,224,224

Builds the model the way convrewrite does (import the file, seed torch, call the factory) and
prints torchinfo's table for the given input shape.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from torchinfo import summary

ZOO = Path(__file__).resolve().parent.parent / "sample_models" / "zoo"


def main() -> None:
    spec_text, shape_text = sys.argv[1], sys.argv[2]
    file_name, _, factory = spec_text.partition(":")
    spec = importlib.util.spec_from_file_location("zoo_model", ZOO / file_name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["zoo_model"] = module
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = getattr(module, factory or "build_model")()
    shape = tuple(int(d) for d in shape_text.split(","))
    print(summary(model, input_size=shape, device="cpu", verbose=0))


if __name__ == "__main__":
    main()
