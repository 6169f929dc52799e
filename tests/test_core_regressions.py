"""Regression tests for core bugs that the zoo found on real architectures, one small model each."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from convrewrite.api import report
from convrewrite.cli import run
from convrewrite.core.loading import load_model

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "sample_models" / "zoo"


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Callable[..., int]:
    """The CLI in-process, from an empty directory (no pyproject.toml config applies)."""
    monkeypatch.chdir(tmp_path)

    def invoke(*args: str | Path) -> int:
        code = run([str(a) for a in args])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return code

    return invoke


def write_model(directory: Path, source: str) -> Path:
    path = directory / "user_model.py"
    path.write_text(textwrap.dedent(source))
    return path


def test_apply_with_string_annotations(run_cli: Callable[..., int], tmp_path: Path) -> None:
    """``from __future__ import annotations`` made fx emit ``_torch_Tensor_`` globals that codegen refused."""
    path = write_model(
        tmp_path,
        """
        from __future__ import annotations
        import torch
        from torch import nn
        INPUT_SHAPE = (1, 3, 16, 16)

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = nn.Conv2d(3, 8, 3, padding=1)

            def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
                return {"out": self.conv(x)}
        """,
    )
    run_cli("apply", path, "--rule", "separable", "--out", tmp_path / "out")
    source = (tmp_path / "out" / "model.py").read_text()
    assert "def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:" in source
    assert "_torch_Tensor_" not in source


def test_apply_with_container_children(run_cli: Callable[..., int], tmp_path: Path) -> None:
    """Children named "0" or "seg-out" were written as ``getattr(...) = ...``, a syntax error."""
    path = write_model(
        tmp_path,
        """
        import torch
        from torch import nn
        INPUT_SHAPE = (1, 3, 16, 16)

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Sequential(nn.Conv2d(8, 8, 3)))
                self.heads = nn.ModuleDict({"seg-out": nn.Conv2d(8, 2, 3), "logits": nn.Conv2d(8, 4, 1)})

            def forward(self, x):
                x = self.body(x)
                return self.heads["seg-out"](x), self.heads["logits"](x)
        """,
    )
    out = tmp_path / "out"
    run_cli("apply", path, "--rule", "separable", "--out", out)
    source = (out / "model.py").read_text()
    assert "self.body = nn.Sequential(\n            SeparableConv2d(" in source  # nested constructor calls
    assert '"seg-out": SeparableConv2d(' in source
    original, rewritten = load_model(str(path)), load_model(str(out))
    with torch.no_grad():
        for a, b in zip(original.model(*original.inputs.args), rewritten.model(*original.inputs.args)):
            assert a.shape == b.shape


def test_apply_directory_with_shared_modules_loads(run_cli: Callable[..., int], tmp_path: Path) -> None:
    """safetensors saves a shared tensor once; loading an apply directory called that "missing"."""
    out = tmp_path / "out"
    run_cli("apply", ZOO / "shared_conv.py", "--rule", "separable", "--out", out)
    loaded = load_model(str(out))
    assert loaded.model.encoder_a is loaded.model.encoder_b
    run_cli("report", out)


def test_rows_of_tied_convs_rewritten_into_one_block() -> None:
    """The second name of a shared replacement showed as "Conv2d -> None" plus an "added" row."""
    result = report(str(ZOO / "tied.py"), rules=["separable"])
    rows = {row.name: row for row in result.layers}
    assert [row.status for row in result.layers if row.name in ("left", "right")] == ["rewritten", "rewritten"]
    assert rows["right"].type_after == rows["left"].type_after == "SeparableConv2d"
    assert rows["right"].macs_after == rows["left"].macs_after > 0
    assert rows["right"].params_after == 0
    assert rows["right"].kernel_error == rows["left"].kernel_error
    assert not [row for row in result.layers if row.status == "added"]


def test_rows_of_a_conv_called_twice_and_registered_twice() -> None:
    """A module under two names got a spurious "(new)" row for its second name."""
    result = report(str(ZOO / "shared_conv.py"), rules=["separable"])
    assert [(row.name, row.call) for row in result.layers if row.name.startswith("encoder")] == [
        ("encoder_a", 0),
        ("encoder_a", 1),
    ]
    assert not [row for row in result.layers if row.status == "added"]


def test_tie_skip_reasons_say_what_the_weight_is_tied_to() -> None:
    result = report(str(ZOO / "tied.py"), rules=["separable"])
    reasons = {skip.name: skip.reason for skip in result.skipped}
    assert "branch_b (own bias" in reasons["branch_a"]
    assert "decode (ConvTranspose2d)" in reasons["encode"]


def test_row_of_a_conv_the_rewritten_model_no_longer_calls(tmp_path: Path) -> None:
    """Control flow can change after a rewrite; the rewritten conv's row lost its "after" numbers."""
    path = write_model(
        tmp_path,
        """
        import torch
        from torch import nn
        INPUT_SHAPE = (1, 3, 16, 16)

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.stem = nn.Conv2d(3, 8, 3, padding=1)
                self.optional = nn.Conv2d(8, 8, 3, padding=1)

            def forward(self, x):
                x = self.stem(x)
                if isinstance(self.optional, nn.Conv2d):
                    x = self.optional(x)
                return x
        """,
    )
    result = report(str(path), rules=["separable"])
    row = next(row for row in result.layers if row.name == "optional")
    assert row.status == "rewritten"
    assert row.type_after == "SeparableConv2d"
    assert row.params_after == 8 * 9 + 8 + 8 * 8 + 8
    assert row.macs_after == 0
    assert result.after is not None
    assert sum(r.params_after or 0 for r in result.layers) == result.after.params


