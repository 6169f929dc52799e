"""Export a model to ONNX, atomically, and prove in ONNX Runtime that it computes what torch does.

``export_onnx`` writes the model with ``torch.onnx.export`` to a temporary file beside the target,
checks it (``onnx.checker``), runs it in ONNX Runtime's CPU provider on the example input and
compares with the torch model element-wise (``RTOL``, ``ATOL``; apply's reload check of model.py
scales its tolerance to each output instead, see ``core.compare.scaled_difference``). Only then does
the file move into place (``os.replace``), and the file in place is read back and must be the bytes
that were verified. A model that cannot be exported or does not match raises ``ModelError`` (exit
3) with one line, and nothing is written.

Exporters: torch's ``torch.export``-based exporter (the default since torch 2.9; it needs
onnxscript) and, where that one fails or onnxscript is missing, the TorchScript exporter; the
result says which one wrote the file. The batch dimension (dim 0 of every input, and of every
output whose first dimension is the batch) is dynamic unless ``dynamic_batch=False``.

onnx and onnxruntime come with the optional extra ``convrewrite[onnx]``; ``require_onnx()`` says
so (``UsageError``, exit 2) before any work is done when they are missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from convrewrite.core.loading import ExampleInputs
from convrewrite.errors import ModelError, UsageError, describe, first_line
from convrewrite.export.base import ExportContext, Exporter, register_exporter

#: The tolerance of ``apply``'s reload check (export/writer.py), used for the ONNX Runtime check too.
RTOL = 1e-5
ATOL = 1e-6

EXTRA_HINT = "install the extra: pip install 'convrewrite[onnx]' (onnx, onnxruntime, onnxscript)"


def require_onnx(what: str = "--export onnx") -> tuple[Any, Any]:
    """The ``onnx`` and ``onnxruntime`` modules, or a UsageError naming the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        missing = getattr(exc, "name", None) or "onnx"
        raise UsageError(f"{what} needs the {missing} package, which is not installed", hint=EXTRA_HINT) from None
    return onnx, onnxruntime


