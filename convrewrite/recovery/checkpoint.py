"""Resumable distillation checkpoints: safetensors for tensors, a small JSON for everything else.

A checkpoint directory holds ``checkpoint.json`` and one ``state-<step>.safetensors``. The JSON
names the tensor file and carries its SHA-256, so the pair is consistent at every instant: the
tensor file is written first (temporary file, ``os.replace``, read back), then the JSON the same
way, and only then are older tensor files removed. A crash between the two renames leaves the
previous JSON pointing at the previous, still present, tensor file.

Nothing is unpickled to resume: tensors come from safetensors, the rest is JSON (optimizer
scalars, the data cursor, the history, the configuration).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from convrewrite.errors import UsageError
from convrewrite.export.writer import write_file_atomic

SCHEMA = "convrewrite.distill-checkpoint/1"
INDEX_NAME = "checkpoint.json"

# Tensor name prefixes inside the safetensors file.
_STUDENT = "student/"
_BEST = "best/"
_OPTIMIZER = "optimizer/"
_RNG = "rng/"


@dataclass
class CheckpointState:
    """Everything a distillation needs to continue exactly where it stopped."""

    step: int
    epoch: int
    position: int
    student: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None
    optimizer_state: dict[int, dict[str, Any]]
    rng: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    # safetensors refuses tensors that share storage (tied weights): every entry gets its own copy.
    return tensor.detach().to("cpu", copy=True).contiguous()


def save_checkpoint(directory: Path, state: CheckpointState) -> Path:
    """Write ``state`` into ``directory`` atomically; returns the path of ``checkpoint.json``."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.student.items():
        tensors[_STUDENT + key] = _cpu(value)
    if state.best is not None:
        for key, value in state.best.items():
            tensors[_BEST + key] = _cpu(value)
    scalars: dict[str, dict[str, Any]] = {}
    for parameter_index, entries in state.optimizer_state.items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPTIMIZER}{parameter_index}/{name}"] = _cpu(value)
            else:
                scalars.setdefault(str(parameter_index), {})[name] = value
    for name, value in state.rng.items():
        tensors[_RNG + name] = _cpu(value)

    data = save(tensors, metadata={"format": "pt", "schema": SCHEMA, "step": str(state.step)})
    tensor_name = f"state-{state.step:08d}.safetensors"
    write_file_atomic(directory / tensor_name, data)
    index: dict[str, Any] = {
        "schema": SCHEMA,
        "step": state.step,
        "epoch": state.epoch,
        "position": state.position,
        "tensors": tensor_name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "has_best": state.best is not None,
        "optimizer_scalars": scalars,
        **state.info,
    }
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    write_file_atomic(directory / INDEX_NAME, text.encode())
    for stale in directory.glob("state-*.safetensors"):
        if stale.name != tensor_name:
            stale.unlink(missing_ok=True)
    return directory / INDEX_NAME


def has_checkpoint(directory: Path | None) -> bool:
    return directory is not None and (Path(directory) / INDEX_NAME).is_file()


def load_checkpoint(directory: Path) -> CheckpointState:
    """Read a checkpoint written by :func:`save_checkpoint`; a damaged one is a usage error."""
    from safetensors.torch import load

    directory = Path(directory)
    index_path = directory / INDEX_NAME
    start_over = f"delete {directory} to start over"
    if not index_path.is_file():
        raise UsageError(f"{directory} holds no distillation checkpoint ({INDEX_NAME} is missing)")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{index_path} is not readable JSON ({exc})", hint=start_over) from None
    if not isinstance(index, dict) or index.get("schema") != SCHEMA:
        raise UsageError(f"{index_path} is not a convrewrite distillation checkpoint ({SCHEMA})", hint=start_over)
    tensor_path = directory / str(index.get("tensors", ""))
    if not tensor_path.is_file():
        raise UsageError(f"{index_path} names {tensor_path.name}, which is missing", hint=start_over)
    data = tensor_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != index.get("sha256"):
        raise UsageError(f"{tensor_path} does not match the digest in {INDEX_NAME}", hint=start_over)
    tensors = load(data)

    student: dict[str, torch.Tensor] = {}
    best: dict[str, torch.Tensor] = {}
    optimizer_state: dict[int, dict[str, Any]] = {}
    rng: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.startswith(_STUDENT):
            student[key[len(_STUDENT) :]] = value
        elif key.startswith(_BEST):
            best[key[len(_BEST) :]] = value
        elif key.startswith(_OPTIMIZER):
            index_text, name = key[len(_OPTIMIZER) :].split("/", 1)
            optimizer_state.setdefault(int(index_text), {})[name] = value
        elif key.startswith(_RNG):
            rng[key[len(_RNG) :]] = value
    for index_text, entries in dict(index.get("optimizer_scalars", {})).items():
        optimizer_state.setdefault(int(index_text), {}).update(entries)
    reserved = {"schema", "step", "epoch", "position", "tensors", "sha256", "has_best", "optimizer_scalars"}
    return CheckpointState(
        step=int(index["step"]),
        epoch=int(index["epoch"]),
        position=int(index["position"]),
        student=student,
        best=best if index.get("has_best") else None,
        optimizer_state=optimizer_state,
        rng=rng,
        info={k: v for k, v in index.items() if k not in reserved},
    )
