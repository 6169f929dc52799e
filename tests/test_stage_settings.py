"""Typed stage settings: one frozen config per stage, built from the settings schema.

The expected defaults come from the schema's own table (``Setting(...).default``) and from the
signature of ``convrewrite.rewrite``; the check that each default is written once reads the
source of the modules that used to repeat them.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from convrewrite.config import schema
from convrewrite.config.job import make_job
from convrewrite.config.project import ProjectConfig
from convrewrite.config.stages import DistillSettings, FitSettings, LatencySettings, PlanSettings, RunSettings

PACKAGE = Path(__file__).resolve().parent.parent / "convrewrite"


def test_unset_settings_take_the_schema_defaults() -> None:
    settings = RunSettings.from_values({})
    assert settings == RunSettings()
    assert settings.fit.enabled is schema.BY_NAME["fit"].default
    assert settings.fit.steps == schema.BY_NAME["fit-steps"].default
    assert settings.holdout == schema.BY_NAME["holdout"].default
    assert settings.distill.steps == schema.BY_NAME["distill"].default
    assert settings.distill.loss == schema.BY_NAME["distill-loss"].default
    assert settings.latency.backend == schema.BY_NAME["latency-backend"].default
    assert settings.latency.threads == settings.threads == schema.BY_NAME["threads"].default
    assert settings.device == schema.BY_NAME["device"].default
    assert not (settings.keep_reference or settings.distill_after_write or settings.quiet)


def test_none_means_unset() -> None:
    assert RunSettings.from_values({"fit-steps": None, "device": None}) == RunSettings()


def test_values_reach_their_stage() -> None:
    settings = RunSettings.from_values(
        {"fit": False, "fit-steps": 7, "distill": 3, "distill-lr": 0.5, "latency": True, "threads": 2}
    )
    assert settings.fit == FitSettings(enabled=False, steps=7)
    assert settings.distill == dataclasses.replace(DistillSettings(), steps=3, lr=0.5)
    assert settings.latency == dataclasses.replace(LatencySettings(), enabled=True, threads=2)


def test_the_command_line_reaches_the_typed_settings() -> None:
    job = make_job("report", {"model": "m.py", "fit-steps": "12", "holdout": "0.25"}, ProjectConfig())
    settings = RunSettings.from_values(job.settings_values())
    assert (settings.fit.steps, settings.holdout) == (12, 0.25)


def test_the_plan_settings_take_the_schema_defaults() -> None:
    settings = PlanSettings.from_values({})
    assert settings == PlanSettings() == RunSettings().plan
    assert settings.sensitivity == schema.BY_NAME["sensitivity"].default == "hutchinson"
    assert settings.latency_backend == schema.BY_NAME["latency-backend"].default
    assert settings.threads == schema.BY_NAME["threads"].default
    assert settings.holdout == schema.BY_NAME["holdout"].default
    assert settings.device == schema.BY_NAME["device"].default
    assert (settings.budgets, settings.candidates, settings.include, settings.exclude) == ((), (), (), ())
    assert settings.save is None


def test_the_plan_command_line_and_config_reach_the_plan_settings(tmp_path: Path) -> None:
    """``plan`` resolves like the other commands: the command line over the model's table."""
    from convrewrite.config.project import load_project_config

    (tmp_path / "pyproject.toml").write_text(
        '[tool.convrewrite]\nmodel = "m.py"\ncandidates = ["separable", "low-rank"]\n'
        'sensitivity = "isotropic"\nthreads = 4\n'
    )
    cli = {"model": "m.py", "budget": ["latency=2x", "params=0.5x"], "latency-backend": "onnxruntime", "threads": 2}
    job = make_job("plan", cli, load_project_config(tmp_path / "pyproject.toml"))
    settings = PlanSettings.from_values(job.settings_values())
    assert settings.budgets == ("latency=2x", "params=0.5x")
    assert settings.candidates == ("separable", "low-rank") and settings.sensitivity == "isotropic"
    assert (settings.latency_backend, settings.threads) == ("onnxruntime", 2)
    assert job.source("threads") == "command line" and "pyproject.toml" in job.source("sensitivity")


@pytest.mark.parametrize("name", ["budget", "save"])
def test_the_plan_budget_and_save_are_command_line_only(name: str) -> None:
    assert not schema.BY_NAME[name].toml


def test_a_misspelt_key_is_refused() -> None:
    with pytest.raises(ValueError, match="fit_steps"):
        RunSettings.from_values({"fit_steps": 3})


def test_the_configs_are_frozen() -> None:
    settings = RunSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.fit.steps = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.holdout = 0.5  # type: ignore[misc]


def test_the_python_api_defaults_are_the_schemas() -> None:
    from convrewrite.api import rewrite

    parameters = inspect.signature(rewrite).parameters
    for keyword, name in [
        ("holdout", "holdout"),
        ("fit", "fit"),
        ("fit_steps", "fit-steps"),
        ("distill", "distill"),
        ("distill_loss", "distill-loss"),
        ("device", "device"),
        ("min_channels", "min-channels"),
    ]:
        assert parameters[keyword].default == schema.BY_NAME[name].default, keyword


def test_the_distill_config_defaults_agree_with_the_schema() -> None:
    """The recovery layer's DistillConfig keeps its own defaults (it is used without the schema):
    a run with nothing set must distil exactly as DistillConfig does by default, but for steps."""
    from convrewrite.engine.stages.distill import distill_config
    from convrewrite.recovery.distill import DistillConfig

    assert distill_config(dataclasses.replace(DistillSettings(), steps=500)) == DistillConfig()


@pytest.mark.parametrize(
    "path",
    ["api.py", "commands/run.py", "engine/stages/fit.py", "engine/stages/distill.py", "engine/stages/latency.py"],
)
def test_no_default_is_spelled_again(path: str) -> None:
    source = (PACKAGE / path).read_text()
    assert not re.search(r"(fit.steps|holdout)\D{0,12}(500|0\.1)\b", source), path
