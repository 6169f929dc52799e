"""Batches of calibration data: what fitting, distillation and fidelity measurement iterate over.

A source splits its samples once, deterministically, into a *fit* part and a *holdout* part. The
holdout part is never given to an optimiser or to a statistics pass; every fidelity figure is
measured on it. A source can be iterated any number of times (each call to ``batches`` is a new
pass) and keeps no more than one batch in memory beyond what the source itself holds, so fitting
and distillation scale with the batch size, not with the data set.

Under data parallelism (``torchrun``) each rank iterates its own shard of the fit split with
``rank``/``world_size``; every rank gets the same number of batches so that collective operations
never wait for a rank that ran out of data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch.utils._pytree import tree_map

from convrewrite.config import schema

#: The holdout fraction when none is given (``--holdout``), from the settings schema.
HOLDOUT: float = schema.default("holdout")
#: How many samples a batch holds when the source does not say (``--batch-size``).
DEFAULT_BATCH_SIZE: int = schema.default("batch-size")

Split = Literal["fit", "holdout"]
SPLITS: tuple[Split, ...] = ("fit", "holdout")


@dataclass
class Batch:
    """The arguments of one forward call on ``size`` samples (dim 0 of every tensor)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    size: int = 0

    def call(self, model: torch.nn.Module) -> Any:
        return model(*self.args, **self.kwargs)

    def to(self, device: torch.device | str) -> Batch:
        def move(value: Any) -> Any:
            return value.to(device) if isinstance(value, torch.Tensor) else value

        return Batch(tree_map(move, self.args), tree_map(move, self.kwargs), self.size)


@runtime_checkable
class BatchSource(Protocol):
    """Anything that yields batches of a fit and a holdout split, again and again."""

    description: str

    def count(self, split: Split) -> int | None:
        """Samples in ``split``, or None when the source only knows after a pass."""
        ...

    def batches(self, split: Split, *, rank: int = 0, world_size: int = 1, epoch: int = 0) -> Iterator[Batch]:
        """One pass over ``split`` (this rank's shard of it); ``epoch`` reseeds any shuffling."""
        ...


def holdout_indices(count: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(fit, holdout) sample indices: a seeded permutation, holdout = ``ceil(fraction * count)``.

    At least one sample is held out whenever ``fraction > 0`` and at least one is left to fit on.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(count, generator=generator).tolist()
    held = min(count - 1, math.ceil(fraction * count)) if fraction > 0 and count > 1 else 0
    return sorted(order[held:]), sorted(order[:held])


def shard(indices: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's part of ``indices``, padded by wrapping around so every rank gets as many."""
    if world_size <= 1:
        return list(indices)
    if not indices:
        return []
    per_rank = math.ceil(len(indices) / world_size)
    padded = indices + indices[: per_rank * world_size - len(indices)]
    while len(padded) < per_rank * world_size:  # fewer samples than ranks
        padded += indices[: per_rank * world_size - len(padded)]
    return padded[rank::world_size]


def epoch_order(indices: list[int], seed: int, epoch: int) -> list[int]:
    """``indices`` in the seeded order of one epoch over the fit split (the same on every rank,
    so that ``shard`` splits one permutation)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)
    return [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]


class IndexedBatches:
    """Samples addressed by index: the split is fixed when the source opens (``indices``), the fit
    split is reordered every epoch (``shuffle``, ``seed``) and sharded across ranks.

    A subclass sets ``indices``, ``seed`` and ``shuffle`` and yields the batches of a list of
    sample indices (``batches_of``); ``count`` and ``batches`` are the same for all of them.
    """

    indices: dict[Split, list[int]]
    seed: int
    shuffle: bool
    #: Whether the holdout split is sharded across ranks as well (True), or read whole by each rank.
    shard_holdout: ClassVar[bool] = True

    def count(self, split: Split) -> int | None:
        return len(self.indices[split])

    def batches(self, split: Split, *, rank: int = 0, world_size: int = 1, epoch: int = 0) -> Iterator[Batch]:
        indices = self.indices[split]
        if split == "fit" and self.shuffle:
            indices = epoch_order(indices, self.seed, epoch)
        if split == "fit" or self.shard_holdout:
            indices = shard(indices, rank, world_size)
        yield from self.batches_of(indices)

    def batches_of(self, indices: list[int]) -> Iterator[Batch]:
        raise NotImplementedError


class TensorBatches(IndexedBatches):
    """Samples held as tensors along dim 0: one per positional input, or named keyword inputs.

    Used for tensor files, for tensors handed to the Python API, and by the tests.
    """

    def __init__(
        self,
        args: tuple[torch.Tensor, ...] = (),
        kwargs: dict[str, torch.Tensor] | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        holdout: float = HOLDOUT,
        seed: int = 0,
        shuffle: bool = True,
        description: str = "",
    ) -> None:
        kwargs = dict(kwargs or {})
        tensors = [*args, *kwargs.values()]
        if not tensors:
            raise ValueError("no tensors given")
        counts = {int(t.shape[0]) for t in tensors}
        if len(counts) != 1:
            raise ValueError(f"inputs disagree on the number of samples (dim 0): {sorted(counts)}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.args = tuple(args)
        self.kwargs = kwargs
        self.samples = counts.pop()
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.indices: dict[Split, list[int]] = dict(zip(SPLITS, holdout_indices(self.samples, holdout, seed)))
        self.description = description or f"{self.samples:,} samples in memory"

    def batches_of(self, indices: list[int]) -> Iterator[Batch]:
        mine = indices
        for start in range(0, len(mine), self.batch_size):
            chosen = torch.tensor(mine[start : start + self.batch_size], dtype=torch.long)
            yield Batch(
                tuple(t.index_select(0, chosen) for t in self.args),
                {k: t.index_select(0, chosen) for k, t in self.kwargs.items()},
                int(chosen.numel()),
            )
