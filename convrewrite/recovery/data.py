"""Calibration data: open a ``--data`` SPEC (or a Python object) into a checked ``BatchSource``.

SPEC forms
----------
- a tensor file: ``.pt``/``.pth`` (read with ``torch.load(weights_only=True)`` only), ``.safetensors``,
  ``.npy``, ``.npz``. One tensor holds the samples along dim 0. Several named tensors are the
  forward's inputs by parameter name (tensors whose names are not parameters of ``forward``, such
  as ``labels``, are ignored and listed in the description). A ``.pt`` may also hold a tuple or
  list of tensors: the positional inputs.
- ``file.py:function`` or ``package.module:function``: a function taking no arguments. Returning a
  tensor or a dict of tensors gives all samples at once (like a tensor file). Returning a
  ``DataLoader`` over a map-style dataset splits its *samples* (by index) into fit and holdout and
  batches them with the loader's own ``collate_fn``. Returning any other iterable (a list, a
  generator, a ``DataLoader`` over an ``IterableDataset``) streams its *batches*: the function is
  called again for every pass, nothing is kept beyond the batch in hand, and the split is by batch
  index (see *Holdout*).
- nothing: a ``calibration_data()`` function in the model file, found like ``example_inputs()``,
  read like ``file.py:function``.
- a directory of PNG/JPEG images (searched recursively, sorted by path; needs the ``images`` extra,
  ``pip install 'convrewrite[images]'``). Each image is converted to the example input's channels
  (1: grey, 3: RGB), resized so that it covers the example's height and width, center-cropped to
  them, scaled to [0, 1] and normalised with ``mean``/``std`` when given. A ``preprocess(image)``
  function in the model file replaces all of that: it receives the PIL image and returns one
  sample tensor (a torchvision ``Compose`` works).

Batch forms
-----------
A batch is read the way ``example_inputs()`` is read: a tensor is the one positional input, a tuple
or list holds the positional inputs, a dict holds the inputs by parameter name (keys that are not
parameters of ``forward`` are dropped). **Labelled loaders:** a batch that does not have the
example input's form but is a pair (tuple or list of two) whose *first* element has it is an
``(inputs, labels)`` pair, and the second element is ignored. So for a model whose example input is
one tensor, ``(images, labels)`` from a labelled ``DataLoader`` is read as images plus ignored
labels; a model whose example input is two tensors of the right shapes reads the same pair as its
two inputs. The reading is decided on the first batch and must hold for every batch.

"Has the example input's form" means: as many positional inputs and the same named inputs, each
tensor with the example's shape except dim 0 and a dtype of the same kind (floating data is cast
to the example's floating dtype; integer data for a floating input is refused). A batch whose
shapes differ from the example's is run once through the original model (variable-sized inputs
work where the model accepts them); if that fails, it does not fit the model.

Checks
------
Before any work, every problem is one ``UsageError`` (exit 2) naming what was expected and what
was found: a missing or unreadable file, an empty set, too few samples to hold some out, the wrong
number of inputs, a shape, a dtype, NaN or Inf values, disagreeing sample counts, a batch that does
not fit the model. Tensor files are checked whole when opened. Streamed sources and datasets are
checked by one pass over the data when opened (``scan=True``, the default: it also counts the
samples) and every batch is checked again as it streams. Image directories have every file's
header read when opened (a decoding failure later names the file).

Holdout
-------
``holdout`` (default 0.1) of the data is never fitted on; every fidelity figure is measured on it.
Samples held in memory, datasets and image directories split by sample index
(``batches.holdout_indices``: a seeded permutation, ``ceil(holdout * count)`` held out). Streams
split by batch index without knowing the count up front: batch i is held out when
``ceil((i + 1) * holdout) > ceil(i * holdout)``, so batches 0, 10, 20, ... with the default 0.1.
A stream must give the same batches in the same order on every call (no shuffling, no random
augmentation): each batch's checksum from the opening scan is compared on every later pass.

Under ``torchrun`` each rank takes its shard of the fit split (``rank``/``world_size`` of
``BatchSource.batches``), all shards equally long.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from convrewrite.core.loading import ExampleInputs, LoadedModel
from convrewrite.errors import ModelError, UsageError, describe, first_line
from convrewrite.recovery.batches import (
    Batch,
    BatchSource,
    Split,
    TensorBatches,
    epoch_order,
    holdout_indices,
    shard,
)

TENSOR_SUFFIXES = (".pt", ".pth", ".safetensors", ".npy", ".npz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_BATCH_SIZE = 32
SPEC_FORMS = (
    "a .pt/.pth/.safetensors/.npy/.npz file, file.py:function, package.module:function or a directory of images"
)


# --------------------------------------------------------------------------- what the model takes


@dataclass(frozen=True)
class _Leaf:
    """One tensor of the example input: its readable path, per-sample shape and dtype."""

    path: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def _shape_text(shape: Sequence[int], batch: str | int = "N") -> str:
    return " x ".join([str(batch), *(str(d) for d in shape)])


def _dtype_text(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_floating_point:
        return "floating"
    if dtype.is_complex:
        return "complex"
    return "integer"


class InputForm:
    """The form of one forward call, read from the example input (and ``forward``'s signature).

    Everything a batch is compared with: positional inputs, named inputs, each tensor's shape
    except dim 0 and its dtype. ``model`` (the original model) settles batches whose shapes differ
    from the example's by running them once.
    """

    def __init__(self, example: ExampleInputs, model: nn.Module | None = None) -> None:
        self.example = example
        self.model = model
        self.arg_names = tuple(example.arg_names)
        self.parameters, self.takes_any_keyword = _forward_parameters(model)
        self.accepted_shapes: set[tuple[tuple[int, ...], ...]] = {self._signature(example.args, example.kwargs)}

    @staticmethod
    def _signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[int, ...], ...]:
        leaves, _ = tree_flatten((args, kwargs))
        return tuple(tuple(t.shape[1:]) for t in leaves if isinstance(t, torch.Tensor))

    def leaves(self) -> list[_Leaf]:
        return [_Leaf(path, tuple(t.shape[1:]), t.dtype) for path, t in self.example.tensors()]

    def describe(self) -> str:
        parts = [f"{leaf.path}: {_shape_text(leaf.shape)} {_dtype_text(leaf.dtype)}" for leaf in self.leaves()]
        return ", ".join(parts) if parts else "no tensors"

    def name_of(self, index: int) -> str:
        return self.arg_names[index] if index < len(self.arg_names) else f"arg{index}"

    def input_names(self) -> list[str]:
        return [self.name_of(i) for i in range(len(self.example.args))] + list(self.example.kwargs)

    def is_parameter(self, name: str) -> bool:
        if self.takes_any_keyword:
            return True
        if self.parameters:
            return name in self.parameters
        return name in self.input_names()

    def from_named(self, named: dict[str, Any]) -> tuple[Batch | None, list[str], list[str]]:
        """Map named values onto the example's layout: (batch or None, missing names, ignored names)."""
        wanted = self.input_names()
        missing = [name for name in wanted if name not in named]
        ignored = [name for name in named if name not in wanted and not self.is_parameter(name)]
        extra_parameters = [name for name in named if name not in wanted and self.is_parameter(name)]
        if missing:
            return None, missing, ignored
        positional = len(self.example.args)
        args = tuple(named[self.name_of(i)] for i in range(positional))
        kwargs = {key: named[key] for key in self.example.kwargs}
        kwargs.update({key: named[key] for key in extra_parameters})
        return Batch(args, kwargs, 0), [], ignored

    def mismatch(self, batch: Batch) -> str | None:
        """Why ``batch`` does not have this form (a short phrase), or None when it does."""
        if len(batch.args) != len(self.example.args):
            return f"{len(batch.args)} positional input(s)"
        if set(batch.kwargs) != set(self.example.kwargs):
            names = ", ".join(sorted(batch.kwargs)) or "none"
            return f"named inputs {names}"
        pairs = [(self.name_of(i), a, e) for i, (a, e) in enumerate(zip(batch.args, self.example.args))]
        pairs += [(key, batch.kwargs[key], value) for key, value in self.example.kwargs.items()]
        for name, given, expected in pairs:
            given_leaves, given_spec = tree_flatten(given)
            expected_leaves, expected_spec = tree_flatten(expected)
            if given_spec != expected_spec:
                return f"{name} shaped like {type(given).__name__}"
            for value, reference in zip(given_leaves, expected_leaves):
                if not isinstance(reference, torch.Tensor):
                    continue
                if not isinstance(value, torch.Tensor):
                    return f"{name} as {type(value).__name__}"
                if value.dim() != reference.dim():
                    return f"{name} {_shape_text(value.shape[1:], value.shape[0] if value.dim() else 'N')}"
                if _kind(value.dtype) != _kind(reference.dtype):
                    return f"{name} {_dtype_text(value.dtype)}"
        return None

    def shapes_differ(self, batch: Batch) -> bool:
        return self._signature(batch.args, batch.kwargs) not in self.accepted_shapes

    def runs(self, batch: Batch) -> str | None:
        """Run two samples of ``batch`` through the model: None when they run, else the error."""
        if self.model is None:
            return "no model to try it on"
        was_training = self.model.training
        self.model.eval()

        def head(value: Any) -> Any:
            return value[:2] if isinstance(value, torch.Tensor) and value.dim() else value

        try:
            with torch.no_grad():
                self.model(*tree_map(head, batch.args), **tree_map(head, batch.kwargs))
        except Exception as exc:
            return describe(exc)
        finally:
            self.model.train(was_training)
        self.accepted_shapes.add(self._signature(batch.args, batch.kwargs))
        return None

    def cast(self, batch: Batch) -> Batch:
        """Floating tensors in the example's floating dtype (e.g. NumPy's float64 to float32)."""
        targets = [leaf.dtype for leaf in self.leaves()]
        leaves, spec = tree_flatten((batch.args, batch.kwargs))
        index = 0
        converted = []
        for value in leaves:
            if isinstance(value, torch.Tensor):
                target = targets[index] if index < len(targets) else value.dtype
                index += 1
                if value.dtype.is_floating_point and target.is_floating_point and value.dtype != target:
                    value = value.to(target)
            converted.append(value)
        args, kwargs = tree_unflatten(converted, spec)
        return Batch(tuple(args), dict(kwargs), batch.size)


def _forward_parameters(model: nn.Module | None) -> tuple[tuple[str, ...], bool]:
    if model is None:
        return (), False
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return (), True
    names = tuple(p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    return names, any(p.kind == p.VAR_KEYWORD for p in parameters)


# --------------------------------------------------------------------------- reading one batch


@dataclass
class Reading:
    """How items of a source become batches: ``inputs`` or ``(inputs, labels)`` (labels ignored)."""

    labelled: bool = False
    ignored: tuple[str, ...] = ()

    def describe(self) -> str:
        text = "(inputs, labels) pairs, labels ignored" if self.labelled else "inputs"
        if self.ignored:
            text += f"; ignored: {', '.join(self.ignored)}"
        return text


def _sample_count(batch: Batch, where: str) -> int:
    leaves, _ = tree_flatten((batch.args, batch.kwargs))
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    if not tensors:
        raise UsageError(f"{where}: expected tensors, found none")
    if any(t.dim() == 0 for t in tensors):
        raise UsageError(f"{where}: expected samples along dim 0, found a 0-d tensor")
    counts = sorted({int(t.shape[0]) for t in tensors})
    if len(counts) > 1:
        raise UsageError(f"{where}: expected one number of samples (dim 0) in every tensor, found {counts}")
    return counts[0]


def _plain(item: Any, form: InputForm) -> tuple[Batch | None, list[str], str]:
    """``item`` read as the inputs themselves: (batch or None, ignored names, why not)."""
    if isinstance(item, Batch):
        return item, [], ""
    if isinstance(item, torch.Tensor):
        return Batch((item,), {}, 0), [], ""
    if isinstance(item, dict):
        batch, missing, ignored = form.from_named(dict(item))
        if batch is None:
            return None, ignored, f"no {', '.join(missing)} among keys {', '.join(map(str, item))}"
        return batch, ignored, ""
    if isinstance(item, (tuple, list)):
        return Batch(tuple(item), {}, 0), [], ""
    return None, [], f"a {type(item).__name__}"


def _found_text(item: Any) -> str:
    """What an item looks like, for messages: shapes and dtypes of its tensors."""
    if isinstance(item, torch.Tensor):
        return (
            f"{_shape_text(item.shape[1:], item.shape[0]) if item.dim() else 'a 0-d tensor'} {_dtype_text(item.dtype)}"
        )
    if isinstance(item, dict):
        return "{" + ", ".join(f"{k}: {_found_text(v)}" for k, v in item.items()) + "}"
    if isinstance(item, (tuple, list)):
        return "(" + ", ".join(_found_text(v) for v in item) + ")"
    return type(item).__name__


def read_item(item: Any, form: InputForm, reading: Reading | None, where: str) -> tuple[Batch, Reading]:
    """One item of a source as a checked batch; decides the reading when ``reading`` is None."""
    expected = f"inputs {form.describe()}"
    candidates: list[tuple[bool, Any]] = []
    if reading is None or not reading.labelled:
        candidates.append((False, item))
    if (reading is None or reading.labelled) and isinstance(item, (tuple, list)) and len(item) == 2:
        candidates.append((True, item[0]))
    first_reason = ""
    for labelled, value in candidates:
        batch, ignored, why = _plain(value, form)
        if batch is None:
            first_reason = first_reason or why
            continue
        reason = form.mismatch(batch)
        if reason is not None:
            first_reason = first_reason or reason
            continue
        batch = Batch(batch.args, batch.kwargs, _sample_count(batch, where))
        decided = reading or Reading(labelled, tuple(ignored))
        return batch, decided
    hint = "give the inputs in the form example_inputs() returns, or an (inputs, labels) pair"
    if reading is not None and reading.labelled:
        expected = f"an (inputs, labels) pair like the first batch, with inputs {form.describe()}"
    found = _found_text(item) + (f" ({first_reason})" if first_reason else "")
    raise UsageError(f"{where}: expected {expected}, found {found}", hint=hint)


def check_batch(batch: Batch, form: InputForm, where: str, offset: int | None = None) -> Batch:
    """Finite values, shapes that fit the model, floating data in the example's dtype.

    ``offset``: the index of the batch's first sample in the whole set, for messages.
    """
    leaves, _ = tree_flatten((batch.args, batch.kwargs))
    paths = [leaf.path for leaf in form.leaves()]
    for index, value in enumerate(leaves):
        if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.is_complex()):
            continue
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            nan = int(torch.isnan(value).sum())
            inf = int(torch.isinf(value).sum())
            bad_sample = int((~finite).reshape(value.shape[0], -1).any(dim=1).nonzero()[0, 0])
            name = paths[index] if index < len(paths) else f"tensor {index}"
            sample = f"sample {bad_sample + offset}" if offset is not None else f"sample {bad_sample} of the batch"
            raise UsageError(
                f"{where}: expected finite values, found {nan:,} NaN and {inf:,} Inf in {name} (first in {sample})",
                hint="clean the data before calibrating",
            )
    if form.shapes_differ(batch):
        error = form.runs(batch)
        if error is not None:
            found = ", ".join(
                f"{_shape_text(t.shape[1:], t.shape[0])} {_dtype_text(t.dtype)}"
                for t in leaves
                if isinstance(t, torch.Tensor)
            )
            raise UsageError(
                f"{where}: a batch that does not fit the model: expected {form.describe()}, found {found} "
                f"(the model raised {error})",
                hint="give samples shaped like the example input",
            )
    return form.cast(batch)


# --------------------------------------------------------------------------- sources


def _check_holdout(holdout: float) -> None:
    if not 0.0 <= holdout < 1.0:
        raise UsageError(f"--holdout {holdout}: expected a fraction in [0, 1)", hint="e.g. --holdout 0.1")


def _check_count(count: int, holdout: float, where: str, unit: str = "sample") -> None:
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
        holdout: float = 0.1,
        description: str = "",
        where: str = "calibration data",
        scan: bool = True,
    ) -> None:
        _check_holdout(holdout)
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
        _check_count(len(sizes), self.holdout, self.where, "batch")
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


