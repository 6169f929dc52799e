"""``convrewrite distill DIR --teacher MODEL --data SPEC --steps N`` (``distill_job``), and the
distillation of ``apply --distill`` (``distill_output``): distill an ``apply`` output directory
against its original model, and write the result as an ``apply`` output again.

The student is DIR's ``model.py`` with DIR's ``weights.safetensors``. Checkpoints go to
``DIR/distill-checkpoint/``; when one is there the run continues from it, so after Ctrl-C or a
crash the same command resumes. The result is written the way ``apply`` writes (export/writer.py):
into a temporary directory beside the destination, where ``model.py`` is imported, given the
distilled weights, saved, read back and run against the in-memory student; only then does it move
into place. The destination is DIR itself by default (an earlier convrewrite output, replaced
whole, its checkpoint with it), or ``out``, which like ``apply --out`` is replaced only with
``force`` and only when it holds a convrewrite output. Under torchrun, rank 0 alone writes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convrewrite import __version__
from convrewrite.errors import ConvRewriteError, ModelError, UsageError, describe
from convrewrite.export.pytorch import check_weights_read_back, compare_outputs, import_generated
from convrewrite.export.writer import (
    CHECKPOINT_DIR,
    check_destination,
    is_our_output,
    move_into_place,
    umask,
    write_file_atomic,
)
from convrewrite.recovery.batches import BatchSource
from convrewrite.recovery.checkpoint import has_checkpoint
from convrewrite.recovery.distill import DistillConfig, DistillResult, distill
from convrewrite.recovery.distributed import distributed_session


@dataclass
class DistillJobResult:
    """What ``distill_output`` did; ``model`` is the distilled student (on the CPU, eval mode)."""

    source: Path
    directory: Path
    resumed_from_step: int | None
    distillation: DistillResult
    written: bool
    reload_max_abs_error: float | None
    model: nn.Module
    #: The report as written into ``directory`` (rank 0; None on the other ranks).
    report: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "directory": str(self.directory),
            "resumed_from_step": self.resumed_from_step,
            "written": self.written,
            "reload_max_abs_error": self.reload_max_abs_error,
            "distillation": self.distillation.to_dict(),
        }

    def summary(self) -> str:
        text = self.distillation.summary()
        if self.resumed_from_step:
            text += f", resumed at step {self.resumed_from_step:,}"
        if self.written:
            text += f"; wrote {self.directory}/ (reloaded and matched, max abs diff {self.reload_max_abs_error:.3g})"
        return text


def _read_report(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / "report.json").read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{directory}/report.json is not readable ({describe(exc)})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{directory}/report.json does not hold a report")
    return data


def check_source(directory: Path) -> None:
    """DIR must be a complete ``apply`` output: model.py, weights.safetensors, report.json."""
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory", hint="point at a directory written by `convrewrite apply`")
    missing = [name for name in ("model.py", "weights.safetensors", "report.json") if not (directory / name).is_file()]
    if missing or not is_our_output(directory):
        what = f"lacks {', '.join(missing)}" if missing else "holds no convrewrite report.json"
        raise UsageError(
            f"{directory} is not an output of `convrewrite apply` (it {what})",
            hint="run convrewrite apply MODEL --rule ... --out DIR first",
        )


def rewritten_layers(report: dict[str, Any]) -> list[str]:
    """The original model's layers a rewrite replaced (the names to match with hints)."""
    fidelity = report.get("fidelity") or {}
    names = [str(layer["name"]) for layer in fidelity.get("layers", []) if "name" in layer]
    if not names:
        names = [str(r["name"]) for r in report.get("rewrites", []) if "name" in r]
    return [n for n in names if not any(n.startswith(other + ".") for other in names if other != n)]


