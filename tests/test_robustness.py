"""Issue 17: real models that broke after the work was done, one class of failure per section.

1. torch's recurrent and attention layers written as constructor calls; a third-party class's
   private plain attributes kept when it is rebuilt from its attributes.
2. ``torch.fx.wrap``-ped functions: the wrap statement at module level of ``model.py``.
3. The reload check's tolerance scales with each output tensor; a wrong weight still fails.
4. ``apply`` checks the export right after the rewrite, before fitting; a late failure keeps the
   fitted weights and prints the command that continues.
5. ``from convrewrite.rules import Rule`` (the pre-restructure path) works, with a warning.
6. Winograd F(2x2,3x3): transforms by additions, MACs counted as its element-wise products.

Expected figures come from torch itself (the original model's output, ``F.conv2d``) or from
hand formulas, never from the code under test.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from convrewrite.core.loading import load_model
from convrewrite.engine.pipeline import analyse
from convrewrite.engine.report_builder import build_report
from convrewrite.export.source import SourceWriter
from convrewrite.export.writer import write_apply_output
from convrewrite.rules.api import make_rule


def _write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def _apply_and_reload(model_file: Path, out: Path, rule: str = "separable") -> tuple[Any, Any, Any]:
    """apply's path in process: rewrite, write, then load the written directory afresh.

    Returns (the rewritten model's output, the reloaded model's output, the run state)."""
    loaded = load_model(str(model_file))
    result = analyse(loaded, [make_rule(rule)])
    assert result.rewrites, "the fixture must have something to rewrite"
    write_apply_output(result, build_report(result), out)
    with torch.no_grad():
        expected = loaded.inputs.call(result.model.eval())
    fresh = load_model(str(out))
    with torch.no_grad():
        actual = fresh.inputs.call(fresh.model.eval())
    return expected, actual, result


# ------------------------------------------------------------------ 1. recurrent layers, private attributes

TORCH_LAYERS = {
    "gru": lambda: nn.GRU(6, 5),
    "lstm-proj": lambda: nn.LSTM(6, 8, proj_size=3),
    "lstm-deep-bi-batch-first": lambda: nn.LSTM(6, 5, num_layers=2, bidirectional=True, batch_first=True),
    "lstm-no-bias-dropout": lambda: nn.LSTM(6, 5, num_layers=2, bias=False, dropout=0.25),
    "rnn-relu": lambda: nn.RNN(6, 5, nonlinearity="relu", num_layers=3),
    "gru-double": lambda: nn.GRU(6, 5, bidirectional=True).to(torch.float64),
    "lstm-cell": lambda: nn.LSTMCell(6, 5),
    "gru-cell": lambda: nn.GRUCell(6, 5, bias=False),
    "rnn-cell": lambda: nn.RNNCell(6, 5, nonlinearity="relu"),
    "attention": lambda: nn.MultiheadAttention(8, 2, add_bias_kv=True, kdim=5, vdim=7, batch_first=True),
    "attention-no-bias": lambda: nn.MultiheadAttention(8, 4, bias=False, dropout=0.1),
    "encoder-layer": lambda: nn.TransformerEncoderLayer(
        8, 2, dim_feedforward=16, activation="gelu", norm_first=True, batch_first=True, layer_norm_eps=1e-3
    ),
    "decoder-layer": lambda: nn.TransformerDecoderLayer(8, 2, dim_feedforward=12, dropout=0.0, bias=False),
}


@pytest.mark.parametrize("kind", sorted(TORCH_LAYERS))
def test_torch_recurrent_and_attention_layers_are_written_as_constructor_calls(kind: str) -> None:
    """The call written for the layer builds an equal layer: same class, arguments, tensors."""
    module = TORCH_LAYERS[kind]()
    writer = SourceWriter(module, None, None, None)
    expression = writer.constructor(module)
    assert expression is not None and expression.startswith(f"nn.{type(module).__name__}(")
    built = eval(expression, dict(writer.namespace))  # noqa: S307 - the writer's own text
    assert type(built) is type(module)
    assert built.extra_repr() == module.extra_repr()
    shapes = {name: (t.shape, t.dtype) for name, t in module.state_dict().items()}
    assert {name: (t.shape, t.dtype) for name, t in built.state_dict().items()} == shapes
    for name in ("_flat_weights_names", "_qkv_same_embed_dim", "activation_relu_or_gelu", "proj_size", "mode"):
        if hasattr(module, name):
            assert getattr(built, name) == getattr(module, name), name


RECURRENT_MODEL = """
    import torch
    import torch.nn.functional as F
    from torch import nn

    INPUT_SHAPE = (2, 3, 8, 12)


    class GroupNorm1(nn.GroupNorm):
        '''timm's GroupNorm1: one group, and a private flag cached at construction.'''

        def __init__(self, channels):
            super().__init__(1, channels)
            self._fast_norm = False

        def forward(self, x):
            if self._fast_norm:
                raise RuntimeError("the fast path was never asked for")
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


    class Guarded(nn.Module):
        '''Data-dependent control flow (untraceable): a leaf, rebuilt from its attributes.'''

        def __init__(self, channels):
            super().__init__()
            self._limit = 50.0
            self.norm = GroupNorm1(channels)

        def forward(self, x):
            if x.abs().max() > self._limit:
                x = x.clamp(-self._limit, self._limit)
            return self.norm(x)


    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.guard = Guarded(8)
            self.lstm = nn.LSTM(64, 6, num_layers=2, bidirectional=True, batch_first=True)
            self.gru = nn.GRU(12, 5, batch_first=True)
            self.projected = nn.LSTM(5, 7, proj_size=4, batch_first=True)
            self.rnn = nn.RNN(4, 3, nonlinearity="relu", batch_first=True)
            self.cell = nn.GRUCell(3, 4)
            self.attention = nn.MultiheadAttention(4, 2, batch_first=True, add_bias_kv=True)
            self.encoder = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, activation="gelu", batch_first=True)
            layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True, norm_first=True)
            self.stack = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(4), enable_nested_tensor=False)

        def forward(self, x):
            x = self.guard(self.conv(x))
            x = x.permute(0, 3, 1, 2).flatten(2)  # (N, width, channels * height): a sequence
            x, _ = self.lstm(x)
            x, _ = self.gru(x)
            x, _ = self.projected(x)
            x, _ = self.rnn(x)
            h = self.cell(x[:, -1])
            y, _ = self.attention(h.unsqueeze(1), h.unsqueeze(1), h.unsqueeze(1))
            return self.stack(self.encoder(y))


    def build_model():
        return Heads().eval()
