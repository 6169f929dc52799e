"""Tensor files as calibration data: ``.pt``/``.pth`` (``torch.load(weights_only=True)`` only),
``.safetensors``, ``.npy`` and ``.npz``, checked whole when opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_map

from convrewrite.errors import UsageError, first_line
from convrewrite.recovery.batches import (
    Batch,
    TensorBatches,
)
from convrewrite.recovery.data.forms import InputForm, check_batch, found_text, sample_count
from convrewrite.recovery.data.sources import check_count, check_holdout

TENSOR_SUFFIXES = (".pt", ".pth", ".safetensors", ".npy", ".npz")


def load_tensor_file(path: Path, where: str) -> Any:
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


def tensor_batches_from(
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
    check_holdout(holdout)
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
        found = found_text(given[0]) if len(given) == 1 else found_text(given)
        raise UsageError(f"{where}: expected inputs {form.describe()}, found {found}")
    count = sample_count(batch, where)
    check_count(count, holdout, where)
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
