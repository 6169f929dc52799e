"""The two sources read on every pass: ``StreamBatches`` (an iterable the user's function
returns again for each pass, split by batch index) and ``DatasetBatches`` (a map-style dataset
split by sample index and batched with its loader's ``collate_fn``), and the holdout checks they
share. See the package docstring, *Holdout*.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from convrewrite.errors import ModelError, UsageError, describe
from convrewrite.recovery.batches import (
    DEFAULT_BATCH_SIZE,
    HOLDOUT,
    Batch,
    IndexedBatches,
    Split,
    holdout_indices,
)
from convrewrite.recovery.data.forms import InputForm, Reading, check_batch, read_item


def check_holdout(holdout: float) -> None:
    if not 0.0 <= holdout < 1.0:
        raise UsageError(f"--holdout {holdout}: expected a fraction in [0, 1)", hint="e.g. --holdout 0.1")


def check_count(count: int, holdout: float, where: str, unit: str = "sample") -> None:
    if count == 0:
        raise UsageError(f"{where}: expected calibration data, found an empty set")
    if holdout > 0 and count < 2:
        raise UsageError(
            f"{where}: expected at least 2 {unit}s (some are held out), found 1",
            hint="give more data, or --holdout 0 to fit on everything and measure nothing",
        )


def stream_is_held_out(index: int, holdout: float) -> bool:
    """Batch ``index`` of a stream is held out: ``ceil((i + 1) * f) > ceil(i * f)`` in exact arithmetic."""
    fraction = Fraction(holdout).limit_denominator(1_000_000)
    if fraction == 0:
        return False
    p, q = fraction.numerator, fraction.denominator
    return -(-(index + 1) * p // q) > -(-index * p // q)


def _checksum(batch: Batch) -> float:
    leaves, _ = tree_flatten((batch.args, batch.kwargs))
    total = 0.0
    for position, value in enumerate(leaves):
        if isinstance(value, torch.Tensor) and value.numel():
            total += (position + 1) * float(value.detach().to(torch.float64).sum())
            total += float(value.detach().reshape(-1)[: 1 << 10].to(torch.float64).abs().sum()) * 1e-3
    return total


def _guarded(items: Iterator[Any], where: str, verb: str) -> Iterator[tuple[int, Any]]:
    """``(index, item)`` for each item of the user's iterator; an error raised while producing an
    item becomes a ModelError that names the batch (``{where}: {verb} batch {index} raised ...``)."""
    index = 0
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except UsageError:
            raise
        except Exception as exc:
            raise ModelError(f"{where}: {verb} batch {index} raised {describe(exc)}") from exc
        yield index, item
        index += 1


class StreamBatches:
    """Batches streamed from an iterable that ``opener`` returns anew for every pass.

    Split by batch index (``stream_is_held_out``); the fit batches are sharded by batch index
    across ranks, padded by wrapping around so every rank gets as many. The opening scan counts
    the batches and samples and checks every batch; later passes check each batch again and
    compare its checksum, so a source that reorders or changes its batches is caught.
    """

    def __init__(
        self,
        opener: Callable[[], Iterable[Any]],
        form: InputForm,
        *,
        holdout: float = HOLDOUT,
        description: str = "",
        where: str = "calibration data",
        scan: bool = True,
    ) -> None:
        check_holdout(holdout)
        self.opener = opener
        self.form = form
        self.holdout = holdout
        self.where = where
        self.reading: Reading | None = None
        self.checksums: list[float] = []
        self.sizes: list[int] = []
        self.scanned = False
        self._last_iterable: Any = None
        first = self._first_batch()
        if scan:
            self._scan()
            self._confirm_order(first)
        count = len(self.sizes) if self.scanned else None
        counted = f"{sum(self.sizes):,} samples in {count:,} batches" if count is not None else "streamed"
        assert self.reading is not None
        self.description = f"{description or where}: {counted}, read as {self.reading.describe()}"

    def _iterate(self) -> Iterator[Any]:
        try:
            iterable = self.opener()
        except UsageError:
            raise
        except Exception as exc:
            raise ModelError(f"{self.where}: calling the data function raised {describe(exc)}") from exc
        if iterable is self._last_iterable and iter(iterable) is iterable:
            raise UsageError(
                f"{self.where}: expected a new iterable on every call, found the same exhausted iterator again",
                hint="return a list, a DataLoader, or a new generator from each call",
            )
        self._last_iterable = iterable
        try:
            iterator = iter(iterable)
        except TypeError:
            raise UsageError(
                f"{self.where}: expected an iterable of batches, found {type(iterable).__name__}"
            ) from None
        for _, item in _guarded(iterator, self.where, "producing"):
            yield item

    def _read(self, item: Any, index: int) -> Batch:
        where = f"{self.where}, batch {index}"
        batch, self.reading = read_item(item, self.form, self.reading, where)
        return check_batch(batch, self.form, where)

    def _first_batch(self) -> Batch:
        for item in self._iterate():
            return self._read(item, 0)
        raise UsageError(f"{self.where}: expected calibration data, found an empty set (no batches)")

    def _scan(self) -> None:
        sizes, checksums = [], []
        for index, item in enumerate(self._iterate()):
            batch = self._read(item, index)
            sizes.append(batch.size)
            checksums.append(_checksum(batch))
        check_count(len(sizes), self.holdout, self.where, "batch")
        fit = [i for i in range(len(sizes)) if not stream_is_held_out(i, self.holdout)]
        if not fit:
            raise UsageError(f"{self.where}: expected batches left to fit on, found {len(sizes)} all held out")
        self.sizes, self.checksums, self.scanned = sizes, checksums, True

    def _confirm_order(self, first: Batch) -> None:
        if self.checksums and _checksum(first) != self.checksums[0]:
            raise UsageError(
                f"{self.where}: expected the same batches on every call, found batch 0 changed between two calls",
                hint="turn off shuffling and random augmentation in the calibration data",
            )

    def count(self, split: Split) -> int | None:
        if not self.scanned:
            return None
        held = [stream_is_held_out(i, self.holdout) for i in range(len(self.sizes))]
        return sum(size for size, h in zip(self.sizes, held) if h == (split == "holdout"))

    def batches(self, split: Split, *, rank: int = 0, world_size: int = 1, epoch: int = 0) -> Iterator[Batch]:
        fit_batches = sum(not stream_is_held_out(i, self.holdout) for i in range(len(self.sizes)))
        wanted: dict[int, int] = {}  # position among this split's batches -> times this rank takes it
        if split == "fit" and world_size > 1:
            if not self.scanned:
                raise UsageError(f"{self.where}: sharding a stream across processes needs the opening scan")
            if fit_batches < world_size:
                raise UsageError(
                    f"{self.where}: expected at least {world_size} batches to fit on (one per process), "
                    f"found {fit_batches}",
                    hint="use a smaller batch size or more data",
                )
            per_rank = math.ceil(fit_batches / world_size)
            for slot in range(rank, per_rank * world_size, world_size):
                position = slot if slot < fit_batches else slot - fit_batches
                wanted[position] = wanted.get(position, 0) + 1
        padding: list[Batch] = []
        position = 0
        for index, item in enumerate(self._iterate()):
            held = stream_is_held_out(index, self.holdout)
            if held != (split == "holdout"):
                continue
            batch = self._read(item, index)
            if self.scanned and (index >= len(self.checksums) or _checksum(batch) != self.checksums[index]):
                raise UsageError(
                    f"{self.where}: expected the same batches on every pass, found batch {index} changed",
                    hint="turn off shuffling and random augmentation in the calibration data",
                )
            if split == "fit" and world_size > 1:
                times = wanted.get(position, 0)
                position += 1
                if times == 0:
                    continue
                if times > 1:
                    padding.append(batch)
            yield batch
        yield from padding


class DatasetBatches(IndexedBatches):
    """Samples of a map-style dataset, split by sample index and batched by a DataLoader per pass."""

    shard_holdout = False  # every rank measures on the whole holdout

    def __init__(
        self,
        dataset: Any,
        form: InputForm,
        *,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        num_workers: int = 0,
        holdout: float = HOLDOUT,
        seed: int = 0,
        shuffle: bool = True,
        description: str = "",
        where: str = "calibration data",
        scan: bool = True,
    ) -> None:
        check_holdout(holdout)
        if batch_size < 1:
            raise UsageError(f"--batch-size {batch_size}: expected a positive integer")
        try:
            samples = len(dataset)
        except TypeError:
            raise UsageError(f"{where}: expected a dataset with a length, found {type(dataset).__name__}") from None
        check_count(samples, holdout, where)
        self.dataset = dataset
        self.form = form
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle = shuffle
        self.where = where
        self.reading: Reading | None = None
        self.indices: dict[Split, list[int]] = dict(zip(("fit", "holdout"), holdout_indices(samples, holdout, seed)))
        if scan:
            for split in ("fit", "holdout"):
                for _ in self.batches_of(self.indices[split]):
                    pass
        else:
            next(self.batches_of(self.indices["fit"][: self.batch_size]))
        assert self.reading is not None
        self.description = f"{description or where}: {samples:,} samples, read as {self.reading.describe()}"

    def _loader(self, indices: list[int]) -> Iterable[Any]:
        from torch.utils.data import DataLoader, Subset

        return DataLoader(
            Subset(self.dataset, indices),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
        )

    def batches_of(self, indices: list[int]) -> Iterator[Batch]:
        for index, item in _guarded(iter(self._loader(indices)), self.where, "loading"):
            where = f"{self.where}, batch {index}"
            batch, self.reading = read_item(item, self.form, self.reading, where)
            yield check_batch(batch, self.form, where)
