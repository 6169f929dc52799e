"""Data-aware fitting of rewritten layers, and BatchNorm re-estimation, on calibration data.

A rule transfers weights from the dense kernel alone. Fitting uses data: for each rewritten layer,
in the order the model calls them, the replacement block is fitted so that its output on the
*partly rewritten* model's activations reproduces the *original* layer's output on the original
model's activations (asymmetric reconstruction, Zhang et al., "Accelerating Very Deep
Convolutional Networks", TPAMI 2016). Errors of earlier approximations are therefore corrected,
not compounded. Every forward pass stops at the layer being fitted (a hook raises a private
exception), so fitting layer k costs two forward prefixes up to layer k, never the whole model.

**The statistics path** (the default, ``recovery/fit_statistics.py``): a block with a declared
linear structure (every built-in rule's; see ``recovery/solvers``) is fitted from the sufficient
statistics of its layer (``recovery/statistics.py``), accumulated in ONE streaming pass over the
fit and holdout splits, then solved in closed form; held-out errors come from the holdout
statistics; ``steps`` > 0 adds Adam steps after it. Passes are counted per layer (``passes``, in
units of one full forward of the original over the data, from the MACs each prefix runs).

**The gradient path** (below; ``statistics=False``, or a block with no statistics path). Per
block, generic over any ``nn.Module`` a rule returns:

1. **Closed form.** Any plain ``nn.Conv1d/2d/3d`` or ``nn.Linear`` inside the block whose output
   reaches the block's output unchanged up to a fixed channel permutation (and an additive part
   that does not depend on it) is a *terminal*: the block is linear in its weights given the rest.
   Terminals are found by probing, not by type: each candidate's output is marked with distinct
   constants per channel (twice, with two orderings and scales) and the marks must come out of the
   block as a clean permutation. That finds the pointwise conv of a separable block, the grouped
   conv of a group-shuffle block (through its shuffle), every branch of a log-group block (through
   the concatenation), and the same parts of any composition or third-party block. For each
   terminal the normal equations ``XᵀX`` and ``XᵀY`` are accumulated batch by batch in float64
   (im2col by an identity-kernel convolution, so Conv1d/2d/3d, stride, dilation, groups and
   padding modes are all the same code), per group, and solved with a small ridge. A terminal
   with more than ``max_closed_form_dim`` unknowns per output is left to the gradient steps.
2. **Gradient steps.** Whatever the closed form does not cover (the depthwise part of a separable
   block, channel-wise convolutions, any third-party parameters) gets ``steps`` Adam steps on the
   relative squared layer error, with a learning rate relative to each parameter's RMS; then the
   terminals are solved again given the new rest.
3. **Keep the best.** The fit-split layer loss of every state (as transferred, closed form, after
   the gradient steps, solved again) is known exactly (measured directly, or from the normal
   equations) and the best one is kept, so fitting never makes a layer worse on the fit split.

Memory does not grow with the data set: a pass streams batches; the (block input, target) pairs
of a layer are cached on the device only up to ``cache_mb`` (the holdout split first). When the
whole fit split fits, the passes after the first and the gradient steps reuse the cache; when it
does not, the closed form still sees every batch (streamed again) and the gradient steps cycle
over the cached part.

Reported per layer: the relative error ``||block(x') - layer(x)|| / ||layer(x)||`` on the holdout
split before and after fitting (measured, never fitted on), the same on the fit split, what was
solved, and the time.

Under ``torch.distributed`` (``torchrun``) each rank streams its shard of the fit split; the
normal equations, loss sums and gradients are all-reduced, so every rank holds the same weights.
The holdout split is measured whole on every rank (no communication, identical numbers).

Threads: the small per-group solves run on one thread (many tiny factorizations on many threads
crawl on a busy machine); the big matrix products use torch's setting. Under ``torchrun`` with
several CPU processes, torchrun's ``OMP_NUM_THREADS=1`` default keeps the processes from
oversubscribing the cores.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from convrewrite.core.threads import torch_threads
from convrewrite.errors import ModelError, describe
from convrewrite.recovery.batches import Batch, BatchSource, Split

_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
#: Rounds of (gradient steps, closed-form solve) when a layer's fit split is cached.
_ROUNDS = 4
#: Gradient steps of a block with no statistics path when ``steps`` (the refinement after a
#: closed form) is 0: the default of the gradient path before the statistics fit.
FALLBACK_STEPS = 500
#: Rows x unknowns of one float64 chunk of patches (32 MiB): bounds im2col's memory per step.
_CHUNK_ELEMENTS = 1 << 22


class _StopForward(BaseException):
    """Raised by a hook once the layer being fitted has been reached.

    A ``BaseException``, so a model's own ``except Exception`` cannot swallow it.
    """


# --------------------------------------------------------------------------- results


@dataclass
class LayerFit:
    """What fitting did to one rewritten layer."""

    name: str
    block: str
    #: The original module whose output was the target, when not the layer of the same name.
    target: str | None = None
    calls: int = 0
    closed_form: list[str] = field(default_factory=list)
    gradient_steps: int = 0
    kept: str = "transfer"
    fit_error_before: float | None = None
    fit_error_after: float | None = None
    holdout_error_before: float | None = None
    holdout_error_after: float | None = None
    seconds: float = 0.0
    cached: str = "none"
    note: str | None = None
    #: ``statistics:<solver method>`` (one pass, closed form) or ``gradient`` (the probing path).
    method: str = "gradient"
    #: Forward prefixes run for this layer, in units of one full original forward over the data.
    passes: float = 0.0
    #: Seconds of the closed-form solve (statistics path; no data pass), part of ``seconds``.
    solve_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    """Fitting of every rewritten layer, in the order the model calls them."""

    layers: list[LayerFit] = field(default_factory=list)
    fit_samples: int | None = None
    holdout_samples: int | None = None
    steps: int = 0
    lr: float = 0.0
    device: str = "cpu"
    world_size: int = 1
    seconds: float = 0.0
    #: All layers' forward prefixes, in units of one full original forward over the data.
    passes: float = 0.0
    #: How the layers' (input, target) pairs were streamed: ``frontier: ...`` (each layer from
    #: where the previous one stopped, ``recovery/frontier.py``) or ``prefix passes: ...`` (why).
    streaming: str = ""
    #: Set when the whole fit was undone (the fitted model was worse on held-out data).
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = [layer.to_dict() for layer in self.layers]
        return data


@dataclass
class BatchNormResult:
    """BatchNorm statistics re-estimated as cumulative averages over the fit split.

    With a reference model, ``output_error_before``/``_after`` are the relative output errors
    against it on the split ``compared_on`` (the holdout split; the fit split when there is
    none), and ``kept`` says whether the new statistics were kept (only when they lower that error).
    """

    modules: int = 0
    batches: int = 0
    samples: int = 0
    seconds: float = 0.0
    kept: bool = True
    output_error_before: float | None = None
    output_error_after: float | None = None
    #: Batches of one sample that BatchNorm in training mode cannot use (after global pooling).
    skipped_batches: int = 0
    #: The split the output errors were measured on ("holdout", or "fit" without one).
    compared_on: str = ""
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitProgress:
    """One step of progress: ``phase`` is ``start`` or ``done`` (then ``layer_fit`` is set)."""

    layer: str
    index: int
    total: int
    phase: str
    layer_fit: LayerFit | None = None


# --------------------------------------------------------------------------- distributed helpers


def distributed_world() -> tuple[int, int]:
    """(rank, world size) when ``torch.distributed`` is initialised, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(tensor: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def _all_reduce_floats(values: list[float], world: int, device: torch.device) -> list[float]:
    if world <= 1:
        return values
    reduced = _all_reduce(torch.tensor(values, dtype=torch.float64, device=device), world)
    return [float(v) for v in reduced.cpu()]


# --------------------------------------------------------------------------- stopping at a layer


Pair = tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]


