"""How the tool's time grows with the size of the graph: three depths of one family.

    python benchmarks/bench_depth.py

ResNet-50, -101 and -152 from the zoo (the same bottleneck blocks, 16 / 33 / 50 of them) at a small
input (1x3x64x64), so that the work per node, not the arithmetic of the convolutions, dominates.
For each depth: the number of nodes of the torch.fx graph, the number of modules, the whole
process time (best of N) of ``report``, ``report --rule separable`` and ``apply --rule separable``,
and, in this process, the time of each engine phase of ``report --rule separable`` (which leaves
out the interpreter start and torch import, about 2 s of noise-prone constant). The increments
between depths, divided by the extra nodes, give the cost per node.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

from common import CONVREWRITE, ZOO, best, machine, run_process

DEPTHS = ("resnet50", "resnet101", "resnet152")
SHAPE = "1,3,64,64"


def graph_size(factory: str) -> tuple[int, int, int]:
    """(fx graph nodes, modules, parameters) of a zoo ResNet, built on the meta device."""
    import torch
    from torch import fx

    spec = importlib.util.spec_from_file_location("zoo_resnet", ZOO / "resnet.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["zoo_resnet"] = module
    spec.loader.exec_module(module)
    with torch.device("meta"):
        model = getattr(module, factory)()
    nodes = len(fx.symbolic_trace(model).graph.nodes)
    return nodes, len(list(model.modules())), sum(p.numel() for p in model.parameters())


def engine_seconds(factory: str, runs: int) -> dict[str, float]:
    """In this process (torch already imported): best time of each engine phase, and in all."""
    import time

    from convrewrite.core.loading import load_model
    from convrewrite.engine.pipeline import analyse
    from convrewrite.engine.report_builder import build_report
    from convrewrite.rules.api import make_rule

    best_phases: dict[str, float] = {}
    shape = tuple(int(d) for d in SHAPE.split(","))
    for _ in range(runs):
        start = time.perf_counter()
        loaded = load_model(str(ZOO / f"resnet.py:{factory}"), input_shapes=[shape])
        loaded_at = time.perf_counter()
        result = analyse(loaded, [make_rule("separable")])
        build_report(result)
        phases = {"load": loaded_at - start, **result.timings, "all": time.perf_counter() - start}
        for name, value in phases.items():
            best_phases[name] = min(value, best_phases.get(name, float("inf")))
    return best_phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="convrewrite-bench-"))
    rows = []
    try:
        for factory in DEPTHS:
            model = str(ZOO / f"resnet.py:{factory}")
            commands = {
                "report": [*CONVREWRITE, "report", model, "--input-shape", SHAPE],
                "report+rule": [*CONVREWRITE, "report", model, "--input-shape", SHAPE, "--rule", "separable"],
                "apply": [
                    *[*CONVREWRITE, "apply", model, "--input-shape", SHAPE, "--rule", "separable"],
                    *["--out", str(work / factory), "--force"],
                ],
            }
            times = {name: best([run_process(c) for _ in range(args.runs)]) for name, c in commands.items()}
            rows.append((factory, *graph_size(factory), times, engine_seconds(factory, args.runs)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"input {SHAPE}; best of {args.runs}; {machine()}")
    print("whole process (start to finish):")
    print(f"  {'model':<10} {'nodes':>6} {'modules':>8} {'params':>12} {'report':>8} {'+rule':>8} {'apply':>8}")
    for factory, nodes, modules, params, times, _ in rows:
        print(
            f"  {factory:<10} {nodes:>6} {modules:>8} {params:>12,} "
            f"{times['report']:>7.2f}s {times['report+rule']:>7.2f}s {times['apply']:>7.2f}s"
        )
    print("in process, report --rule separable by engine phase (no interpreter start, no torch import):")
    phases = ["load", "profile", "trace", "rewrite", "verify", "all"]
    print(f"  {'model':<10} {'nodes':>6} " + " ".join(f"{p:>8}" for p in phases))
    for factory, nodes, _, _, _, engine in rows:
        print(f"  {factory:<10} {nodes:>6} " + " ".join(f"{engine[p]:>7.2f}s" for p in phases))
    first, last = rows[0], rows[-1]
    extra_nodes = last[1] - first[1]
    for name in ("report", "report+rule", "apply"):
        per_node = (last[4][name] - first[4][name]) / extra_nodes * 1000
        print(f"  whole process, {name:<12} {per_node:6.2f} ms per extra node ({first[0]} -> {last[0]})")
    per_node = (last[5]["all"] - first[5]["all"]) / extra_nodes * 1000
    print(f"  in process, report+rule     {per_node:6.2f} ms per extra node ({first[0]} -> {last[0]})")


if __name__ == "__main__":
    main()
