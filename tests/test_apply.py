"""``convrewrite apply``: readable source + safetensors that reload, match and train."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from convrewrite.core.loading import load_model

from .conftest import ASSETS, SAMPLES


def _import(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_apply_writes_source_weights_and_report(cli, tmp_path: Path) -> None:
    out = tmp_path / "crnn-separable"
    result = cli("apply", SAMPLES / "crnn.py", "--rule", "separable", "--out", out)
    assert result.code == 0, result.err
    assert sorted(p.name for p in out.iterdir()) == ["model.py", "report.json", "weights.safetensors"]
    assert "matched the rewritten model" in result.err
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["params"] == 781_450
    weights = load_file(str(out / "weights.safetensors"))
    assert sum(t.numel() for t in weights.values() if t.is_floating_point()) >= 781_450
    # Untouched layers keep their state_dict keys; rewritten ones live under the same name.
    assert "batchNorm2.running_mean" in weights
    assert "conv0.depthwise.weight" in weights and "conv0.pointwise.weight" in weights
    source = (out / "model.py").read_text()
    assert "self.conv0 = SeparableConv2d(1, 64, (3, 3), padding=(1, 1))" in source
    top_level_imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not [line for line in top_level_imports if "convrewrite" in line]


def test_generated_model_imports_with_torch_alone_and_trains(cli, tmp_path: Path) -> None:
    out = tmp_path / "tdnn"
    assert cli("apply", SAMPLES / "tdnn.py", "--rule", "separable", "--out", out).code == 0
    script = f"""
import sys
sys.modules["convrewrite"] = None  # the generated file must not need convrewrite
sys.path.insert(0, {str(out)!r})
import torch, model
net = model.load_model()
net.train()
optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
generator = torch.Generator().manual_seed(1)
x = torch.randn(16, 39, 50, generator=generator)
target = torch.randint(0, 10, (16,), generator=generator)
losses = []
for _ in range(15):
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(net(x), target)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    optimizer.step()
    losses.append(loss.item())
print(losses[0], losses[-1])
assert losses[-1] < losses[0]
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr


def test_reloaded_weights_match_the_rewritten_model(cli, tmp_path: Path) -> None:
    from convrewrite.engine.pipeline import analyse
    from convrewrite.rules.api import make_rule

    out = tmp_path / "tiny"
    assert cli("apply", ASSETS / "tiny.py", "--rule", "separable", "--out", out).code == 0
    generated = _import(out / "model.py", "generated_tiny")
    reloaded = generated.load_model().eval()
    loaded = load_model(str(ASSETS / "tiny.py"))
    rewritten = analyse(loaded, [make_rule("separable")]).model
    x = generated.example_inputs()
    with torch.no_grad():
        assert torch.equal(reloaded(x), rewritten(x))


def test_an_apply_directory_is_a_model(cli, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert cli("apply", ASSETS / "multi_input.py", "--rule", "separable", "--out", out).code == 0
    again = cli("report", out, "--format", "json")
    assert again.code == 0, again.err
    report = json.loads(again.out)
    applied = json.loads((out / "report.json").read_text())
    assert report["before"]["params"] == applied["after"]["params"]
    assert report["before"]["macs"] == applied["after"]["macs"]
    assert report["model"]["weights"].endswith("weights.safetensors")


def test_force_replaces_an_earlier_output(cli, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert cli("apply", ASSETS / "tiny.py", "--rule", "separable", "--out", out).code == 0
    first = (out / "report.json").read_text()
    result = cli("apply", ASSETS / "tiny.py", "--rule", "separable:multiplier=2", "--out", out, "--force")
    assert result.code == 0, result.err
    assert (out / "report.json").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_untraceable_leaf_needs_the_copied_source(cli, tmp_path: Path) -> None:
    model_file = tmp_path / "gated.py"
    model_file.write_text(
        "import torch\nfrom torch import nn\n"
        "INPUT_SHAPE = (1, 3, 8, 8)\n"
        "class Gate(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.a = nn.Conv2d(4, 4, 3, padding=1)\n        self.b = nn.Conv2d(4, 4, 3, padding=1)\n"
        "    def forward(self, x):\n        return self.a(x) if x.sum() > 0 else self.b(x)\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.stem = nn.Conv2d(3, 4, 3, padding=1)\n        self.gate = Gate()\n"
        "    def forward(self, x):\n        return self.gate(torch.relu(self.stem(x)))\n"
        "def build_model():\n    return Net()\n"
    )
    out = tmp_path / "o"
    result = cli("apply", model_file, "--rule", "separable", "--out", out, "--format", "json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["trace"]["mode"] == "fx+leaves"
    assert [leaf["name"] for leaf in report["trace"]["leaves"]] == ["gate"]
    assert sorted(r["name"] for r in report["rewrites"]) == ["gate.a", "gate.b", "stem"]
    unreached = next(r for r in report["rewrites"] if r["name"] == "gate.b")
    assert "not called on the example input" in unreached["notes"]["unverified"]
    assert (out / "original_gated.py").is_file()
    assert "_original.Gate" in (out / "model.py").read_text()


def test_model_py_imports_the_library_behind_a_custom_operator(cli, tmp_path: Path, monkeypatch) -> None:
    """The traced forward calls torch.ops.convrewrite_zoo_ops.soft_clip, which exists only once
    zoo_custom_ops is imported: model.py must import it itself (here the SoftClip leaf happens to
    import the package too; a model using only the operator would not load in a fresh process),
    and apply's own reload must not import it a second time in this one (issue 10, class 1)."""
    site = SAMPLES / "zoo_site"
    monkeypatch.syspath_prepend(str(site))
    out = tmp_path / "out"
    result = cli("apply", SAMPLES / "zoo" / "custom_op.py", "--rule", "separable", "--out", out)
    assert result.code == 0, result.err
    source = (out / "model.py").read_text()
    assert "import zoo_custom_ops  # registers torch.ops.convrewrite_zoo_ops" in source
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2]); import model; "
        "net = model.load_model().eval(); torch.set_grad_enabled(False); "
        "print(tuple(net(model.example_inputs()).shape))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, str(site), str(out)], capture_output=True, text=True, cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "(1, 10)"
