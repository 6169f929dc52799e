"""A directory of PNG/JPEG images as calibration data: converted to the example's channels,
resized to cover and center-cropped to its height and width, scaled to [0, 1] and normalised
(or the model file's ``preprocess(image)``). Needs the ``images`` extra (Pillow).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from convrewrite.errors import ModelError, UsageError, describe, first_line
from convrewrite.recovery.data.forms import InputForm, shape_text
from convrewrite.recovery.data.sources import DEFAULT_BATCH_SIZE, HOLDOUT, DatasetBatches

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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
    holdout: float = HOLDOUT,
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
            f"{where}: expected an example input shaped N x C x H x W with C = 1 or 3, found {shape_text(leaf.shape)}",
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