class DatasetBatches:
    """Samples of a map-style dataset, split by sample index and batched by a DataLoader per pass."""

    def __init__(
        self,
        dataset: Any,
        form: InputForm,
        *,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        num_workers: int = 0,
        holdout: float = 0.1,
        seed: int = 0,
        shuffle: bool = True,
        description: str = "",
        where: str = "calibration data",
        scan: bool = True,
    ) -> None:
        _check_holdout(holdout)
        if batch_size < 1:
            raise UsageError(f"--batch-size {batch_size}: expected a positive integer")
        try:
            samples = len(dataset)
        except TypeError:
            raise UsageError(f"{where}: expected a dataset with a length, found {type(dataset).__name__}") from None
        _check_count(samples, holdout, where)
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
                for _ in self._batches(self.indices[split]):
                    pass
        else:
            next(self._batches(self.indices["fit"][: self.batch_size]))
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

    def _batches(self, indices: list[int]) -> Iterator[Batch]:
        for index, item in _guarded(iter(self._loader(indices)), self.where, "loading"):
            where = f"{self.where}, batch {index}"
            batch, self.reading = read_item(item, self.form, self.reading, where)
            yield check_batch(batch, self.form, where)

    def count(self, split: Split) -> int | None:
        return len(self.indices[split])

    def batches(self, split: Split, *, rank: int = 0, world_size: int = 1, epoch: int = 0) -> Iterator[Batch]:
        indices = self.indices[split]
        if split == "fit" and self.shuffle:
            indices = epoch_order(indices, self.seed, epoch)
        yield from self._batches(shard(indices, rank, world_size) if split == "fit" else indices)


