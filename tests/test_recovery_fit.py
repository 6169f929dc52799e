"""Data-aware fitting, BatchNorm re-estimation and held-out fidelity on tiny models.

Expected figures come from outside the code under test: the original dense layer's output (a
full-rank rewrite must reproduce it), plain tensor reductions over the fit samples (BatchNorm
statistics), direct formulas over whole tensors (fidelity).
"""

from __future__ import annotations

import copy
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from convrewrite.core.loading import ExampleInputs, LoadedModel
from convrewrite.engine.pipeline import analyse
from convrewrite.errors import ModelError
from convrewrite.recovery.batches import TensorBatches, holdout_indices
from convrewrite.recovery.data import calibration_data_from
from convrewrite.recovery.fit import find_terminals, fit_layers, reestimate_batchnorm
from convrewrite.recovery.metrics import measure_fidelity, run_evaluate
from convrewrite.rules.api import make_rule


def smooth_images(count: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Inputs correlated across space and channels (upsampled noise in a 2-channel subspace, like
    the correlated colours of natural images): what makes data-aware fitting pay off."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(count, 2, size // 2, size // 2, generator=generator)
    smooth = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    mixing = torch.randn(channels, 2, generator=generator)
    noise = 0.05 * torch.randn(count, channels, size, size, generator=generator)
    return torch.einsum("cz,nzhw->nchw", mixing, smooth) + noise


class Net2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.mix(x))
        return self.head(x.mean(dim=(2, 3)))


class Net1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(8, 8, 5, padding=2)
        self.conv2 = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(dim=2))


def rewrite(model: nn.Module, example: torch.Tensor, specs: list[str]) -> tuple[nn.Module, nn.Module, list[str]]:
    """(original copy, rewritten model, rewritten names) through the real pipeline."""
    torch.manual_seed(0)
    original = copy.deepcopy(model).eval()
    loaded = LoadedModel(model.eval(), ExampleInputs((example[:1],), {}, "test", ("x",)), "t", "t", "t")
    result = analyse(loaded, [make_rule(spec) for spec in specs])
    assert result.rewrites, specs
    return original, result.model, [r.name for r in result.rewrites]


CASES_2D = [
    ["separable"],
    ["group-shuffle:groups=2"],
    ["group-shuffle:groups=2,assign=energy"],
    ["log-group:groups=2"],
    ["channelwise:groups=2"],
    ["separable", "group-shuffle:groups=2"],
    ["separable", "channelwise:groups=2"],
]


@pytest.mark.parametrize("specs", CASES_2D, ids=lambda s: "+".join(s))
def test_fitting_lowers_every_layer_error_conv2d(specs: list[str]) -> None:
    torch.manual_seed(1)
    x = smooth_images(96, 4, 8)
    original, rewritten, names = rewrite(Net2d(), x, specs)
    data = TensorBatches((x,), batch_size=32, holdout=0.25)
    result = fit_layers(original, rewritten, names, data, steps=40)
    assert result.layers and all(layer.note is None or "not called" not in layer.note for layer in result.layers)
    for layer in result.layers:
        assert layer.fit_error_after <= layer.fit_error_before + 1e-9, layer
        assert layer.holdout_error_after < 0.97 * layer.holdout_error_before, layer
    assert {n.split(".")[0] for n in names} == {layer.name for layer in result.layers}  # outermost blocks only


@pytest.mark.parametrize("specs", [["separable"], ["log-group:groups=2"]], ids=lambda s: "+".join(s))
def test_fitting_lowers_every_layer_error_conv1d(specs: list[str]) -> None:
    torch.manual_seed(2)
    coarse = nn.functional.interpolate(torch.randn(64, 3, 12), size=24, mode="linear")
    x = torch.einsum("cz,nzt->nct", torch.randn(8, 3), coarse) + 0.05 * torch.randn(64, 8, 24)
    original, rewritten, names = rewrite(Net1d(), x, specs)
    result = fit_layers(original, rewritten, names, TensorBatches((x,), batch_size=16, holdout=0.25), steps=40)
    assert len(result.layers) == 2
    for layer in result.layers:
        assert layer.holdout_error_after < 0.97 * layer.holdout_error_before, layer


