"""apply on models whose layers are named by index (nn.Sequential, nn.ModuleList children)."""

from __future__ import annotations

import textwrap

from convrewrite.cli import run
from convrewrite.export.source import _assignment

MODEL = textwrap.dedent(
    """
    from torch import nn

    INPUT_SHAPE = (1, 3, 12, 12)


    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))

        def forward(self, x):
            return self.features(x)
    """
)


def test_an_index_named_child_is_assigned_with_setattr() -> None:
    assert _assignment('getattr(self.features, "0")', "nn.ReLU()") == 'setattr(self.features, "0", nn.ReLU())'
    assert _assignment('getattr(getattr(self.a, "0"), "1")', "x") == 'setattr(getattr(self.a, "0"), "1", x)'
    assert _assignment('getattr(self.a, "0").conv', "x") == 'getattr(self.a, "0").conv = x'
    assert _assignment("self.conv", "x") == "self.conv = x"


def test_apply_rewrites_convs_inside_a_sequential(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.py").write_text(MODEL)
    code = run(["apply", "model.py", "--rule", "separable", "--out", "out", "--format", "json"])
    assert code == 0, capsys.readouterr().err
    source = (tmp_path / "out" / "model.py").read_text()
    assert 'setattr(self.features, "0", SeparableConv2d(3, 8, (3, 3), padding=(1, 1)))' in source
