"""Opening a ``--data`` SPEC (or a Python object) into a checked ``BatchSource``: which form the
SPEC takes (tensor file, ``file.py:function``, ``package.module:function``, image directory, or
the model file's ``calibration_data()``), and the function sources. See the package docstring.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from convrewrite.core.loading import ExampleInputs, LoadedModel
from convrewrite.errors import ModelError, UsageError, describe, first_line
from convrewrite.recovery.batches import (
    BatchSource,
)
from convrewrite.recovery.data.forms import InputForm, forward_parameters
from convrewrite.recovery.data.images import open_image_directory
from convrewrite.recovery.data.sources import DEFAULT_BATCH_SIZE, HOLDOUT, DatasetBatches, StreamBatches, check_holdout
from convrewrite.recovery.data.tensors import TENSOR_SUFFIXES, load_tensor_file, tensor_batches_from

SPEC_FORMS = (
    "a .pt/.pth/.safetensors/.npy/.npz file, file.py:function, package.module:function or a directory of images"
)


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
        return tensor_batches_from(
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
    holdout: float = HOLDOUT,
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
    check_holdout(holdout)
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
        content = load_tensor_file(path, where)
        return tensor_batches_from(
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
    holdout: float = HOLDOUT,
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
        names, _ = forward_parameters(model)
        example.arg_names = names
    form = InputForm(example, model)
    where = "calibration data"
    if isinstance(obj, tuple) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        return tensor_batches_from(
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
