"""Exporter ``pytorch``: readable ``model.py`` plus ``weights.safetensors``, proven by a reload.

The generated ``model.py`` is imported on its own, built, given the rewritten weights and saved
with safetensors; the weights are read back and compared bit for bit, and a fresh import of
``model.py`` with ``load_model()`` must reproduce the in-memory rewritten model's output on the
example input.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convrewrite import __version__
from convrewrite.errors import ModelError
from convrewrite.export.base import ExportContext, Exporter, register_exporter
from convrewrite.export.writer import file_mode, write_file_atomic


def import_generated(path: Path, tag: str) -> Any:
    from convrewrite.core.loading import import_file, isolated_import

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


def compare_outputs(expected: Any, actual: Any) -> float:
    """The reload check: the written files must reproduce the rewritten model (max abs diff).

    Each floating output tensor may differ by ``RELOAD_TOLERANCE`` (1e-5) of its own largest
    magnitude (``core.compare.scaled_difference``); integer tensors must be equal.
    """
    from convrewrite.core.compare import RELOAD_TOLERANCE, max_abs_difference, same_structure, scaled_difference

    if not same_structure(expected, actual):
        raise ModelError("the reloaded model's outputs have different shapes from the rewritten model's")
    scaled = scaled_difference(expected, actual)
    if not scaled <= RELOAD_TOLERANCE:
        raise ModelError(
            "the reloaded model.py + weights do not reproduce the rewritten model "
            f"(max abs diff {max_abs_difference(expected, actual):.3g}, {scaled:.3g} of the output's largest "
            f"magnitude; at most {RELOAD_TOLERANCE:g} is allowed)"
        )
    return max_abs_difference(expected, actual)


def check_weights_read_back(model: nn.Module, loaded: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    for key, tensor in loaded.items():
        if key not in state:
            raise ModelError(f"weights.safetensors holds an unexpected tensor {key}")
        original = state[key]
        if original.dtype != tensor.dtype or original.shape != tensor.shape or not torch.equal(original.cpu(), tensor):
            raise ModelError(f"weights.safetensors did not read back identically at {key}")


@register_exporter
class PyTorchExporter(Exporter):
    name = "pytorch"
    files = ("model.py", "weights.safetensors")
    always = True
    order = 10

    def write(self, context: ExportContext, staging: Path) -> list[str]:
        from safetensors.torch import load_file, save_model

        from convrewrite.export.source import SourceWriter, class_name_for, graph_constants, inputs_source

        result = context.result
        loaded = result.loaded
        model: nn.Module = loaded.model
        graph_module = result.rewritten_trace.graph_module if result.rewritten_trace is not None else None
        with loaded.module_registered():
            writer = SourceWriter(model, graph_module, loaded.user_module, loaded.source_file)
            class_name = class_name_for(model)
            generated = writer.generate(
                class_name, _header(result, context.report), inputs_source(loaded.inputs.args, loaded.inputs.kwargs)
            )
        written = ["model.py", "weights.safetensors"]
        write_file_atomic(staging / "model.py", generated.text.encode())
        if generated.user_source is not None and generated.user_source_copy_name:
            shutil.copyfile(generated.user_source, staging / generated.user_source_copy_name)
            os.chmod(staging / generated.user_source_copy_name, file_mode())
            context.facts["user_source"] = generated.user_source_copy_name

        module = import_generated(staging / "model.py", "first import")
        fresh: nn.Module = module.build_model()
        prefix = "model." if graph_module is None else ""
        transplant(fresh, _source_tensors(model, graph_constants(model, graph_module)), prefix)
        metadata = {"generator": f"convrewrite {__version__}", "format": "pt"}
        save_model(fresh, str(staging / "weights.safetensors"), metadata=metadata)
        os.chmod(staging / "weights.safetensors", file_mode())
        check_weights_read_back(fresh, load_file(str(staging / "weights.safetensors")))
        return written

    def verify(self, context: ExportContext, staging: Path) -> None:
        result = context.result
        reloaded_module = import_generated(staging / "model.py", "reload")
        reloaded: nn.Module = reloaded_module.load_model(staging / "weights.safetensors")
        reloaded.eval()
        with torch.no_grad():
            actual = result.loaded.inputs.call(reloaded)
        # The engine's last profile already ran the rewritten model on these inputs.
        context.facts["reload_max_abs_error"] = compare_outputs(result.after.output, actual)


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
