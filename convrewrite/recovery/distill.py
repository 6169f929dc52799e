"""Knowledge distillation: train the rewritten model (student) to reproduce the original (teacher).

Hinton, Vinyals and Dean (2015) for the output loss (softened logits, KL scaled by T²); FitNets
(Romero et al. 2015) for the optional hints, which match the rewritten layers' outputs against the
teacher's layers of the same qualified name (or the module a rewrite absorbed: ``teacher_layers``).
Only unlabeled inputs are needed: the teacher's
outputs are the targets.

The loop:
- the teacher runs in eval mode under ``no_grad``; the student trains with AdamW (no weight decay
  on biases and normalisation parameters), a linear warm-up then a cosine decay to zero, and
  gradient clipping. The learning rate is a pure function of the step, so a resumed run follows
  exactly the schedule of an uninterrupted one;
- BatchNorm (``batchnorm``): ``train`` (the default) lets the student's BatchNorm layers use batch
  statistics and re-estimate their running statistics while it learns. A rewrite changes the
  distribution of every rewritten layer's output, so the running statistics copied from the
  original are stale; with ``frozen`` they stay as they are (eval mode) and only the affine
  parameters learn. Measured on held-out test accuracy (benchmarks/bench_distill_digits.py, 300
  steps): on the digits CNN ``train`` is as good or better for every rule (separable 0.997 against
  0.931 frozen, separable then channelwise 0.969 against 0.764); on the Conv1d TDNN the two are
  within 0.2 points. ``frozen`` remains for tiny batches, where batch statistics are noise;
- every ``eval_every`` steps the student is measured against the teacher on the *holdout* split
  (never trained on): output relative error, cosine similarity and, for outputs shaped
  (N, classes), top-1 agreement, and the output loss itself on those samples. The student state
  with the lowest held-out loss (for ``mse``: the lowest held-out output error) is kept and is what
  the student holds when ``distill`` returns (the starting point is measured too, so distillation
  never hands back something worse than it was given by its own measure);
- checkpoints (see checkpoint.py) every ``checkpoint_every`` steps, at the end, and on Ctrl-C or a
  crash, which also prints one line with the command that resumes;
- under ``torch.distributed`` (see distributed.py) the student is wrapped in
  DistributedDataParallel and every rank trains on its shard of the fit split; rank 0 alone
  evaluates the holdout split (so reported figures do not depend on the number of processes),
  prints and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from convrewrite.errors import ModelError, UsageError, describe
from convrewrite.recovery.batches import SPLITS, Batch, BatchSource
from convrewrite.recovery.checkpoint import CheckpointState, has_checkpoint, load_checkpoint, save_checkpoint
from convrewrite.recovery.progress import PROGRESS_MODES, DistillProgress, describe_fidelity

LossName = Literal["auto", "mse", "kl", "cosine"]
LOSSES: tuple[str, ...] = ("auto", "mse", "kl", "cosine")
BATCHNORM_MODES: tuple[str, ...] = ("train", "frozen")

#: Configuration fields a resumed run must share with its checkpoint (the others may change:
#: more steps extend the schedule, evaluation and checkpoint cadence are only bookkeeping).
RESUME_FIXED = (
    "loss",
    "temperature",
    "layer_weight",
    "lr",
    "weight_decay",
    "warmup_steps",
    "warmup_fraction",
    "clip_norm",
    "batchnorm",
    "accumulate",
    "min_batch_size",
    "seed",
)


@dataclass
class DistillConfig:
    """How to distill; every field is checked on construction (bad values are usage errors)."""

    steps: int = 500
    loss: LossName = "auto"
    temperature: float = 4.0
    layer_weight: float = 0.0
    lr: float = 3e-3  # see benchmarks/README.md: 1e-3 fell short in 300 steps (separable 0.969 vs 0.997)
    weight_decay: float = 1e-4
    warmup_steps: int | None = None
    warmup_fraction: float = 0.05
    clip_norm: float | None = 1.0
    batchnorm: Literal["train", "frozen"] = "train"
    accumulate: int = 1
    min_batch_size: int = 2
    checkpoint_every: int | None = None
    eval_every: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(what: str) -> UsageError:
            return UsageError(f"distillation: {what}")

        if not isinstance(self.steps, int) or self.steps < 1:
            raise bad(f"steps must be a whole number >= 1, got {self.steps!r}")
        if self.loss not in LOSSES:
            raise bad(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise bad(f"temperature must be > 0, got {self.temperature}")
        if not (math.isfinite(self.layer_weight) and self.layer_weight >= 0):
            raise bad(f"layer_weight must be >= 0, got {self.layer_weight}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad(f"lr must be > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise bad(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps is not None and (not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            raise bad(f"warmup_steps must be a whole number >= 0, got {self.warmup_steps!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise bad(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.clip_norm is not None and not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise bad(f"clip_norm must be > 0 (or None for no clipping), got {self.clip_norm}")
        if self.batchnorm not in BATCHNORM_MODES:
            raise bad(f"batchnorm must be one of {', '.join(BATCHNORM_MODES)}, got {self.batchnorm!r}")
        if not isinstance(self.accumulate, int) or self.accumulate < 1:
            raise bad(f"accumulate must be a whole number >= 1, got {self.accumulate!r}")
        if not isinstance(self.min_batch_size, int) or self.min_batch_size < 1:
            raise bad(f"min_batch_size must be a whole number >= 1, got {self.min_batch_size!r}")
        for name in ("checkpoint_every", "eval_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise bad(f"{name} must be a whole number >= 1 (or None for the default), got {value!r}")

    @property
    def warmup(self) -> int:
        """Warm-up steps: ``warmup_steps`` when given, else ``warmup_fraction`` of the steps."""
        if self.warmup_steps is not None:
            return min(self.warmup_steps, self.steps)
        return int(round(self.warmup_fraction * self.steps))

    @property
    def evaluation_interval(self) -> int:
        """Steps between held-out evaluations: ``eval_every``, by default about 20 per run."""
        return self.eval_every or max(1, self.steps // 20)

    @property
    def checkpoint_interval(self) -> int:
        """Steps between checkpoints: ``checkpoint_every``, by default every 4th evaluation."""
        return self.checkpoint_every or 4 * self.evaluation_interval

    def learning_rate(self, step: int) -> float:
        """The learning rate of update ``step`` (0-based): linear warm-up, then cosine to zero."""
        warmup = self.warmup
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.steps - warmup)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class HeldOutFidelity:
    """The student against the teacher on held-out samples (the same definitions as the engine's
    example-input fidelity, accumulated over batches: relative error ``||s - t|| / ||t||`` and the
    cosine of the whole output, every sample concatenated), and the distillation loss itself on
    those samples (``loss``, what the best state is chosen by; None when not asked for)."""

    output_relative_error: float
    cosine_similarity: float
    top1_agreement: float | None
    samples: int
    loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> HeldOutFidelity | None:
        return None if data is None else cls(**data)


@dataclass
class DistillResult:
    """What one ``distill`` call did; ``to_dict()`` is what reports and checkpoints carry."""

    steps: int
    start_step: int
    completed_steps: int
    loss: str
    batchnorm: str
    device: str
    world_size: int
    best_step: int | None
    initial: HeldOutFidelity | None
    best: HeldOutFidelity | None
    final: HeldOutFidelity | None
    seconds: float
    total_seconds: float
    samples_seen: int
    layers: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for a table footer: held-out figures before -> after, steps and time."""
        parts = []
        if self.initial is not None and self.best is not None:
            samples = f"held-out, {self.best.samples:,} samples"
            parts.append(
                f"output error {self.initial.output_relative_error:.4f} -> {self.best.output_relative_error:.4f}"
            )
            parts.append(f"cosine {self.initial.cosine_similarity:.4f} -> {self.best.cosine_similarity:.4f}")
            if self.initial.top1_agreement is not None and self.best.top1_agreement is not None:
                parts.append(f"top-1 agreement {self.initial.top1_agreement:.3f} -> {self.best.top1_agreement:.3f}")
        else:
            samples = "no held-out data"
        steps = f"{self.completed_steps:,} steps"
        if self.best_step is not None and self.best_step != self.completed_steps:
            steps += f" (kept step {self.best_step:,})"
        where = f"{self.device}" + (f" x {self.world_size} processes" if self.world_size > 1 else "")
        figures = "; ".join(parts)
        return (
            f"Distillation ({self.loss} loss, {samples}): {figures}{'; ' if figures else ''}"
            f"{steps} in {self.total_seconds:.1f} s on {where}"
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("initial", "best", "final"):
            value = getattr(self, key)
            data[key] = value.to_dict() if value is not None else None
        return data


# --------------------------------------------------------------------------- losses


def _float_leaves(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _is_logits(tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and tensor.shape[1] > 1


def resolve_losses(loss: str, outputs: Sequence[torch.Tensor]) -> list[str]:
    """The loss of each floating-point output: ``auto`` is ``kl`` for (N, classes), else ``mse``."""
    kinds = []
    for tensor in outputs:
        kind = loss if loss != "auto" else ("kl" if _is_logits(tensor) else "mse")
        if kind == "kl" and tensor.dim() < 2:
            shape = "x".join(str(d) for d in tensor.shape)
            raise UsageError(
                f"the kl loss needs logits with a class dimension (dim 1), but the output is shaped {shape}",
                hint="use mse or cosine",
            )
        kinds.append(kind)
    return kinds


def normalized_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error divided by the teacher's mean square (a squared relative error), so the
    loss scale, and with it the learning rate, does not depend on the output's units."""
    student, teacher = student.float(), teacher.float()
    return (student - teacher).pow(2).mean() / teacher.pow(2).mean().clamp_min(1e-12)


def output_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """One output's loss (``kl``: over dim 1, every other position a separate distribution)."""
    if kind == "kl":
        s, t = student.float(), teacher.float()
        if s.dim() > 2:
            classes = s.shape[1]
            s = s.movedim(1, -1).reshape(-1, classes)
            t = t.movedim(1, -1).reshape(-1, classes)
        log_s = F.log_softmax(s / temperature, dim=-1)
        log_t = F.log_softmax(t / temperature, dim=-1)
        # Hinton et al.: soft-target gradients scale as 1/T², so T² keeps them comparable across T.
        return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2
    if kind == "cosine":
        s = student.float().reshape(student.shape[0], -1) if student.dim() > 1 else student.float().reshape(1, -1)
        t = teacher.float().reshape(s.shape)
        return (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()
    return normalized_mse(student, teacher)


# --------------------------------------------------------------------------- held-out fidelity


class _FidelitySums:
    """Sums from which the held-out figures follow, accumulated batch by batch in float64."""

    def __init__(self, kinds: Sequence[str] | None, temperature: float) -> None:
        self.kinds, self.temperature = kinds, temperature
        self.reference = 0.0
        self.candidate = 0.0
        self.difference = 0.0
        self.dot = 0.0
        self.agree = 0
        self.rows = 0
        self.samples = 0
        # Per output: (numerator, denominator) of its held-out loss.
        self.loss_sums: list[list[float]] = [[0.0, 0.0] for _ in kinds or ()]

    def add(self, teacher: list[torch.Tensor], student: list[torch.Tensor], samples: int) -> None:
        for index, (t, s) in enumerate(zip(teacher, student)):
            t64, s64 = t.detach().double(), s.detach().double()
            reference = float(t64.pow(2).sum())
            difference = float((s64 - t64).pow(2).sum())
            self.reference += reference
            self.candidate += float(s64.pow(2).sum())
            self.difference += difference
            self.dot += float((s64 * t64).sum())
            if _is_logits(t):
                self.agree += int((t.argmax(dim=1) == s.argmax(dim=1)).sum())
                self.rows += int(t.shape[0])
            if self.kinds is not None:
                kind, sums = self.kinds[index], self.loss_sums[index]
                if kind == "mse":  # the whole holdout's squared relative error
                    sums[0] += difference
                    sums[1] += reference
                else:  # a mean over samples (kl: over rows of logits) of the training loss
                    rows = t.numel() // t.shape[1] if kind == "kl" and t.dim() > 2 else max(1, t.shape[0])
                    if t.dim() < 2:
                        rows = 1
                    sums[0] += float(output_loss(kind, s64, t64, self.temperature)) * rows
                    sums[1] += rows
        self.samples += samples

    def result(self) -> HeldOutFidelity:
        reference, difference = math.sqrt(self.reference), math.sqrt(self.difference)
        relative = difference / reference if reference > 0 else (0.0 if difference == 0 else math.inf)
        denominator = reference * math.sqrt(self.candidate)
        cosine = self.dot / denominator if denominator > 0 else (1.0 if difference == 0 else 0.0)
        agreement = self.agree / self.rows if self.rows else None
        loss = None
        if self.loss_sums:
            parts = [num / den if den > 0 else 0.0 for num, den in self.loss_sums]
            loss = sum(parts) / len(parts)
        return HeldOutFidelity(relative, cosine, agreement, self.samples, loss)


def _held_out_fidelity(
    teacher: nn.Module,
    student: nn.Module,
    data: BatchSource,
    device: torch.device,
    kinds: Sequence[str] | None = None,
    temperature: float = 1.0,
) -> HeldOutFidelity | None:
    """The student against the teacher over the whole holdout split (None when it is empty);
    with ``kinds`` (one loss per output) also the held-out distillation loss.

    Self-contained on purpose: recovery/metrics.py's ``measure_fidelity`` can replace the figures.
    """
    sums = _FidelitySums(kinds, temperature)
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            for batch in data.batches("holdout"):
                batch = batch.to(device)
                sums.add(_float_leaves(batch.call(teacher)), _float_leaves(batch.call(student)), batch.size)
    finally:
        student.train(was_training)
    return sums.result() if sums.samples else None


# --------------------------------------------------------------------------- the loop's pieces


class _Cursor:
    """Where the fit split is being read: ``(epoch, position)`` is exactly resumable."""

    def __init__(self, data: BatchSource, rank: int, world_size: int, epoch: int, position: int, min_size: int) -> None:
        self.data, self.rank, self.world_size, self.min_size = data, rank, world_size, min_size
        self.epoch, self.position = epoch, 0
        self._iterator = self._open()
        for _ in range(position):
            if next(self._iterator, None) is None:
                break
            self.position += 1

    def _open(self) -> Iterator[Batch]:
        return iter(self.data.batches("fit", rank=self.rank, world_size=self.world_size, epoch=self.epoch))

    def next(self) -> Batch:
        empty_epochs = 0
        while True:
            batch = next(self._iterator, None)
            if batch is None:
                if self.position == 0:
                    empty_epochs += 1
                if empty_epochs >= 2:
                    raise UsageError(
                        f"the fit split yields no batch of at least {self.min_size} samples",
                        hint="give more calibration data or a larger batch size",
                    )
                self.epoch, self.position = self.epoch + 1, 0
                self._iterator = self._open()
                continue
            self.position += 1
            if batch.size >= self.min_size:
                return batch


class _Hints:
    """Forward hooks that record the outputs of the named layers in the teacher and the student."""

    def __init__(
        self, teacher: nn.Module, student: nn.Module, names: Sequence[str], teacher_names: Mapping[str, str]
    ) -> None:
        self.names = list(names)
        self.teacher: dict[str, torch.Tensor] = {}
        self.student: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        for name in self.names:
            for model, store, module in (
                (teacher, self.teacher, teacher_names.get(name, name)),
                (student, self.student, name),
            ):
                self._handles.append(model.get_submodule(module).register_forward_hook(self._recorder(store, name)))

    @staticmethod
    def _recorder(store: dict[str, torch.Tensor], name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            leaves = _float_leaves(output)
            if leaves:
                store[name] = leaves[0]

        return hook

    def loss(self) -> torch.Tensor | None:
        terms = [normalized_mse(self.student[n], self.teacher[n]) for n in self.names if n in self.student]
        self.teacher.clear()
        self.student.clear()
        return torch.stack(terms).mean() if terms else None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _set_student_mode(student: nn.Module, batchnorm: str) -> None:
    student.train()
    if batchnorm == "frozen":
        for module in student.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _parameter_groups(student: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Decay only weight matrices and kernels: biases and normalisation scales are 1-D.
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for parameter in student.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() > 1 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _state_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _broadcast_buffers(module: nn.Module, world_size: int) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics drift apart per rank)."""
    if world_size <= 1:
        return
    import torch.distributed as dist

    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


def _broadcast_object(value: Any, world_size: int) -> Any:
    if world_size <= 1:
        return value
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _check_models(
    teacher: nn.Module, student: nn.Module, layers: Sequence[str], teacher_layers: Mapping[str, str]
) -> None:
    if teacher is student:
        raise UsageError("the student is the teacher itself; distill a rewritten copy")
    teacher_ids = {id(p) for p in teacher.parameters()} | {id(b) for b in teacher.buffers()}
    shared = [n for n, p in student.named_parameters() if id(p) in teacher_ids]
    if shared:
        raise UsageError(f"the student shares {shared[0]} with the teacher; distill a copy of the rewritten model")
    if not any(p.requires_grad for p in student.parameters()):
        raise UsageError("the student has no trainable parameters")
    for name in layers:
        for role, model, module in (("student", student, name), ("teacher", teacher, teacher_layers.get(name, name))):
            try:
                model.get_submodule(module)
            except AttributeError:
                raise UsageError(f"layer {module!r} for the hint loss is not a module of the {role}") from None


def _probe(teacher: nn.Module, student: nn.Module, batch: Batch, loss: str) -> list[str]:
    """Run one batch through both models before any training: shapes must match."""
    with torch.no_grad():
        try:
            expected = _float_leaves(batch.call(teacher))
        except Exception as exc:
            raise UsageError(f"a calibration batch does not fit the teacher: {describe(exc)}") from None
        was_training = student.training
        student.eval()
        try:
            actual = _float_leaves(batch.call(student))
        except Exception as exc:
            raise UsageError(f"a calibration batch does not fit the student: {describe(exc)}") from None
        finally:
            student.train(was_training)
    if not expected:
        raise UsageError("the teacher's output holds no floating-point tensor to distill")
    shapes_t = [tuple(t.shape) for t in expected]
    shapes_s = [tuple(t.shape) for t in actual]
    if shapes_t != shapes_s:
        raise UsageError(f"the student's outputs {shapes_s} do not match the teacher's {shapes_t}")
    return resolve_losses(loss, expected)


def _check_resume(
    saved: CheckpointState, config: DistillConfig, student: nn.Module, data: BatchSource, layers: Sequence[str]
) -> None:
    before = dict(saved.info.get("config", {}))
    for name in RESUME_FIXED:
        now = getattr(config, name)
        if name in before and before[name] != now:
            raise UsageError(
                f"the checkpoint was made with {name}={before[name]!r}, this run asks for {now!r}",
                hint="use the same setting to resume, or delete the checkpoint to start over",
            )
    if saved.step > config.steps:
        raise UsageError(
            f"the checkpoint is at step {saved.step}, beyond the {config.steps} steps asked for",
            hint=f"ask for at least {saved.step} steps",
        )
    if list(saved.info.get("layers", [])) != list(layers):
        raise UsageError(
            f"the checkpoint matched the layers {saved.info.get('layers')}, this run asks for {list(layers)}"
        )
    counts = saved.info.get("data", {})
    for split in SPLITS:
        now_count = data.count(split)
        if split in counts and now_count is not None and counts[split] != now_count:
            raise UsageError(
                f"the checkpoint was made on {counts[split]} {split} samples, this data has {now_count}",
                hint="resume with the same --data, or delete the checkpoint to start over",
            )
    state = student.state_dict()
    wrong = [k for k in state if k not in saved.student or tuple(saved.student[k].shape) != tuple(state[k].shape)]
    extra = [k for k in saved.student if k not in state]
    if wrong or extra:
        raise UsageError(
            f"the checkpoint was made for a different student ({(wrong + extra)[0]} differs)",
            hint="delete the checkpoint to start over",
        )


def _selection_key(fidelity: HeldOutFidelity) -> float:
    # The objective itself on held-out data: with the kl loss the raw logits' error is the wrong
    # yardstick (KL ignores a constant added to a row of logits, so the error can rise while the
    # student improves; on the digits benchmark it kept a state with 38% agreement over one with 83%).
    return fidelity.loss if fidelity.loss is not None else fidelity.output_relative_error


def _default_resume_command(directory: Path) -> str:
    return f"distill(..., resume={str(directory)!r})"


# --------------------------------------------------------------------------- distill


def distill(
    teacher: nn.Module,
    student: nn.Module,
    data: BatchSource,
    config: DistillConfig,
    *,
    device: torch.device | str,
    layers: Sequence[str] = (),
    teacher_layers: Mapping[str, str] | None = None,
    checkpoint_dir: Path | str | None = None,
    resume: Path | str | None = None,
    progress: str = "auto",
    resume_command: str | None = None,
) -> DistillResult:
    """Distill ``teacher`` into ``student`` (in place) on ``data``; the student ends in eval mode
    holding its best state by held-out loss (see the module docstring).

    Both models are moved to ``device``. ``layers`` names modules (qualified names, present in
    both models) whose outputs are matched with weight ``config.layer_weight``; ``teacher_layers``
    maps a student layer to the teacher module whose output it stands for where that is another
    name (``RunState.output_of``: fuse-bn's conv is matched with the folded BatchNorm). ``resume`` is a
    checkpoint directory to continue from (its step count, optimizer, data position, RNG and best
    state); new checkpoints go to ``checkpoint_dir``, by default the ``resume`` directory.
    ``resume_command`` is the command printed after Ctrl-C or a crash. Under an initialised
    ``torch.distributed`` process group the run is data-parallel (see distributed.py).

    The steps: check the request (``_checked_request``, before any work), set the run up
    (``_DistillRun``: probe the losses, build the optimizer, restore a checkpoint), train
    (``_DistillRun.train``), and on the way out either keep the best state (``finish``) or write a
    checkpoint and say how to resume (``stop``).
    """
    if progress not in PROGRESS_MODES:
        raise UsageError(f"progress must be one of {', '.join(PROGRESS_MODES)}, got {progress!r}")
    device = torch.device(device)
    layers = list(layers)
    teacher_names = dict(teacher_layers or {})
    resume_dir = Path(resume) if resume is not None else None
    checkpoint_path = Path(checkpoint_dir) if checkpoint_dir is not None else resume_dir
    saved = _checked_request(teacher, student, data, config, layers, teacher_names, resume_dir)

    teacher_was_training = teacher.training
    teacher.to(device).eval()
    student.to(device)
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    started = time.perf_counter()
    with torch.random.fork_rng(devices=cuda_devices):
        run = _DistillRun(
            teacher, student, data, config, device, layers, teacher_names, checkpoint_path, progress, saved, started
        )
        try:
            run.train()
        except BaseException as exc:
            run.stop(exc, resume_command)
            teacher.train(teacher_was_training)
            raise
        run.finish()
        teacher.train(teacher_was_training)
    return run.result()


def _checked_request(
    teacher: nn.Module,
    student: nn.Module,
    data: BatchSource,
    config: DistillConfig,
    layers: list[str],
    teacher_names: dict[str, str],
    resume_dir: Path | None,
) -> CheckpointState | None:
    """Every check that can fail before any work; returns the checkpoint to resume from, if any."""
    if config.layer_weight > 0 and not layers:
        raise UsageError("layer_weight > 0 needs the names of the layers to match (layers=...)")
    if resume_dir is not None and not has_checkpoint(resume_dir):
        raise UsageError(f"nothing to resume: {resume_dir} holds no distillation checkpoint")
    _check_models(teacher, student, layers, teacher_names)
    if data.count("fit") == 0:
        raise UsageError("the fit split of the calibration data is empty")
    saved = load_checkpoint(resume_dir) if resume_dir is not None else None
    if saved is not None:
        _check_resume(saved, config, student, data, layers)
    return saved


class _DistillRun:
    """One distillation while it runs: the models, the optimizer, where the data stands, the
    history and the best state so far. Built inside the run's forked RNG (``distill``)."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        data: BatchSource,
        config: DistillConfig,
        device: torch.device,
        layers: list[str],
        teacher_names: dict[str, str],
        checkpoint_path: Path | None,
        progress: str,
        saved: CheckpointState | None,
        started: float,
    ) -> None:
        self.teacher, self.student, self.data, self.config, self.device = teacher, student, data, config, device
        self.layers, self.checkpoint_path, self.started = layers, checkpoint_path, started
        self.rank, self.world_size = _world()
        self.is_main = self.rank == 0
        torch.manual_seed(config.seed + self.rank)
        first = next(iter(data.batches("fit", rank=self.rank, world_size=self.world_size)), None)
        if first is None:
            raise UsageError("the fit split of the calibration data yields no batch")
        self.kinds = _probe(teacher, student, first.to(device), config.loss)
        self.loss_label = ", ".join(sorted(set(self.kinds)))
        if "kl" in self.kinds:
            self.loss_label += f" (T={config.temperature:g})"

        self.optimizer = torch.optim.AdamW(_parameter_groups(student, config.weight_decay), lr=config.lr)
        self.step, epoch, position = 0, 0, 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_step: int | None = None
        self.best_fidelity: HeldOutFidelity | None = None
        self.history: list[dict[str, Any]] = []
        self.previous_seconds = 0.0
        self.samples_seen = 0
        if saved is not None:
            epoch, position = self._restore(saved)
        self.start_step = self.step

        self.training_model: nn.Module = student
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.training_model = DistributedDataParallel(
                student, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.hints = _Hints(teacher, student, layers, teacher_names) if layers and config.layer_weight > 0 else None
        self.display = DistillProgress(progress, config.steps, self.step, is_main=self.is_main)
        self.cursor = _Cursor(data, self.rank, self.world_size, epoch, position, config.min_batch_size)
        history = self.history
        self.initial = HeldOutFidelity.from_dict(history[0].get("fidelity")) if history else None
        self.last_fidelity = HeldOutFidelity.from_dict(history[-1].get("fidelity")) if history else None
        self.step_start = (self.cursor.epoch, self.cursor.position, _rng_state(device))
        self.losses_since_eval: list[float] = []
        self.updating = False
        self.final: HeldOutFidelity | None = None

    def _restore(self, saved: CheckpointState) -> tuple[int, int]:
        """Continue from ``saved``: weights, optimizer, counters, history, RNG; the data position."""
        self.student.load_state_dict(saved.student)
        optimizer_state = self.optimizer.state_dict()
        optimizer_state["state"] = saved.optimizer_state
        self.optimizer.load_state_dict(optimizer_state)
        self.step = saved.step
        self.best_state = saved.best
        self.best_step = saved.info.get("best_step")
        self.best_fidelity = HeldOutFidelity.from_dict(saved.info.get("best_fidelity"))
        self.history = list(saved.info.get("history", []))
        self.previous_seconds = float(saved.info.get("seconds", 0.0))
        self.samples_seen = int(saved.info.get("samples_seen", 0))
        if self.is_main:
            _set_rng_state(saved.rng, self.device)
        else:
            # Only rank 0's generator state is saved; the others restart from a seed fixed by the step.
            torch.manual_seed(self.config.seed * 1_000_003 + self.rank * 7919 + self.step)
        return saved.epoch, saved.position

    def _seconds(self) -> float:
        return self.previous_seconds + time.perf_counter() - self.started

    def evaluate(self, at: int) -> None:
        """Measure the held-out fidelity at step ``at``, record it, and keep the best state."""
        config = self.config
        _broadcast_buffers(self.student, self.world_size)
        fidelity = (
            _held_out_fidelity(self.teacher, self.student, self.data, self.device, self.kinds, config.temperature)
            if self.is_main
            else None
        )
        fidelity = _broadcast_object(fidelity, self.world_size)
        losses = self.losses_since_eval
        mean_loss = sum(losses) / len(losses) if losses else None
        losses.clear()
        self.history.append(
            {
                "step": at,
                "loss": mean_loss,
                "lr": config.learning_rate(max(0, at - 1)) if at else 0.0,
                "fidelity": fidelity.to_dict() if fidelity is not None else None,
                "seconds": self._seconds(),
            }
        )
        if self.initial is None and at == 0:
            self.initial = fidelity
        self.last_fidelity = fidelity
        best = self.best_fidelity
        if fidelity is not None and (best is None or _selection_key(fidelity) < _selection_key(best)):
            self.best_state, self.best_step, self.best_fidelity = _state_copy(self.student), at, fidelity
        self.display.evaluated(at, mean_loss, fidelity)
        _set_student_mode(self.student, config.batchnorm)

    def write_checkpoint(self, at: int, cursor_epoch: int, cursor_position: int, rng: dict[str, torch.Tensor]) -> None:
        if self.checkpoint_path is None or not self.is_main:
            return
        data = self.data
        save_checkpoint(
            self.checkpoint_path,
            CheckpointState(
                step=at,
                epoch=cursor_epoch,
                position=cursor_position,
                student=self.student.state_dict(),
                best=self.best_state,
                optimizer_state=self.optimizer.state_dict()["state"],
                rng=rng,
                info={
                    "config": self.config.to_dict(),
                    "layers": self.layers,
                    "best_step": self.best_step,
                    "best_fidelity": self.best_fidelity.to_dict() if self.best_fidelity is not None else None,
                    "history": self.history,
                    "seconds": self._seconds(),
                    "samples_seen": self.samples_seen,
                    "world_size": self.world_size,
                    "data": {
                        "description": data.description,
                        "fit": data.count("fit"),
                        "holdout": data.count("holdout"),
                    },
                },
            ),
        )

    def train(self) -> None:
        """Evaluate where due, then take steps up to ``config.steps``, evaluating and checkpointing."""
        config = self.config
        _set_student_mode(self.student, config.batchnorm)
        step = self.step
        due = step == 0 or step % config.evaluation_interval == 0 or step == config.steps
        if due and (not self.history or self.history[-1]["step"] != step):
            # A fresh start, or a run interrupted during the evaluation its last step was due.
            self.evaluate(step)
        while self.step < config.steps:
            step_loss = self._one_step()
            self.losses_since_eval.append(step_loss)
            self.display.step(self.step, step_loss)
            if self.step % config.evaluation_interval == 0 or self.step == config.steps:
                self.evaluate(self.step)
            if self.step % config.checkpoint_interval == 0 or self.step == config.steps:
                self.write_checkpoint(self.step, self.cursor.epoch, self.cursor.position, _rng_state(self.device))

    def _one_step(self) -> float:
        """One optimizer step over ``config.accumulate`` micro-batches; returns its mean loss."""
        config, device = self.config, self.device
        lr = config.learning_rate(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(config.accumulate):
            batch = self.cursor.next().to(device)
            with torch.no_grad():
                teacher_out = _float_leaves(batch.call(self.teacher))
            sync = micro == config.accumulate - 1 or self.world_size == 1
            context = contextlib.nullcontext() if sync else self.training_model.no_sync()
            with context:
                student_out = _float_leaves(batch.call(self.training_model))
                terms = [
                    output_loss(kind, s, t, config.temperature)
                    for kind, s, t in zip(self.kinds, student_out, teacher_out)
                ]
                loss = torch.stack(terms).mean()
                if self.hints is not None:
                    hint = self.hints.loss()
                    if hint is not None:
                        loss = loss + config.layer_weight * hint
                (loss / config.accumulate).backward()
            step_loss += float(loss.detach()) / config.accumulate
            self.samples_seen += batch.size * self.world_size
        norm = torch.nn.utils.clip_grad_norm_(
            self.student.parameters(), config.clip_norm if config.clip_norm is not None else math.inf
        )
        # Gradients are all-reduced by now, so every rank sees the same norm and stops together.
        if not torch.isfinite(norm):
            raise ModelError(
                f"distillation diverged at step {self.step + 1} (gradient norm {float(norm)})",
                hint="lower the learning rate or set a clip norm",
            )
        self.updating = True
        self.optimizer.step()
        self.updating = False
        self.step += 1
        # Where the next step starts: what an interruption from here on must hand back.
        self.step_start = (self.cursor.epoch, self.cursor.position, _rng_state(device))
        return step_loss

    def _close(self) -> None:
        self.display.close()
        if self.hints is not None:
            self.hints.remove()

    def stop(self, exc: BaseException, resume_command: str | None) -> None:
        """Interrupted or failed: write a checkpoint that repeats the unfinished step, and say so."""
        self._close()
        if self.checkpoint_path is None or not self.is_main or self.updating:
            return
        # The state after `step` completed updates: the batches and random numbers the
        # unfinished step consumed are handed back, so resuming repeats that step exactly.
        step = self.step
        try:
            self.write_checkpoint(step, *self.step_start)
            where = f"checkpoint (step {step}"
            if self.best_step is not None and self.best_fidelity is not None:
                where += f", best step {self.best_step}: held-out error {self.best_fidelity.output_relative_error:.4f}"
            where += f") in {self.checkpoint_path}"
            command = resume_command or _default_resume_command(self.checkpoint_path)
            what = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"stopped ({describe(exc)})"
            print(
                f"distillation {what} at step {step} of {self.config.steps}; {where}; resume with: {command}",
                file=sys.stderr,
                flush=True,
            )
        except Exception as save_error:  # never hide the original failure
            print(f"distillation: could not write a checkpoint ({describe(save_error)})", file=sys.stderr)

    def finish(self) -> None:
        """Done: the student takes its best state, in eval mode."""
        self._close()
        self.final = self.last_fidelity
        if self.best_state is not None:
            self.student.load_state_dict(self.best_state)
        self.student.eval()
        if self.is_main and self.display.mode != "none":
            text = f"distill: {self.step - self.start_step} steps in {time.perf_counter() - self.started:.1f} s"
            if self.best_step is not None:
                text += f"; kept step {self.best_step}: {describe_fidelity(self.best_fidelity)}"
            self.display.message(text)

    def result(self) -> DistillResult:
        config = self.config
        return DistillResult(
            steps=config.steps,
            start_step=self.start_step,
            completed_steps=self.step,
            loss=self.loss_label,
            batchnorm=config.batchnorm,
            device=str(self.device),
            world_size=self.world_size,
            best_step=self.best_step,
            initial=self.initial,
            best=self.best_fidelity,
            final=self.final,
            seconds=time.perf_counter() - self.started,
            total_seconds=self._seconds(),
            samples_seen=self.samples_seen,
            layers=self.layers,
            history=self.history,
            checkpoint=str(self.checkpoint_path) if self.checkpoint_path is not None else None,
            config=config.to_dict(),
        )