# --------------------------------------------------------------------------- images


class ImageFiles:
    """A map-style dataset of image files, each read into one sample shaped like the example input."""

    def __init__(
        self,
        files: list[Path],
        channels: int,
        size: tuple[int, int],
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        preprocess: Callable[[Any], Any] | None,
        expected: tuple[int, ...],
        dtype: torch.dtype,
    ) -> None:
        self.files = files
        self.channels = channels
        self.size = size
        self.mean = None if mean is None else torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        self.preprocess = preprocess
        self.expected = expected
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        path = self.files[index]
        try:
            with Image.open(path) as image:
                image.load()
                picture = image.convert("L" if self.channels == 1 else "RGB") if self.preprocess is None else image
                if self.preprocess is not None:
                    sample = self._preprocessed(picture.copy(), path)
                else:
                    sample = self._resized(picture)
        except UsageError:
            raise
        except Exception as exc:
            raise UsageError(f"calibration image {path}: expected a readable image, found {describe(exc)}") from exc
        return sample.to(self.dtype)

    def _preprocessed(self, image: Any, path: Path) -> torch.Tensor:
        try:
            sample = self.preprocess(image) if self.preprocess is not None else image
        except Exception as exc:
            raise ModelError(f"preprocess() raised {describe(exc)} on {path}") from exc
        if not isinstance(sample, torch.Tensor):
            raise UsageError(f"preprocess() on {path}: expected a tensor, found {type(sample).__name__}")
        if tuple(sample.shape) != self.expected:
            raise UsageError(
                f"preprocess() on {path}: expected a sample shaped {' x '.join(map(str, self.expected))} "
                f"(the example input without its batch dim), found {' x '.join(map(str, sample.shape))}"
            )
        return sample

    def _resized(self, image: Any) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        height, width = self.size
        scale = max(height / image.height, width / image.width)
        resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(resized, Image.Resampling.BILINEAR)
        left = (resized[0] - width) // 2
        top = (resized[1] - height) // 2
        image = image.crop((left, top, left + width, top + height))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
        sample = (pixels.unsqueeze(0) if pixels.dim() == 2 else pixels.permute(2, 0, 1)).to(torch.float32) / 255.0
        if self.mean is not None:
            sample = sample - self.mean
        if self.std is not None:
            sample = sample / self.std
        return sample


