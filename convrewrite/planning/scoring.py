"""Score candidates without a data pass per candidate: layer statistics and output sensitivity.

**Statistics.** One pass of the original model per split (fit, holdout) collects, for every
planned layer, the ``LayerStatistics`` of its unfolded input against its own output (symmetric:
inputs of the original; ``recovery.statistics.collect_statistics``). A candidate's predicted
layer error is the relative error ``sqrt(Σ||K a − y||² / Σ||y||²)`` of its equivalent dense
kernel ``K`` on the **holdout** statistics, after its weights are solved on the **fit**
statistics (``solve_from_statistics`` of ``convrewrite.recovery.solvers`` when installed;
otherwise the rule's own data-free weight transfer is scored, and the plan says which).

**Sensitivity (Hutchinson probes).** How much an error at layer ``l`` moves the model's output:
one forward and backward pass per fit batch with a random Rademacher probe ``v`` on the output
gives ``g = J_lᵀ v`` at the layer output, and ``E_v (vᵀ J_l δ)² = ||J_l δ||²`` for any layer error
``δ``. A candidate's error is ``δ = (K − K₀) a`` at every position, so ``vᵀ J_l δ = ⟨K − K₀, Mᵀ⟩``
with ``M = Σ_positions a gᵀ`` (n, out): one such matrix per probed batch (``probes``) predicts the
first-order squared output error of *every* candidate of the layer, with the structure of its own
error (a channel-wide error that survives average pooling is not averaged away). Each loss is
``mean_b ⟨K − K₀, M_bᵀ⟩² / mean_b ||z_b||²``: a share of the squared relative output error; the
losses of different layers add up to the plan's predicted squared relative output error (errors of
different layers taken as uncorrelated). ``isotropic`` is the cheaper estimate that assumes an
error without structure: ``||J_l||_F² e² ||y_l||² / dim(y_l)`` (``Sensitivity.weight`` x e²);
``uniform`` weights every layer's e² by 1. The benchmark compares the three rankings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    #: Per layer, one (n, out) matrix per probed batch: ``M_b = Σ_rows a gᵀ`` of the unfolded
    #: layer input and the probe gradient at the layer output (the ``structured`` estimate).
    probes: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    #: The model output's energy in each probed batch.
    batch_energy: list[float] = field(default_factory=list)
    #: ``structured`` (the probe moments), ``isotropic`` (gain x e²) or ``uniform``.
    method: str = "structured"

    def loss(self, name: str, kernel: torch.Tensor, original: torch.Tensor, error: float) -> float:
        """A candidate's predicted share of the squared relative output error.

        ``structured``: ``mean_b ⟨K − K₀, M_bᵀ⟩² / mean_b E_b``, an unbiased first-order estimate
        of ``Σ ||J δ||² / Σ ||z||²`` for this candidate's own error ``δ = (K − K₀) a`` whatever its
        structure (a probe ``v`` gives ``E_v (vᵀ J δ)² = ||J δ||²``; one probe per batch, so the
        cross terms between samples vanish in expectation). ``isotropic``: ``weight · e²``.
        """
        probes = self.probes.get(name)
        if self.method != "structured" or not probes or not self.batch_energy:
            return self.weight(name) * error**2
        delta = (kernel.to(torch.float64) - original.to(torch.float64)).t()
        values = [float((delta * probe.to(delta.device, torch.float64)).sum()) ** 2 for probe in probes]
        energy = sum(self.batch_energy) / len(self.batch_energy)
        return (sum(values) / len(values)) / energy if energy > 0 else 0.0

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
    max_batches: int = 8,
    seed: int = 0,
    structured: bool = True,
) -> Sensitivity:
    """The Hutchinson estimate of the module doc, over the first ``max_batches`` fit batches."""
    generator = torch.Generator().manual_seed(seed)
    outputs: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    geometries = {name: PatchGeometry.of(model.get_submodule(name)) for name in layer_names} if structured else {}
    probes: dict[str, list[torch.Tensor]] = {name: [] for name in layer_names}
    batch_energy: list[float] = []
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
                if structured and args and isinstance(args[0], torch.Tensor):
                    inputs[name] = args[0].detach()

        return hook

    handles = [model.get_submodule(name).register_forward_hook(keep(name)) for name in layer_names]
    was_training = model.training
    model.eval()
    try:
        for index, batch in enumerate(data.batches("fit")):
            if index >= max_batches:
                break
            outputs.clear()
            inputs.clear()
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
            energy_here = sum(float((t.detach().double() ** 2).sum()) for t in leaves)
            output_energy += energy_here
            batch_energy.append(energy_here)
            for name, output in outputs.items():
                if output.grad is None:
                    continue
                if structured and name in inputs:
                    probes[name].append(_probe_moment(geometries[name], inputs[name], output.grad))
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
        probes=probes if structured else {},
        batch_energy=batch_energy,
        method="structured" if structured else "isotropic",
    )


def _probe_moment(geometry: PatchGeometry, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``Σ_rows a gᵀ`` (n, out), float32, one sample at a time (the patches of a whole batch of a
    wide layer would not fit)."""
    total = None
    for index in range(x.shape[0]):
        a = geometry.unfold(x[index : index + 1].to(torch.float64))
        g = geometry.target_rows(grad[index : index + 1].to(torch.float64))
        part = a.t() @ g
        total = part if total is None else total + part
    assert total is not None
    return total.to(torch.float32)


def uniform_sensitivity(layer_names: Sequence[str]) -> Sensitivity:
    """Every layer weighted 1 (the ablation the benchmark compares against)."""
    return Sensitivity(dict.fromkeys(layer_names, 1.0), dict.fromkeys(layer_names, 1.0), 1.0, 0, method="uniform")


def _solvers_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("convrewrite.recovery.solvers") is not None


def scoring_method() -> str:
    """``closed-form fit`` when the rules' solvers are installed, else ``data-free transfer``."""
    return "closed-form fit" if _solvers_installed() else "data-free transfer"


def candidate_error(
    block: nn.Module, original: nn.Module, stats: dict[str, LayerStatistics], *, ridge: float = 1e-7, rounds: int = 3
) -> tuple[float, torch.Tensor]:
    """The block's relative error on the holdout statistics after solving it on the fit ones, and
    its (out, n) kernel.

    Without a statistics path for the block (no solvers installed, or a block that declares no
    linear structure) its weights stay as the rule built them (the data-free transfer).
    """
    from convrewrite.layers.dense import dense_kernel
    from convrewrite.recovery.fit_statistics import solve_from_statistics, statistics_kernel

    geometry = PatchGeometry.of(original)
    kernel = None
    if _solvers_installed():
        # Fewer alternating rounds than a final fit (8): a score needs the ranking, not the last digit.
        from convrewrite.recovery.solvers import solve_from_statistics as solve

        solved = solve(block, stats["fit"], geometry=geometry, ridge=ridge, rounds=rounds)
    else:
        solved = solve_from_statistics(block, stats["fit"], geometry=geometry, ridge=ridge)
    if solved is not None:
        kernel = statistics_kernel(block, geometry)
    if kernel is None:
        weight, bias = dense_kernel(block)
        kernel = kernel_matrix(weight, bias)
    holdout = stats.get("holdout") or stats["fit"]
    if kernel.shape[1] != holdout.unknowns:
        return math.inf, kernel
    return holdout.relative_error(kernel), kernel


__all__ = [
    "Sensitivity",
    "candidate_error",
    "collect",
    "hutchinson_sensitivity",
    "scoring_method",
    "uniform_sensitivity",
]