def _clone(value: Any) -> Any:
    return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, value)


def _inputs_at(model: nn.Module, block: nn.Module, calls: int, batch: Batch) -> list[tuple[tuple, dict]]:
    """The arguments of ``block``'s first ``calls`` calls, stopping the forward before the last."""
    recorded: list[tuple[tuple, dict]] = []

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if len(recorded) + 1 == calls:
            recorded.append((args, kwargs))
            raise _StopForward
        # Earlier calls: the forward goes on and may change these tensors in place.
        recorded.append((_clone(args), _clone(kwargs)))

    _run_until_stopped(model, batch, block.register_forward_pre_hook(before, with_kwargs=True))
    return recorded


def _outputs_at(model: nn.Module, layer: nn.Module, calls: int, batch: Batch) -> list[torch.Tensor]:
    """The outputs of ``layer``'s first ``calls`` calls, stopping the forward after the last."""
    recorded: list[torch.Tensor] = []

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            raise ModelError(f"layer output is a {type(output).__name__}, not a tensor: cannot fit it")
        if len(recorded) + 1 == calls:
            recorded.append(output)
            raise _StopForward
        recorded.append(output.clone())

    _run_until_stopped(model, batch, layer.register_forward_hook(after))
    return recorded


def _run_until_stopped(model: nn.Module, batch: Batch, handle: Any) -> None:
    """Run ``batch`` through ``model`` without gradients until the hook behind ``handle``
    raises ``_StopForward`` (or the forward ends), then remove the hook."""
    try:
        with torch.no_grad():
            batch.call(model)
    except _StopForward:
        pass
    finally:
        handle.remove()


def _leaf_macs(module: nn.Module, output: Any) -> float:
    """Multiply-accumulates of one call of a conv or linear module (0 for anything else)."""
    if not isinstance(output, torch.Tensor) or not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return 0.0
    weight = module.weight
    return float(output.numel()) * float(weight[0].numel())


def _call_order_and_costs(
    model: nn.Module, modules: dict[str, nn.Module], batch: Batch, when: str
) -> tuple[list[str], dict[str, int], float, dict[str, list[float]]]:
    """One probe forward: the names in call order, their call counts, the model's cost, and the
    cost run up to each call of each module (``before`` it: a block's input; ``after``: a target).

    Cost counts passes in units of a full forward: MACs of convs and linears, or module calls in
    a model without any.
    """
    order: list[str] = []
    calls: dict[str, int] = dict.fromkeys(modules, 0)
    total = [0.0, 0.0]  # MACs, leaf calls
    at: dict[str, list[list[float]]] = {name: [] for name in modules}
    handles = []

    def leaf(module: nn.Module, args: tuple, output: Any) -> None:
        total[0] += _leaf_macs(module, output)
        total[1] += 1

    for module in model.modules():
        if not list(module.children()):
            handles.append(module.register_forward_hook(leaf))
    for name, module in modules.items():

        def mark(*hook_args: Any, name: str = name) -> None:
            if calls[name] == 0:
                order.append(name)
            calls[name] += 1
            at[name].append(list(total))

        if when == "before":
            handles.append(module.register_forward_pre_hook(mark))
        else:
            handles.append(module.register_forward_hook(mark))
    try:
        with torch.no_grad():
            batch.call(model)
    finally:
        for handle in handles:
            handle.remove()
    use = 0 if total[0] > 0 else 1
    return order, calls, total[use], {name: [v[use] for v in values] for name, values in at.items()}


def _probe_order(
    original: nn.Module,
    rewritten: nn.Module,
    blocks: dict[str, nn.Module],
    layers: dict[str, nn.Module],
    probe: Batch,
) -> tuple[list[str], dict[str, int], dict[str, list[float]], dict[str, int], float, dict[str, list[float]]]:
    """Both models' probe forwards (``_call_order_and_costs``) on the probe batch's first samples
    (``frontier.PROBE_SAMPLES``; costs are fractions of a forward, so the batch size does not
    matter), or on the whole probe batch when the models do not run on that slice (a model that
    needs a batch of some size): a quarter of a pass saved at ResNet-50's batch of 32."""
    from convrewrite.recovery.frontier import PROBE_SAMPLES, _first_samples

    def both(batch: Batch) -> tuple:
        order, calls, _, rewritten_at = _call_order_and_costs(rewritten, blocks, batch, "before")
        _, original_calls, full, original_at = _call_order_and_costs(original, layers, batch, "after")
        return order, calls, rewritten_at, original_calls, full, original_at

    small = _first_samples(probe, PROBE_SAMPLES)
    if small is not probe:
        try:
            return both(small)
        except Exception:  # noqa: BLE001 - the slice did not run: the whole probe batch decides
            pass
    return both(probe)


def _own(value: Any) -> Any:
    """Tensors that are views of a much larger storage copied out, so a cache holds only them."""

    def own(tensor: Any) -> Any:
        if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().nbytes() > 2 * tensor.nbytes + 4096:
            return tensor.clone()
        return tensor

    return tree_map(own, value)


def _nbytes(value: Any) -> int:
    leaves, _ = tree_flatten(value)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


# --------------------------------------------------------------------------- terminals (closed form)