def distill_output(
    directory: Path | str,
    teacher: nn.Module,
    data: BatchSource,
    config: DistillConfig,
    *,
    device: str | torch.device | None = "auto",
    out: Path | str | None = None,
    force: bool = False,
    layers: Sequence[str] | None = None,
    progress: str = "auto",
    resume_command: str | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    student: nn.Module | None = None,
    inputs: Any = None,
) -> DistillJobResult:
    """Distill the apply output in ``directory`` against ``teacher`` and write the result.

    ``student`` and ``inputs``: the model ``directory`` holds and its example inputs, when the
    caller has them in memory (``apply --distill`` just wrote them); by default DIR's
    ``model.py`` is imported with its weights. ``layers`` defaults to the layers the rewrite
    replaced (read from report.json) when ``config.layer_weight`` > 0. Bad input (not an apply
    output, a destination holding someone else's files, data that does not fit) is a usage error
    raised before any training.
    """
    from convrewrite.core.loading import load_model

    source = Path(directory)
    check_source(source)
    target = Path(out) if out is not None else source
    same_place = target.resolve() == source.resolve()
    if not same_place:
        check_destination(target, force)
    report = _read_report(source)
    if layers is None:
        layers = rewritten_layers(report) if config.layer_weight > 0 else []
    checkpoint_dir = source / CHECKPOINT_DIR
    resume = checkpoint_dir if has_checkpoint(checkpoint_dir) else None

    with distributed_session(device) as session:
        if student is None:
            loaded = load_model(str(source))
            student, inputs = loaded.model, loaded.inputs
        resumed_from: int | None = None
        if resume is not None:
            resumed_from = int(json.loads((checkpoint_dir / "checkpoint.json").read_text()).get("step", 0))
        result = distill(
            teacher,
            student,
            data,
            config,
            device=session.device,
            layers=layers,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            progress=progress,
            resume_command=resume_command or f"the same call again (it continues from {checkpoint_dir})",
        )
        failure: str | None = None
        reload_error: float | None = None
        written_report: dict[str, Any] | None = None
        if session.is_main:
            try:
                refreshed = refreshed_report(report, result, student, teacher)
                if evaluate is not None:
                    refreshed = with_evaluation(refreshed, evaluate(student.to("cpu").eval()))
                written_report = {**refreshed, "distillation": result.to_dict()}
                reload_error = _write_distilled(source, target, student, inputs, written_report)
                if not same_place:
                    shutil.rmtree(checkpoint_dir, ignore_errors=True)
            except ConvRewriteError as exc:
                failure = exc.one_line()
            except Exception as exc:
                failure = describe(exc)
        if session.distributed:
            import torch.distributed as dist

            # Every rank learns whether rank 0 wrote, so none waits forever or exits 0 on a failure.
            holder: list[Any] = [failure]
            dist.broadcast_object_list(holder, src=0)
            failure = holder[0]
        if failure is not None:
            # The last step's checkpoint is on disk (distill writes one at the end): running
            # the same command again loads it, does no more steps and only writes.
            continue_with = resume_command or "the same call again"
            raise ModelError(
                f"could not write the distilled model: {failure}; the distilled weights are kept in {checkpoint_dir}",
                hint=f"to write them without distilling again: {continue_with}",
            )
    student.to("cpu").eval()
    return DistillJobResult(
        source, target, resumed_from, result, session.is_main, reload_error, student, written_report
    )


def with_evaluation(report: dict[str, Any], result: dict[str, float]) -> dict[str, Any]:
    """``report`` with the user's ``evaluate()`` measured again on the distilled model."""
    updated = json.loads(json.dumps(report))
    section = updated.setdefault("evaluation", {"original": {}, "result": {}})
    section["result"] = dict(result)
    metrics = (updated.get("after") or {}).setdefault("metrics", {})
    for name, value in result.items():
        metrics[f"eval:{name}"] = value
    return updated


