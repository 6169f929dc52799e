"""The settings schema: generated options, config validation, and which config table a model gets.

A model's settings in ``[tool.convrewrite]`` must apply to that model only: the bug was that an
``input-shape`` (or ``weights``) set for one model leaked onto any other MODEL given on the
command line, labelled "(from --input-shape)".
"""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import pytest

from convrewrite.cli import app
from convrewrite.config import schema
from convrewrite.config.job import make_job, same_model
from convrewrite.config.project import KNOWN_KEYS, load_project_config
from convrewrite.errors import UsageError

MODEL_A = """
import torch
from torch import nn

INPUT_SHAPE = (1, 3, 16, 16)

class A(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x)
"""

MODEL_B = """
import torch
from torch import nn

INPUT_SHAPE = (1, 1, 12, 12)

class B(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return self.conv(x)
"""


def _project(tmp_path: Path, toml: str) -> None:
    (tmp_path / "a.py").write_text(MODEL_A)
    (tmp_path / "b.py").write_text(MODEL_B)
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent(toml))


def _inputs(cli, *args: str) -> tuple[list[dict], str]:
    result = cli("report", *args, "--format", "json")
    assert result.code == 0, result.err
    model = json.loads(result.out)["model"]
    return model["inputs"], model["input_source"]


def test_a_config_input_shape_does_not_leak_onto_another_model(cli, tmp_path: Path) -> None:
    _project(tmp_path, '[tool.convrewrite]\nmodel = "a.py"\ninput-shape = [2, 3, 8, 8]\n')
    inputs, source = _inputs(cli, "b.py")
    assert inputs[0]["shape"] == [1, 1, 12, 12]  # b.py's own INPUT_SHAPE, not a.py's config
    assert source == "INPUT_SHAPE in b.py"


def test_the_config_model_gets_its_settings_with_their_provenance(cli, tmp_path: Path) -> None:
    _project(tmp_path, '[tool.convrewrite]\nmodel = "a.py"\ninput-shape = [2, 3, 8, 8]\n')
    for args in [(), ("a.py",), ("a.py:A",), ("./a.py",)]:
        inputs, source = _inputs(cli, *args)
        assert inputs[0]["shape"] == [2, 3, 8, 8], args
        assert source == "input-shape in pyproject.toml [tool.convrewrite] input-shape", args
        assert "--input-shape" not in source


def test_a_named_target_gives_its_model_its_own_settings(cli, tmp_path: Path) -> None:
    _project(
        tmp_path,
        """
        [tool.convrewrite]
        model = "a.py"
        input-shape = [2, 3, 8, 8]

        [tool.convrewrite.targets.b]
        model = "b.py"
        input-shape = [3, 1, 9, 9]
        """,
    )
    inputs, source = _inputs(cli, "b.py")
    assert inputs[0]["shape"] == [3, 1, 9, 9]
    assert "[tool.convrewrite.targets.b] input-shape" in source


def test_a_table_without_model_describes_any_model(cli, tmp_path: Path) -> None:
    _project(tmp_path, "[tool.convrewrite]\ninput-shape = [2, 1, 10, 10]\n")
    inputs, _ = _inputs(cli, "b.py")
    assert inputs[0]["shape"] == [2, 1, 10, 10]


def test_config_weights_do_not_leak_either(cli, tmp_path: Path) -> None:
    _project(tmp_path, '[tool.convrewrite]\nmodel = "a.py"\nweights = "missing-a-weights.safetensors"\n')
    result = cli("report", "b.py", "--format", "json")
    assert result.code == 0, result.err  # a.py's weights are never tried on b.py
    assert json.loads(result.out)["model"]["weights"] is None
    assert cli("report").code == 2  # a.py does get them (and they do not exist)


def test_verbose_says_where_settings_came_from_and_what_was_left_out(cli, tmp_path: Path) -> None:
    _project(tmp_path, '[tool.convrewrite]\nmodel = "a.py"\ninput-shape = [2, 3, 8, 8]\ndevice = "cpu"\n')
    result = cli("report", "b.py", "--verbose")
    assert result.code == 0, result.err
    assert "not the model of [tool.convrewrite]" in result.err
    assert "device = 'cpu'  (pyproject.toml [tool.convrewrite] device)" in result.err  # not per model: applies
    assert "input-shape = []  (default)" in result.err


def test_same_model_compares_files_and_objects(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("")
    assert same_model("a.py", tmp_path, "./a.py:A", tmp_path)
    assert not same_model("a.py:A", tmp_path, "a.py:B", tmp_path)
    assert not same_model("a.py", tmp_path, "b.py", tmp_path)
    assert same_model("pkg.mod:Net", tmp_path, "pkg.mod:Net", tmp_path)


def test_every_schema_setting_is_a_command_line_option_of_its_commands() -> None:
    """One edit in the schema gives the option: the generated signatures carry every setting."""
    commands = {info.callback.__name__: info.callback for info in app.registered_commands}
    for command in ("report", "apply", "check", "distill", "plan"):
        parameters = inspect.signature(commands[command]).parameters
        for setting in schema.settings_for(command):
            assert setting.key in parameters, (command, setting.name)


def test_every_toml_setting_is_a_known_config_key() -> None:
    assert {s.name for s in schema.SCHEMA if s.toml} <= KNOWN_KEYS
    assert "format" not in KNOWN_KEYS  # command-line only


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("holdout", "1.5", "must be below 1"),
        ("holdout", "-0.1", "must be >= 0"),
        ("batch-size", "0", "must be >= 1"),
        ("fit", '"yes"', "must be true or false"),
        ("latency-backend", '"tensorrt"', "must be one of torch, onnxruntime"),
        ("threads", '"2"', "must be an integer"),
    ],
)
def test_config_values_are_validated_from_the_schema(tmp_path: Path, key: str, value: str, message: str) -> None:
    (tmp_path / "pyproject.toml").write_text(f"[tool.convrewrite]\n{key} = {value}\n")
    with pytest.raises(UsageError, match=message) as caught:
        load_project_config(tmp_path / "pyproject.toml")
    assert key in caught.value.one_line()


def test_command_line_values_are_range_checked_before_any_work(cli, tmp_path: Path) -> None:
    _project(tmp_path, "")
    result = cli("report", "a.py", "--holdout", "1")
    assert result.code == 2
    assert result.err.strip() == "convrewrite: error: --holdout must be below 1"


def test_make_job_defaults_and_sources() -> None:
    from convrewrite.config.project import ProjectConfig

    job = make_job("report", {"model": "x.py", "rules": ["separable"]}, ProjectConfig())
    assert job["rules"] == ["separable"] and job.source("rules") == "command line"
    assert job["holdout"] == 0.1 and job.source("holdout") == "default"
    assert job["include"] == []
