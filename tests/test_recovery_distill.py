"""Distillation mechanics on tiny models: losses, schedule, held-out fidelity, BatchNorm handling,
checkpoints and exact resumption, the apply-directory job. (Accuracy claims live in
benchmarks/bench_distill_digits.py, on trained models.)"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from convrewrite.core.compare import agreement_of
from convrewrite.errors import ModelError, UsageError
from convrewrite.recovery.batches import Batch, TensorBatches
from convrewrite.recovery.checkpoint import INDEX_NAME
from convrewrite.recovery.distill import (
    DistillConfig,
    _held_out_fidelity,
    distill,
    output_loss,
    resolve_losses,
)
from convrewrite.recovery.progress import DistillProgress


def tiny_net(dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 5),
    )


def teacher_and_student(seed: int = 0, noise: float = 0.3, dropout: float = 0.0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    teacher = tiny_net(dropout)
    teacher.eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(noise * torch.randn_like(parameter))
    return teacher, student


def inputs(count: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


class Interrupting:
    """A batch source that raises KeyboardInterrupt when batch number ``after + 1`` of ``split`` is asked for."""

    def __init__(self, inner: TensorBatches, after: int, split: str = "fit") -> None:
        self.inner, self.after, self.served, self.split = inner, after, 0, split
        self.description = inner.description

    def count(self, split: Any) -> int | None:
        return self.inner.count(split)

    def batches(self, split: Any, **kwargs: Any) -> Iterator[Batch]:
        for batch in self.inner.batches(split, **kwargs):
            if split == self.split:
                self.served += 1
                if self.served > self.after:
                    raise KeyboardInterrupt
            yield batch


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("steps", 0, "steps must be"),
        ("loss", "l1", "loss must be one of"),
        ("temperature", 0.0, "temperature must be > 0"),
        ("lr", -1.0, "lr must be > 0"),
        ("clip_norm", 0.0, "clip_norm must be > 0"),
        ("batchnorm", "sync", "batchnorm must be one of"),
        ("warmup_fraction", 1.0, "warmup_fraction"),
        ("eval_every", 0, "eval_every must be"),
        ("accumulate", 0, "accumulate must be"),
    ],
)
def test_config_rejects_bad_values(field: str, value: Any, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        DistillConfig(**{field: value})


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_zero() -> None:
    config = DistillConfig(steps=110, lr=0.01, warmup_steps=10)
    assert config.learning_rate(0) == pytest.approx(0.001)  # 1/10 of the peak
    assert config.learning_rate(9) == pytest.approx(0.01)
    assert config.learning_rate(10) == pytest.approx(0.01)  # cosine starts at the peak
    assert config.learning_rate(60) == pytest.approx(0.005)  # half-way through the 100 cosine steps
    assert config.learning_rate(110) == pytest.approx(0.0, abs=1e-12)
    assert DistillConfig(steps=200, warmup_fraction=0.1).warmup == 20


# --------------------------------------------------------------------------- losses


def test_kl_loss_is_hintons_temperature_scaled_kl() -> None:
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    temperature = 3.0
    # By hand: mean over samples of sum_c p_t (log p_t - log p_s), times T².
    p_t = torch.softmax(teacher / temperature, dim=1)
    expected = (p_t * (p_t.log() - torch.log_softmax(student / temperature, dim=1))).sum(1).mean() * temperature**2
    assert float(output_loss("kl", student, teacher, temperature)) == pytest.approx(float(expected), rel=1e-5)
    assert float(output_loss("kl", teacher, teacher, temperature)) == pytest.approx(0.0, abs=1e-6)


def test_mse_and_cosine_losses_by_hand() -> None:
    teacher = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    student = torch.tensor([[3.0, 5.0], [0.0, -2.0]])
    # normalised MSE: mean squared difference (1 + 16)/4 over the teacher's mean square (9+16+4)/4.
    assert float(output_loss("mse", student, teacher, 1.0)) == pytest.approx(17 / 29)
    cos_first = (9 + 20) / (5 * math.sqrt(34))
    assert float(output_loss("cosine", student, teacher, 1.0)) == pytest.approx(((1 - cos_first) + 2) / 2)


def test_auto_loss_is_kl_for_logits_and_mse_otherwise() -> None:
    assert resolve_losses("auto", [torch.zeros(2, 10), torch.zeros(2, 3, 4, 4), torch.zeros(2)]) == ["kl", "mse", "mse"]
    with pytest.raises(UsageError, match="kl loss needs logits"):
        resolve_losses("kl", [torch.zeros(5)])


# --------------------------------------------------------------------------- held-out fidelity


def test_held_out_fidelity_matches_the_engines_fidelity_on_the_whole_holdout() -> None:
    teacher, student = teacher_and_student()
    data = TensorBatches((inputs(),), batch_size=7, holdout=0.25)
    measured = _held_out_fidelity(teacher, student, data, torch.device("cpu"))
    assert measured is not None and measured.samples == 24
    held = torch.cat([b.args[0] for b in data.batches("holdout")])
    with torch.no_grad():
        expected_t, expected_s = teacher(held), student.eval()(held)
    whole = agreement_of(expected_t, expected_s)
    relative, cosine = whole.relative_error, whole.cosine_similarity
    assert measured.output_relative_error == pytest.approx(relative, rel=1e-6)
    assert measured.cosine_similarity == pytest.approx(cosine, rel=1e-6)
    agreement = float((expected_t.argmax(1) == expected_s.argmax(1)).float().mean())
    assert measured.top1_agreement == pytest.approx(agreement)
    assert measured.loss is None
    # With the losses: the mean over all 24 held-out rows of the KL, batches of 7 notwithstanding.
    kl = _held_out_fidelity(teacher, student, data, torch.device("cpu"), ["kl"], 2.0)
    p_t = torch.softmax(expected_t.double() / 2.0, dim=1)
    by_hand = (p_t * (p_t.log() - torch.log_softmax(expected_s.double() / 2.0, dim=1))).sum(1).mean() * 4.0
    assert kl is not None and kl.loss == pytest.approx(float(by_hand), rel=1e-6)
    mse = _held_out_fidelity(teacher, student, data, torch.device("cpu"), ["mse"], 1.0)
    assert mse is not None and mse.loss == pytest.approx(relative**2, rel=1e-6)


# --------------------------------------------------------------------------- training


def test_distillation_lowers_the_held_out_error_and_keeps_the_teacher_intact() -> None:
    teacher, student = teacher_and_student()
    before = copy.deepcopy(teacher.state_dict())
    data = TensorBatches((inputs(),), batch_size=16, holdout=0.25)
    config = DistillConfig(steps=60, lr=3e-3, loss="mse")
    result = distill(teacher, student, data, config, device="cpu", progress="none")
    assert result.initial is not None and result.best is not None
    assert result.best.output_relative_error < 0.5 * result.initial.output_relative_error
    assert result.best_step is not None and result.best_step > 0
    assert result.completed_steps == 60 and result.loss == "mse"
    assert not student.training and not teacher.training
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # The student ends in the best state: measuring it again gives the kept figure.
    again = _held_out_fidelity(teacher, student, data, torch.device("cpu"))
    assert again is not None and again.output_relative_error == pytest.approx(result.best.output_relative_error)
    json.dumps(result.to_dict())  # serialisable as it is


def test_holdout_samples_never_reach_the_optimiser() -> None:
    teacher, student = teacher_and_student()
    x = inputs(60)
    x[:, 0, 0, 0] = torch.arange(60, dtype=torch.float32)  # every sample carries its index
    data = TensorBatches((x,), batch_size=8, holdout=0.2)
    seen: set[int] = set()

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.is_grad_enabled():  # a forward whose loss is back-propagated
            seen.update(int(v) for v in args[0][:, 0, 0, 0].tolist())

    student.register_forward_pre_hook(record)
    distill(teacher, student, data, DistillConfig(steps=20), device="cpu", progress="none")
    assert seen and seen <= set(data.indices["fit"])
    assert seen.isdisjoint(data.indices["holdout"])


def test_frozen_batchnorm_keeps_running_statistics_and_train_mode_updates_them() -> None:
    data = TensorBatches((inputs(),), batch_size=16, holdout=0.25)
    teacher, student = teacher_and_student()
    stats = student[1].running_mean.clone()
    distill(teacher, student, data, DistillConfig(steps=5, batchnorm="frozen"), device="cpu", progress="none")
    assert torch.equal(student[1].running_mean, stats)
    teacher, student = teacher_and_student()
    start_weight = student[1].weight.detach().clone()
    distill(teacher, student, data, DistillConfig(steps=5, eval_every=5), device="cpu", progress="none")
    assert not torch.equal(student[1].running_mean, stats)
    assert not torch.equal(student[1].weight, start_weight)


def test_layer_hints_pull_the_named_layer_towards_the_teachers() -> None:
    data = TensorBatches((inputs(),), batch_size=16, holdout=0.25)
    held = torch.cat([b.args[0] for b in data.batches("holdout")])
    errors = {}
    for weight in (0.0, 10.0):
        teacher, student = teacher_and_student(noise=0.5)
        config = DistillConfig(steps=60, lr=2e-2, layer_weight=weight)
        distill(teacher, student, data, config, device="cpu", progress="none", layers=["0"])
        with torch.no_grad():
            errors[weight] = agreement_of(teacher[0](held), student[0](held)).relative_error
    # Output matching alone leaves the first conv far from the teacher's (error about 4.4 at the
    # start); the hint pulls it most of the way.
    assert errors[10.0] < 0.5 * errors[0.0]
    with pytest.raises(UsageError, match="'nope' for the hint loss is not a module of the student"):
        distill(teacher, student, data, config, device="cpu", progress="none", layers=["nope"])
    with pytest.raises(UsageError, match="needs the names of the layers"):
        distill(teacher, student, data, config, device="cpu", progress="none")


def test_a_hint_for_a_folded_layer_compares_with_the_module_it_absorbed() -> None:
    from torch.nn.utils.fusion import fuse_conv_bn_eval  # torch's own fold: the reference

    data = TensorBatches((inputs(),), batch_size=16, holdout=0.25)
    held = torch.cat([b.args[0] for b in data.batches("holdout")])
    teacher, _ = teacher_and_student()
    with torch.no_grad():  # statistics far from the identity, so conv and conv+BN differ
        teacher[1].running_mean.copy_(torch.linspace(-2, 2, 8))
        teacher[1].running_var.copy_(torch.linspace(0.1, 4, 8))
    errors = {}
    for mapping in ({}, {"0": "1"}):
        student = copy.deepcopy(teacher)
        student[0] = fuse_conv_bn_eval(student[0], student[1])
        student[1] = nn.Identity()
        with torch.no_grad():
            student[0].weight.add_(0.3 * torch.randn_like(student[0].weight))
        config = DistillConfig(steps=60, lr=2e-2, layer_weight=10.0)
        distill(teacher, student, data, config, device="cpu", progress="none", layers=["0"], teacher_layers=mapping)
        with torch.no_grad():
            errors[bool(mapping)] = agreement_of(teacher[1](teacher[0](held)), student[0](held)).relative_error
    # Matched with the BatchNorm's output the folded conv approaches it; matched with the bare
    # conv's output it is pulled away from what it has to compute.
    assert errors[True] < 0.5 * errors[False]
    with pytest.raises(UsageError, match="'9' for the hint loss is not a module of the teacher"):
        distill(teacher, student, data, config, device="cpu", progress="none", layers=["0"], teacher_layers={"0": "9"})


def test_the_distill_stage_gives_a_folded_layer_the_batchnorm_as_its_hint() -> None:
    from convrewrite.core.loading import ExampleInputs, LoadedModel
    from convrewrite.engine.pipeline import analyse
    from convrewrite.rules.api import make_rule

    teacher, _ = teacher_and_student()
    with torch.no_grad():
        teacher[1].running_mean.copy_(torch.linspace(-2, 2, 8))
        teacher[1].running_var.copy_(torch.linspace(0.1, 4, 8))
    x = inputs()
    loaded = LoadedModel(teacher, ExampleInputs((x[:1],), {}, "test", ("input",)), "t", "t", "t")
    settings = {"fit": False, "distill": 2, "layer-weight": 1.0, "distill-lr": 1e-9, "quiet": True}
    state = analyse(loaded, [make_rule("fuse-bn")], data=TensorBatches((x,), batch_size=16), settings=settings)
    history = state.sections["distillation"].history
    # The fold is exact: output and hint both match from the first step (a hint against the bare
    # conv's output would be the BatchNorm's whole effect, a normalised error of order 1).
    assert history[1]["loss"] < 1e-6


def test_bad_pairs_are_usage_errors_before_any_training() -> None:
    teacher, student = teacher_and_student()
    data = TensorBatches((inputs(),), batch_size=16, holdout=0.25)
    config = DistillConfig(steps=5)
    with pytest.raises(UsageError, match="the student is the teacher"):
        distill(teacher, teacher, data, config, device="cpu", progress="none")
    other = nn.Sequential(nn.Flatten(), nn.Linear(108, 7))
    with pytest.raises(UsageError, match=r"outputs \[\(16, 7\)\] do not match the teacher's \[\(16, 5\)\]"):
        distill(teacher, other, data, config, device="cpu", progress="none")
    wrong_size = TensorBatches((torch.randn(40, 3, 6),), batch_size=8)
    with pytest.raises(UsageError, match="does not fit the teacher"):
        distill(teacher, student, wrong_size, config, device="cpu", progress="none")


# --------------------------------------------------------------------------- checkpoints and resumption


def test_interrupt_and_resume_give_the_same_weights_as_one_uninterrupted_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # No holdout: the final weights are the last step's, not a best state both runs might share.
    data = TensorBatches((inputs(80),), batch_size=16, holdout=0.0)
    config = DistillConfig(steps=23, checkpoint_every=4, lr=3e-3)
    teacher, start = teacher_and_student(dropout=0.3)  # dropout: the RNG state must resume too

    straight = copy.deepcopy(start)
    distill(teacher, straight, data, config, device="cpu", progress="none")

    first = copy.deepcopy(start)
    with pytest.raises(KeyboardInterrupt):
        # The probe takes one batch, so the 15th is step 14's: 13 steps complete, step 14 is cut short.
        distill(
            teacher,
            first,
            Interrupting(data, after=14),
            config,
            device="cpu",
            progress="none",
            checkpoint_dir=tmp_path,
            resume_command="convrewrite distill OUT --teacher m.py --data d.pt --steps 23",
        )
    err = capsys.readouterr().err
    assert "interrupted at step 13 of 23" in err
    assert "resume with: convrewrite distill OUT --teacher m.py --data d.pt --steps 23" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [INDEX_NAME, "state-00000013.safetensors"]

    def no_unpickling(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("resuming must not need torch.load")

    monkeypatch.setattr(torch, "load", no_unpickling)
    resumed = copy.deepcopy(start)  # the checkpoint, not this, is where it continues from
    result = distill(teacher, resumed, data, config, device="cpu", progress="none", resume=tmp_path)
    assert (result.start_step, result.completed_steps) == (13, 23)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


@pytest.mark.parametrize(
    ("split", "after"),
    [("fit", 8), ("holdout", 5)],  # during step 8; during the evaluation due after step 6
)
def test_resume_keeps_the_best_state_and_history(tmp_path: Path, split: str, after: int) -> None:
    data = TensorBatches((inputs(),), batch_size=16, holdout=0.25)  # 2 holdout batches per evaluation
    config = DistillConfig(steps=12, eval_every=3, checkpoint_every=5, lr=3e-3)
    teacher, start = teacher_and_student()
    straight = copy.deepcopy(start)
    expected = distill(teacher, straight, data, config, device="cpu", progress="none")
    with pytest.raises(KeyboardInterrupt):
        cut = Interrupting(data, after, split)
        distill(teacher, copy.deepcopy(start), cut, config, device="cpu", progress="none", checkpoint_dir=tmp_path)
    resumed = copy.deepcopy(start)
    result = distill(teacher, resumed, data, config, device="cpu", progress="none", resume=tmp_path)
    assert result.start_step == (7 if split == "fit" else 6)
    assert result.best_step == expected.best_step
    assert [h["step"] for h in result.history] == [h["step"] for h in expected.history] == [0, 3, 6, 9, 12]
    assert [h["fidelity"] for h in result.history] == [h["fidelity"] for h in expected.history]
    assert result.initial == expected.initial and result.best == expected.best
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_resume_refuses_a_changed_configuration_or_a_damaged_checkpoint(tmp_path: Path) -> None:
    data = TensorBatches((inputs(),), batch_size=16, holdout=0.25)
    teacher, student = teacher_and_student()
    distill(teacher, student, data, DistillConfig(steps=4), device="cpu", progress="none", checkpoint_dir=tmp_path)
    with pytest.raises(UsageError, match=r"made with lr=0\.003, this run asks for 0\.01"):
        distill(teacher, student, data, DistillConfig(steps=8, lr=1e-2), device="cpu", progress="none", resume=tmp_path)
    with pytest.raises(UsageError, match="beyond the 2 steps"):
        distill(teacher, student, data, DistillConfig(steps=2), device="cpu", progress="none", resume=tmp_path)
    tensors = next(tmp_path.glob("state-*.safetensors"))
    damaged = bytearray(tensors.read_bytes())
    damaged[-1] ^= 0xFF
    tensors.write_bytes(bytes(damaged))
    with pytest.raises(UsageError, match="does not match the digest"):
        distill(teacher, student, data, DistillConfig(steps=8), device="cpu", progress="none", resume=tmp_path)
    with pytest.raises(UsageError, match="holds no distillation checkpoint"):
        distill(teacher, student, data, DistillConfig(steps=8), device="cpu", progress="none", resume=tmp_path / "x")


# --------------------------------------------------------------------------- progress


def test_progress_lines_when_not_a_terminal_and_silence_elsewhere(capsys: pytest.CaptureFixture[str]) -> None:
    teacher, student = teacher_and_student()
    data = TensorBatches((inputs(),), batch_size=16, holdout=0.25)
    distill(teacher, student, data, DistillConfig(steps=4, eval_every=2), device="cpu", progress="auto")
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split()[2] for line in lines[:3]] == ["0/4", "2/4", "4/4"]
    assert "held-out error" in lines[1] and "left" in lines[1]
    assert lines[-1].startswith("distill: 4 steps in")
    distill(teacher, student, data, DistillConfig(steps=4, eval_every=2), device="cpu", progress="none")
    assert capsys.readouterr().err == ""
    quiet = DistillProgress("bar", 4, 0, is_main=False)  # ranks other than 0 never print
    quiet.message("hello")
    assert quiet.mode == "none" and capsys.readouterr().err == ""


def test_summary_line_says_before_and_after() -> None:
    teacher, student = teacher_and_student()
    data = TensorBatches((inputs(),), batch_size=16, holdout=0.25)
    result = distill(teacher, student, data, DistillConfig(steps=6, eval_every=3), device="cpu", progress="none")
    assert result.initial is not None and result.best is not None
    line = result.summary()
    assert line.startswith("Distillation (kl (T=4) loss, held-out, 24 samples): output error ")
    assert f"{result.initial.output_relative_error:.4f} -> {result.best.output_relative_error:.4f}" in line
    assert "top-1 agreement" in line and "6 steps" in line and "on cpu" in line


def test_a_crash_leaves_a_checkpoint_and_the_resume_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    teacher, student = teacher_and_student()
    x = inputs()
    x[40:] = float("nan")  # batches that reach the optimiser from step 3 on carry NaN
    data = TensorBatches((x,), batch_size=16, holdout=0.0, shuffle=False)
    with pytest.raises(ModelError, match="diverged at step 3"):
        distill(teacher, student, data, DistillConfig(steps=8), device="cpu", progress="none", checkpoint_dir=tmp_path)
    err = capsys.readouterr().err
    assert "distillation stopped (ModelError: distillation diverged at step 3" in err and "at step 2 of 8" in err
    assert json.loads((tmp_path / INDEX_NAME).read_text())["step"] == 2


def test_the_rich_bar_runs_and_closes(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")
    teacher, student = teacher_and_student()
    data = TensorBatches((inputs(),), batch_size=16, holdout=0.25)
    distill(teacher, student, data, DistillConfig(steps=4, eval_every=2), device="cpu", progress="bar")
    err = capsys.readouterr().err
    assert "4/4" in err and "held-out err" in err and "left" in err
    assert err.splitlines()[-1].startswith("distill: 4 steps in")
