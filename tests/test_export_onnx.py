"""``export_onnx``: a verified, atomic ONNX file; one-line failures that write nothing; the extra.

The oracle is ONNX Runtime itself, run here independently of the exporter's own check, on a batch
size the export never saw (the batch dimension must be dynamic).
"""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
import torch
from torch import nn

from convrewrite.errors import ModelError, UsageError
from convrewrite.export import onnx as onnx_export
from convrewrite.layers import WinogradConv2d

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.wino = WinogradConv2d(4, 4, padding=1, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wino(torch.relu(self.norm(self.conv(x)))).mean(dim=(2, 3))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return Small().eval()


def test_export_writes_a_verified_file_with_a_dynamic_batch(tmp_path: Path) -> None:
    model = _model()
    x = torch.randn(2, 3, 9, 7)
    result = onnx_export.export_onnx(model, (x,), tmp_path / "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary left behind
    assert result.exporter == "torch.export" and result.dynamic_batch
    assert result.opset >= 17 and result.input_names == ["arg0"] and result.output_names == ["output"]
    assert result.max_abs_diff < 1e-5
    data = result.to_dict()
    assert data["file"] == "model.onnx" and data["bytes"] == (tmp_path / "model.onnx").stat().st_size
    assert data["tolerance"] == {"rtol": 1e-5, "atol": 1e-6}
    # An independent run on a batch of 5, which the export never saw.
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    bigger = torch.randn(5, 3, 9, 7)
    (got,) = session.run(None, {session.get_inputs()[0].name: bigger.numpy()})
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), model(bigger), rtol=1e-5, atol=1e-6)


def test_fixed_batch_and_the_torchscript_exporter_without_onnxscript(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(onnx_export, "_has_onnxscript", lambda: False)
    result = onnx_export.export_onnx(_model(), torch.randn(2, 3, 6, 6), tmp_path / "m.onnx", dynamic_batch=False)
    assert result.exporter == "torchscript" and not result.dynamic_batch
    assert any("onnxscript" in note for note in result.notes)
    session = onnx_export.ort_session(tmp_path / "m.onnx", threads=1)
    assert session.get_inputs()[0].shape == [2, 3, 6, 6]


class Histogram(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.histc(x, bins=4)


def test_a_model_that_cannot_be_exported_is_one_line_and_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(onnx_export, "_has_onnxscript", lambda: False)  # one exporter: keeps the test quick
    with pytest.raises(ModelError) as caught:
        onnx_export.export_onnx(Histogram(), torch.randn(1, 8), tmp_path / "model.onnx")
    message = caught.value.one_line()
    assert "\n" not in message and message.startswith("the model cannot be exported to ONNX")
    assert "histc" in message and caught.value.exit_code == 3
    assert list(tmp_path.iterdir()) == []


def test_a_mismatch_in_onnx_runtime_fails_and_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    real_session = onnx_export.ort_session

    class Off:
        def __init__(self, path: Path) -> None:
            self.session = real_session(path)

        def get_inputs(self):  # noqa: ANN202 - the ONNX Runtime interface
            return self.session.get_inputs()

        def run(self, names, feed):  # noqa: ANN001, ANN202
            return [value + 1e-3 for value in self.session.run(names, feed)]

    monkeypatch.setattr(onnx_export, "ort_session", lambda path, threads=1: Off(path))
    monkeypatch.setattr(onnx_export, "_has_onnxscript", lambda: False)
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(ModelError, match="does not reproduce the model in ONNX Runtime"):
        onnx_export.export_onnx(_model(), torch.randn(1, 3, 5, 5), target)
    assert target.read_bytes() == b"previous"  # the file in place is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_without_the_extra_export_is_a_usage_error_naming_it(tmp_path: Path, monkeypatch, missing: str) -> None:
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if name == missing or name.startswith(missing + "."):
            raise ImportError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(UsageError) as caught:
        onnx_export.export_onnx(_model(), torch.randn(1, 3, 5, 5), tmp_path / "model.onnx")
    assert caught.value.exit_code == 2
    assert f"needs the {missing} package" in caught.value.one_line()
    assert "convrewrite[onnx]" in caught.value.one_line()
    assert list(tmp_path.iterdir()) == []


def test_apply_output_can_carry_a_verified_model_onnx(tmp_path: Path, monkeypatch) -> None:
    import json

    from convrewrite.core.loading import load_model
    from convrewrite.engine.pipeline import analyse
    from convrewrite.engine.report_builder import build_report
    from convrewrite.export.writer import write_apply_output
    from convrewrite.rules.api import make_rule

    from .rule_test_support import REPO_SAMPLES

    monkeypatch.setattr(onnx_export, "_has_onnxscript", lambda: False)  # the quick exporter
    loaded = load_model(str(REPO_SAMPLES / "crnn.py"), input_shapes=[(1, 1, 32, 24)])
    result = analyse(loaded, [make_rule("fuse-bn"), make_rule("separable")])
    written = write_apply_output(result, build_report(result), tmp_path / "out", exports=["onnx"])
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["model.onnx", "model.py", "report.json", "weights.safetensors"]
    section = json.loads((tmp_path / "out" / "report.json").read_text())["export"]["onnx"]
    assert section["path"] == "model.onnx" and section["opset"] == written.onnx.opset >= 17
    assert section["max_abs_diff"] < 1e-5 and "model.onnx: ONNX opset" in written.summary()
