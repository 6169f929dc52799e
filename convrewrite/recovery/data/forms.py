"""What the model takes, and reading one batch of calibration data in that form.

``InputForm`` describes the example input (positional and named tensors, shapes but dim 0,
dtypes); ``read_item`` decides how a batch is read (the input itself, or an ``(inputs, labels)``
pair), and ``check_batch`` checks a batch against the form (shapes, dtypes, NaN/Inf, and one run
through the original model when the shapes differ). See the package docstring, *Batch forms*.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from convrewrite.core.loading import ExampleInputs
from convrewrite.errors import UsageError, describe
from convrewrite.recovery.batches import (
    Batch,
)

# --------------------------------------------------------------------------- what the model takes


@dataclass(frozen=True)
class _Leaf:
    """One tensor of the example input: its readable path, per-sample shape and dtype."""

    path: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def shape_text(shape: Sequence[int], batch: str | int = "N") -> str:
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
        self.parameters, self.takes_any_keyword = forward_parameters(model)
        self.accepted_shapes: set[tuple[tuple[int, ...], ...]] = {self._signature(example.args, example.kwargs)}

    @staticmethod
    def _signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[int, ...], ...]:
        leaves, _ = tree_flatten((args, kwargs))
        return tuple(tuple(t.shape[1:]) for t in leaves if isinstance(t, torch.Tensor))

    def leaves(self) -> list[_Leaf]:
        return [_Leaf(path, tuple(t.shape[1:]), t.dtype) for path, t in self.example.tensors()]

    def describe(self) -> str:
        parts = [f"{leaf.path}: {shape_text(leaf.shape)} {_dtype_text(leaf.dtype)}" for leaf in self.leaves()]
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
                    return f"{name} {shape_text(value.shape[1:], value.shape[0] if value.dim() else 'N')}"
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


def forward_parameters(model: nn.Module | None) -> tuple[tuple[str, ...], bool]:
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


def sample_count(batch: Batch, where: str) -> int:
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


def found_text(item: Any) -> str:
    """What an item looks like, for messages: shapes and dtypes of its tensors."""
    if isinstance(item, torch.Tensor):
        return (
            f"{shape_text(item.shape[1:], item.shape[0]) if item.dim() else 'a 0-d tensor'} {_dtype_text(item.dtype)}"
        )
    if isinstance(item, dict):
        return "{" + ", ".join(f"{k}: {found_text(v)}" for k, v in item.items()) + "}"
    if isinstance(item, (tuple, list)):
        return "(" + ", ".join(found_text(v) for v in item) + ")"
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
        batch = Batch(batch.args, batch.kwargs, sample_count(batch, where))
        decided = reading or Reading(labelled, tuple(ignored))
        return batch, decided
    hint = "give the inputs in the form example_inputs() returns, or an (inputs, labels) pair"
    if reading is not None and reading.labelled:
        expected = f"an (inputs, labels) pair like the first batch, with inputs {form.describe()}"
    found = found_text(item) + (f" ({first_reason})" if first_reason else "")
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
                f"{shape_text(t.shape[1:], t.shape[0])} {_dtype_text(t.dtype)}"
                for t in leaves
                if isinstance(t, torch.Tensor)
            )
            raise UsageError(
                f"{where}: a batch that does not fit the model: expected {form.describe()}, found {found} "
                f"(the model raised {error})",
                hint="give samples shaped like the example input",
            )
    return form.cast(batch)
