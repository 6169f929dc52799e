"""The Python API: ``convrewrite.rewrite`` on a module the user holds, over the CLI's pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import convrewrite
from convrewrite.errors import UsageError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1))


def test_rewrite_returns_model_and_report_and_leaves_the_users_module_alone(tmp_path: Path) -> None:
    net = _net()
    before = [p.clone() for p in net.parameters()]
    result = convrewrite.rewrite(net, ["separable"], example_inputs=torch.randn(1, 3, 16, 16))
    assert type(net[0]) is nn.Conv2d and all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert type(result.model[0]).__name__ == "SeparableConv2d"
    assert result.report.after is not None
    assert result.report.after.params == sum(p.numel() for p in result.model.parameters())
    assert "Conv2d->SeparableConv2d" in str(result.report)
    assert result.report._repr_markdown_().startswith("### convrewrite report")
    written = result.save(tmp_path / "out")
    assert sorted(p.name for p in written.directory.iterdir()) == ["model.py", "report.json", "weights.safetensors"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved == json.loads(json.dumps(result.report.to_dict()))


def test_rewrite_takes_keyword_inputs_and_rule_objects() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv1d(4, 8, 3)
            self.b = nn.Conv1d(4, 8, 3)

        def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
            return self.a(left) + self.b(right)

    from convrewrite.rules.api import make_rule

    x = torch.randn(2, 4, 10)
    result = convrewrite.rewrite(
        Two(), [make_rule("log-group:groups=2")], example_inputs={"left": x, "right": x}, exclude=["b"]
    )
    assert [r.name for r in result.report.rewrites] == ["a"]


def test_bad_example_inputs_are_one_line_usage_errors() -> None:
    with pytest.raises(UsageError, match="example_inputs must be a tensor"):
        convrewrite.rewrite(_net(), ["separable"], example_inputs="1,3,16,16")


def test_importing_convrewrite_stays_lean() -> None:
    code = "import sys, convrewrite; print('torch' in sys.modules, convrewrite.__version__)"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert completed.stdout.split()[0] == "False"


def test_rewrite_fits_and_distils_on_calibration_data_from_a_dataloader() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    net = _net()
    images = torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    labels = torch.zeros(40, dtype=torch.long)
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)  # (inputs, labels) pairs
    plain = convrewrite.rewrite(net, ["separable"], example_inputs=images[:1], data=loader, fit=False)
    fitted = convrewrite.rewrite(net, ["separable"], example_inputs=images[:1], data=loader, fit_steps=5, distill=3)
    assert plain.report.fidelity.samples == fitted.report.fidelity.samples == 4  # 10% of 40, by sample
    assert fitted.report.fidelity.output_relative_error < plain.report.fidelity.output_relative_error
    assert {"fitting", "distillation"} <= set(fitted.report.sections)
