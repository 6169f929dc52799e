"""Write what ``apply`` produced, atomically, and prove it reads back.

Everything is first written to a temporary directory beside DIR. There the generated ``model.py``
is imported on its own, built, given the rewritten weights and saved with safetensors. The
weights are read back and compared bit for bit, ``report.json`` is read back and compared, and a
fresh import of ``model.py`` with ``load_model()`` must reproduce the in-memory rewritten model's
output. Only then does the directory move into place. A non-empty DIR is replaced only with
``--force``, and only when it holds an earlier convrewrite output: a user's files are never lost.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convrewrite import __version__
from convrewrite.errors import ModelError, NothingRewritten, UsageError

OUTPUT_FILES = ("model.py", "weights.safetensors", "report.json")


@dataclass
class WrittenOutput:
    directory: Path
    files: list[str]
    reload_max_abs_error: float
    user_source: str | None

    def summary(self) -> str:
        extra = f" (+ {self.user_source}, needed by model.py)" if self.user_source else ""
        return (
            f"wrote {self.directory}/: {', '.join(self.files)}{extra}; reloaded model.py + weights "
            f"and matched the rewritten model (max abs diff {self.reload_max_abs_error:.3g})"
        )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, then read it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(temporary, 0o666 & ~_umask())
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        if Path(temporary).read_bytes() != data:
            raise ModelError(f"{path} did not read back identically")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _is_our_output(directory: Path) -> bool:
    report = directory / "report.json"
    if not report.is_file():
        return False
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("schema", "")).startswith("convrewrite.report/")


def check_destination(directory: Path, force: bool) -> None:
    """Refuse a DIR that would lose someone's files; called before any work is done."""
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"--out {directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()):
        if not force:
            raise UsageError(f"output directory {directory} exists and is not empty", hint="pass --force to replace it")
        if not _is_our_output(directory):
            raise UsageError(
                f"output directory {directory} holds files that convrewrite did not write; "
                "not replacing it even with --force",
                hint="choose another --out",
            )
        unexpected = sorted(
            p.name for p in directory.iterdir() if p.name not in OUTPUT_FILES and not p.name.startswith("original_")
        )
        if unexpected:
            raise UsageError(
                f"output directory {directory} also holds {', '.join(unexpected[:3])}; not replacing it",
                hint="move those files or choose another --out",
            )


def _import_generated(path: Path, tag: str) -> Any:
    from convrewrite.engine.loading import import_file, isolated_import

    with isolated_import(path.parent):
        try:
            return import_file(path)
        except ModelError as exc:
            raise ModelError(f"the generated {path.name} does not import ({tag}): {exc.message}") from exc


