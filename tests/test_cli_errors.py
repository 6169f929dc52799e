"""Every bad input: a one-line message on stderr, the documented exit code, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .conftest import ASSETS, SAMPLES


def assert_one_line_error(result, code: int, *fragments: str) -> None:
    assert result.code == code, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("convrewrite: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.err


@pytest.mark.parametrize(
    ("args", "code", "fragments"),
    [
        (["report", "missing.py"], 2, ["model file missing.py does not exist"]),
        (["report", ASSETS / "syntax_error.py"], 3, ["syntax error in syntax_error.py:4"]),
        (["report", ASSETS / "raises.py"], 3, ["importing raises.py raised KeyError at raises.py:4", "'b'"]),
        (["report", ASSETS / "no_model.py"], 3, ["no model found in no_model.py", "no_model.py:NAME"]),
        (["report", ASSETS / "ambiguous.py"], 3, ["2 nn.Module subclasses (First, Second)", "ambiguous.py:First"]),
        (["report", f"{ASSETS / 'forms.py'}:Nope"], 3, ["has no 'Nope'", "candidates: Small, Big, model, build_model"]),
        (["report", ASSETS / "needs_args.py"], 3, ["cannot build Net with no arguments", "build_model()"]),
        (["report", ASSETS / "no_input.py"], 2, ["no example input", "--input-shape"]),
        (
            ["report", ASSETS / "tiny.py", "--input-shape", "1,4,16,16"],
            3,
            ["failed at layer conv1 (Conv2d)", "RuntimeError", "--input-shape"],
        ),
        (["report", ASSETS / "tiny.py", "--input-shape", "1,three"], 2, ["is not a list of integers"]),
        (
            ["report", ASSETS / "tiny.py", "--rule", "sepparable"],
            2,
            ["unknown rule 'sepparable'", "valid rules:", "separable"],
        ),
        (
            ["report", ASSETS / "tiny.py", "--rule", "seperable"],
            2,
            ["unknown rule 'seperable'; did you mean 'separable'? valid rules:", "low-rank"],
        ),
        (
            ["report", ASSETS / "tiny.py", "--rule", "lowrank:rank=2"],
            2,
            ["unknown rule 'lowrank'; did you mean 'low-rank'?"],
        ),
        (
            ["report", ASSETS / "tiny.py", "--rule", "low-rank:rank=2,energy=0.9"],
            2,
            ["rule 'low-rank': give at most one of rank, ratio and energy, not rank and energy"],
        ),
        (
            ["apply", ASSETS / "tiny.py", "--rule", "separable:include=nothing", "--out", "o"],
            3,
            [
                "no layer was rewritten, so nothing was written: separable:include=nothing skipped 3 layers:",
                "not selected by include=nothing (3x)",
            ],
        ),
        (
            ["report", ASSETS / "tiny.py", "--rule", "separable:multiplier=0"],
            2,
            ["multiplier must be a positive integer"],
        ),
        (["report", ASSETS / "tiny.py", "--rule", "separable:multiplier"], 2, ["is not key=value"]),
        (["report", ASSETS / "tiny.py", "--format", "yaml"], 2, ["unknown --format 'yaml'"]),
        (["report", ASSETS / "tiny.py", "--bogus"], 2, ["No such option", "--bogus"]),
        (["report", ASSETS / "tiny.py", "--weights", "nothing.pt"], 2, ["weights file nothing.pt does not exist"]),
        (
            ["report", ASSETS / "tiny.py", "--rule", "separable", "--include", "conv2", "--min-channels", "9"],
            2,
            ["cannot rewrite conv2, which you named explicitly", "min-channels=9"],
        ),
        (["report"], 2, ["no MODEL given"]),
        (["apply", ASSETS / "tiny.py", "--rule", "separable"], 2, ["apply needs --out DIR"]),
        (["apply", ASSETS / "tiny.py", "--out", "o"], 2, ["apply needs at least one --rule"]),
        (
            ["report", ASSETS / "nested_blocks.py"],
            3,
            [
                "3 nn.Module subclasses (ConvBlock, Stage, Network)",
                "pick the root module with nested_blocks.py:Network",
            ],
        ),
        (
            ["report", ASSETS / "relpkg" / "net.py"],
            2,
            ["net.py uses a relative import (net.py:5)", "give MODEL as relpkg.net:build_model", f"run from {ASSETS}"],
        ),
        (
            ["report", ASSETS / "multi_input.py", "--input-shape", "1,3,12,12"],
            2,
            ["TwoInputs.forward takes 2 input(s) (image, depth) but the example input gives 1", "repeat --input-shape"],
        ),
        (["report", ASSETS / "raises_coloured.py"], 3, ["raised RuntimeError", "CUDA driver not found (set DEVICE)"]),
    ],
)
def test_bad_input(cli, args, code: int, fragments: list[str]) -> None:
    result = cli(*args)
    assert_one_line_error(result, code, *fragments)
    assert result.out == ""


def test_an_unknown_rule_far_from_every_name_gets_no_guess(cli) -> None:
    result = cli("report", ASSETS / "tiny.py", "--rule", "nosuchrule")
    assert_one_line_error(result, 2, "unknown rule 'nosuchrule'; valid rules: channelwise, fuse-bn, group-shuffle")
    assert "did you mean" not in result.err


def test_apply_that_rewrites_nothing_writes_nothing(cli, tmp_path: Path) -> None:
    """Exit 3 (the model could not be rewritten), one line that sums up why, no output directory."""
    result = cli("apply", SAMPLES / "tdnn.py", "--rule", "channelwise", "--out", "rewritten")
    assert_one_line_error(
        result,
        3,
        "no layer was rewritten, so nothing was written: channelwise skipped 3 layers: not a pointwise conv",
        "lists every layer with its reason",
    )
    assert result.out == ""
    assert not (tmp_path / "rewritten").exists()
    assert not list(tmp_path.iterdir())  # no staging directory left behind either


def test_debug_shows_the_traceback(cli) -> None:
    result = cli("report", ASSETS / "raises.py", "--debug")
    assert result.code == 3
    assert "Traceback" in result.err and "KeyError" in result.err


def test_unsafe_checkpoint(cli, tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(1), "code": print}, tmp_path / "unsafe.pt")
    result = cli("report", ASSETS / "tiny.py", "--weights", tmp_path / "unsafe.pt")
    assert_one_line_error(result, 3, "refusing to load unsafe.pt", "never unpickles")


def test_output_directory_that_exists(cli, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = cli("apply", ASSETS / "tiny.py", "--rule", "separable", "--out", out)
    assert_one_line_error(result, 2, "exists and is not empty", "--force")
    forced = cli("apply", ASSETS / "tiny.py", "--rule", "separable", "--out", out, "--force")
    assert_one_line_error(forced, 2, "did not write; not replacing it even with --force")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging directory left behind


def test_report_output_file_is_not_overwritten(cli, tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("precious")
    result = cli("report", SAMPLES / "tdnn.py", "--format", "json", "--output", target)
    assert_one_line_error(result, 2, "exists", "--force")
    assert target.read_text() == "precious"


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--rule", "separable:multiplier=-1"], 2),
        (["--rule", "nope"], 2),
        (["--rule", "separable", "--input-shape", "1,5,16,16"], 3),
    ],
)
def test_failed_apply_writes_nothing(cli, tmp_path: Path, args: list[str], code: int) -> None:
    out = tmp_path / "out"
    result = cli("apply", ASSETS / "tiny.py", "--out", out, *args)
    assert result.code == code
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("name", ["weights.pt", "weights.pth", "weights.safetensors", "sub/weights.PT"])
def test_weights_given_as_model_point_to_the_weights_option(cli, name: str) -> None:
    result = cli("report", name)
    assert_one_line_error(result, 2, f"{name} is a weights file, not a model", f"--weights {name}")


def test_the_suggested_dotted_form_of_a_package_module_works(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ASSETS)
    result = cli("report", "relpkg.net:build_model", "--format", "json")
    assert result.code == 0, result.err


def test_one_line_messages_carry_no_terminal_escape_codes(cli) -> None:
    result = cli("report", ASSETS / "raises_coloured.py")
    assert "\x1b" not in result.err
    assert_one_line_error(result, 3, "CUDA driver not found (set DEVICE)")
