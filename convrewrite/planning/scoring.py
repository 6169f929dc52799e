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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from convrewrite.core.compare import tensor_leaves
from convrewrite.recovery.batches import Batch, BatchSource
from convrewrite.recovery.statistics import LayerStatistics, PatchGeometry, collect_statistics, kernel_matrix


def supported(module: nn.Module) -> str | None:
    """Why no statistics can be collected for ``module``'s input, or None."""
    try:
        PatchGeometry.of(module)
    except ValueError:
        return f"{type(module).__name__}: no patch statistics for this layer type"
    return None


def collect(
    model: nn.Module,
    layer_names: Sequence[str],
    data: BatchSource,
    *,
    device: torch.device,
    product: torch.dtype = torch.float32,
) -> dict[str, dict[str, LayerStatistics]]:
    """The statistics of every layer and split: ONE pass of the original per split.

    ``product``: float32 (the default) products summed in float64, as the fit accumulates: their
    relative layer-error floor (~5e-6, ``benchmarks/results/bench_statistics_precision.txt``) is
    far below any candidate's score, at about half the cost of float64 products.
    """
    return collect_statistics(model, list(layer_names), data, device=device, splits=("fit", "holdout"), product=product)


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
    micro_batch: int | None = None,
) -> Sensitivity:
    """The Hutchinson estimate of the module doc, over the first ``max_batches`` fit batches.

    Each batch is run in pieces of at most ``micro_batch`` samples (default ``PROBE_BATCH``), one
    probe per piece: the memory of one forward and backward pass of the model, with every planned
    layer's output gradient retained, is bounded by that many samples whatever the batch size
    (a ResNet-50 at 224x224 keeps about 1/8 GB per sample). More, smaller probes estimate the same
    expectation (each piece is a batch of the module doc's formula) with less variance.
    """
    micro_batch = PROBE_BATCH if micro_batch is None else max(1, int(micro_batch))
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
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not isinstance(output, torch.Tensor) or not output.is_floating_point():
                return None
            if output.requires_grad:
                tracked = output
                tracked.retain_grad()
            else:
                # Nothing upstream needs a gradient (no parameter does): the output becomes a leaf
                # whose .grad is the probe gradient.
                tracked = output.detach().requires_grad_(True)
            outputs[name] = tracked
            if structured and args and isinstance(args[0], torch.Tensor):
                inputs[name] = args[0].detach()
            # The model goes on with a copy: an in-place op that follows (ReLU(inplace=True)) must
            # neither write into a leaf nor move the retained gradient to its own result (the
            # gradient of the layer's output, not of the activation's).
            return tracked.clone()

        return hook

    handles = [model.get_submodule(name).register_forward_hook(keep(name)) for name in layer_names]
    was_training = model.training
    model.eval()

    def pieces() -> Any:
        for index, batch in enumerate(data.batches("fit")):
            if index >= max_batches:
                return
            yield from split_batch(batch, micro_batch)

    try:
        for batch in pieces():
            outputs.clear()
            inputs.clear()
            moved = batch.to(device)
            with torch.enable_grad():
                # No parameter needs a gradient: the backward pass computes the activation gradients
                # from the first planned layer on and no weight gradient (a third less work than a
                # backward pass that also makes every weight's gradient, and none upstream of the
                # first planned layer); the hooks make the first planned outputs leaves.
                flags = [p.requires_grad for p in model.parameters()]
                for p in model.parameters():
                    p.requires_grad_(False)
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


#: Samples per forward/backward pass of the sensitivity probes (the memory bound of that pass).
PROBE_BATCH = 8
#: Patch elements unfolded at once for a probe moment (float32: 16 MiB).
PROBE_CHUNK_ELEMENTS = 1 << 22