def _root_cause(exc: BaseException) -> str:
    """The innermost cause of an exporter failure, as one plain line (exporters wrap the real
    reason, e.g. "no ONNX function for aten::histc", in generic step messages with colours)."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    text = re.sub(r"\x1b\[[0-9;]*m", "", describe(exc))
    return " ".join(text.split())[:300]


def _has_onnxscript() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class OnnxExport:
    """What ``export_onnx`` wrote and how it was verified."""

    path: Path
    opset: int
    exporter: str
    input_names: list[str]
    output_names: list[str]
    dynamic_batch: bool
    max_abs_diff: float
    bytes: int
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["file"] = self.path.name
        data["tolerance"] = {"rtol": RTOL, "atol": ATOL}
        return data

    def summary(self) -> str:
        return (
            f"wrote {self.path.name} (ONNX opset {self.opset}, {self.exporter} exporter"
            f"{', dynamic batch' if self.dynamic_batch else ''}); ONNX Runtime matched the model "
            f"(max abs diff {self.max_abs_diff:.3g})"
        )


def _as_inputs(example_inputs: ExampleInputs | tuple[Any, ...] | torch.Tensor) -> ExampleInputs:
    if isinstance(example_inputs, ExampleInputs):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return ExampleInputs((example_inputs,))
    return ExampleInputs(tuple(example_inputs))


def _onnx_name(text: str, used: set[str]) -> str:
    """A graph-friendly name (``x[0]`` -> ``x_0``), unique among ``used``."""
    name = re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_") or "input"
    candidate, number = name, 1
    while candidate in used:
        number += 1
        candidate = f"{name}_{number}"
    used.add(candidate)
    return candidate


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def _export_once(
    model: nn.Module,
    inputs: ExampleInputs,
    path: Path,
    *,
    dynamo: bool,
    opset: int | None,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]] | None,
) -> None:
    kwargs: dict[str, Any] = {
        "input_names": input_names,
        "output_names": output_names,
        "opset_version": opset,
        "dynamo": dynamo,
        "dynamic_axes": dynamic_axes,
    }
    if dynamo:
        kwargs["external_data"] = False
    # torch.onnx prints progress lines, log records and deprecation warnings: keep the output clean.
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            torch.no_grad(),
        ):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, inputs.args, str(path), kwargs=inputs.kwargs or None, **kwargs)
    finally:
        onnx_logger.setLevel(level)


def ort_session(path: Path | str, threads: int = 1) -> Any:
    """An ONNX Runtime InferenceSession on the CPU provider with ``threads`` intra-op threads."""
    _, onnxruntime = require_onnx("ONNX Runtime")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def ort_feed(session: Any, inputs: ExampleInputs) -> dict[str, Any]:
    """The session's inputs, in graph order, from the example input's tensors in call order."""
    tensors = [t for _, t in inputs.tensors()]
    graph_inputs = session.get_inputs()
    if len(graph_inputs) != len(tensors):
        raise ModelError(
            f"the ONNX graph takes {len(graph_inputs)} input(s), the model's example input has {len(tensors)} tensor(s)"
        )
    return {g.name: t.detach().cpu().numpy() for g, t in zip(graph_inputs, tensors)}


def _compare(expected: list[torch.Tensor], actual: list[Any]) -> float:
    if len(expected) != len(actual):
        raise ModelError(f"ONNX Runtime returned {len(actual)} output(s), the model {len(expected)}")
    worst = 0.0
    for index, (reference, value) in enumerate(zip(expected, actual)):
        got = torch.from_numpy(value) if not isinstance(value, torch.Tensor) else value
        reference = reference.detach().cpu()
        if tuple(got.shape) != tuple(reference.shape):
            raise ModelError(
                f"ONNX Runtime output {index} has shape {tuple(got.shape)}, the model's {tuple(reference.shape)}"
            )
        if reference.numel() == 0:
            continue
        if reference.is_floating_point():
            got = got.to(reference.dtype)
            difference = float((got - reference).abs().max())
            if not torch.allclose(got, reference, rtol=RTOL, atol=ATOL):
                raise ModelError(
                    f"the ONNX model does not reproduce the model in ONNX Runtime (output {index}: "
                    f"max abs diff {difference:.3g}, tolerance rtol {RTOL:g} + atol {ATOL:g})"
                )
            worst = max(worst, difference)
        elif not torch.equal(got.to(reference.dtype), reference):
            raise ModelError(f"ONNX Runtime gives different integer values for output {index}")
    return worst


def export_onnx(
    model: nn.Module,
    example_inputs: ExampleInputs | tuple[Any, ...] | torch.Tensor,
    path: Path | str,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
) -> OnnxExport:
    """Write ``model`` to ``path`` as ONNX, verified in ONNX Runtime on ``example_inputs``."""
    onnx, onnxruntime = require_onnx()
    path = Path(path)
    inputs = _as_inputs(example_inputs)
    model.eval()
    with torch.no_grad():
        reference = _tensors(inputs.call(model))
    if not reference:
        raise ModelError("the model returns no tensor: nothing to export to ONNX")
    used: set[str] = set()
    named = inputs.tensors()
    input_names = [_onnx_name(name, used) for name, _ in named]
    output_names = [_onnx_name("output" if len(reference) == 1 else f"output_{i}", used) for i in range(len(reference))]
    notes: list[str] = []
    dynamic_axes: dict[str, dict[int, str]] | None = None
    if dynamic_batch:
        batches = {int(t.shape[0]) for _, t in named if t.dim() > 0}
        if len(batches) == 1:
            batch = batches.pop()
            dynamic_axes = {name: {0: "batch"} for name, (_, t) in zip(input_names, named) if t.dim() > 0}
            for name, tensor in zip(output_names, reference):
                if tensor.dim() > 0 and int(tensor.shape[0]) == batch:
                    dynamic_axes[name] = {0: "batch"}
        else:
            dynamic_batch = False
            notes.append("the inputs disagree on their first dimension: exported with fixed shapes")

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent)
    os.close(handle)
    temporary = Path(temporary_name)
    try:
        exporter = ""
        failures: list[str] = []
        attempts = [True, False] if _has_onnxscript() else [False]
        if not _has_onnxscript():
            notes.append("onnxscript is not installed: used the TorchScript exporter")
        for dynamo in attempts:
            try:
                _export_once(
                    model,
                    inputs,
                    temporary,
                    dynamo=dynamo,
                    opset=opset,
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_axes=dynamic_axes,
                )
            except Exception as exc:
                failures.append(f"{'torch.export' if dynamo else 'TorchScript'} exporter: {_root_cause(exc)}")
                continue
            exporter = "torch.export" if dynamo else "torchscript"
            break
        if not exporter:
            raise ModelError(f"the model cannot be exported to ONNX ({'; '.join(failures)})")
        if failures:
            notes.append(f"fell back to the TorchScript exporter ({failures[0]})")
        data = temporary.read_bytes()
        try:
            proto = onnx.load_from_string(data)
            onnx.checker.check_model(proto)
            session = ort_session(temporary)
            outputs = session.run(None, ort_feed(session, inputs))
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"the exported ONNX model does not load in ONNX Runtime: {first_line(exc)}") from exc
        worst = _compare(reference, outputs)
        opset_used = next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        digest = hashlib.sha256(data).hexdigest()
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            path.unlink(missing_ok=True)
            raise ModelError(f"{path} did not read back identically")
    finally:
        temporary.unlink(missing_ok=True)
    return OnnxExport(
        path=path,
        opset=opset_used,
        exporter=exporter,
        input_names=[i.name for i in session.get_inputs()],
        output_names=[o.name for o in session.get_outputs()],
        dynamic_batch=dynamic_batch,
        max_abs_diff=worst,
        bytes=len(data),
        versions={
            "torch": torch.__version__,
            "onnx": str(getattr(onnx, "__version__", "?")),
            "onnxruntime": str(getattr(onnxruntime, "__version__", "?")),
        },
        notes=notes,
    )


def _umask() -> int:
    from convrewrite.export.writer import umask

    return umask()


@register_exporter
class OnnxExporter(Exporter):
    """``apply --export onnx``: ``model.onnx``, checked and run in ONNX Runtime against the model."""

    name = "onnx"
    files = ("model.onnx",)
    order = 50

    def check_available(self) -> None:
        require_onnx()

    def write(self, context: ExportContext, staging: Path) -> list[str]:
        result = context.result
        written = export_onnx(result.loaded.model, result.loaded.inputs, staging / "model.onnx")
        section = {**written.to_dict(), "path": "model.onnx"}
        context.report.sections.setdefault("export", {})["onnx"] = section
        context.facts["onnx"] = written
        return ["model.onnx"]

    def verify(self, context: ExportContext, staging: Path) -> None:
        """``export_onnx`` already ran the file in ONNX Runtime and read it back (sha256)."""


__all__ = ["ATOL", "RTOL", "OnnxExport", "OnnxExporter", "export_onnx", "ort_feed", "ort_session", "require_onnx"]