"""


def test_a_model_with_recurrent_heads_and_a_private_flag_writes_and_reloads(tmp_path: Path) -> None:
    model_file = _write(tmp_path, "heads.py", RECURRENT_MODEL)
    expected, actual, result = _apply_and_reload(model_file, tmp_path / "out")
    assert "guard" in {leaf.name for leaf in result.trace.leaves}
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    text = (tmp_path / "out" / "model.py").read_text()
    assert "nn.LSTM(input_size=64, hidden_size=6, num_layers=2" in text
    assert "bidirectional=True" in text and "proj_size=4" in text
    assert "'_fast_norm': False" in text and "'_limit': 50.0" in text


# ------------------------------------------------------------------ 2. torch.fx.wrap-ped functions

WRAPPED_MODEL = """
    import torch
    import torch.fx
    from torch import nn


    def stochastic_depth(x, p: float, training: bool = True):
        '''torchvision.ops.stochastic_depth's shape: identity in eval, wrapped so fx keeps it one call.'''
        if not training or p == 0.0:
            return x
        keep = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype).bernoulli_(1.0 - p)
        return x * keep / (1.0 - p)


    torch.fx.wrap("stochastic_depth")

    INPUT_SHAPE = (1, 3, 16, 16)


    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return x + stochastic_depth(self.conv(x), 0.25, self.training)


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.block = Block()

        def forward(self, x):
            return self.block(self.stem(x))


    def build_model():
        return Net().eval()
