"""Fitted weights that outlive a failed write, and the ``apply --fitted-weights`` that continues.

``apply`` checks its export before fitting (stage ``export-check``), so a structure that cannot be
written fails in seconds. Whatever still fails later (the disk fills, the reload check after
fitting, an exporter's own bug) must not throw the fitting away: ``write_or_keep_fitted`` then
saves the fitted model's tensors beside the output directory, in
``OUT.fitted-checkpoint/`` (``fitted.safetensors`` and ``fitted.json``, written atomically), and
the error says which command continues. Run again with ``--fitted-weights`` naming that
directory, ``apply`` rewrites as before and the ``fit`` stage loads these tensors instead of
fitting (they must match the rewritten model name for name, shape for shape).

Nothing is unpickled: tensors come from safetensors, the rest is JSON.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convrewrite.errors import ConvRewriteError, ModelError, UsageError, describe
from convrewrite.export.writer import write_file_atomic

SCHEMA = "convrewrite.fitted-weights/1"
INDEX_NAME = "fitted.json"
TENSORS_NAME = "fitted.safetensors"


def fitted_checkpoint_dir(out: Path) -> Path:
    """Where a failed ``apply --out OUT`` keeps its fitted weights: ``OUT.fitted-checkpoint``."""
    out = Path(out)
    return out.parent / f"{out.name}.fitted-checkpoint"


def save_fitted(directory: Path, model: nn.Module, rules: list[str]) -> Path:
    """Write ``model``'s state (parameters and buffers) into ``directory``; returns the directory."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share storage (tied weights): every entry gets its own copy.
    state = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in model.state_dict().items()}
    data = save(state)
    write_file_atomic(directory / TENSORS_NAME, data)
    index = {
        "schema": SCHEMA,
        "tensors": TENSORS_NAME,
        "sha256": hashlib.sha256(data).hexdigest(),
        "rules": list(rules),
        "model_class": type(model).__name__,
    }
    write_file_atomic(directory / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
    return directory


def load_fitted(directory: Path, model: nn.Module) -> int:
    """Load the tensors kept in ``directory`` into the rewritten ``model``; returns how many.

    A directory that is not such a checkpoint, a damaged file or tensors that do not match the
    rewritten model (another model, other rules) are usage errors: nothing is loaded.
    """
    from safetensors.torch import load

    directory = Path(directory)
    index_path = directory / INDEX_NAME
    if not index_path.is_file():
        raise UsageError(
            f"--fitted-weights {directory}: no {INDEX_NAME} there",
            hint="give the OUT.fitted-checkpoint directory a failed apply printed",
        )
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--fitted-weights {directory}: {INDEX_NAME} does not read: {describe(exc)}") from exc
    if not isinstance(index, dict) or index.get("schema") != SCHEMA:
        raise UsageError(f"--fitted-weights {directory}: {INDEX_NAME} is not a {SCHEMA} file")
    data = (directory / str(index.get("tensors", TENSORS_NAME))).read_bytes()
    if hashlib.sha256(data).hexdigest() != index.get("sha256"):
        raise UsageError(f"--fitted-weights {directory}: {TENSORS_NAME} does not match its checksum (damaged)")
    tensors = load(data)
    state = model.state_dict()
    missing = sorted(set(state) - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    wrong = sorted(k for k in set(state) & set(tensors) if tuple(state[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        detail = (missing and f"missing {missing[0]}") or (unexpected and f"unexpected {unexpected[0]}") or ""
        detail = detail or f"{wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, not {tuple(state[wrong[0]].shape)}"
        raise UsageError(
            f"--fitted-weights {directory} does not fit the rewritten model ({detail})",
            hint=f"it was kept for the rules {' then '.join(index.get('rules', [])) or '?'}; run with the same "
            "model, weights and rules",
        )
    with torch.no_grad():
        for name, tensor in state.items():
            tensor.copy_(tensors[name].to(dtype=tensor.dtype, device=tensor.device))
    return len(state)


def continue_command(out: Path, checkpoint: Path, argv: list[str] | None = None) -> str:
    """The command that continues: this ``apply`` again, with ``--fitted-weights CHECKPOINT``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["apply"]:
        where = f"--out {shlex.quote(str(out))} --fitted-weights {shlex.quote(str(checkpoint))}"
        return f"the same convrewrite apply command with {where}"
    cleaned: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--fitted-weights":
            skip = True
            continue
        if item.startswith("--fitted-weights="):
            continue
        cleaned.append(item)
    return shlex.join(["convrewrite", *cleaned, "--fitted-weights", str(checkpoint)])


def fitted(result: Any) -> bool:
    """Whether the run changed the rewritten weights by fitting (so there is work to keep)."""
    return any(record.name == "fit" and record.modified for record in getattr(result, "stages", []))


def write_or_keep_fitted(
    result: Any,
    report: Any,
    out: Path,
    *,
    force: bool = False,
    exports: tuple[str, ...] | list[str] = (),
    argv: list[str] | None = None,
) -> Any:
    """``write_apply_output``; when it fails after fitting, keep the fitted weights and say how to go on."""
    from convrewrite.export.writer import write_apply_output

    try:
        return write_apply_output(result, report, out, force=force, exports=exports)
    except (ConvRewriteError, Exception) as exc:
        if not fitted(result) or isinstance(exc, UsageError):
            raise
        checkpoint = fitted_checkpoint_dir(out)
        rules = [rule.spec() if hasattr(rule, "spec") else str(rule) for rule in getattr(result, "rules", [])]
        try:
            save_fitted(checkpoint, result.model, rules)
        except Exception as save_error:  # the first failure is the one to report
            raise ModelError(
                f"{_message(exc)}; the fitted weights could not be kept either: {describe(save_error)}"
            ) from exc
        raise ModelError(
            f"{_message(exc)}; the fitted weights are kept in {checkpoint}",
            hint=f"to write them without fitting again: {continue_command(out, checkpoint, argv)}",
        ) from exc


def _message(exc: BaseException) -> str:
    if isinstance(exc, ConvRewriteError):
        return exc.message if not exc.hint else f"{exc.message} ({exc.hint})"
    return describe(exc)