def split_batch(batch: Batch, size: int) -> Iterator[Batch]:
    """``batch`` in pieces of at most ``size`` samples (every tensor whose dim 0 is the batch size
    is sliced; anything else is passed to every piece as it is)."""
    from torch.utils._pytree import tree_map

    if batch.size <= size:
        yield batch
        return
    for start in range(0, batch.size, size):
        count = min(size, batch.size - start)

        def cut(value: Any, start: int = start, count: int = count) -> Any:
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch.size:
                return value[start : start + count]
            return value

        yield Batch(tree_map(cut, batch.args), tree_map(cut, batch.kwargs), count)


def _probe_moment(geometry: PatchGeometry, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``Σ_rows a gᵀ`` (n, out), float32 (a stochastic estimate: float64 would buy nothing), a few
    samples at a time so that at most ``PROBE_CHUNK_ELEMENTS`` patch elements are unfolded."""
    per_sample = max(1, grad[0].numel() // max(geometry.out_channels, 1)) * geometry.unknowns()
    step = max(1, PROBE_CHUNK_ELEMENTS // per_sample)
    total = None
    for index in range(0, x.shape[0], step):
        a = geometry.unfold(x[index : index + step].to(torch.float32))
        g = geometry.target_rows(grad[index : index + step].to(torch.float32))
        part = a.t() @ g
        total = part if total is None else total + part
    assert total is not None
    return total


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


# -- one factorization per layer, shared by its candidates ------------------------------------------


def block_squared_error(stats: LayerStatistics, kernel: torch.Tensor, supports: Sequence[tuple[Any, Any]]) -> float:
    """``Σ ||K a − y||²`` for a kernel whose output rows ``rows`` read only the patch entries
    ``columns``, for each ``(rows, columns)`` of ``supports`` (the rows of all supports partition
    the outputs): ``Σ_s tr(K_s G_ss K_sᵀ)`` costs ``Σ out_s n_s²`` instead of ``out n²``."""
    total = float(stats.energy.sum())
    for rows, columns in supports:
        r = torch.as_tensor(rows, dtype=torch.long)
        c = torch.as_tensor(columns, dtype=torch.long)
        k = kernel.index_select(0, r).index_select(1, c).to(stats.gram.dtype)
        gram = stats.gram.index_select(0, c).index_select(1, c)
        cross = stats.cross.index_select(0, c).index_select(1, r)
        total += float(-2 * (k * cross.t()).sum() + (k * (k @ gram)).sum())
    return max(total, 0.0)


def factored_squared_error(stats: LayerStatistics, left: torch.Tensor, right: torch.Tensor) -> float:
    """``Σ ||K a − y||²`` for ``K = left @ right`` ((out, r) x (r, n)): ``r n²`` instead of ``out n²``."""
    projected = right @ stats.gram  # (r, n)
    inner = projected @ right.t()  # (r, r)
    value = stats.energy.sum() - 2 * (left * (right @ stats.cross).t()).sum() + (left * (left @ inner)).sum()
    return max(float(value), 0.0)


def _relative(stats: LayerStatistics, squared: float) -> float:
    energy = float(stats.energy.sum())
    if energy <= 0:
        return 0.0 if squared <= 0 else math.inf
    return math.sqrt(squared / energy)


class LayerScorer:
    """Scores every candidate of one layer from its statistics, sharing the work between them.

    The built-in structures get the closed-form fit of ``convrewrite.recovery.solvers`` computed
    from factorizations made once per layer, with the same proximal ridge towards each candidate's
    transferred weights, so a score equals the independent ``solve_from_statistics`` to rounding:

    - ``low-rank`` (every rank): ONE Cholesky of the gram (centred when the block's ``expand`` has a
      bias, uncentred when it has none, as after every conv-BatchNorm pair) and one solve of its
      cross moment; a rank's own proximal term needs only a solve against its rank-r start (``n² r``), then one
      ``out x out`` eigenproblem gives its generalized-SVD kernel; errors in factored form (``r n²``);
    - ``group-shuffle`` and ``log-group``: the per-group (per-branch) least squares on sub-blocks
      of the gram (no copy of the whole gram), errors block by block (``out n² / groups``);
    - ``separable`` (``separable_score="whitened+pointwise"``, the default): the solver's whitened
      start and one exact pointwise solve, no depthwise alternation (an upper bound of the fitted
      error; see ``_separable``), every multiplier reusing the first one's Cholesky factor of the
      whole gram; ``"als"`` scores it by ``rounds`` alternating rounds instead;
    - anything else (``channelwise``, plugins): ``candidate_error`` (the solver registry) with
      ``generic_rounds`` block-coordinate rounds (default 1: the generic path probes ``to_dense()``
      once per parameter entry per round; a group channel-wise conv of 2,122 weights on the digits
      CNN took 29 s at 3 rounds and 7 s at 1, its score 0.1337 -> 0.1348; exact linear blocks such
      as the plain channel-wise conv are solved in one step either way).

    ``solve_from_statistics`` keeps the transferred start when the solve is not better on the fit
    statistics; so does this.
    """

    def __init__(
        self,
        original: nn.Module,
        stats: dict[str, LayerStatistics],
        *,
        ridge: float = 1e-7,
        rounds: int = 3,
        separable_score: str = "whitened+pointwise",
        generic_rounds: int = 1,
    ) -> None:
        from convrewrite.recovery.solvers.base import on_cpu

        self.original = original
        self.geometry = PatchGeometry.of(original)
        self.fit = on_cpu(stats["fit"])
        self.holdout = on_cpu(stats.get("holdout") or stats["fit"])
        self.stats = stats
        self.ridge = ridge
        self.rounds = rounds
        self.separable_score = separable_score
        self.generic_rounds = generic_rounds
        self._centred: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor] | None = None
        self._uncentred: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor] | None = None
        #: The separable starts' Cholesky factor of the whole gram (``_Separable.whitened_start``).
        self._full: dict[str, Any] = {}

    def score(self, block: nn.Module) -> tuple[float, torch.Tensor]:
        """(relative holdout error, (out, n) kernel) of ``block`` fitted on the fit statistics."""
        if _solvers_installed():
            fast = self._fast(block)
            if fast is not None:
                return fast
        from convrewrite.layers.separable import _SeparableConvNd

        rounds = self.rounds if isinstance(block, _SeparableConvNd) else self.generic_rounds
        return candidate_error(block, self.original, self.stats, ridge=self.ridge, rounds=rounds)

    def _fast(self, block: nn.Module) -> tuple[float, torch.Tensor] | None:
        from convrewrite.layers.log_group import _LogGroupConvNd
        from convrewrite.layers.low_rank import LowRankLinear, _LowRankConvNd
        from convrewrite.layers.shuffle import _GroupShuffleConvNd
        from convrewrite.recovery.solvers.base import statistics_kernel
        from convrewrite.recovery.solvers.dense import is_plain

        if not self.fit.with_ones:
            return None
        start = statistics_kernel(block, self.geometry)
        if start is None or start.shape[1] != self.fit.unknowns or start.shape[0] != self.fit.outputs:
            return None
        if isinstance(block, (LowRankLinear, _LowRankConvNd)):
            reduce, expand = block[0], block[1]
            if is_plain(reduce) and is_plain(expand) and int(getattr(reduce, "groups", 1)) == 1:
                return self._low_rank(reduce, expand, start)
            return None
        if isinstance(block, _GroupShuffleConvNd) and is_plain(block[0]):
            return self._group_shuffle(block, start)
        branches: Any = getattr(block, "branches", ())
        if isinstance(block, _LogGroupConvNd) and all(is_plain(b) and int(b.groups) == 1 for b in branches):
            return self._log_group(block, start)
        if self.separable_score == "whitened+pointwise":
            return self._separable(block)
        return None

    # -- separable ---------------------------------------------------------------------------------

    def _separable(self, block: nn.Module) -> tuple[float, torch.Tensor] | None:
        """The separable solver's whitened start, then its exact pointwise solve: no depthwise ALS.

        An upper bound of the fitted error (the final fit's alternation only lowers it), within a
        few percent of three ALS rounds on the CRNN sample (``benchmarks/bench_plan_cost.py``) at a
        fraction of the cost: the depthwise step of a 512-channel 3x3 layer at multiplier 4 is an
        18,432-unknown conjugate-gradient solve per round.
        """
        from convrewrite.layers.separable import _SeparableConvNd
        from convrewrite.recovery.solvers.separable import start_then_pointwise

        if not isinstance(block, _SeparableConvNd):
            return None
        with torch.no_grad():
            solved = start_then_pointwise(block, self.fit, self.ridge, factored=self._full, holdout=self.holdout)
        if solved is None:
            return None
        kernel, squared = solved
        assert squared is not None
        return _relative(self.holdout, squared), kernel

    # -- low-rank ---------------------------------------------------------------------------------

    def _factored_solve(self, centred: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor]:
        """(Cholesky factor of G + λI, its solve of C, C, λ, ones column) over the patch entries: once
        per layer and kind. ``centred``: the statistics with the optimal bias substituted (a
        low-rank block whose ``expand`` has a bias); else the uncentred ones (a block without bias,
        as every conv followed by a BatchNorm), as ``optimal_low_rank`` takes them."""
        kept = self._centred if centred else self._uncentred
        if kept is None:
            from convrewrite.recovery.solvers.base import cholesky_apply, ridge_scale

            stats = self.fit
            width = stats.unknowns - 1
            column = stats.gram[:width, width]
            if centred:
                ones = float(stats.gram[width, width])
                gram = stats.gram[:width, :width] - torch.outer(column, column) / ones
                cross = stats.cross[:width] - torch.outer(column, stats.cross[width]) / ones
            else:
                gram = stats.gram[:width, :width].clone()
                cross = stats.cross[:width]
            scale = ridge_scale(gram, self.ridge)
            gram.diagonal().add_(scale)
            factor, info = torch.linalg.cholesky_ex(gram)
            if int(info) != 0:
                raise _NoFactor
            kept = (factor, cholesky_apply(factor, cross), cross, scale, column)
            if centred:
                self._centred = kept
            else:
                self._uncentred = kept
        return kept

    def _low_rank(self, reduce: Any, expand: Any, start: torch.Tensor) -> tuple[float, torch.Tensor] | None:
        from convrewrite.recovery.solvers.base import cholesky_apply

        stats = self.fit
        width = stats.unknowns - 1
        centred = expand.bias is not None
        if centred and float(stats.gram[width, width]) <= 0:
            return None
        try:
            factor, solved, cross, scale, column = self._factored_solve(centred)
        except _NoFactor:
            return None
        out = int(expand.weight.shape[0])
        rank = int(reduce.weight.shape[0])
        b0 = expand.weight.detach().to("cpu", torch.float64).reshape(out, rank)
        a0 = reduce.weight.detach().to("cpu", torch.float64).reshape(rank, -1)
        # (G + λI)⁻¹ (C + λ W₀ᵀ) with W₀ = B₀ A₀: the shared solve plus a rank-r one.
        optimum = (solved + scale * (cholesky_apply(factor, a0.t().contiguous()) @ b0.t())).t()
        right = cross + scale * (a0.t() @ b0.t())
        metric = optimum @ right
        metric = (metric + metric.t()) / 2
        _, vectors = torch.linalg.eigh(metric)
        basis = vectors[:, -rank:] if rank < vectors.shape[1] else vectors
        reduced = basis.t() @ optimum  # (r', n_w)
        if centred:
            ones = float(stats.gram[width, width])
            bias = (stats.cross[width] - basis @ (reduced @ column)) / ones
        else:
            bias = torch.zeros(out, dtype=torch.float64)  # no bias to solve: the column stays zero
        left = torch.cat([basis, bias.unsqueeze(1)], dim=1)  # K = [U | b] [[U ᵀW*, 0], [0, 1]]
        factors = torch.zeros(basis.shape[1] + 1, width + 1, dtype=torch.float64)
        factors[:-1, :width] = reduced
        factors[-1, width] = 1.0
        start_left = torch.cat([b0, start[:, width:]], dim=1)
        start_right = torch.zeros(rank + 1, width + 1, dtype=torch.float64)
        start_right[:-1, :width] = a0
        start_right[-1, width] = 1.0
        if not factored_squared_error(stats, left, factors) <= factored_squared_error(stats, start_left, start_right):
            left, factors = start_left, start_right
        return _relative(self.holdout, factored_squared_error(self.holdout, left, factors)), left @ factors

    # -- group-shuffle and log-group ----------------------------------------------------------------

    def _finish(
        self, block: nn.Module, start: torch.Tensor, saved: dict[str, torch.Tensor], supports: list[tuple[Any, Any]]
    ) -> tuple[float, torch.Tensor] | None:
        from convrewrite.recovery.solvers.base import statistics_kernel

        kernel = statistics_kernel(block, self.geometry)
        if kernel is None:
            return None
        if not block_squared_error(self.fit, kernel, supports) <= block_squared_error(self.fit, start, supports):
            with torch.no_grad():
                for name, parameter in block.named_parameters():
                    parameter.copy_(saved[name])
            kernel = start
        return _relative(self.holdout, block_squared_error(self.holdout, kernel, supports)), kernel

    def _group_shuffle(self, block: Any, start: torch.Tensor) -> tuple[float, torch.Tensor] | None:
        """The solver's own per-group solve; the errors block by block on the groups' supports."""
        from convrewrite.recovery.solvers.dense import solve_group_shuffle

        conv, shuffle = block[0], block[1]
        out, groups = int(conv.out_channels), int(conv.groups)
        width = self.fit.unknowns - 1
        if out % groups or conv.weight.shape[1] * groups * self.geometry.taps != width:
            return None
        target_of = [0] * out  # conv row r writes output channel target_of[r]
        for position, source in enumerate(shuffle.source_indices(out)):
            target_of[source] = position
        saved = {name: p.detach().clone() for name, p in block.named_parameters()}
        with torch.no_grad():
            if solve_group_shuffle(block, self.fit, self.ridge, 1) is None:
                return None
        per_out, per_in = out // groups, int(conv.weight.shape[1]) * self.geometry.taps
        ones = [width] if conv.bias is not None else []
        supports = [
            (
                [target_of[r] for r in range(group * per_out, (group + 1) * per_out)],
                list(range(group * per_in, (group + 1) * per_in)) + ones,
            )
            for group in range(groups)
        ]
        return self._finish(block, start, saved, supports)

    def _log_group(self, block: nn.Module, start: torch.Tensor) -> tuple[float, torch.Tensor] | None:
        """The solver's own per-branch solve; the errors block by block on the branches' supports."""
        from convrewrite.recovery.solvers.dense import solve_log_group

        layer: Any = block
        taps = self.geometry.taps
        width = self.fit.unknowns - 1
        if int(layer.in_channels) * taps != width:
            return None
        saved = {name: p.detach().clone() for name, p in block.named_parameters()}
        with torch.no_grad():
            if solve_log_group(block, self.fit, self.ridge, 1) is None:
                return None
        supports = []
        row = column = 0
        for branch, cin, cout in zip(layer.branches, layer.in_sizes, layer.out_sizes):
            columns = list(range(column * taps, (column + cin) * taps)) + ([width] if branch.bias is not None else [])
            supports.append((list(range(row, row + cout)), columns))
            row += cout
            column += cin
        return self._finish(block, start, saved, supports)


class _NoFactor(Exception):
    """The centred gram is not positive definite to rounding: the solver's own path handles it."""


__all__ = [
    "LayerScorer",
    "Sensitivity",
    "block_squared_error",
    "candidate_error",
    "collect",
    "factored_squared_error",
    "hutchinson_sensitivity",
    "scoring_method",
    "uniform_sensitivity",
]
