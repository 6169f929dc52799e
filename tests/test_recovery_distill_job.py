"""``convrewrite distill DIR``'s body: distill an apply output and write it back as one; resume an
interrupted run from the checkpoint left in DIR; run data-parallel on 2 CPU processes under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from convrewrite.commands.distill import distill_output, rewritten_layers
from convrewrite.core.loading import load_model
from convrewrite.engine.pipeline import analyse
from convrewrite.engine.report_builder import build_report
from convrewrite.errors import UsageError
from convrewrite.export.writer import CHECKPOINT_DIR, check_destination, write_apply_output
from convrewrite.recovery.batches import Batch, TensorBatches
from convrewrite.recovery.distill import DistillConfig
from convrewrite.recovery.distributed import DistributedSession, distributed_session, torchrun_environment
from convrewrite.rules.api import make_rule

TINY_SOURCE = """
import torch
from torch import nn

INPUT_SHAPE = (2, 3, 8, 8)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))
"""

OUTPUT = ["model.py", "report.json", "weights.safetensors"]


@pytest.fixture
def applied(tmp_path: Path) -> tuple[Path, Path]:
    """(model file, apply output directory of it rewritten with ``separable``)."""
    model_file = tmp_path / "tiny.py"
    model_file.write_text(TINY_SOURCE)
    result = analyse(load_model(str(model_file)), [make_rule("separable")])
    out = tmp_path / "tiny-separable"
    write_apply_output(result, build_report(result), out)
    return model_file, out


def calibration() -> TensorBatches:
    return TensorBatches((torch.randn(72, 3, 8, 8, generator=torch.Generator().manual_seed(5)),), batch_size=8)


class Interrupting:
    def __init__(self, inner: TensorBatches, after: int) -> None:
        self.inner, self.after, self.served = inner, after, 0
        self.description = inner.description

    def count(self, split: Any) -> int | None:
        return self.inner.count(split)

    def batches(self, split: Any, **kwargs: Any) -> Iterator[Batch]:
        for batch in self.inner.batches(split, **kwargs):
            if split == "fit":
                self.served += 1
                if self.served > self.after:
                    raise KeyboardInterrupt
            yield batch


def test_distilled_output_replaces_the_directory_and_reloads(applied: tuple[Path, Path]) -> None:
    model_file, out = applied
    before = load_file(str(out / "weights.safetensors"))
    teacher = load_model(str(model_file)).model  # the same seeded initialisation as the rewritten original
    job = distill_output(out, teacher, calibration(), DistillConfig(steps=30, lr=3e-3), device="cpu", progress="none")
    assert sorted(p.name for p in out.iterdir()) == OUTPUT  # no checkpoint left behind
    result = job.distillation
    assert result.best is not None and result.initial is not None
    assert result.best.output_relative_error < result.initial.output_relative_error
    report = json.loads((out / "report.json").read_text())
    assert report["distillation"]["best_step"] == result.best_step
    assert report["after"]["params"] > 0  # the rest of the apply report is kept
    after = load_file(str(out / "weights.safetensors"))
    assert set(after) == set(before)
    assert not torch.equal(after["conv1.pointwise.weight"], before["conv1.pointwise.weight"])
    reloaded = load_model(str(out)).model
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), job.model(x), atol=1e-6)


def test_a_destination_with_someone_elses_files_is_refused_before_any_work(
    applied: tuple[Path, Path], tmp_path: Path
) -> None:
    model_file, out = applied
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    weights = (out / "weights.safetensors").read_bytes()
    teacher = load_model(str(model_file)).model
    with pytest.raises(UsageError, match="holds files that convrewrite did not write"):
        distill_output(out, teacher, calibration(), DistillConfig(steps=3), out=target, force=True, progress="none")
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert (out / "weights.safetensors").read_bytes() == weights and not (out / CHECKPOINT_DIR).exists()
    with pytest.raises(UsageError, match="is not an output of `convrewrite apply`"):
        distill_output(target, teacher, calibration(), DistillConfig(steps=3), progress="none")


def test_an_interrupted_job_resumes_with_the_same_command(
    applied: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_file, out = applied
    weights = (out / "weights.safetensors").read_bytes()
    teacher = load_model(str(model_file)).model
    config = DistillConfig(steps=10, checkpoint_every=2)
    command = f"convrewrite distill {out} --teacher {model_file} --data samples.pt --steps 10"
    with pytest.raises(KeyboardInterrupt):
        distill_output(out, teacher, Interrupting(calibration(), 6), config, progress="none", resume_command=command)
    assert f"resume with: {command}" in capsys.readouterr().err
    assert (out / "weights.safetensors").read_bytes() == weights  # the output is untouched until the end
    assert (out / CHECKPOINT_DIR / "checkpoint.json").is_file()
    check_destination(out, force=True)  # an apply --force over it may replace the checkpoint too

    other = tmp_path / "distilled"
    job = distill_output(out, teacher, calibration(), config, out=other, progress="none", resume_command=command)
    assert job.resumed_from_step == 5 and job.distillation.start_step == 5
    assert job.distillation.completed_steps == 10
    assert sorted(p.name for p in other.iterdir()) == OUTPUT
    assert not (out / CHECKPOINT_DIR).exists()  # finished: nothing left to resume


def test_rewritten_layers_come_from_the_report(applied: tuple[Path, Path]) -> None:
    _, out = applied
    assert rewritten_layers(json.loads((out / "report.json").read_text())) == ["conv1", "conv2"]


# --------------------------------------------------------------------------- torch.distributed


def test_torchrun_environment_is_read_and_checked() -> None:
    assert torchrun_environment({}) is None
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "1"}
    assert torchrun_environment(env) == (1, 2, 1)
    with pytest.raises(UsageError, match="MASTER_PORT not set"):
        torchrun_environment({k: v for k, v in env.items() if k != "MASTER_PORT"})
    with pytest.raises(UsageError, match="do not describe a process"):
        torchrun_environment({**env, "RANK": "2"})
    with distributed_session("cpu", environ={}) as session:
        assert session == DistributedSession(0, 1, 0, torch.device("cpu"))


def test_two_processes_on_cpu_train_the_same_weights_and_write_one_output(
    applied: tuple[Path, Path], tmp_path: Path
) -> None:
    model_file, apply_dir = applied
    out, results = tmp_path / "ddp-out", tmp_path / "ranks"
    results.mkdir()
    worker = Path(__file__).with_name("distributed_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    completed = subprocess.run(
        [*command, str(worker), str(apply_dir), str(model_file), str(out), str(results)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == OUTPUT
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left over
    report = json.loads((out / "report.json").read_text())["distillation"]
    assert report["world_size"] == 2 and report["completed_steps"] == 12
    losses = [h["loss"] for h in report["history"] if h["loss"] is not None]
    assert losses and all(math_finite(v) for v in losses)
    # Only rank 0 printed: one progress line per evaluation (steps 0, 4, 8, 12) and one summary.
    lines = [line for line in completed.stderr.splitlines() if line.startswith("distill:")]
    assert [line.split()[2] for line in lines[:4]] == ["0/12", "4/12", "8/12", "12/12"] and len(lines) == 5
    rank0, rank1 = (load_file(str(results / f"rank{r}.safetensors")) for r in (0, 1))
    assert set(rank0) == set(rank1)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    written = load_file(str(out / "weights.safetensors"))
    assert all(torch.equal(written[k], rank0[k]) for k in written)
    # The process group really went with the session: no gloo thread is left to race the
    # interpreter's shutdown (a rank that lost that race aborted with SIGABRT after its work).
    for rank in (0, 1):
        threads = results / f"threads{rank}.txt"
        if threads.exists():
            assert not [name for name in threads.read_text().split("\n") if "gloo" in name], rank


def math_finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def test_a_student_in_memory_is_distilled_without_importing_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``apply --distill`` hands over the model it just wrote: DIR/model.py is not imported to train
    (only to verify the written result), and the report written is returned as well as written."""
    model_file = tmp_path / "tiny.py"
    model_file.write_text(TINY_SOURCE)
    teacher = load_model(str(model_file)).model
    result = analyse(load_model(str(model_file)), [make_rule("separable")])
    out = tmp_path / "tiny-separable"
    write_apply_output(result, build_report(result), out)

    import convrewrite.core.loading as loading

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"load_model{args} was called")

    monkeypatch.setattr(loading, "load_model", refuse)
    job = distill_output(
        out,
        teacher,
        calibration(),
        DistillConfig(steps=2),
        device="cpu",
        progress="none",
        student=result.model,
        inputs=result.loaded.inputs,
    )
    assert job.model is result.model and job.written
    assert job.report == json.loads((out / "report.json").read_text())
    assert job.report["distillation"]["completed_steps"] == 2