def test_closed_form_parts_are_found_by_probing() -> None:
    torch.manual_seed(0)
    x = smooth_images(4, 4, 8)
    for specs, expected in [
        (["separable"], ["pointwise"]),
        (["group-shuffle:groups=2"], ["conv"]),
        (["log-group:groups=2"], ["branches.0", "branches.1"]),
        (["separable", "group-shuffle:groups=2"], ["pointwise.conv"]),
        (["separable", "channelwise:groups=2"], []),
    ]:
        _, rewritten, _ = rewrite(Net2d(), x, specs)
        block = rewritten.conv2
        terminals, _ = find_terminals(block, (torch.randn(2, 8, 8, 8),), {})
        assert [t.name for t in terminals] == expected, specs


@pytest.mark.parametrize(
    ("model", "spec", "shape"),
    [
        (
            lambda: nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, stride=2)),
            "separable:multiplier=9,init=random",
            (3, 9, 9),
        ),
        (
            lambda: nn.Sequential(nn.Conv1d(3, 5, 5, padding=2, padding_mode="reflect")),
            "separable:multiplier=5,init=random",
            (3, 16),
        ),
    ],
    ids=["conv2d-stride", "conv1d-reflect"],
)
def test_a_fitted_full_rank_rewrite_is_exact(model, spec: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(3)
    x = torch.randn(64, *shape)
    original, rewritten, names = rewrite(model(), x, [spec])
    data = TensorBatches((x,), batch_size=16, holdout=0.25)
    before = measure_fidelity(original, rewritten, data)
    result = fit_layers(original, rewritten, names, data, steps=0)
    after = measure_fidelity(original, rewritten, data)
    assert before is not None and after is not None
    assert before.output_relative_error > 0.5  # random init: far from the original
    assert after.output_relative_error < 1e-4  # the dense conv itself, on samples never fitted on
    assert result.layers[0].kept == "closed-form"


class ThirdPartyShuffled(nn.Module):
    """A rule nobody wrote code for: conv, a fixed channel reordering, plus an input passthrough."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Conv2d(4, 6, 3, padding=1)
        self.register_buffer("order", torch.randperm(6, generator=torch.Generator().manual_seed(5)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).index_select(1, self.order) + 0.5 * x.repeat(1, 2, 1, 1)[:, :6]


class ThirdPartySquashed(nn.Module):
    """Nothing linear reaches the output: only gradient steps can fit it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * torch.tanh(self.inner(x) / 3)


def test_third_party_blocks_need_no_special_code() -> None:
    torch.manual_seed(4)
    x = smooth_images(64, 4, 8)
    original = nn.Sequential(nn.Identity(), nn.Conv2d(4, 6, 3, padding=1)).eval()
    data = TensorBatches((x,), batch_size=16, holdout=0.25)
    shuffled = nn.Sequential(nn.Identity(), ThirdPartyShuffled()).eval()
    result = fit_layers(original, shuffled, ["1"], data, steps=0)
    assert result.layers[0].closed_form == ["inner"]
    assert result.layers[0].holdout_error_after < 1e-4  # conv + permutation + passthrough: exact
    squashed = nn.Sequential(nn.Identity(), ThirdPartySquashed()).eval()
    result = fit_layers(original, squashed, ["1"], data, steps=60)
    layer = result.layers[0]
    assert layer.closed_form == [] and layer.gradient_steps == 60
    assert layer.holdout_error_after < 0.9 * layer.holdout_error_before


def test_conv3d_blocks_fit_exactly() -> None:
    torch.manual_seed(5)
    x = torch.randn(24, 2, 4, 4, 4)
    original = nn.Sequential(nn.Identity(), nn.Conv3d(2, 3, 3, padding=1)).eval()
    separable = nn.Sequential(nn.Conv3d(2, 54, 3, padding=1, groups=2), nn.Conv3d(54, 3, 1))
    rewritten = nn.Sequential(nn.Identity(), separable).eval()
    result = fit_layers(original, rewritten, ["1"], TensorBatches((x,), batch_size=8, holdout=0.25), steps=0)
    assert result.layers[0].closed_form == ["1"]
    assert result.layers[0].holdout_error_after < 1e-4


def _trained_batchnorm(model: Net2d) -> Net2d:
    """Net2d with BatchNorm statistics and affine parameters far from the identity (as after
    training), so a conv folded with its BatchNorm and the conv alone have different outputs."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        model.bn1.running_mean.copy_(torch.randn(8, generator=generator))
        model.bn1.running_var.copy_(0.2 + 3 * torch.rand(8, generator=generator))
        model.bn1.weight.copy_(0.5 + torch.rand(8, generator=generator))
        model.bn1.bias.copy_(torch.randn(8, generator=generator))
    return model.eval()


@pytest.mark.parametrize("specs", [["fuse-bn"], ["fuse-bn", "separable"]], ids=lambda s: "+".join(s))
def test_a_conv_with_its_batchnorm_folded_in_is_fitted_to_the_batchnorm_output(specs: list[str]) -> None:
    # fuse-bn's conv computes conv1 and bn1 together: its target is bn1's output in the original.
    torch.manual_seed(13)
    x = smooth_images(64, 4, 8)
    model = _trained_batchnorm(Net2d())
    original = copy.deepcopy(model)
    loaded = LoadedModel(model, ExampleInputs((x[:1],), {}, "test", ("x",)), "t", "t", "t")
    data = TensorBatches((x,), batch_size=16, holdout=0.25)
    state = analyse(loaded, [make_rule(spec) for spec in specs], data=data, settings={"fit-steps": 20})
    assert state.output_of == {"conv1": "bn1"}
    fitting = state.sections["fitting"]
    layers = {layer.name: layer for layer in fitting.fit.layers}
    with torch.no_grad():
        expected, actual = original.bn1(original.conv1(x)), state.model.conv1(x)
    error = float((actual - expected).norm() / expected.norm())
    if specs == ["fuse-bn"]:
        # An exact fold stays exact: the layer reproduces conv1 then bn1 of the original model.
        with torch.no_grad():
            assert torch.allclose(state.model(x), original(x), atol=1e-4)
        assert error < 1e-5
        assert layers["conv1"].holdout_error_before < 1e-5 and layers["conv1"].holdout_error_after < 1e-5
    else:
        assert error == pytest.approx(layers["conv1"].fit_error_after, rel=0.5)  # measured on bn1's output
        assert layers["conv1"].holdout_error_after < 0.97 * layers["conv1"].holdout_error_before
    assert layers["conv1"].target == "bn1"
    assert all(layer.target is None for name, layer in layers.items() if name != "conv1")


def test_a_block_whose_last_conv_absorbed_the_batchnorm_is_fitted_to_the_batchnorm_output() -> None:
    # separable then fuse-bn: bn1 is folded into conv1.pointwise, so the block conv1 now computes
    # conv1 then bn1 of the original; fitting must target bn1's output, not conv1's.
    torch.manual_seed(13)
    x = smooth_images(64, 4, 8)
    model = _trained_batchnorm(Net2d())
    loaded = LoadedModel(model, ExampleInputs((x[:1],), {}, "test", ("x",)), "t", "t", "t")
    data = TensorBatches((x,), batch_size=16, holdout=0.25)
    state = analyse(loaded, [make_rule("separable"), make_rule("fuse-bn")], data=data, settings={"fit-steps": 20})
    assert state.output_of == {"conv1.pointwise": "bn1", "conv1": "bn1"}
    layers = {layer.name: layer for layer in state.sections["fitting"].fit.layers}
    assert layers["conv1"].target == "bn1"
    assert layers["conv1"].holdout_error_after < 0.97 * layers["conv1"].holdout_error_before


def test_an_ambiguous_target_is_left_as_transferred() -> None:
    torch.manual_seed(14)
    x = smooth_images(32, 4, 8)
    original, rewritten, names = rewrite(Net2d(), x, ["separable"])
    before = copy.deepcopy(rewritten.conv1.state_dict())
    result = fit_layers(original, rewritten, names, TensorBatches((x,), batch_size=8), steps=2, targets={"conv1": None})
    layers = {layer.name: layer for layer in result.layers}
    assert "not fitted" in (layers["conv1"].note or "") and layers["conv2"].kept != "transfer"
    for key, value in before.items():
        assert torch.equal(rewritten.conv1.state_dict()[key], value), key


def test_holdout_samples_never_reach_the_optimiser_or_batchnorm() -> None:
    torch.manual_seed(6)
    x = smooth_images(40, 4, 8)
    _, held = holdout_indices(40, 0.25, seed=0)
    poisoned = x.clone()
    poisoned[held] = float("nan")  # any use of a held-out sample turns weights or statistics into NaN
    data = TensorBatches((poisoned,), batch_size=10, holdout=0.25)
    original, rewritten, names = rewrite(Net2d(), x, ["separable"])
    result = fit_layers(original, rewritten, names, data, steps=20)
    assert all(layer.gradient_steps == 20 for layer in result.layers)
    assert all(math.isnan(layer.holdout_error_after) for layer in result.layers)  # it was measured on them
    reestimate_batchnorm(rewritten, data)
    for name, tensor in [*rewritten.named_parameters(), *rewritten.named_buffers()]:
        assert torch.isfinite(tensor).all(), name
    fit = torch.ones(40, dtype=torch.bool)
    fit[held] = False
    # Equal batches (30 fit samples in 3 batches of 10): the cumulative average is the plain mean.
    expected_mean = rewritten.conv1(x[fit]).mean(dim=(0, 2, 3))
    assert torch.allclose(rewritten.bn1.running_mean, expected_mean, atol=1e-5)


def test_batchnorm_statistics_are_kept_only_when_they_help() -> None:
    torch.manual_seed(12)
    x = smooth_images(40, 4, 8)
    data = TensorBatches((x,), batch_size=10, holdout=0.25)
    reference = Net2d().eval()
    reestimate_batchnorm(reference, data)  # the reference's statistics come from these very samples
    corrupted = copy.deepcopy(reference)
    corrupted.bn1.running_mean.add_(3.0)
    result = reestimate_batchnorm(corrupted, data, reference=reference)
    assert result.kept and result.output_error_before > 0.1 and result.output_error_after < 1e-6
    assert torch.allclose(corrupted.bn1.running_mean, reference.bn1.running_mean)
    shifted = copy.deepcopy(reference)
    data_shifted = TensorBatches((x + 1.0,), batch_size=10, holdout=0.25)  # other data, other statistics
    saved = copy.deepcopy(shifted.bn1.state_dict())
    result = reestimate_batchnorm(shifted, data_shifted, reference=reference)
    assert not result.kept and result.output_error_before == 0.0 and result.output_error_after > 0
    for key, value in saved.items():
        assert torch.equal(shifted.bn1.state_dict()[key], value), key


def test_each_pass_stops_at_the_layer_being_fitted() -> None:
    torch.manual_seed(7)
    x = smooth_images(32, 4, 8)
    original, rewritten, names = rewrite(Net2d(), x, ["separable"])
    calls = {"original": 0, "rewritten": 0}
    original.head.register_forward_hook(lambda *a: calls.__setitem__("original", calls["original"] + 1))
    rewritten.head.register_forward_hook(lambda *a: calls.__setitem__("rewritten", calls["rewritten"] + 1))
    fit_layers(original, rewritten, names, TensorBatches((x,), batch_size=8, holdout=0.25), steps=5, cache_mb=0)
    assert calls == {"original": 1, "rewritten": 1}  # the one probe forward that finds the call order


@pytest.mark.parametrize("frontier", [True, False])
def test_streaming_without_a_cache_matches_and_reopens_the_source(frontier: bool, monkeypatch) -> None:
    monkeypatch.setenv("CONVREWRITE_FIT_FRONTIER", "1" if frontier else "0")
    torch.manual_seed(8)
    x = smooth_images(48, 4, 8)
    original, rewritten, names = rewrite(Net2d(), x, ["group-shuffle:groups=2"])
    cached = copy.deepcopy(rewritten)
    opened = []

    def stream():
        opened.append(1)
        return (x[i : i + 6] for i in range(0, 48, 6))

    example = ExampleInputs((x[:1],), {}, "test", ("x",))
    source = calibration_data_from(stream, example=example, model=original)
    before = len(opened)
    streamed = fit_layers(original, rewritten, names, source, steps=0, cache_mb=0)
    passes = len(opened) - before
    # The probe, then ONE pass over each split per layer (the statistics fit): every pass called
    # the function again. (The gradient path opened it at least 4 times per layer.) With the
    # frontier (no cache: every frontier on disk) each split is read from the source once, the
    # layers after the first start from the stored frontiers.
    assert passes == (1 + 2 if frontier else 1 + 2 * len(names))
    assert streamed.streaming.startswith("frontier" if frontier else "prefix passes")
    reference = fit_layers(original, cached, names, source, steps=0)
    for a, b in zip(streamed.layers, reference.layers):
        assert a.holdout_error_after == pytest.approx(b.holdout_error_after, rel=1e-5)
    for (name, p), (_, q) in zip(rewritten.state_dict().items(), cached.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_fit_result_serialises() -> None:
    torch.manual_seed(9)
    x = smooth_images(16, 4, 8)
    original, rewritten, names = rewrite(Net2d(), x, ["separable"])
    events = []
    result = fit_layers(original, rewritten, names, TensorBatches((x,), batch_size=8), steps=2, progress=events.append)
    data = result.to_dict()
    assert [layer["name"] for layer in data["layers"]] == ["conv1", "conv2"]
    assert [(e.layer, e.phase) for e in events] == [
        ("conv1", "start"),
        ("conv1", "done"),
        ("conv2", "start"),
        ("conv2", "done"),
    ]
    assert data["fit_samples"] == 14 and data["holdout_samples"] == 2


# --------------------------------------------------------------------------- metrics


def test_measure_fidelity_against_whole_tensor_formulas() -> None:
    torch.manual_seed(10)
    reference = nn.Linear(6, 4)
    candidate = copy.deepcopy(reference)
    with torch.no_grad():
        candidate.weight.add_(0.3 * torch.randn_like(candidate.weight))
    x = torch.randn(50, 6)
    data = TensorBatches((x,), batch_size=7, holdout=0.4)
    _, held = holdout_indices(50, 0.4, seed=0)
    a, b = reference(x[held]).detach().double(), candidate(x[held]).detach().double()
    measured = measure_fidelity(reference, candidate, data)
    assert measured is not None and measured.samples == 20
    assert measured.output_relative_error == pytest.approx(float((b - a).norm() / a.norm()), rel=1e-6)
    assert measured.cosine_similarity == pytest.approx(float((a * b).sum() / (a.norm() * b.norm())), rel=1e-6)
    assert measured.agreement == pytest.approx(float((a.argmax(1) == b.argmax(1)).double().mean()))
    spatial = measure_fidelity(nn.Conv1d(6, 4, 1), nn.Conv1d(6, 4, 1), TensorBatches((torch.randn(10, 6, 3),)))
    assert spatial is not None and spatial.agreement is None


def test_run_evaluate_normalises_and_reports_in_one_line() -> None:
    model = nn.Linear(2, 2)
    assert run_evaluate(lambda m: 0.5, model, "the original model") == {"score": 0.5}
    assert run_evaluate(lambda m: {"acc": torch.tensor(0.25), "loss": 2}, model, "x") == {"acc": 0.25, "loss": 2.0}
    for bad, message in [
        (lambda m: "high", "evaluate() on the rewritten model: expected a number, found str"),
        (lambda m: {"acc": float("nan")}, "expected a finite number, found nan"),
        (lambda m: {}, "found an empty dict"),
        (lambda m: 1 / 0, "evaluate() raised ZeroDivisionError: division by zero on the rewritten model"),
    ]:
        with pytest.raises(ModelError) as caught:
            run_evaluate(bad, model, "the rewritten model")
        assert message in caught.value.one_line() and "\n" not in caught.value.one_line()


# --------------------------------------------------------------------------- torch.distributed


def _distributed_fit(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for steps in (0, 3):
            torch.manual_seed(11)
            x = smooth_images(64, 4, 8)
            original, rewritten, names = rewrite(Net2d(), x, ["separable"])
            data = TensorBatches((x,), batch_size=8, holdout=0.25, shuffle=False)
            fit_layers(original, rewritten, names, data, steps=steps)
            reestimate_batchnorm(rewritten, data)
            torch.save(rewritten.state_dict(), os.path.join(out_dir, f"steps{steps}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_all_reduce_to_one_model(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(
        _distributed_fit,
        args=(2, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="fork" if sys.platform == "linux" else "spawn",  # fork: no second torch import
    )
    for steps in (0, 3):
        first = torch.load(tmp_path / f"steps{steps}-rank0.pt", weights_only=True)
        second = torch.load(tmp_path / f"steps{steps}-rank1.pt", weights_only=True)
        for key in first:
            assert torch.isfinite(first[key].float()).all(), key
            assert torch.allclose(first[key].float(), second[key].float(), atol=1e-6), key  # one model, not two
    # One process over all the data solves the same normal equations: the two shards were summed.
    torch.manual_seed(11)
    x = smooth_images(64, 4, 8)
    original, single, names = rewrite(Net2d(), x, ["separable"])
    data = TensorBatches((x,), batch_size=8, holdout=0.25, shuffle=False)
    fit_layers(original, single, names, data, steps=0)
    reestimate_batchnorm(single, data)
    shared = torch.load(tmp_path / "steps0-rank0.pt", weights_only=True)
    for key, value in single.state_dict().items():
        # Batch variances depend on which samples share a batch, and shards interleave samples.
        if value.is_floating_point() and not key.endswith("running_var"):
            assert torch.allclose(value, shared[key], atol=1e-4, rtol=1e-4), key


# --------------------------------------------------------------------------- the statistics path


def _perturbed(model: nn.Module, names: list[str], seed: int = 7) -> nn.Module:
    """A copy whose named convs/linears carry wrong weights: full-capacity 'replacements'."""
    rewritten = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            module = rewritten.get_submodule(name)
            module.weight.add_(0.5 * torch.randn(module.weight.shape, generator=generator))
            module.bias.add_(0.5 * torch.randn(module.bias.shape, generator=generator))
    return rewritten


def test_statistics_fit_of_full_capacity_replacements_is_exact_end_to_end() -> None:
    torch.manual_seed(12)
    original = Net2d().eval()
    names = ["conv1", "conv2", "mix", "head"]
    rewritten = _perturbed(original, names)
    x = smooth_images(64, 4, 8)
    data = TensorBatches((x,), batch_size=16, holdout=0.25, shuffle=False)
    result = fit_layers(original, rewritten, names, data, steps=0, product=torch.float64)
    assert [layer.name for layer in result.layers] == names
    for layer in result.layers:
        assert layer.method.startswith("statistics"), layer
        # Exact up to the solvers' relative ridge (1e-7 of the mean diagonal, pulling towards the
        # start: from a start at error ~5 that leaves ~1e-5; the head's nearly dead ReLU inputs
        # keep their perturbed weights, ~3e-5 on held-out samples).
        assert layer.holdout_error_before > 0.05 and layer.holdout_error_after < 1e-4, layer
        assert layer.kept == "closed-form" and layer.gradient_steps == 0
    with torch.no_grad():
        assert torch.allclose(rewritten(x), original(x), atol=1e-4)
    # The original's own weights come back where the data determines them (the first layer sees
    # the full-rank input; later ones see ReLU outputs with dead channels, whose weights are free).
    assert torch.allclose(rewritten.conv1.weight, original.conv1.weight, atol=1e-3)


def test_statistics_fit_counts_one_pass_of_each_prefix_per_layer(monkeypatch) -> None:
    monkeypatch.setenv("CONVREWRITE_FIT_FRONTIER", "0")
    torch.manual_seed(13)
    original = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 8, 3, padding=1), nn.ReLU()).eval()
    rewritten = _perturbed(original, ["0", "2"])
    x = torch.randn(40, 4, 16)
    data = TensorBatches((x,), batch_size=8, holdout=0.25)
    calls = {"original": 0, "rewritten": 0}
    original.register_forward_pre_hook(lambda m, a: calls.__setitem__("original", calls["original"] + 1))
    rewritten.register_forward_pre_hook(lambda m, a: calls.__setitem__("rewritten", calls["rewritten"] + 1))
    result = fit_layers(original, rewritten, ["0", "2"], data, steps=0)
    batches = len(list(data.batches("fit"))) + len(list(data.batches("holdout")))
    # One probe forward, then one streamed pass over both splits per layer, in each model.
    assert calls == {"original": 1 + 2 * batches, "rewritten": 1 + 2 * batches}
    # Hand MACs: conv "0" costs 16*8*(4*3) per sample, conv "2" 16*8*(8*3); a full forward both.
    first, second = 16 * 8 * 12, 16 * 8 * 24
    full = first + second
    expected = [(first + 0) / full, (full + first) / full]  # (original through the target + rewritten up to the block)
    assert [layer.passes for layer in result.layers] == pytest.approx(expected)
    assert result.passes == pytest.approx(sum(expected))


def test_the_frontier_runs_each_module_once_per_batch_and_counts_the_segments() -> None:
    torch.manual_seed(13)
    original = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 8, 3, padding=1), nn.ReLU()).eval()
    rewritten = _perturbed(original, ["0", "2"])
    reference = copy.deepcopy(rewritten)
    x = torch.randn(40, 4, 16)
    data = TensorBatches((x,), batch_size=8, holdout=0.25)
    calls: dict[str, int] = {}
    for label, model in (("original", original), ("rewritten", rewritten)):
        for name in ("0", "2"):
            key = f"{label}.{name}"
            calls[key] = 0
            model.get_submodule(name).register_forward_pre_hook(
                lambda m, a, key=key: calls.__setitem__(key, calls[key] + 1)
            )
    result = fit_layers(original, rewritten, ["0", "2"], data, steps=0)
    assert result.streaming.startswith("frontier"), result.streaming
    batches = len(list(data.batches("fit"))) + len(list(data.batches("holdout")))
    # The probe forward runs each module once, the check of the graph on the probe batch twice
    # (by the graph and by the models' own forwards, both stopped before the last block, whose
    # pre-hook still sees that call); then every module up to the last cut runs once per batch in
    # all, whatever the number of layers, and the last block never.
    assert calls == {
        "original.0": 3 + batches,
        "original.2": 3 + batches,
        "rewritten.0": 3 + batches,
        "rewritten.2": 2,
    }
    # Hand MACs: layer "0" runs the original's first conv; layer "2" the original's second and
    # the rewritten model's first (fitted) conv: the segments between the cuts.
    first, second = 16 * 8 * 12, 16 * 8 * 24
    full = first + second
    assert [layer.passes for layer in result.layers] == pytest.approx([first / full, (second + first) / full])
    # The same fit as the prefix passes (which the environment switch restores).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONVREWRITE_FIT_FRONTIER", "0")
        prefix = fit_layers(original, reference, ["0", "2"], data, steps=0)
    assert prefix.streaming.startswith("prefix passes")
    for a, b in zip(result.layers, prefix.layers):
        assert a.holdout_error_after == pytest.approx(b.holdout_error_after, rel=1e-6)
    for (name, p), (_, q) in zip(rewritten.state_dict().items(), reference.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_a_fused_batchnorm_target_is_reproduced_from_statistics() -> None:
    torch.manual_seed(14)
    original = Net2d().eval()
    x = smooth_images(48, 4, 8)
    with torch.no_grad():
        original.bn1.running_mean.normal_()
        original.bn1.running_var.uniform_(0.5, 2.0)
    rewritten = copy.deepcopy(original)
    rewritten.bn1 = nn.Identity()  # conv1 must now compute conv1 + bn1 (what fuse-bn's conv does)
    data = TensorBatches((x,), batch_size=16, holdout=0.25)
    result = fit_layers(original, rewritten, ["conv1"], data, steps=0, targets={"conv1": "bn1"}, product=torch.float64)
    layer = result.layers[0]
    assert layer.method.startswith("statistics") and layer.holdout_error_after < 1e-6, layer
    with torch.no_grad():
        assert torch.allclose(rewritten(x), original(x), atol=1e-4)


def test_the_gradient_path_stays_selectable() -> None:
    torch.manual_seed(15)
    original = Net2d().eval()
    rewritten = _perturbed(original, ["conv2"])
    x = smooth_images(48, 4, 8)
    data = TensorBatches((x,), batch_size=16, holdout=0.25)
    result = fit_layers(original, rewritten, ["conv2"], data, steps=5, statistics=False)
    layer = result.layers[0]
    assert layer.method == "gradient" and layer.closed_form == ["(block)"]
    assert layer.holdout_error_after < 1e-4
    assert layer.passes > 1  # the probing path streams the data more than once


def test_refinement_steps_after_the_closed_form_never_make_it_worse() -> None:
    torch.manual_seed(16)
    original = Net2d().eval()
    rewritten = _perturbed(original, ["conv2"])
    x = smooth_images(48, 4, 8)
    data = TensorBatches((x,), batch_size=16, holdout=0.25)
    layer = fit_layers(original, rewritten, ["conv2"], data, steps=10).layers[0]
    assert layer.gradient_steps == 10 and layer.kept in ("closed-form", "closed-form+gradient")
    assert layer.holdout_error_after < 1e-4  # float32 chunk products (the default): a floor near 1e-5


class _ThirdParty(nn.Module):
    """A block that declares no linear structure (no to_dense): no statistics path."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = copy.deepcopy(conv)
        self.scale = nn.Parameter(torch.ones(conv.out_channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.tanh(self.scale)


def test_a_block_without_statistics_path_keeps_the_gradient_path_and_its_steps() -> None:
    torch.manual_seed(17)
    original = Net2d().eval()
    rewritten = copy.deepcopy(original)
    rewritten.conv2 = _ThirdParty(original.conv2)
    with torch.no_grad():
        rewritten.conv2.conv.weight.mul_(0.5)
    x = smooth_images(32, 4, 8)
    data = TensorBatches((x,), batch_size=16, holdout=0.25)
    layer = fit_layers(original, rewritten, ["conv2"], data, steps=0).layers[0]
    assert layer.method == "gradient" and layer.gradient_steps == 500  # FALLBACK_STEPS
    assert layer.holdout_error_after < 0.5 * layer.holdout_error_before


def test_reference_outputs_are_computed_once_and_never_reused_for_other_samples() -> None:
    from convrewrite.recovery.metrics import ReferenceOutputs

    torch.manual_seed(21)
    reference = Net2d().eval()
    candidate = copy.deepcopy(reference)
    with torch.no_grad():
        candidate.conv2.weight.mul_(1.1)
    calls = [0]
    reference.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    x = smooth_images(32, 4, 8)
    data = TensorBatches((x,), batch_size=8, holdout=0.25)
    plain = measure_fidelity(reference, candidate, data)
    outputs = ReferenceOutputs(reference)
    first = measure_fidelity(reference, candidate, data, outputs=outputs)
    held_batches = calls[0] // 2  # the plain measurement ran it once per held-out batch
    before = calls[0]
    again = measure_fidelity(reference, candidate, data, outputs=outputs)
    assert calls[0] == before  # every output reused
    assert first == again and first is not None and plain is not None
    assert first.output_relative_error == pytest.approx(plain.output_relative_error, rel=1e-12)
    assert outputs.hits == held_batches and outputs.misses == held_batches
    # A source that yields other samples on the next pass (augmentation): computed again.
    other = TensorBatches((x + 0.5,), batch_size=8, holdout=0.25)
    shifted = measure_fidelity(reference, candidate, other, outputs=outputs)
    fresh = measure_fidelity(reference, candidate, other)
    assert shifted is not None and fresh is not None
    assert shifted.output_relative_error == pytest.approx(fresh.output_relative_error, rel=1e-12)