"""


def test_a_model_calling_an_fx_wrapped_function_writes_a_model_py_that_imports(tmp_path: Path) -> None:
    model_file = _write(tmp_path, "wrapped.py", WRAPPED_MODEL)
    expected, actual, _ = _apply_and_reload(model_file, tmp_path / "out")
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    text = (tmp_path / "out" / "model.py").read_text()
    lines = text.splitlines()
    wraps = [line for line in lines if "wrap(" in line]
    assert wraps and all(line.startswith("torch.fx.wrap(") for line in wraps), wraps  # module level
    # Traced again, model.py still calls the function as one node (the wrap took effect).
    fresh = load_model(str(tmp_path / "out")).model
    graph = torch.fx.symbolic_trace(fresh).graph
    called = [n for n in graph.nodes if n.op == "call_function" and "stochastic_depth" in str(n.target)]
    assert len(called) == 1


# ------------------------------------------------------------------ 3. the reload tolerance


def _standardized(weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    flat = weight.flatten(1)
    mean = flat.mean(dim=1, keepdim=True)
    variance = flat.var(dim=1, unbiased=False, keepdim=True)
    return ((flat - mean) / torch.sqrt(variance + eps)).view_as(weight)


def _weight_standardized_outputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight-standardized conv (standardizing in every call) and its rewrite to the effective
    weight (standardized once, in float64): the same function on two float paths. Third: the
    rewrite with one weight of the effective kernel changed, a genuinely wrong reload."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(128, 128, 3, 3, generator=generator) * 0.05
    x = torch.randn(2, 128, 20, 20, generator=generator) * 3
    expected = torch.nn.functional.conv2d(x, _standardized(weight), padding=1)
    effective = _standardized(weight.double()).float()
    exact = torch.nn.functional.conv2d(x, effective, padding=1)
    wrong_weight = effective.clone()
    wrong_weight[5, 7, 1, 1] += 0.05  # the kernel's entries have unit variance
    wrong = torch.nn.functional.conv2d(x, wrong_weight, padding=1)
    return expected, exact, wrong


def test_the_reload_check_accepts_an_exact_rewrite_on_another_float_path() -> None:
    from convrewrite.export.pytorch import compare_outputs

    expected, exact, _ = _weight_standardized_outputs()
    # The element-wise check the issue reports rejects it: outputs near zero are sums of large terms.
    assert not torch.allclose(exact, expected, rtol=1e-5, atol=1e-6)
    worst = compare_outputs(expected, exact)
    assert worst == float((exact - expected).abs().max())
    # Scaled per tensor: a second output a thousand times smaller is judged on its own scale.
    compare_outputs((expected, expected / 1000), (exact, exact / 1000))


def test_the_reload_check_still_rejects_one_changed_weight() -> None:
    from convrewrite.errors import ModelError
    from convrewrite.export.pytorch import compare_outputs

    expected, exact, wrong = _weight_standardized_outputs()
    with pytest.raises(ModelError, match="do not reproduce the rewritten model"):
        compare_outputs(expected, wrong)
    # Wrong in a small output next to a large one: the small one's own scale catches it.
    with pytest.raises(ModelError, match="do not reproduce"):
        compare_outputs((expected * 1000, expected), (exact * 1000, wrong))
    with pytest.raises(ModelError, match="do not reproduce"):
        compare_outputs(torch.zeros(3), torch.full((3,), 1e-30))
    with pytest.raises(ModelError, match="do not reproduce"):
        compare_outputs(torch.arange(4), torch.arange(4) + torch.tensor([0, 0, 0, 1]))


def test_inception_with_separable_writes_and_reloads_within_the_scaled_tolerance(tmp_path: Path) -> None:
    from convrewrite.core.compare import RELOAD_TOLERANCE

    zoo_file = Path(__file__).resolve().parent.parent / "sample_models" / "zoo" / "inception.py"
    loaded = load_model(str(zoo_file), input_shapes=[(2, 3, 75, 75)])
    result = analyse(loaded, [make_rule("separable")])
    written = write_apply_output(result, build_report(result), tmp_path / "out")
    fresh = load_model(str(tmp_path / "out"), input_shapes=[(2, 3, 75, 75)])
    with torch.no_grad():
        expected = loaded.inputs.call(result.model.eval())
        actual = loaded.inputs.call(fresh.model.eval())
    assert written.reload_max_abs_error == pytest.approx(float((actual - expected).abs().max()), abs=1e-7)
    assert float((actual - expected).abs().max()) <= RELOAD_TOLERANCE * float(expected.abs().max())


# ------------------------------------------------------------------ 5. the plugin API's old import path


def test_the_pre_restructure_plugin_imports_work_with_a_deprecation_warning() -> None:
    import convrewrite.rules.api as api

    with pytest.warns(DeprecationWarning, match=r"import it from convrewrite\.rules\.api") as caught:
        from convrewrite.rules import ConvSite, Cost, Replacement, Rule, RuleConfig, common_skip_reason
    assert (ConvSite, Cost, Replacement, Rule, RuleConfig, common_skip_reason) == (
        api.ConvSite,
        api.Cost,
        api.Replacement,
        api.Rule,
        api.RuleConfig,
        api.common_skip_reason,
    )
    named = [str(w.message).split()[1] for w in caught if issubclass(w.category, DeprecationWarning)]
    assert sorted(named) == sorted(["ConvSite", "Cost", "Replacement", "Rule", "RuleConfig", "common_skip_reason"])
    assert {w.filename for w in caught} == {__file__}  # each at the plugin's own import line, once
    with pytest.warns(DeprecationWarning, match=r"convrewrite\.rule_api is deprecated.*convrewrite\.rules\.api"):
        from convrewrite.rule_api import make_rule as old_make_rule
    assert old_make_rule is api.make_rule


def test_a_plugin_written_against_the_old_path_still_defines_a_working_rule() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from convrewrite.rules import ConvSite, Rule, RuleConfig

    class Keep(Rule):
        name = "keep-old-path"
        summary = "never rewrites (a plugin from before the restructure)"
        config_class = RuleConfig

        def skip_reason(self, site: ConvSite) -> str | None:
            return "keeps every layer"

    assert Keep().skip_reason(None) == "keeps every layer"  # type: ignore[arg-type]


def test_rule_submodules_and_unknown_names_are_not_deprecated_api() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        from convrewrite.rules import separable  # a rule module, imported as before

    assert separable.__name__ == "convrewrite.rules.separable"
    with pytest.raises(ImportError):
        from convrewrite.rules import NoSuchName  # noqa: F401


# ------------------------------------------------------------------ 4. failures after the work

UNWRITABLE_MODEL = """
    import torch
    from torch import nn

    INPUT_SHAPE = (1, 3, 16, 16)


    class Settings:
        '''A configuration object with no literal form: model.py cannot rebuild a class that keeps it.'''

        scale = 1.0


    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.settings = Settings()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            if x.mean() > 100:  # data-dependent: an untraceable leaf, rebuilt from its attributes
                return x
            return self.conv(x) * self.settings.scale


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.gate = Gate()

        def forward(self, x):
            return self.gate(self.stem(x)).mean(dim=(2, 3))


    def build_model():
        return Net()