def _source_tensors(model: nn.Module, constants: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        tensors[name] = parameter
    for name, buffer in model.named_buffers(remove_duplicate=False):
        tensors[name] = buffer
    tensors.update(constants)
    return tensors


def transplant(generated: nn.Module, source: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Copy every tensor of ``generated``'s state from the in-memory model, by name."""
    state = generated.state_dict()
    values: dict[str, torch.Tensor] = {}
    missing = []
    for key in state:
        lookup = key[len(prefix) :] if prefix and key.startswith(prefix) else key
        if lookup not in source:
            missing.append(key)
            continue
        values[key] = source[lookup].detach()
    if missing:
        raise ModelError(f"the generated model has tensors the rewritten model lacks: {', '.join(missing[:5])}")
    generated.load_state_dict(values, strict=True)
    # Non-persistent buffers are not in the state_dict: copy them too.
    for name, buffer in generated.named_buffers():
        lookup = name[len(prefix) :] if prefix and name.startswith(prefix) else name
        if lookup in source and name not in values:
            with torch.no_grad():
                buffer.copy_(source[lookup])


def _compare_outputs(expected: Any, actual: Any) -> float:
    from torch.utils._pytree import tree_leaves

    left = [t for t in tree_leaves(expected) if isinstance(t, torch.Tensor)]
    right = [t for t in tree_leaves(actual) if isinstance(t, torch.Tensor)]
    if len(left) != len(right) or any(a.shape != b.shape for a, b in zip(left, right)):
        raise ModelError("the reloaded model's outputs have different shapes from the rewritten model's")
    worst = 0.0
    for a, b in zip(left, right):
        if a.numel() == 0:
            continue
        if a.is_floating_point():
            if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
                raise ModelError(
                    "the reloaded model.py + weights do not reproduce the rewritten model "
                    f"(max abs diff {float((a - b).abs().max()):.3g})"
                )
            worst = max(worst, float((a - b).abs().max()))
        elif not torch.equal(a, b):
            raise ModelError("the reloaded model gives different integer outputs")
    return worst


#: Distinct skip reasons named in the one-line message of ``require_rewrites``.
_REASONS_SHOWN = 2


def nothing_rewritten_message(result: Any) -> str:
    """Why no layer was rewritten, in one line: per rule, how many layers it skipped and the most
    common reasons (the full list is in ``convrewrite report``)."""
    rules = [rule.spec() for rule in result.rules]
    parts = []
    for rule in result.rules:
        skips = [s for s in result.skipped if s.rule == rule.name]
        if not skips:
            parts.append(f"{rule.spec()} found no layer it takes")
            continue
        counts = Counter(s.reason for s in skips)
        shown = [
            f"{reason} ({count}x)" if count > 1 else reason for reason, count in counts.most_common(_REASONS_SHOWN)
        ]
        more = len(counts) - len(shown)
        tail = f"; {more} other reason(s)" if more > 0 else ""
        layers = "layer" if len(skips) == 1 else "layers"
        parts.append(f"{rule.spec()} skipped {len(skips)} {layers}: {'; '.join(shown)}{tail}")
    if not rules:
        parts.append("no rules were given")
    return "no layer was rewritten, so nothing was written: " + " / ".join(parts)


def require_rewrites(result: Any) -> None:
    """Raise ``NothingRewritten`` (exit 3) when the rules rewrote no layer of the model.

    ``apply`` would otherwise write a copy of the unchanged model; called before anything is
    written, so the output directory is not created.
    """
    if result.rewrites:
        return
    raise NothingRewritten(
        nothing_rewritten_message(result),
        hint="`convrewrite report MODEL --rule ...` lists every layer with its reason; "
        "change the rules or their options",
    )


def write_apply_output(result: Any, report: Any, directory: Path, force: bool = False) -> WrittenOutput:
    """Generate, save, verify and move into place the rewritten model in ``directory``.

    Refuses (``NothingRewritten``, exit 3) when no rule rewrote anything: nothing is written.
    """
    from safetensors.torch import load_file, save_model

    from convrewrite.export.source import SourceWriter, class_name_for, graph_constants, inputs_source
    from convrewrite.layers import BLOCK_CLASSES

    check_destination(directory, force)
    require_rewrites(result)
    loaded = result.loaded
    model: nn.Module = loaded.model
    graph_module = result.rewritten_trace.graph_module if result.rewritten_trace is not None else None
    directory = Path(directory)
    parent = directory.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.convrewrite-", dir=parent))
    os.chmod(staging, 0o777 & ~_umask())
    try:
        with loaded.module_registered():
            writer = SourceWriter(model, graph_module, loaded.user_module, loaded.source_file, BLOCK_CLASSES)
            class_name = class_name_for(model)
            generated = writer.generate(
                class_name, _header(result, report), inputs_source(loaded.inputs.args, loaded.inputs.kwargs)
            )
        files = ["model.py", "weights.safetensors", "report.json"]
        write_file_atomic(staging / "model.py", generated.text.encode())
        if generated.user_source is not None and generated.user_source_copy_name:
            shutil.copyfile(generated.user_source, staging / generated.user_source_copy_name)
            os.chmod(staging / generated.user_source_copy_name, 0o666 & ~_umask())

        module = _import_generated(staging / "model.py", "first import")
        fresh: nn.Module = module.build_model()
        prefix = "model." if graph_module is None else ""
        transplant(fresh, _source_tensors(model, graph_constants(model, graph_module)), prefix)
        metadata = {"generator": f"convrewrite {__version__}", "format": "pt"}
        save_model(fresh, str(staging / "weights.safetensors"), metadata=metadata)
        os.chmod(staging / "weights.safetensors", 0o666 & ~_umask())
        _check_weights_read_back(fresh, load_file(str(staging / "weights.safetensors")))
        # A model of 100M+ parameters: free this copy before the reload builds another.
        del fresh, module

        report_text = json.dumps(report.to_dict(), indent=2) + "\n"
        write_file_atomic(staging / "report.json", report_text.encode())
        if json.loads((staging / "report.json").read_text()) != json.loads(report_text):
            raise ModelError("report.json did not read back identically")

        reloaded_module = _import_generated(staging / "model.py", "reload")
        reloaded: nn.Module = reloaded_module.load_model(staging / "weights.safetensors")
        reloaded.eval()
        with torch.no_grad():
            actual = loaded.inputs.call(reloaded)
        # The engine's last profile already ran the rewritten model on these inputs.
        worst = _compare_outputs(result.after.output, actual)
        _move_into_place(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return WrittenOutput(directory, files, worst, generated.user_source_copy_name)


def _check_weights_read_back(model: nn.Module, loaded: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    for key, tensor in loaded.items():
        if key not in state:
            raise ModelError(f"weights.safetensors holds an unexpected tensor {key}")
        original = state[key]
        if original.dtype != tensor.dtype or original.shape != tensor.shape or not torch.equal(original.cpu(), tensor):
            raise ModelError(f"weights.safetensors did not read back identically at {key}")


def _move_into_place(staging: Path, directory: Path) -> None:
    if directory.exists():
        if any(directory.iterdir()):
            backup = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.resolve().parent))
            backup.rmdir()
            os.replace(directory, backup)
            try:
                os.replace(staging, directory)
            except BaseException:
                os.replace(backup, directory)
                raise
            shutil.rmtree(backup, ignore_errors=True)
            return
        directory.rmdir()
    os.replace(staging, directory)


def _header(result: Any, report: Any) -> str:
    rules = " then ".join(r["spec"] for r in report.rules)
    before, after = report.before, report.final
    lines = [
        f'"""{type(result.loaded.model).__name__} rewritten by convrewrite {__version__} ({rules}).',
        "",
        f"Source: {result.loaded.display_name}",
        f"Params: {before.params:,} -> {after.params:,}; MACs: {before.macs:,} -> {after.macs:,}",
        "",
        "load_model() gives the rewritten model with its transferred weights (weights.safetensors);",
        "build_model() gives the same architecture freshly initialized. Only torch is needed to import",
        "this file; load_model() also needs safetensors.",
    ]
    if result.trace.mode != "fx":
        lines += ["", f"Trace: {result.trace.describe()}."]
    lines.append('"""')
    return "\n".join(lines)
