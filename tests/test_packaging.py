"""Packaging: a built wheel works in a fresh venv, and third-party rules plug in by entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from .conftest import ASSETS, ROOT, SAMPLES


def _run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True)
    assert completed.returncode == 0, f"{command}\n{completed.stdout}\n{completed.stderr}"
    return completed


def _build_wheel(source: Path, into: Path) -> Path:
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        into,
        source,
        cwd=into,
    )
    wheels = list(into.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_wheel(ROOT, tmp_path_factory.mktemp("wheel"))


def test_wheel_contents(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "convrewrite/rules/separable.py" in names
    assert "convrewrite/layers/separable.py" in names
    assert not [n for n in names if n.startswith("rules/")], "a bare top-level `rules` package must not be installed"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[convrewrite.rules]" in text and "separable = convrewrite.rules.separable:SeparableRule" in text
    assert "convrewrite = convrewrite.cli:main" in text


def test_wheel_in_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    fresh = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", fresh, cwd=tmp_path)
    bindir = fresh / ("Scripts" if os.name == "nt" else "bin")
    _run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        bindir / "python",
        "install",
        "--quiet",
        "--no-deps",
        wheel,
        cwd=tmp_path,
    )
    # The dependencies (torch, typer, ...) come from this environment's site-packages, read as a
    # plain path: the editable convrewrite here is not activated there, so the wheel is what runs.
    purelib = subprocess.run(
        [str(bindir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = _run(
        bindir / "python",
        "-c",
        "import convrewrite, importlib.util; print(convrewrite.__file__); print(importlib.util.find_spec('rules'))",
        cwd=tmp_path,
    )
    location, rules_spec = probe.stdout.split()
    assert location.startswith(str(fresh)), location
    assert rules_spec == "None"
    report = _run(
        bindir / "convrewrite", "report", SAMPLES / "crnn.py", "--rule", "separable", "--format", "json", cwd=tmp_path
    )
    assert json.loads(report.stdout)["after"]["params"] == 781_450


def test_third_party_rule_plugs_in(tmp_path: Path) -> None:
    plugin_wheel = _build_wheel(ASSETS / "plugin_ranksplit", tmp_path)
    site = tmp_path / "site"
    _run(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", site, plugin_wheel, cwd=tmp_path)
    env = dict(os.environ, PYTHONPATH=str(site))
    listing = _run(sys.executable, "-m", "convrewrite", "rules", cwd=tmp_path, env=env)
    assert "rank-split  (convrewrite_ranksplit:RankSplitRule)" in listing.stdout
    assert "rank" in listing.stdout
    out = tmp_path / "out"
    applied = _run(
        sys.executable,
        "-m",
        "convrewrite",
        "apply",
        ASSETS / "tiny.py",
        "--rule",
        "rank-split:rank=2",
        "--out",
        out,
        "--format",
        "json",
        cwd=tmp_path,
        env=env,
    )
    report = json.loads(applied.stdout)
    rewritten = {r["name"]: r for r in report["rewrites"]}
    assert set(rewritten) == {"conv1", "conv2", "proj"}
    assert rewritten["conv2"]["params_after"] == rewritten["conv2"]["analytic_params"] == 8 * 9 * 2 + 2 * 16
    # The plugin's own block survives as a named layer: its torch-only file is copied into model.py.
    source = (out / "model.py").read_text()
    assert "class RankSplitConv2d(nn.Sequential):" in source
    assert "self.conv2 = RankSplitConv2d(8, 16, (3, 3), 2, stride=(2, 2), padding=(1, 1), bias=False)" in source
    assert rewritten["conv2"]["type_after"] == "RankSplitConv2d"
    assert not [line for line in source.splitlines() if line.startswith(("import ", "from ")) and "ranksplit" in line]
    # ...and reloads exactly in a process that has neither the plugin nor convrewrite on its path.
    reload = (
        "import sys, torch\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import model\n"
        "assert 'convrewrite' not in sys.modules and 'ranksplit_layers' not in sys.modules\n"
        "net = model.load_model()\n"
        "print(type(net.conv2).__name__, float(net(model.example_inputs()).abs().sum()))\n"
    )
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    reloaded = _run(sys.executable, "-I", "-c", reload, out, cwd=tmp_path, env=clean_env)
    assert reloaded.stdout.split()[0] == "RankSplitConv2d"