def _stack(samples: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(samples)


def _parse_floats(value: str | float | Sequence[float] | None, name: str, channels: int) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            numbers = [float(part) for part in value.replace(" ", "").split(",") if part]
        except ValueError:
            raise UsageError(f"--{name} {value!r}: expected numbers separated by commas") from None
    elif isinstance(value, (int, float)):
        numbers = [float(value)]
    else:
        numbers = [float(v) for v in value]
    if len(numbers) == 1:
        numbers = numbers * channels
    if len(numbers) != channels:
        raise UsageError(f"--{name}: expected 1 or {channels} values (one per channel), found {len(numbers)}")
    if name == "std" and any(n == 0 for n in numbers):
        raise UsageError("--std: expected non-zero values, found 0")
    return numbers


def image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def open_image_directory(
    directory: Path,
    form: InputForm,
    *,
    mean: str | float | Sequence[float] | None = None,
    std: str | float | Sequence[float] | None = None,
    preprocess: Callable[[Any], Any] | None = None,
    holdout: float = 0.1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    num_workers: int = 0,
) -> DatasetBatches:
    """A directory of PNG/JPEG images as calibration data (every header read before any work)."""
    try:
        from PIL import Image
    except ImportError:
        raise UsageError(
            f"--data {directory}: reading images needs Pillow, which is not installed",
            hint="pip install 'convrewrite[images]'",
        ) from None
    where = f"--data {directory}"
    leaves = form.leaves()
    if len(leaves) != 1 or len(form.example.args) != 1 or form.example.kwargs:
        raise UsageError(
            f"{where}: a directory of images needs a model that takes one image tensor; its example input is "
            f"{form.describe()}"
        )
    leaf = leaves[0]
    if preprocess is None and (len(leaf.shape) != 3 or leaf.shape[0] not in (1, 3)):
        raise UsageError(
            f"{where}: expected an example input shaped N x C x H x W with C = 1 or 3, found {_shape_text(leaf.shape)}",
            hint="define preprocess(image) in the model file to turn an image into one sample",
        )
    if preprocess is not None and (mean is not None or std is not None):
        raise UsageError(f"{where}: expected either --mean/--std or a preprocess() function, found both")
    files = image_files(directory)
    if not files:
        raise UsageError(f"{where}: expected PNG or JPEG images, found none", hint="check the directory")
    for path in files:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as exc:
            raise UsageError(f"{where}: expected readable images, found {path} ({first_line(exc)})") from exc
    channels = leaf.shape[0] if leaf.shape else 1
    size = (leaf.shape[-2], leaf.shape[-1]) if len(leaf.shape) >= 2 else (1, 1)
    dataset = ImageFiles(
        files,
        channels,
        size,
        _parse_floats(mean, "mean", channels),
        _parse_floats(std, "std", channels),
        preprocess,
        leaf.shape,
        leaf.dtype if leaf.dtype.is_floating_point else torch.float32,
    )
    how = "preprocess()" if preprocess is not None else f"resized and center-cropped to {size[0]}x{size[1]}"
    return DatasetBatches(
        dataset,
        form,
        collate_fn=_stack,
        batch_size=batch_size,
        num_workers=num_workers,
        holdout=holdout,
        seed=seed,
        description=f"{directory}: {len(files):,} images, {how}",
        where=where,
        scan=preprocess is not None,
    )


# --------------------------------------------------------------------------- tensor files


def _load_tensor_file(path: Path, where: str) -> Any:
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UsageError(
                f"{where}: expected tensors readable with torch.load(weights_only=True), found {first_line(exc)}",
                hint="save plain tensors (torch.save(tensor)) or use .safetensors/.npy",
            ) from exc
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UsageError(f"{where}: expected a safetensors file, found {first_line(exc)}") from exc
    import numpy as np

    try:
        loaded = np.load(str(path), allow_pickle=False)
    except ValueError as exc:
        raise UsageError(
            f"{where}: expected numeric arrays, found {first_line(exc)}", hint="save arrays without Python objects"
        ) from exc
    except OSError as exc:
        raise UsageError(f"{where}: expected a NumPy file, found {first_line(exc)}") from exc
    if suffix == ".npz":
        with loaded:
            return {name: _from_numpy(loaded[name], f"{where}[{name}]") for name in loaded.files}
    return _from_numpy(loaded, where)


def _from_numpy(array: Any, where: str) -> torch.Tensor:
    try:
        return torch.from_numpy(array.copy())
    except TypeError:
        raise UsageError(f"{where}: expected a numeric array, found dtype {array.dtype}") from None


def _tensor_batches_from(
    content: Any,
    form: InputForm,
    *,
    where: str,
    holdout: float,
    batch_size: int,
    seed: int,
    description: str,
) -> TensorBatches:
    """All samples held as tensors (a tensor file, or a function returning tensors) as a source."""
    _check_holdout(holdout)
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: expected a positive integer")
    ignored: list[str] = []
    if isinstance(content, torch.Tensor):
        batch = Batch((content,), {}, 0)
    elif isinstance(content, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in content):
        batch = Batch(tuple(content), {}, 0)
    elif isinstance(content, dict) and all(isinstance(t, torch.Tensor) for t in content.values()):
        named = {str(k): v for k, v in content.items()}
        if len(named) == 1 and len(form.input_names()) == 1:
            batch = Batch((next(iter(named.values())),), {}, 0)
        else:
            mapped, missing, ignored = form.from_named(named)
            if mapped is None:
                raise UsageError(
                    f"{where}: expected tensors named {', '.join(form.input_names())} (the forward's parameters), "
                    f"found {', '.join(named) or 'none'}"
                )
            batch = mapped
    else:
        raise UsageError(f"{where}: expected a tensor or named tensors, found {type(content).__name__}")
    reason = form.mismatch(batch)
    if reason is not None:
        given = [*batch.args, *batch.kwargs.values()]
        found = _found_text(given[0]) if len(given) == 1 else _found_text(given)
        raise UsageError(f"{where}: expected inputs {form.describe()}, found {found}")
    count = _sample_count(batch, where)
    _check_count(count, holdout, where)
    # Checked in slices: a whole-set float64 copy is what a big file must not cost twice.
    for start in range(0, count, 4096):
        window = slice(start, start + 4096)

        def part_of(value: Any, window: slice = window) -> Any:
            return value[window] if isinstance(value, torch.Tensor) else value

        part = Batch(tree_map(part_of, batch.args), tree_map(part_of, batch.kwargs), 0)
        check_batch(part, form, where, offset=start)
    batch = form.cast(batch)
    if any(not isinstance(a, torch.Tensor) for a in batch.args) or any(
        not isinstance(v, torch.Tensor) for v in batch.kwargs.values()
    ):
        raise UsageError(f"{where}: expected one tensor per input, found nested inputs")
    source = TensorBatches(
        tuple(batch.args),
        dict(batch.kwargs),
        batch_size=batch_size,
        holdout=holdout,
        seed=seed,
        description=description,
    )
    fit, held = source.count("fit"), source.count("holdout")
    note = f"; ignored: {', '.join(ignored)}" if ignored else ""
    source.description = f"{description}: {count:,} samples ({fit:,} fit, {held:,} held out){note}"
    return source


# --------------------------------------------------------------------------- functions


@contextlib.contextmanager
def _on_path(directory: Path | None) -> Iterator[None]:
    """``directory`` first on ``sys.path`` while user code runs; modules it imports stay loaded.

    Unlike a full ``sys.modules`` restore, installed libraries imported on the way stay imported
    (importing torchvision twice re-registers its operators and fails).
    """
    if directory is None:
        yield
        return
    entry = str(directory)
    sys.path.insert(0, entry)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _import_data_file(path: Path, where: str) -> ModuleType:
    name = f"convrewrite_data_{abs(hash(str(path.resolve()))):x}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"{where}: expected a Python source file, found {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        with _on_path(path.parent.resolve()):
            spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise ModelError(f"{where}: syntax error in {path.name}:{exc.lineno}: {exc.msg}") from exc
    except Exception as exc:
        raise ModelError(f"{where}: importing {path.name} raised {describe(exc)}") from exc
    return module


def resolve_function(spec: str) -> tuple[Callable[[], Any], Path | None]:
    """``file.py:function`` or ``package.module:function`` to the function and its directory."""
    from convrewrite.core.loading import split_spec

    where = f"--data {spec}"
    target, name = split_spec(spec)
    if name is None:
        raise UsageError(f"{where}: expected {SPEC_FORMS}, found neither a file nor MODULE:FUNCTION")
    directory: Path | None
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise UsageError(f"{where}: expected a Python file, found no file {target}")
        module = _import_data_file(path, where)
        directory = path.parent.resolve()
    else:
        try:
            with _on_path(Path.cwd()):
                module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise UsageError(f"{where}: expected an importable module, found {first_line(exc)}") from exc
        except Exception as exc:
            raise ModelError(f"{where}: importing {target} raised {describe(exc)}") from exc
        directory = None
    function = getattr(module, name, None)
    if function is None:
        raise UsageError(f"{where}: expected a function {name} in {target}, found none")
    if not callable(function):
        raise UsageError(f"{where}: expected {name} to be a function, found {type(function).__name__}")
    return function, directory


def model_function(loaded: LoadedModel | None, name: str) -> Callable[..., Any] | None:
    """A function the model file defines (``calibration_data``, ``preprocess``, ``evaluate``)."""
    module = loaded.user_module if loaded is not None else None
    function = getattr(module, name, None) if module is not None else None
    return function if callable(function) else None


def _is_map_style_loader(value: Any) -> bool:
    from torch.utils.data import DataLoader, IterableDataset

    if not isinstance(value, DataLoader):
        return False
    dataset = value.dataset
    return not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__")


def _source_from_value(
    value: Any,
    opener: Callable[[], Any] | None,
    form: InputForm,
    *,
    where: str,
    holdout: float,
    batch_size: int | None,
    seed: int,
    description: str,
    scan: bool,
) -> BatchSource:
    """A source for whatever a data function (or the Python API) gave."""
    if isinstance(value, torch.Tensor) or (
        isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values())
    ):
        return _tensor_batches_from(
            value,
            form,
            where=where,
            holdout=holdout,
            batch_size=batch_size or DEFAULT_BATCH_SIZE,
            seed=seed,
            description=description,
        )
    if _is_map_style_loader(value):
        return DatasetBatches(
            value.dataset,
            form,
            collate_fn=value.collate_fn,
            batch_size=batch_size or value.batch_size or DEFAULT_BATCH_SIZE,
            num_workers=value.num_workers,
            holdout=holdout,
            seed=seed,
            description=description,
            where=where,
            scan=scan,
        )
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise UsageError(f"{where}: expected an iterable of batches (a DataLoader works), found {type(value).__name__}")
    if opener is None:
        if iter(value) is value:
            raise UsageError(
                f"{where}: expected data that can be read again for every pass, found a one-shot "
                f"{type(value).__name__}",
                hint="pass a list, a DataLoader, or a function that returns a new generator",
            )
        opener = lambda: value  # noqa: E731  (a re-iterable object: every pass iterates it again)
    # A stream keeps its own batches: ``batch_size`` is the producer's business there.
    first = [value]

    def reopen() -> Any:
        # The value already produced serves the opening read; later passes call the function again.
        return first.pop() if first else opener()

    return StreamBatches(reopen, form, holdout=holdout, description=description, where=where, scan=scan)


def open_calibration_data(
    spec: str | None,
    loaded: LoadedModel,
    *,
    holdout: float = 0.1,
    batch_size: int | None = None,
    seed: int = 0,
    mean: str | float | Sequence[float] | None = None,
    std: str | float | Sequence[float] | None = None,
    scan: bool = True,
    num_workers: int = 0,
) -> BatchSource | None:
    """Open ``--data SPEC`` for ``loaded`` (checked; None when there is no SPEC and no
    ``calibration_data()`` in the model file).

    Call it before the model is rewritten: a batch whose shapes differ from the example input's
    is tried once on ``loaded.model``. ``batch_size`` applies to tensors, datasets and images (a
    stream keeps its own batches; a DataLoader keeps its own unless given).
    """
    _check_holdout(holdout)
    form = InputForm(loaded.inputs, loaded.model)
    if spec is None or not spec.strip():
        function = model_function(loaded, "calibration_data")
        if function is None:
            return None
        where = f"calibration_data() in {loaded.source_file.name if loaded.source_file else loaded.display_name}"
        return _from_function(function, None, form, where, holdout, batch_size, seed, scan)
    spec = spec.strip()
    path = Path(spec)
    where = f"--data {spec}"
    if path.is_dir():
        return open_image_directory(
            path,
            form,
            mean=mean,
            std=std,
            preprocess=model_function(loaded, "preprocess"),
            holdout=holdout,
            batch_size=batch_size or DEFAULT_BATCH_SIZE,
            seed=seed,
            num_workers=num_workers,
        )
    if path.suffix.lower() in TENSOR_SUFFIXES:
        if not path.is_file():
            raise UsageError(f"{where}: expected a tensor file, found no file {spec}", hint="check the path")
        content = _load_tensor_file(path, where)
        return _tensor_batches_from(
            content,
            form,
            where=where,
            holdout=holdout,
            batch_size=batch_size or DEFAULT_BATCH_SIZE,
            seed=seed,
            description=path.name,
        )
    if ":" in spec and not path.exists():
        function, directory = resolve_function(spec)
        return _from_function(function, directory, form, where, holdout, batch_size, seed, scan)
    if path.exists():
        raise UsageError(f"{where}: expected {SPEC_FORMS}, found a {path.suffix or 'file'} file")
    raise UsageError(f"{where}: expected {SPEC_FORMS}, found nothing at that path")


def _from_function(
    function: Callable[[], Any],
    directory: Path | None,
    form: InputForm,
    where: str,
    holdout: float,
    batch_size: int | None,
    seed: int,
    scan: bool,
) -> BatchSource:
    def call() -> Any:
        try:
            with _on_path(directory):
                return function()
        except (UsageError, ModelError):
            raise
        except Exception as exc:
            raise ModelError(f"{where}: the data function raised {describe(exc)}") from exc

    return _source_from_value(
        call(),
        call,
        form,
        where=where,
        holdout=holdout,
        batch_size=batch_size,
        seed=seed,
        description=where.removeprefix("--data "),
        scan=scan,
    )


def calibration_data_from(
    obj: Any,
    *,
    example: ExampleInputs | LoadedModel,
    model: nn.Module | None = None,
    holdout: float = 0.1,
    batch_size: int | None = None,
    seed: int = 0,
    scan: bool = True,
) -> BatchSource:
    """Calibration data for the Python API, checked like ``--data``.

    ``obj``: a tensor (samples along dim 0), a tuple of tensors (positional inputs), a dict of
    tensors (inputs by parameter name), a DataLoader, a re-iterable of batches (a list), or a
    function of no arguments that returns any of these (called again for every pass of a stream).
    ``example`` is the example input (or the LoadedModel that carries it and the model).
    """
    if isinstance(example, LoadedModel):
        model = model if model is not None else example.model
        example = example.inputs
    if not example.arg_names and model is not None:
        names, _ = _forward_parameters(model)
        example.arg_names = names
    form = InputForm(example, model)
    where = "calibration data"
    if isinstance(obj, tuple) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        return _tensor_batches_from(
            obj,
            form,
            where=where,
            holdout=holdout,
            batch_size=batch_size or DEFAULT_BATCH_SIZE,
            seed=seed,
            description="tensors",
        )
    if callable(obj) and not isinstance(obj, (nn.Module, torch.Tensor)) and not isinstance(obj, Iterable):
        function = obj
        return _from_function(function, None, form, where, holdout, batch_size, seed, scan)
    return _source_from_value(
        obj,
        None,
        form,
        where=where,
        holdout=holdout,
        batch_size=batch_size,
        seed=seed,
        description=type(obj).__name__ if not isinstance(obj, torch.Tensor) else "tensor",
        scan=scan,
    )


__all__ = [
    "DatasetBatches",
    "ImageFiles",
    "InputForm",
    "Reading",
    "StreamBatches",
    "calibration_data_from",
    "image_files",
    "model_function",
    "open_calibration_data",
    "open_image_directory",
    "read_item",
    "stream_is_held_out",
]
