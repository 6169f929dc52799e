"""Score candidates without a data pass per candidate: layer statistics and output sensitivity.

**Statistics.** One pass of the original model per split (fit, holdout) collects, for every
planned layer, the ``LayerStatistics`` of its unfolded input against its own output (symmetric:
inputs of the original; ``recovery.statistics.collect_statistics``). A candidate's predicted
layer error is the relative error ``sqrt(Σ||K a − y||² / Σ||y||²)`` of its equivalent dense
kernel ``K`` on the **holdout** statistics, after its weights are solved on the **fit**
statistics (``solve_from_statistics`` of ``convrewrite.recovery.solvers`` when installed;
otherwise the rule's own data-free weight transfer is scored, and the plan says which).

**Sensitivity (Hutchinson).** How much an error at layer ``l`` moves the model's output: one
forward and backward pass per fit batch with a random Rademacher probe ``v`` on the output gives
``g_l = J_lᵀ v`` at every layer output, and ``E_v ||J_lᵀ v||² = ||J_l||_F²``. An error ``δ`` of
relative size ``e`` and no preferred direction then moves the output by about
``||J_l||_F² e² ||y_l||² / dim(y_l)`` in squared norm, so each layer's loss is
``gain_l · e² · Ē_l / Ē_out``, with ``gain_l`` the mean of ``g_l²`` over elements, ``Ē_l`` the
layer output's energy per sample (holdout) and ``Ē_out`` the model output's. The losses add up
to the predicted squared relative output error (first order, errors of different layers taken as
uncorrelated).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from convrewrite.core.compare import tensor_leaves
from convrewrite.recovery.batches import BatchSource
from convrewrite.recovery.statistics import LayerStatistics, PatchGeometry, collect_statistics, kernel_matrix


def supported(module: nn.Module) -> str | None:
    """Why no statistics can be collected for ``module``'s input, or None."""
    try:
        PatchGeometry.of(module)
    except ValueError:
        return f"{type(module).__name__}: no patch statistics for this layer type"
    return None


def collect(
    model: nn.Module, layer_names: Sequence[str], data: BatchSource, *, device: torch.device
) -> dict[str, dict[str, LayerStatistics]]:
    """The statistics of every layer and split: ONE pass of the original per split."""
    return collect_statistics(model, list(layer_names), data, device=device, splits=("fit", "holdout"))


@dataclass
class Sensitivity:
    """Per layer: ``gain`` (mean squared output-probe gradient per element) and energy per sample."""

    gain: dict[str, float]
    layer_energy: dict[str, float]
    output_energy: float
    samples: int

    def weight(self, name: str) -> float:
        """The factor ``gain · Ē_l / Ē_out`` that turns a layer's e² into a share of output error²."""
        if self.output_energy <= 0:
            return 0.0
        return self.gain.get(name, 0.0) * self.layer_energy.get(name, 0.0) / self.output_energy


def hutchinson_sensitivity(
    model: nn.Module,
    layer_names: Sequence[str],
    data: BatchSource,
    *,
    device: torch.device,
    max_batches: int = 4,
    seed: int = 0,
) -> Sensitivity:
    """The Hutchinson estimate of the module doc, over the first ``max_batches`` fit batches."""
    generator = torch.Generator().manual_seed(seed)
    outputs: dict[str, torch.Tensor] = {}
    squares = dict.fromkeys(layer_names, 0.0)
    elements = dict.fromkeys(layer_names, 0)
    energy = dict.fromkeys(layer_names, 0.0)
    output_energy = 0.0
    samples = 0

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.retain_grad()
                outputs[name] = output

        return hook

    handles = [model.get_submodule(name).register_forward_hook(keep(name)) for name in layer_names]
    was_training = model.training
    model.eval()
    try:
        for index, batch in enumerate(data.batches("fit")):
            if index >= max_batches:
                break
            outputs.clear()
            moved = batch.to(device)
            with torch.enable_grad():
                # Gradients reach the layer outputs only through parameters that need them.
                flags = [p.requires_grad for p in model.parameters()]
                for p in model.parameters():
                    p.requires_grad_(True)
                try:
                    result = moved.call(model)
                    leaves = [t for t in tensor_leaves(result) if t.is_floating_point() and t.requires_grad]
                    if not leaves:
                        break
                    probe = sum(
                        (t * (torch.randint(0, 2, t.shape, generator=generator, dtype=torch.int8).to(t) * 2 - 1)).sum()
                        for t in leaves
                    )
                    probe.backward()
                finally:
                    for p, flag in zip(model.parameters(), flags):
                        p.requires_grad_(flag)
                        p.grad = None
            samples += batch.size
            output_energy += sum(float((t.detach().double() ** 2).sum()) for t in leaves)
            for name, output in outputs.items():
                if output.grad is None:
                    continue
                squares[name] += float((output.grad.double() ** 2).sum())
                elements[name] += output.grad.numel()
                energy[name] += float((output.detach().double() ** 2).sum())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    per_sample = max(samples, 1)
    return Sensitivity(
        gain={n: squares[n] / elements[n] if elements[n] else 0.0 for n in layer_names},
        layer_energy={n: energy[n] / per_sample for n in layer_names},
        output_energy=output_energy / per_sample,
        samples=samples,
    )


def uniform_sensitivity(layer_names: Sequence[str]) -> Sensitivity:
    """Every layer weighted 1 (the ablation the benchmark compares against)."""
    return Sensitivity(dict.fromkeys(layer_names, 1.0), dict.fromkeys(layer_names, 1.0), 1.0, 0)


def _solvers_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("convrewrite.recovery.solvers") is not None


def scoring_method() -> str:
    """``closed-form fit`` when the rules' solvers are installed, else ``data-free transfer``."""
    return "closed-form fit" if _solvers_installed() else "data-free transfer"


def candidate_error(
    block: nn.Module, original: nn.Module, stats: dict[str, LayerStatistics], *, ridge: float = 1e-6
) -> float:
    """The block's relative error on the holdout statistics after solving it on the fit ones.

    Without a statistics path for the block (no solvers installed, or a block that declares no
    linear structure) its weights stay as the rule built them (the data-free transfer).
    """
    from convrewrite.layers.dense import dense_kernel
    from convrewrite.recovery.fit_statistics import solve_from_statistics, statistics_kernel

    geometry = PatchGeometry.of(original)
    kernel = None
    if solve_from_statistics(block, stats["fit"], geometry=geometry, ridge=ridge) is not None:
        kernel = statistics_kernel(block, geometry)
    if kernel is None:
        weight, bias = dense_kernel(block)
        kernel = kernel_matrix(weight, bias)
    holdout = stats.get("holdout") or stats["fit"]
    if kernel.shape[1] != holdout.unknowns:
        return math.inf
    return holdout.relative_error(kernel)


__all__ = [
    "Sensitivity",
    "candidate_error",
    "collect",
    "hutchinson_sensitivity",
    "scoring_method",
    "uniform_sensitivity",
]