def _plain_linear(module: nn.Module) -> str | None:
    """``conv`` or ``linear`` for modules whose forward is exactly a conv / a linear map."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module):
        return None
    for base in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if (
            isinstance(module, base)
            and type(module).forward is base.forward
            and type(module)._conv_forward is base._conv_forward
        ):
            return "conv"
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return "linear"
    return None


class _Terminal:
    """A conv or linear map inside a block whose output channels are block output channels.

    ``channels[c]`` is the block output channel that the module's output channel c becomes.
    """

    def __init__(self, name: str, module: Any, kind: str, channels: torch.Tensor) -> None:
        self.name = name or "(block)"
        self.module: Any = module
        self.kind = kind
        self.channels = channels
        self.channel_dim = 1 if kind == "conv" else -1
        self.has_bias = getattr(module, "bias", None) is not None
        weight = module.weight
        if kind == "conv":
            self.groups = int(module.groups)
            self.taps = math.prod(module.kernel_size)
            self.inputs = int(weight.shape[1]) * self.taps
            self.outputs = int(weight.shape[0]) // self.groups
        else:
            self.groups, self.taps = 1, 1
            self.inputs, self.outputs = int(weight.shape[1]), int(weight.shape[0])
        self.unknowns = self.inputs + (1 if self.has_bias else 0)
        self.gram: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.energy: torch.Tensor | None = None

    # -- the linear model: rows of inputs, weights as a (groups, unknowns, outputs) matrix

    def _columns(self, x: torch.Tensor) -> torch.Tensor:
        """(n, Cin*taps, positions): im2col by a depthwise conv with one-hot kernels."""
        conv = self.module
        dims = len(conv.kernel_size)
        padding: Any = conv.padding
        if conv.padding_mode != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = 0
        channels = x.shape[1]
        # A 1x1 kernel has no padding to apply, whatever ``padding`` says ('same', 'valid', 0).
        unpadded = isinstance(padding, str) or not any(padding if isinstance(padding, tuple) else (padding,))
        if self.taps == 1 and unpadded:
            index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in conv.stride)
            columns = x[index]
        else:
            eye = torch.eye(self.taps, dtype=x.dtype, device=x.device).reshape(self.taps, 1, *conv.kernel_size)
            eye = eye.repeat(channels, 1, *([1] * dims))
            columns = _CONV_FUNCTIONS[dims](x, eye, None, conv.stride, padding, conv.dilation, channels)
        return columns.reshape(columns.shape[0], columns.shape[1], -1)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """(groups, rows, unknowns) float64, a ones column last when the module has a bias."""
        if self.kind == "conv":
            columns = self._columns(x)
            n, _, positions = columns.shape
            per_group = self.inputs
            rows = columns.reshape(n, self.groups, per_group, positions).permute(1, 0, 3, 2)
            rows = rows.reshape(self.groups, n * positions, per_group)
        else:
            rows = x.reshape(1, -1, self.inputs)
        rows = rows.to(torch.float64)
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(*rows.shape[:2], 1)], dim=2)
        return rows

    def target_rows(self, y: torch.Tensor) -> torch.Tensor:
        """(groups, rows, outputs) float64 in the same row order as ``rows``."""
        if self.kind == "conv":
            n = y.shape[0]
            flat = y.reshape(n, self.groups, self.outputs, -1).permute(1, 0, 3, 2)
            return flat.reshape(self.groups, -1, self.outputs).to(torch.float64)
        return y.reshape(1, -1, self.outputs).to(torch.float64)

    def weights(self) -> torch.Tensor:
        """The module's current (weight, bias) as (groups, unknowns, outputs) float64."""
        weight = self.module.weight.detach().to(torch.float64)
        if self.kind == "conv":
            matrix = weight.reshape(self.groups, self.outputs, self.inputs).transpose(1, 2)
        else:
            matrix = weight.t().unsqueeze(0)
        if self.has_bias:
            bias = self.module.bias.detach().to(torch.float64).reshape(self.groups, 1, self.outputs)
            matrix = torch.cat([matrix, bias], dim=1)
        return matrix

    def assign(self, matrix: torch.Tensor) -> None:
        weight = self.module.weight
        with torch.no_grad():
            core = matrix[:, : self.inputs]
            if self.kind == "conv":
                weight.copy_(core.transpose(1, 2).reshape(weight.shape).to(weight.dtype))
            else:
                weight.copy_(core[0].t().to(weight.dtype))
            if self.has_bias:
                self.module.bias.copy_(matrix[:, self.inputs].reshape(-1).to(weight.dtype))

    # -- normal equations

    def reset(self, device: torch.device) -> None:
        shape = (self.groups, self.unknowns)
        self.gram = torch.zeros(*shape, self.unknowns, dtype=torch.float64, device=device)
        self.cross = torch.zeros(*shape, self.outputs, dtype=torch.float64, device=device)
        self.energy = torch.zeros(self.groups, dtype=torch.float64, device=device)

    def accumulate(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """Add one call's input ``x`` and the target of this module's output channels."""
        assert self.gram is not None and self.cross is not None and self.energy is not None
        samples = x.shape[0]
        per_sample = max(1, target[:1].numel() // max(self.outputs * self.groups, 1)) * self.unknowns * self.groups
        step = max(1, _CHUNK_ELEMENTS // max(per_sample, 1))
        for start in range(0, samples, step):
            rows = self.rows(x[start : start + step])
            wanted = self.target_rows(target[start : start + step])
            self.gram.add_(rows.transpose(1, 2) @ rows)
            self.cross.add_(rows.transpose(1, 2) @ wanted)
            self.energy.add_(wanted.pow(2).sum(dim=(1, 2)))

    def all_reduce(self, world: int) -> None:
        for tensor in (self.gram, self.cross, self.energy):
            assert tensor is not None
            _all_reduce(tensor, world)

    def loss(self, matrix: torch.Tensor) -> float:
        """Squared error of ``matrix`` on what was accumulated: e - 2 tr(WᵀC) + tr(WᵀGW)."""
        assert self.gram is not None and self.cross is not None and self.energy is not None
        value = self.energy.sum() - 2 * (matrix * self.cross).sum() + (matrix * (self.gram @ matrix)).sum()
        return float(value)

    def solve(self, ridge: float) -> torch.Tensor:
        """Least squares with a ridge relative to the mean diagonal of XᵀX, one solve per group."""
        assert self.gram is not None and self.cross is not None
        gram = self.gram
        scale = gram.diagonal(dim1=-2, dim2=-1).mean(dim=-1).clamp_min(1e-30)
        eye = torch.eye(self.unknowns, dtype=gram.dtype, device=gram.device)
        regularised = gram + (ridge * scale).view(-1, 1, 1) * eye
        # Small solves on one thread (many threads only fight over them); large ones as torch likes.
        with torch_threads(1) if self.unknowns <= 512 else contextlib.nullcontext():
            factor, info = torch.linalg.cholesky_ex(regularised)
            if bool((info != 0).any()):
                return torch.linalg.lstsq(regularised.cpu(), self.cross.cpu()).solution.to(gram.device)
            solution = torch.cholesky_solve(self.cross, factor)
            # One step of iterated Tikhonov: removes the ridge's bias along well-determined
            # directions (an exact rewrite stays exact) and leaves the poorly determined ones damped.
            return solution + torch.cholesky_solve(self.cross - gram @ solution, factor)


def _probe_copy(block: nn.Module) -> nn.Module | None:
    try:
        return copy.deepcopy(block).to(torch.float64)
    except Exception:
        return None


def _as_double(value: Any) -> Any:
    def double(v: Any) -> Any:
        return v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    return tree_map(double, value)


def _channel_map(
    block: nn.Module, module: Any, args: tuple, kwargs: dict, base: torch.Tensor, channel_dim: int
) -> torch.Tensor | None:
    """Where each output channel of ``module`` lands in the block's output, or None.

    Adds distinct constants per channel to ``module``'s output and reads them back in the
    block's output: they must arrive unchanged, one block channel per module channel, the other
    block channels untouched. Done twice with another ordering and scale, to rule out chance.
    """
    scale = float(base.abs().max()) + 1.0

    def run_with(marks: torch.Tensor) -> torch.Tensor:
        def add(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            shape = [1] * output.dim()
            shape[channel_dim] = -1
            return output + marks.view(shape)

        handle = module.register_forward_hook(add)
        try:
            with torch.no_grad():
                return block(*args, **kwargs)
        finally:
            handle.remove()

    found: list[torch.Tensor] = []
    generator = torch.Generator().manual_seed(0)
    for attempt in range(2):
        channels = int(module.weight.shape[0])
        order = torch.arange(channels) if attempt == 0 else torch.randperm(channels, generator=generator)
        values = 1.0 + order.to(torch.float64) / channels
        factor = scale * (1 + attempt)
        marked = run_with((values * factor).to(base.device))
        if not isinstance(marked, torch.Tensor) or marked.shape != base.shape:
            return None
        read = ((marked - base) / factor).movedim(channel_dim, 0).reshape(base.shape[channel_dim], -1)
        low, high = read.min(dim=1).values, read.max(dim=1).values
        tolerance = 0.2 / channels
        if bool(((high - low) > tolerance).any()):
            return None
        level = read.mean(dim=1).cpu()
        fed = level.abs() > tolerance
        position = torch.round((level - 1.0) * channels).long()
        if bool((fed & ((position < 0) | (position >= channels))).any()):
            return None
        sources = torch.full((base.shape[channel_dim],), -1, dtype=torch.long)
        ranks = torch.empty(channels, dtype=torch.long)
        ranks[order] = torch.arange(channels)  # the channel that carries value position
        for p in fed.nonzero().flatten().tolist():
            k = int(position[p])
            if abs(float(level[p]) - float(values[ranks[k]])) > tolerance:
                return None
            sources[p] = ranks[k]
        used = sources[sources >= 0]
        if used.numel() != channels or torch.unique(used).numel() != channels:
            return None
        destination = torch.empty(channels, dtype=torch.long)
        destination[used] = fed.nonzero().flatten()
        found.append(destination)
    return found[0] if torch.equal(found[0], found[1]) else None


def _same_but_channels(shape: torch.Size, block_shape: torch.Size, channel_dim: int) -> bool:
    """Same rank and sizes except along the channel dim (a branch of a concatenation)."""
    if len(shape) != len(block_shape) or len(shape) < 2:
        return False
    dim = channel_dim % len(shape)
    return all(a == b for i, (a, b) in enumerate(zip(shape, block_shape)) if i != dim)


def find_terminals(
    block: nn.Module, args: tuple, kwargs: dict, max_closed_form_dim: int = 4096
) -> tuple[list[_Terminal], list[str]]:
    """The block's closed-form parts (on a float64 copy of it) and notes on what was left out."""
    notes: list[str] = []
    candidates: list[tuple[str, Any, str]] = []
    for name, module in block.named_modules():
        kind = _plain_linear(module)
        if kind is not None:
            candidates.append((name, module, kind))
    if not candidates:
        return [], notes
    probe = _probe_copy(block)
    if probe is None:
        return [], ["closed form skipped: the block cannot be copied to float64"]
    probe_modules = dict(probe.named_modules())
    double_args, double_kwargs = _as_double(args), _as_double(kwargs)
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name, _, _ in candidates}
    handles = []
    for name, _, _ in candidates:

        def record(mod: nn.Module, inputs: tuple, output: Any, name: str = name) -> None:
            if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
                seen[name].append((inputs[0], output))

        handles.append(probe_modules[name].register_forward_hook(record))
    try:
        with torch.no_grad():
            base = probe(*double_args, **double_kwargs)
    except Exception as exc:
        return [], [f"closed form skipped: the block does not run in float64 ({describe(exc)})"]
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(base, torch.Tensor):
        return [], notes
    terminals: list[_Terminal] = []
    taken: set[int] = set()
    for name, module, kind in candidates:
        calls = seen[name]
        channel_dim = 1 if kind == "conv" else -1
        if len(calls) != 1 or not _same_but_channels(calls[0][1].shape, base.shape, channel_dim):
            continue
        copy_module = probe_modules[name]
        channels = _channel_map(probe, copy_module, double_args, double_kwargs, base, channel_dim)
        if channels is None:
            continue
        terminal = _Terminal(name, copy_module, kind, channels)
        x, output = calls[0]
        predicted = torch.einsum("gri,gio->gro", terminal.rows(x), terminal.weights())
        tolerance = 1e-9 * (1.0 + float(output.abs().max()))
        if not torch.allclose(predicted, terminal.target_rows(output), rtol=1e-6, atol=tolerance):
            notes.append(f"{terminal.name}: its output is not the plain conv of its input; left to gradient steps")
            continue
        if terminal.unknowns > max_closed_form_dim:
            notes.append(
                f"{terminal.name}: {terminal.unknowns:,} unknowns per output exceed the closed-form limit "
                f"{max_closed_form_dim:,}; left to gradient steps"
            )
            continue
        if taken & set(channels.tolist()):
            continue
        taken |= set(channels.tolist())
        terminals.append(_Terminal(name, module, kind, channels))
    return terminals, notes


# --------------------------------------------------------------------------- one layer


class _LayerData:
    """(block inputs, original outputs) pairs of one layer, streamed, cached up to a budget."""

    def __init__(
        self,
        original: nn.Module,
        rewritten: nn.Module,
        layer: nn.Module,
        block: nn.Module,
        calls: int,
        data: BatchSource,
        device: torch.device,
        budget: int,
        rank: int,
        world: int,
        name: str,
        frontier: Any = None,
    ) -> None:
        self.original, self.rewritten = original, rewritten
        self.layer, self.block = layer, block
        self.calls = calls
        self.data = data
        self.device = device
        self.budget = budget
        self.rank, self.world = rank, world
        self.name = name
        #: The frontiers to stream from (``recovery/frontier.py``), or None: prefix passes.
        self.frontier: Any = frontier
        self.cache: dict[Split, list[list[Pair]]] = {"fit": [], "holdout": []}
        self.complete: dict[Split, bool] = {"fit": False, "holdout": False}
        self.used = 0
        #: Samples streamed through the two prefixes, per split (what the passes count).
        self.streamed: dict[Split, int] = {"fit": 0, "holdout": 0}

    def _pairs(self, batch: Batch) -> list[Pair]:
        batch = batch.to(self.device)
        inputs = _inputs_at(self.rewritten, self.block, self.calls, batch)
        targets = _outputs_at(self.original, self.layer, self.calls, batch)
        if len(inputs) != len(targets):
            raise ModelError(
                f"fitting {self.name}: the rewritten model calls it {len(inputs)} time(s) on a batch, "
                f"the original {len(targets)}"
            )
        return [(_own(args), _own(kwargs), _own(target)) for (args, kwargs), target in zip(inputs, targets)]

    def via_frontier(self) -> bool:
        return self.frontier is not None and not self.frontier.broken

    def advance(self) -> None:
        """Move the frontiers to this layer now (a no-op with prefix passes): what a consumer that
        may stop part-way through a pass (gradient steps) needs before it starts."""
        if self.via_frontier():
            for split in ("fit", "holdout"):
                for _ in self.stream(split):
                    pass

    def stream(self, split: Split, epoch: int = 0) -> Iterator[list[Pair]]:
        if self.via_frontier():
            fresh = self.frontier.at[split] != self.name
            for size, pairs in self.frontier.pairs(self.name, split):
                if fresh:
                    self.streamed[split] += size
                yield pairs
            return
        if split == "fit":
            batches = self.data.batches("fit", rank=self.rank, world_size=self.world, epoch=epoch)
        else:
            batches = self.data.batches("holdout")
        for batch in batches:
            self.streamed[split] += batch.size
            yield self._pairs(batch)

    def pairs(self, split: Split) -> Iterator[list[Pair]]:
        """One pass over ``split``: from the cache when it holds all of it, else streamed (filling it)."""
        if self.complete[split]:
            yield from self.cache[split]
            return
        filling = not self.cache[split]
        overflowed = False
        for pairs in self.stream(split):
            if filling and not overflowed:
                size = _nbytes(pairs)
                if self.used + size <= self.budget:
                    self.cache[split].append(pairs)
                    self.used += size
                else:
                    overflowed = True
            yield pairs
        if filling and not overflowed:
            self.complete[split] = True

    def cycle(self, epoch_start: int = 1) -> Iterator[list[Pair]]:
        """Endless fit batches for gradient steps: the cached ones, or fresh passes when none fit."""
        if self.cache["fit"]:
            while True:
                yield from self.cache["fit"]
        epoch = epoch_start
        while True:
            empty = True
            for pairs in self.stream("fit", epoch):
                empty = False
                yield pairs
            if empty:
                return
            epoch += 1

    def cache_state(self) -> str:
        fit = "all" if self.complete["fit"] else ("part" if self.cache["fit"] else "none")
        return f"fit: {fit}, holdout: {'all' if self.complete['holdout'] else 'part or none'}"


def _relative(error: float, energy: float) -> float:
    if energy <= 0:
        return 0.0 if error <= 0 else float("inf")
    return math.sqrt(max(error, 0.0) / energy)


def _measure(block: nn.Module, batches: Iterator[list[Pair]]) -> tuple[float, float, int]:
    """Squared error, target energy and number of target elements of ``block`` over ``batches``."""
    error = energy = 0.0
    elements = 0
    with torch.no_grad():
        for pairs in batches:
            for args, kwargs, target in pairs:
                output = block(*args, **kwargs)
                difference = output.to(torch.float64) - target.to(torch.float64)
                error += float(difference.pow(2).sum())
                energy += float(target.to(torch.float64).pow(2).sum())
                elements += target.numel()
    return error, energy, elements


def _accumulate_pass(
    block: nn.Module, terminals: list[_Terminal], batches: Iterator[list[Pair]], device: torch.device
) -> tuple[float, float, int]:
    """One pass: direct squared error and energy of the block, and every terminal's normal equations."""
    for terminal in terminals:
        terminal.reset(device)
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for index, terminal in enumerate(terminals):

        def grab(mod: nn.Module, args: tuple, kwargs: dict, output: Any, index: int = index) -> None:
            x = args[0] if args else kwargs["input"]
            captured[index] = (x, output)

        handles.append(terminal.module.register_forward_hook(grab, with_kwargs=True))
    error = energy = 0.0
    elements = 0
    try:
        with torch.no_grad():
            for pairs in batches:
                for args, kwargs, target in pairs:
                    captured.clear()
                    output = block(*args, **kwargs)
                    difference = output.to(torch.float64) - target.to(torch.float64)
                    error += float(difference.pow(2).sum())
                    energy += float(target.to(torch.float64).pow(2).sum())
                    elements += target.numel()
                    for index, terminal in enumerate(terminals):
                        x, own = captured[index]
                        dim = terminal.channel_dim
                        channels = terminal.channels.to(output.device)
                        # What the block adds to this module's channels besides the module itself.
                        rest = output.index_select(dim, channels) - own
                        terminal.accumulate(x, target.index_select(dim, channels) - rest)
    finally:
        for handle in handles:
            handle.remove()
    return error, energy, elements


def _parameter_groups(block: nn.Module, lr: float) -> list[dict[str, Any]]:
    """One Adam group per parameter, with a learning rate relative to its RMS.

    Parts of a block live on very different scales (SVD factors, biases, channel-wise taps); an
    absolute rate is too coarse for some and too timid for others.
    """
    groups = []
    for parameter in block.parameters():
        if not parameter.requires_grad:
            continue
        rms = float(parameter.detach().pow(2).mean().sqrt()) if parameter.numel() else 0.0
        groups.append({"params": [parameter], "lr": lr * max(rms, 1e-3)})
    return groups


def _gradient_steps(
    block: nn.Module, batches: Iterator[list[Pair]], steps: int, lr: float, energy_per_element: float, world: int
) -> int:
    groups = _parameter_groups(block, lr)
    if not groups or steps <= 0:
        return 0
    optimizer = torch.optim.Adam(groups)
    scale = max(energy_per_element, 1e-30)
    done = 0
    for pairs in batches:
        if done >= steps:
            break
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            total = 0
            loss: torch.Tensor | None = None
            for args, kwargs, target in pairs:
                output = block(*args, **kwargs)
                term = (output - target).pow(2).sum()
                loss = term if loss is None else loss + term
                total += target.numel()
            assert loss is not None
            (loss / (total * scale)).backward()
        if world > 1:
            for group in groups:
                for parameter in group["params"]:
                    if parameter.grad is None:
                        parameter.grad = torch.zeros_like(parameter)
                    _all_reduce(parameter.grad, world).div_(world)
        optimizer.step()
        done += 1
    return done


def _snapshot(block: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in block.state_dict().items()}


def _fit_layer(
    layer_data: _LayerData,
    record: LayerFit,
    *,
    steps: int,
    lr: float,
    ridge: float,
    max_closed_form_dim: int,
    world: int,
) -> None:
    block, device = layer_data.block, layer_data.device
    has_holdout = layer_data.data.count("holdout") != 0
    if has_holdout:
        error, energy, elements = _measure(block, layer_data.pairs("holdout"))
        record.holdout_error_before = _relative(error, energy) if elements else None

    # The first fit batch, outside the cache (which the first full pass fills in order).
    first = next(layer_data.stream("fit"), None)
    if first is None:
        record.note = "no fit batches reached this layer"
        return
    args, kwargs, _ = first[0]
    terminals, notes = find_terminals(block, args, kwargs, max_closed_form_dim)
    if notes:
        record.note = "; ".join(notes)

    # Pass 1: the layer as transferred, and the normal equations given the rest of the block.
    error, energy, elements = _accumulate_pass(block, terminals, layer_data.pairs("fit"), device)
    error, energy, elements_f = _all_reduce_floats([error, energy, float(elements)], world, device)
    for terminal in terminals:
        terminal.all_reduce(world)
    candidates: list[tuple[float, str, dict[str, torch.Tensor]]] = [(error, "transfer", _snapshot(block))]
    record.fit_error_before = _relative(error, energy)
    record.closed_form = [t.name for t in terminals]
    current = error
    if terminals:
        current = _solve_terminals(terminals, ridge, current)
        candidates.append((current, "closed-form", _snapshot(block)))

    terminal_parameters = {id(p) for t in terminals for p in t.module.parameters()}
    covered = sum(int(t.channels.numel()) for t in terminals)
    target = first[0][2]
    block_channels = int(target.shape[terminals[0].channel_dim]) if terminals and target.dim() > 1 else 0
    rest = [p for p in block.parameters() if p.requires_grad and id(p) not in terminal_parameters]
    if steps > 0 and (rest or covered < block_channels):
        energy_per_element = energy / max(elements_f, 1.0)
        # With the fit split cached, a closed-form solve costs one cheap pass: alternate a few
        # rounds of gradient steps with solves (the solved part then guides the gradient part).
        rounds = _ROUNDS if terminals and layer_data.complete["fit"] else 1
        batches = layer_data.cycle()
        for round_index in range(rounds):
            share = steps // rounds + (1 if round_index < steps % rounds else 0)
            record.gradient_steps += _gradient_steps(block, batches, share, lr, energy_per_element, world)
            # The loss after these steps, and the terminals solved again given the new rest.
            error2, energy2, _ = _accumulate_pass(block, terminals, layer_data.pairs("fit"), device)
            error2, energy2 = _all_reduce_floats([error2, energy2], world, device)
            for terminal in terminals:
                terminal.all_reduce(world)
            candidates.append((error2, "gradient", _snapshot(block)))
            if terminals:
                resolved = _solve_terminals(terminals, ridge, error2)
                candidates.append((resolved, "gradient+closed-form", _snapshot(block)))

    best_error, best_label, best_state = min(candidates, key=lambda c: c[0])
    block.load_state_dict(best_state)
    record.kept = best_label
    record.fit_error_after = _relative(best_error, energy)
    if layer_data.complete["fit"] and best_label != "transfer":
        # Measured again where it is cheap: the normal-equation loss cancels digits near zero.
        error, energy = _all_reduce_floats(list(_measure(block, layer_data.pairs("fit"))[:2]), world, device)
        record.fit_error_after = _relative(error, energy)
    record.cached = layer_data.cache_state()
    if has_holdout:
        error, energy, elements = _measure(block, layer_data.pairs("holdout"))
        record.holdout_error_after = _relative(error, energy) if elements else None
        before, after = record.holdout_error_before, record.holdout_error_after
        if best_label != "transfer" and before is not None and after is not None and after > before:
            # The fit did not carry over to samples it never saw (too little calibration data for
            # this layer's parameters): keep the transfer. This one choice per layer is the only
            # use of the held-out samples besides measuring.
            block.load_state_dict(candidates[0][2])
            record.kept = "transfer"
            record.note = "; ".join(
                filter(None, [record.note, f"fit reverted: held-out layer error {before:.3g} -> {after:.3g}"])
            )
            record.holdout_error_after = before


def _solve_terminals(terminals: list[_Terminal], ridge: float, current: float) -> float:
    """Solve each terminal, keep its solution where it lowers the loss; the block's new loss."""
    for terminal in terminals:
        present = terminal.weights().to(terminal.gram.device if terminal.gram is not None else "cpu")
        solved = terminal.solve(ridge)
        before, after = terminal.loss(present), terminal.loss(solved)
        if after < before:
            terminal.assign(solved)
            current += after - before
    return max(current, 0.0)


# --------------------------------------------------------------------------- public API


def _outermost(names: list[str]) -> list[str]:
    unique = list(dict.fromkeys(names))
    return [n for n in unique if not any(n != m and n.startswith(m + ".") for m in unique)]


def _device_of(model: nn.Module) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def fit_layers(
    original: nn.Module,
    rewritten: nn.Module,
    layer_names: list[str],
    data: BatchSource,
    *,
    device: torch.device | str = "cpu",
    steps: int = 0,
    lr: float = 2e-2,
    ridge: float = 1e-7,
    cache_mb: float = 512.0,
    max_closed_form_dim: int = 4096,
    progress: Callable[[FitProgress], None] | None = None,
    targets: Mapping[str, str | None] | None = None,
    statistics: bool = True,
    product: torch.dtype = torch.float32,
) -> FitResult:
    """Fit every rewritten block to reproduce the original layer's output; see the module docstring.

    ``layer_names``: qualified names in ``rewritten`` of the outermost replacement blocks (nested
    names are dropped); ``original`` holds the dense layer under the same name, or, for a name in
    ``targets``, the module named there is the one whose output the block must reproduce (a
    replacement that also absorbed the modules after it: ``fuse-bn``'s conv computes its
    BatchNorm too, so its target is the BatchNorm's output); a target of None (unknown) leaves
    that block as transferred. ``rewritten`` is
    changed in place and keeps the best weights found; ``original`` is only read. Both models are
    moved to ``device`` for the work and back afterwards. ``lr`` is relative to each parameter's
    RMS. Only the fit split is fitted on; errors are measured on the holdout split.

    ``statistics`` (default): blocks with a statistics path (``recovery/fit_statistics.py``) are
    fitted in one streaming pass and a closed-form solve, ``steps`` gradient steps refining them
    afterwards when > 0 (blocks without a path get ``steps``, or ``FALLBACK_STEPS`` when it is
    0); ``statistics=False`` fits every block by the gradient path (the behaviour
    before the statistics fit, kept for third-party blocks and for comparison). ``product``: the
    dtype of the statistics' per-chunk products, float64 sums either way. float32 (the default)
    is ~1.8x faster to accumulate and leaves a relative layer-error floor of ~5e-6 on a
    full-capacity fit (float64: ~2e-7; ``benchmarks/results/bench_statistics_precision.txt``),
    far below any compressed rewrite's error.
    """
    from convrewrite.recovery import fit_statistics

    start = time.perf_counter()
    device = torch.device(device)
    rank, world = distributed_world()
    names = _outermost(list(layer_names))
    result = FitResult(
        fit_samples=data.count("fit"),
        holdout_samples=data.count("holdout"),
        steps=steps,
        lr=lr,
        device=str(device),
        world_size=world,
    )
    if not names:
        return result
    targets = dict(targets or {})
    unknown = [n for n in names if n in targets and targets[n] is None]
    names = [n for n in names if n not in unknown]
    for name in unknown:
        result.layers.append(
            LayerFit(
                name=name,
                block=type(rewritten.get_submodule(name)).__name__,
                note="not fitted: its replacement absorbed several modules; which output it stands for is unknown",
            )
        )
    if not names:
        return result
    blocks: dict[str, nn.Module] = {}
    layers: dict[str, nn.Module] = {}
    for name in names:
        target = targets.get(name) or name
        try:
            blocks[name] = rewritten.get_submodule(name)
            layers[name] = original.get_submodule(target)
        except AttributeError as exc:
            raise ValueError(
                f"fit_layers: no layer {name!r} in the rewritten model or {target!r} in the original ({exc})"
            ) from None
    homes = (_device_of(original), _device_of(rewritten))
    modes = {id(m): m.training for model in (original, rewritten) for m in model.modules()}
    original.to(device).eval()
    rewritten.to(device).eval()
    frontier: Any = None
    try:
        probe = next(iter(data.batches("fit", rank=rank, world_size=world)), None)
        if probe is None:
            raise ModelError("fitting needs calibration data to fit on: the fit split is empty")
        probe = probe.to(device)
        unique: dict[int, str] = {}
        for name, block in blocks.items():
            unique.setdefault(id(block), name)
        order, calls, rewritten_at, original_calls, full, original_at = _probe_order(
            original, rewritten, {n: blocks[n] for n in unique.values()}, {n: layers[n] for n in unique.values()}, probe
        )
        budget = int(cache_mb * (1 << 20))
        per_pass = (data.count("holdout") or 0) + math.ceil((data.count("fit") or 0) / world)
        why = "prefix passes: fitting every layer from the model's input"
        if statistics and len(order) > 1:
            from convrewrite.recovery.frontier import Frontier

            frontier, reason = Frontier.build(
                original, rewritten, order, targets, calls, probe, data, device, budget, rank, world
            )
            why = (
                "frontier: each layer streamed from where the previous one stopped" if frontier else f"{why} ({reason})"
            )
        result.streaming = why
        del probe
        previous_end = previous_start = 0.0
        skipped = [n for n in names if n not in order]
        total = len(order)
        for index, name in enumerate(order):
            if progress is not None:
                progress(FitProgress(name, index, total, "start"))
            began = time.perf_counter()
            block, layer = blocks[name], layers[name]
            record = LayerFit(name=name, block=type(block).__name__, target=targets.get(name), calls=calls[name])
            if original_calls.get(name) != calls[name]:
                # A replacement shared by tied convs is called once per original conv: its target
                # is not one original layer's output, so the transfer is kept as it is.
                record.note = (
                    f"not fitted: the rewritten model calls it {calls[name]} time(s), "
                    f"the original {original_calls.get(name)} (a replacement shared by tied layers)"
                )
                record.seconds = time.perf_counter() - began
                result.layers.append(record)
                continue
            layer_data = _LayerData(
                original, rewritten, layer, block, calls[name], data, device, budget, rank, world, name, frontier
            )
            geometry = fit_statistics.layer_geometry(original, name, layer) if statistics else None
            found = (
                fit_statistics.fit_layer_from_statistics(
                    layer_data, record, geometry, ridge=ridge, world=world, product=product, cache=steps > 0
                )
                if geometry is not None
                else None
            )
            if found is None:
                layer_data.advance()
                if layer_data.streamed["fit"] and not layer_data.via_frontier():
                    record.note = "; ".join(filter(None, [record.note, "no closed form: fitted by gradient steps"]))
                _fit_layer(
                    layer_data,
                    record,
                    # A block without a closed form needs its gradient steps even when the
                    # closed-form blocks get no refinement.
                    steps=steps if (steps > 0 or not statistics) else FALLBACK_STEPS,
                    lr=lr,
                    ridge=ridge,
                    max_closed_form_dim=max_closed_form_dim,
                    world=world,
                )
            elif found and steps > 0 and geometry is not None:
                fit_statistics.refine(layer_data, record, geometry, found, steps=steps, lr=lr, world=world)
            streamed = layer_data.streamed["fit"] + layer_data.streamed["holdout"]
            # The forwards stop at the last call: after the target's, before the block's.
            ends = original_at.get(name) or [full]
            starts = rewritten_at.get(name) or [full]
            if layer_data.via_frontier():
                # Only the nodes between the previous layer's cut and this one's ran.
                prefix = (ends[-1] - previous_end + starts[-1] - previous_start) / max(full, 1e-30)
                previous_end, previous_start = ends[-1], starts[-1]
            else:
                prefix = (ends[-1] + starts[-1]) / max(full, 1e-30)
            record.passes = streamed / max(per_pass, 1) * prefix
            result.passes += record.passes
            del layer_data
            record.seconds = time.perf_counter() - began
            result.layers.append(record)
            if progress is not None:
                progress(FitProgress(name, index, total, "done", record))
        for name in skipped:
            result.layers.append(
                LayerFit(name=name, block=type(blocks[name]).__name__, note="not called on the calibration data")
            )
    finally:
        if frontier is not None:
            frontier.close()
        original.to(homes[0])
        rewritten.to(homes[1])
        for model in (original, rewritten):
            for module in model.modules():
                module.train(modes.get(id(module), False))
    result.seconds = time.perf_counter() - start
    return result


def _output_error(
    reference: nn.Module,
    model: nn.Module,
    data: BatchSource,
    device: torch.device,
    outputs: Any = None,
    split: Split = "fit",
) -> float:
    """Relative output error of ``model`` against ``reference`` over ``split``: this rank's fit
    shard (all-reduced), or the whole holdout split (every rank measures all of it).

    ``outputs``: a ``metrics.ReferenceOutputs`` of ``reference`` (its outputs kept between calls).
    """
    rank, world = distributed_world()
    if split == "holdout":
        rank, world = 0, 1  # the holdout split is not sharded: nothing to all-reduce
    error = energy = 0.0
    reference.to(device).eval()
    model.to(device).eval()
    with torch.no_grad():
        for index, batch in enumerate(data.batches(split, rank=rank, world_size=world)):
            batch = batch.to(device)
            expected = outputs((split, rank, world, index), batch) if outputs is not None else batch.call(reference)
            for a, b in zip(tree_flatten(expected)[0], tree_flatten(batch.call(model))[0]):
                if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                    error += float((b.to(torch.float64) - a.to(torch.float64)).pow(2).sum())
                    energy += float(a.to(torch.float64).pow(2).sum())
    error, energy = _all_reduce_floats([error, energy], world, device)
    return _relative(error, energy)


def reestimate_batchnorm(
    model: nn.Module,
    data: BatchSource,
    *,
    device: torch.device | str = "cpu",
    split: Split = "fit",
    reference: nn.Module | None = None,
    outputs: Any = None,
) -> BatchNormResult:
    """Recompute every BatchNorm's running mean and variance as cumulative averages over ``split``.

    Only the BatchNorm layers run in training mode (dropout and the rest stay in eval); batches
    stream, so memory does not depend on the data set. Under ``torch.distributed`` each rank
    streams its shard and the statistics are averaged across ranks.

    With ``reference`` (the original model), the new statistics are kept only if they bring the
    output closer to the reference's on the holdout split (the fit split when it is empty). After
    fitting they often do not: fitting reproduces the original layer outputs *with* the original
    statistics, and a fitted output that is a damped least-squares image of the original gets re-
    inflated by new variances (measured on the digits CNN with ``separable``: 0.94 test accuracy
    after fitting, 0.15 after re-estimating unconditionally). ``outputs``: a
    ``metrics.ReferenceOutputs`` of ``reference``, so that its outputs are computed once for both
    comparisons.
    """
    start = time.perf_counter()
    device = torch.device(device)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    result = BatchNormResult(modules=len(norms))
    if not norms:
        return result
    saved = {id(norm): _snapshot(norm) for norm in norms}
    modes_before = {id(m): m.training for m in model.modules()}
    # Judged on the holdout split (samples the statistics were not estimated on; a tenth of the
    # passes of the fit split), on the fit split when there is no holdout split.
    judge: Split = "holdout" if (data.count("holdout") or 0) > 0 else "fit"
    result.compared_on = judge if reference is not None else ""
    if reference is not None:
        reference_modes = {id(m): m.training for m in reference.modules()}
        result.output_error_before = _output_error(reference, model, data, device, outputs, judge)
    rank, world = distributed_world()
    home = _device_of(model)
    modes = {id(m): m.training for m in model.modules()}
    momenta = [norm.momentum for norm in norms]
    model.to(device).eval()
    try:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative moving average: every batch counts the same
            norm.train()
        with torch.no_grad():
            for batch in data.batches(split, rank=rank, world_size=world):
                try:
                    batch.to(device).call(model)
                except ValueError as exc:
                    if "more than 1 value per channel" not in str(exc):
                        raise ModelError(
                            f"re-estimating BatchNorm statistics failed on a batch of {batch.size}: {describe(exc)}"
                        ) from exc
                    # A batch of one sample after global pooling has no batch statistics.
                    result.skipped_batches += 1
                    continue
                except Exception as exc:
                    raise ModelError(
                        f"re-estimating BatchNorm statistics failed on a batch of {batch.size}: {describe(exc)}"
                    ) from exc
                result.batches += 1
                result.samples += batch.size
        if world > 1:
            for norm in norms:
                for buffer in (norm.running_mean, norm.running_var):
                    if buffer is not None:
                        _all_reduce(buffer, world).div_(world)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        for module in model.modules():
            module.train(modes.get(id(module), False))
        model.to(home)
    if result.batches == 0:
        for norm in norms:
            norm.load_state_dict(saved[id(norm)])
        result.kept = False
        result.note = "no batch could give batch statistics (batches of one sample): the old ones are kept"
        result.seconds = time.perf_counter() - start
        return result
    if reference is not None:
        reference_home = _device_of(reference)
        result.output_error_after = _output_error(reference, model, data, device, outputs, judge)
        reference.to(reference_home)
        for module in reference.modules():
            module.train(reference_modes.get(id(module), False))
        for module in model.modules():
            module.train(modes_before.get(id(module), False))
        model.to(home)
        if result.output_error_before is not None and result.output_error_after > result.output_error_before:
            result.kept = False
            for norm in norms:
                norm.load_state_dict(saved[id(norm)])
    result.seconds = time.perf_counter() - start
    return result


__all__ = [
    "BatchNormResult",
    "FitProgress",
    "FitResult",
    "LayerFit",
    "distributed_world",
    "find_terminals",
    "fit_layers",
    "reestimate_batchnorm",
]