def refreshed_report(
    report: dict[str, Any], result: DistillResult, student: nn.Module, teacher: nn.Module
) -> dict[str, Any]:
    """``report`` with the figures distillation changed: the held-out fidelity and its metrics (of
    the best state, the one written), and each rewritten layer's kernel error against the teacher."""
    from convrewrite.layers.dense import kernel_error

    updated = json.loads(json.dumps(report))
    best = result.best
    fidelity = updated.get("fidelity")
    if best is not None and isinstance(fidelity, dict):
        fidelity.update(
            output_relative_error=best.output_relative_error,
            output_cosine_similarity=best.cosine_similarity,
            output_max_abs_error=None,  # not measured by distillation
            agreement=best.top1_agreement,
            samples=best.samples,
            measured_on=f"{best.samples:,} held-out calibration samples",
        )
        for layer in fidelity.get("layers", []):
            try:
                layer["kernel_relative_error"] = kernel_error(
                    student.get_submodule(layer["name"]), teacher.get_submodule(layer["name"])
                )
            except (AttributeError, TypeError, ValueError):
                layer["kernel_relative_error"] = None
        errors = {layer["name"]: layer["kernel_relative_error"] for layer in fidelity.get("layers", [])}
        for row in updated.get("layers", []):
            if row.get("name") in errors:
                row["kernel_error"] = errors[row["name"]]
        metrics = (updated.get("after") or {}).setdefault("metrics", {})
        metrics["output-error"] = best.output_relative_error
        metrics["cosine"] = best.cosine_similarity
        if best.top1_agreement is not None:
            metrics["agreement"] = best.top1_agreement
    return updated


def _write_distilled(
    source: Path,
    target: Path,
    student: nn.Module,
    inputs: Any,
    report: dict[str, Any],
) -> float:
    from safetensors.torch import load_file, save_model

    student = student.to("cpu").eval()
    parent = target.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.convrewrite-", dir=parent))
    os.chmod(staging, 0o777 & ~umask())
    try:
        for item in sorted(source.iterdir()):
            if item.name == "model.py" or (item.name.startswith("original_") and item.is_file()):
                shutil.copyfile(item, staging / item.name)
                os.chmod(staging / item.name, 0o666 & ~umask())
        module = import_generated(staging / "model.py", "first import")
        fresh: nn.Module = module.build_model()
        fresh.load_state_dict(student.state_dict(), strict=True)
        metadata = {"generator": f"convrewrite {__version__}", "format": "pt"}
        save_model(fresh, str(staging / "weights.safetensors"), metadata=metadata)
        os.chmod(staging / "weights.safetensors", 0o666 & ~umask())
        check_weights_read_back(fresh, load_file(str(staging / "weights.safetensors")))
        del fresh, module

        text = json.dumps(report, indent=2) + "\n"
        write_file_atomic(staging / "report.json", text.encode())
        if json.loads((staging / "report.json").read_text()) != json.loads(text):
            raise ModelError("report.json did not read back identically")

        reloaded_module = import_generated(staging / "model.py", "reload")
        reloaded: nn.Module = reloaded_module.load_model(staging / "weights.safetensors")
        reloaded.eval()
        with torch.no_grad():
            worst = compare_outputs(inputs.call(student), inputs.call(reloaded))
        move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return worst


def distill_job(
    job: Any,
    directory: Path,
    teacher: str,
    *,
    out: Path | None = None,
    force: bool = False,
    device: str | torch.device | None = "auto",
    resume_command: str | None = None,
) -> DistillJobResult:
    """``convrewrite distill DIR --teacher MODEL``: load the teacher and the data, then distil DIR.

    ``job`` holds the distill command's resolved settings; ``teacher`` is the MODEL spec of the
    original model.
    """
    from convrewrite.commands.apply import user_evaluate
    from convrewrite.commands.run import load_job_model, open_data
    from convrewrite.config.stages import DistillSettings
    from convrewrite.engine.stages.distill import distill_config

    loaded = load_job_model(job, teacher)
    data = open_data(job, loaded)
    if data is None:
        raise UsageError("distill needs calibration data", hint="pass --data SPEC (or define calibration_data())")
    steps = int(job["steps"])
    return distill_output(
        directory,
        loaded.model,
        data,
        distill_config(DistillSettings.from_values(job.settings_values(), steps=steps)),
        device=device,
        out=out,
        force=force,
        evaluate=user_evaluate(loaded),
        resume_command=resume_command,
    )
