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
    # Nested containers are written as nested constructor calls (issue 12), not setattr chains.
    assert (
        "        self.features = nn.Sequential(\n"
        "            SeparableConv2d(3, 8, (3, 3), padding=(1, 1)),\n"
        "            nn.ReLU(),\n"
        "            SeparableConv2d(8, 8, (3, 3), padding=(1, 1)),\n"
        "        )\n"
    ) in source
    assert "setattr(" not in source


NESTED = textwrap.dedent(
    """
    from collections import OrderedDict

    import torch
    from torch import nn

    INPUT_SHAPE = (1, 3, 10, 10)


    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            shared = nn.Conv2d(8, 8, 3, padding=1)
            self.stem = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 8, 3, padding=1), act=nn.ReLU()))
            self.blocks = nn.ModuleList([nn.Sequential(shared, nn.ReLU()), nn.Sequential(shared, nn.ReLU())])
            self.heads = nn.ModuleDict({"a-b": nn.Conv2d(8, 4, 1), "c": nn.Sequential(nn.Conv2d(8, 4, 3))})

        def forward(self, x):
            x = self.stem(x)
            for block in self.blocks:
                x = block(x)
            return self.heads["a-b"](x).sum() + self.heads["c"](x).sum()
    """
)


def test_named_and_shared_children_in_nested_containers(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.py").write_text(NESTED)
    code = run(["apply", "model.py", "--rule", "separable", "--out", "out", "--format", "json"])
    assert code == 0, capsys.readouterr().err  # apply reloads model.py + weights and compares
    source = (tmp_path / "out" / "model.py").read_text()
    assert "self.stem = nn.Sequential(OrderedDict([" in source
    assert '("conv", SeparableConv2d(3, 8, (3, 3), padding=(1, 1))),' in source
    assert 'self.heads = nn.ModuleDict({\n            "a-b": nn.Conv2d(8, 4, (1, 1)),' in source
    # A module shared by two containers cannot be written twice: the second is an alias.
    assert source.count("SeparableConv2d(8, 8, (3, 3), padding=(1, 1))") == 1