def test_counting_macs_does_not_import_dynamo() -> None:
    """TorchDispatchMode imports torch._dynamo on first dispatch unless told not to: seconds per run."""
    code = (
        "import sys\n"
        "from convrewrite.api import report\n"
        f"report({str(ZOO / 'tied.py')!r}, rules=['separable'])\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr


def test_submodule_named_after_a_keyword_falls_back_to_eager(run_cli: Callable[..., int], tmp_path: Path) -> None:
    """fx writes ``self.heads.class(...)`` for a ModuleDict key "class": the run crashed with a SyntaxError."""
    path = write_model(
        tmp_path,
        """
        import torch
        from torch import nn
        INPUT_SHAPE = (1, 3, 16, 16)

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.heads = nn.ModuleDict({"class": nn.Conv2d(3, 4, 3), "box": nn.Conv2d(3, 4, 3)})

            def forward(self, x):
                return self.heads["class"](x) + self.heads["box"](x)
        """,
    )
    result = report(str(path), rules=["separable"])
    assert result.trace["mode"] == "eager"
    assert "does not compile" in result.trace["failure"]
    assert {r.name for r in result.rewrites} == {"heads.class", "heads.box"}
    out = tmp_path / "out"
    run_cli("apply", path, "--rule", "separable", "--out", out)
    assert '"class": SeparableConv2d(' in (out / "model.py").read_text()  # a keyword as a ModuleDict key


def test_shapes_are_recorded_without_importing_sympy() -> None:
    """fx's ShapeProp imports torch.fx.experimental.symbolic_shapes and sympy: half a second per run."""
    code = (
        "import sys\n"
        "from convrewrite.api import report\n"
        f"report({str(ZOO / 'tied.py')!r}, rules=['separable'])\n"
        "assert 'sympy' not in sys.modules, 'sympy was imported'\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr


STATEFUL = """
import torch
from torch import nn
INPUT_SHAPE = (1, 3, 16, 16)

class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.odd = nn.Conv2d(3, 8, 3, padding=1)
        self.even = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        # Python state: tracing (the second call) takes the other branch than the eager run.
        self.calls += 1
        return self.odd(x) if self.calls % 2 else self.even(x)
"""


@pytest.mark.parametrize("rules", [[], ["separable"]])
def test_a_graph_that_calls_other_modules_than_the_model_is_not_used(tmp_path: Path, rules: list[str]) -> None:
    path = write_model(tmp_path, STATEFUL)
    result = report(str(path), rules=rules)
    assert result.trace["mode"] == "eager"
    expected = "calls even 1 time(s), the model 0" if not rules else "computes a different output"
    assert expected in result.trace["failure"]


def test_a_report_without_rules_does_not_run_the_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """Profiling already ran the model; a second forward pass would double the time of a report."""
    import convrewrite.engine.stages.trace

    def refuse(*args: object) -> None:
        raise AssertionError("the graph was run")

    monkeypatch.setattr(convrewrite.engine.stages.trace, "propagate_shapes", refuse)
    result = report(str(ZOO / "resnet.py:resnet18"), input_shapes=[(1, 3, 32, 32)])
    assert result.trace["mode"] == "fx"
    assert result.trace["checked"] == "module calls"


def test_svd_transfer_factored_in_chunks_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """svd_factors works a few input channels at a time (memory); the factors must not change."""
    from convrewrite.rules import separable

    weight = torch.randn(24, 40, 3, 3, generator=torch.Generator().manual_seed(0))
    whole = separable.svd_factors(weight, 2)
    monkeypatch.setattr(separable, "_SVD_CHUNK_ELEMENTS", 24 * 9 * 3)  # 3 input channels per chunk
    chunked = separable.svd_factors(weight, 2)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    assert chunked[2] == pytest.approx(whole[2], rel=1e-12)


def test_relative_error_summed_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    from convrewrite.layers import dense

    generator = torch.Generator().manual_seed(0)
    approx, exact = torch.randn(1000, generator=generator), torch.randn(1000, generator=generator)
    norm = torch.linalg.vector_norm
    expected = float(norm(approx.double() - exact.double()) / norm(exact.double()))
    monkeypatch.setattr(dense, "_CHUNK_ELEMENTS", 64)
    assert dense.relative_error(approx, exact) == pytest.approx(expected, rel=1e-12)
    assert dense.relative_error(torch.zeros(5), torch.zeros(5)) == 0.0
    assert dense.relative_error(torch.ones(5), torch.zeros(5)) == float("inf")


def test_the_cli_freezes_the_objects_of_its_imports() -> None:
    """import_engine() pauses the collector for torch's import and freezes what it created."""
    code = (
        "import gc\n"
        "from convrewrite.cli import import_engine\n"
        "import_engine()\n"
        "assert gc.isenabled()\n"
        "assert gc.get_freeze_count() > 100_000, gc.get_freeze_count()\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr


def test_subtree_totals_match_a_scan_of_the_records() -> None:
    """The per-name index (one pass, linear) gives what scanning every record for a prefix gives."""
    from convrewrite.engine.stages.profile import run_profile

    loaded = load_model(str(ZOO / "densenet.py"), input_shapes=[(1, 3, 32, 32)])
    profile = run_profile(loaded.model, loaded.inputs)
    for name, _ in loaded.model.named_modules():
        if not name:
            continue
        inside = [r for r in profile.records if r.name == name or r.name.startswith(name + ".")]
        assert profile.subtree_totals(name) == (sum(r.params for r in inside), sum(r.macs for r in inside))


@pytest.mark.parametrize(
    "conv",
    [torch.nn.Conv2d(12, 18, 3, groups=3), torch.nn.Conv1d(6, 12, 5, groups=6), torch.nn.Conv3d(4, 8, 2, groups=4)],
)
def test_grouped_dense_kernel_is_block_diagonal(conv: torch.nn.Module) -> None:
    from convrewrite.layers.dense import conv_dense_kernel

    dense, _ = conv_dense_kernel(conv)
    groups, weight = conv.groups, conv.weight.detach()
    out_per_group, in_per_group = weight.shape[0] // groups, weight.shape[1]
    expected = torch.zeros_like(dense)
    for g in range(groups):
        rows, cols = slice(g * out_per_group, (g + 1) * out_per_group), slice(g * in_per_group, (g + 1) * in_per_group)
        expected[rows, cols] = weight[rows]
    assert torch.equal(dense, expected)