"""


def _calibration(tmp_path: Path, count: int = 48) -> Path:
    path = tmp_path / "calib.pt"
    torch.save(torch.randn(count, 3, 16, 16, generator=torch.Generator().manual_seed(0)), path)
    return path


def _no_fitting(monkeypatch: pytest.MonkeyPatch) -> None:
    import convrewrite.engine.stages.fit as fit_stage

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("fitting ran")

    monkeypatch.setattr(fit_stage, "fit_layers", refuse)


def test_apply_on_a_model_whose_export_cannot_work_fails_before_fitting(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    model_file = _write(tmp_path, "unwritable.py", UNWRITABLE_MODEL)
    data = _calibration(tmp_path)
    _no_fitting(monkeypatch)
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    start = time.perf_counter()
    result = cli("apply", model_file, "--rule", "separable", "--data", data, "--out", out)
    assert time.perf_counter() - start < 60
    assert result.code == 3, result.err
    assert "export-check" in result.err or "checked before any fitting" in result.err
    assert "'settings' holds a Settings, which has no literal form" in result.err
    assert "AssertionError" not in result.err and "Traceback" not in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no scratch left


def test_a_write_that_fails_after_fitting_keeps_the_fitted_weights_and_says_how_to_continue(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shlex
    import sys

    from safetensors.torch import load_file

    import convrewrite.export.writer as writer

    tiny = Path(__file__).resolve().parent / "assets" / "tiny.py"
    data = _calibration(tmp_path)
    out = tmp_path / "out"
    args = ["apply", str(tiny), "--rule", "separable", "--data", str(data), "--fit-steps", "5", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["convrewrite", *args])
    real_move = writer.move_into_place

    def disk_full(staging: Path, directory: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "move_into_place", disk_full)
    failed = cli(*args)
    assert failed.code == 3, failed.err
    checkpoint = tmp_path / "out.fitted-checkpoint"
    assert not out.exists()
    assert f"the fitted weights are kept in {checkpoint}" in failed.err
    assert "No space left on device" in failed.err
    command = failed.err.split("to write them without fitting again: ", 1)[1].strip().split("\n")[0]
    parts = shlex.split(command)
    assert parts[:1] == ["convrewrite"] and parts[-2:] == ["--fitted-weights", str(checkpoint)]
    kept = load_file(str(checkpoint / "fitted.safetensors"))

    # Continue: the printed command, with the disk back; fitting must not run again.
    monkeypatch.setattr(writer, "move_into_place", real_move)
    _no_fitting(monkeypatch)
    resumed = cli(*parts[1:])
    assert resumed.code == 0, resumed.err
    written = load_file(str(out / "weights.safetensors"))
    assert set(written) <= set(kept)
    for name, tensor in written.items():
        assert torch.equal(tensor, kept[name]), name
    # The kept weights are the fitted ones, not the plain transfer: a run without data differs.
    plain = cli("apply", tiny, "--rule", "separable", "--out", tmp_path / "plain")
    assert plain.code == 0, plain.err
    transfer = load_file(str(tmp_path / "plain" / "weights.safetensors"))
    assert any(not torch.equal(transfer[name], kept[name]) for name in transfer)


def test_fitted_weights_that_do_not_fit_the_model_are_a_usage_error(cli: Any, tmp_path: Path) -> None:
    from convrewrite.recovery.resume import save_fitted

    checkpoint = save_fitted(tmp_path / "kept", nn.Sequential(nn.Conv2d(3, 4, 3)), ["separable"])
    tiny = Path(__file__).resolve().parent / "assets" / "tiny.py"
    result = cli("apply", tiny, "--rule", "separable", "--fitted-weights", checkpoint, "--out", tmp_path / "out")
    assert result.code == 2, result.err
    assert "does not fit the rewritten model" in result.err
    assert not (tmp_path / "out").exists()


def test_a_distillation_whose_write_fails_keeps_its_last_step_and_continues_without_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    import convrewrite.commands.distill as distill_job
    from convrewrite.errors import ModelError
    from convrewrite.export.writer import CHECKPOINT_DIR
    from convrewrite.recovery.batches import TensorBatches
    from convrewrite.recovery.checkpoint import load_checkpoint
    from convrewrite.recovery.distill import DistillConfig

    tiny = Path(__file__).resolve().parent / "assets" / "tiny.py"
    result = analyse(load_model(str(tiny)), [make_rule("separable")])
    out = tmp_path / "out"
    write_apply_output(result, build_report(result), out)
    teacher = load_model(str(tiny)).model
    data = TensorBatches((torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1)),), batch_size=8)
    config = DistillConfig(steps=6, checkpoint_every=100)
    command = f"convrewrite distill {out} --teacher {tiny} --data calib.pt --steps 6"
    real_write = distill_job._write_distilled

    def disk_full(*args: Any, **kwargs: Any) -> float:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(distill_job, "_write_distilled", disk_full)
    with pytest.raises(ModelError) as caught:
        distill_job.distill_output(out, teacher, data, config, progress="none", resume_command=command)
    message = caught.value.one_line()
    assert f"the distilled weights are kept in {out / CHECKPOINT_DIR}" in message
    assert f"to write them without distilling again: {command}" in message
    kept = load_checkpoint(out / CHECKPOINT_DIR)
    assert kept.step == 6  # the last step, not an older one

    # Continue: the same call; no optimizer step may run again.
    monkeypatch.setattr(distill_job, "_write_distilled", real_write)
    steps_taken: list[int] = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps_taken.append(1) or real_step(self))
    job = distill_job.distill_output(out, teacher, data, config, progress="none", resume_command=command)
    assert steps_taken == [] and job.resumed_from_step == 6
    written = load_file(str(out / "weights.safetensors"))
    best = kept.best if kept.best is not None else kept.student
    for name, tensor in written.items():
        assert torch.equal(tensor, best[name]), name


def test_with_export_onnx_the_onnx_export_is_also_tried_before_fitting(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnxruntime")
    import convrewrite.export.onnx as onnx_export
    from convrewrite.errors import ModelError

    calls: list[str] = []

    def unsupported(model: Any, inputs: Any, path: Path, **kwargs: Any) -> Any:
        calls.append(str(path))
        raise ModelError("torch.onnx.export failed: aten::frobnicate is not supported")

    monkeypatch.setattr(onnx_export, "export_onnx", unsupported)
    _no_fitting(monkeypatch)
    tiny = Path(__file__).resolve().parent / "assets" / "tiny.py"
    out = tmp_path / "out"
    data = _calibration(tmp_path)
    result = cli("apply", tiny, "--rule", "separable", "--data", data, "--export", "onnx", "--out", out)
    assert result.code == 3, result.err
    assert "(onnx export, checked before any fitting): torch.onnx.export failed" in result.err
    assert len(calls) == 1 and not out.exists()
