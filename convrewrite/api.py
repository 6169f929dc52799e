"""The Python API behind the CLI: resolve settings, load, analyse, report, apply.

``Job`` gathers what a command needs (model spec, input shapes, weights, rules, layer selection)
from the command line and ``[tool.convrewrite]``, remembering where each setting came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convrewrite.errors import UsageError
from convrewrite.gate.config import ProjectConfig, Setting, config_input_shapes


@dataclass
class Job:
    model: Setting
    input_shapes: Setting
    weights: Setting
    rules: Setting
    include: Setting
    exclude: Setting
    min_channels: Setting
    config: ProjectConfig = field(default_factory=ProjectConfig)

    def settings(self) -> dict[str, Setting]:
        return {
            "model": self.model,
            "input-shape": self.input_shapes,
            "weights": self.weights,
            "rules": self.rules,
            "include": self.include,
            "exclude": self.exclude,
            "min-channels": self.min_channels,
        }


def _relative_to_config(setting: Setting, config: ProjectConfig) -> Setting:
    """Paths written in pyproject.toml are relative to that file's directory."""
    if setting.value is None or config.path is None or setting.source == "command line" or setting.source == "default":
        return setting
    text = str(setting.value)
    head, sep, tail = text.rpartition(":")
    path_part, name_part = (head, sep + tail) if sep and "/" not in tail and len(head) > 1 else (text, "")
    candidate = config.path.parent / path_part
    if candidate.exists():
        return Setting(str(candidate) + name_part, setting.source)
    return setting


def make_job(
    config: ProjectConfig,
    *,
    model: str | None = None,
    input_shapes: Sequence[tuple[int, ...]] | None = None,
    weights: str | None = None,
    rules: Sequence[str] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    min_channels: int | None = None,
    require_model: bool = True,
    config_rules: bool = False,
) -> Job:
    """Resolve settings: command line, then ``[tool.convrewrite]``, then defaults.

    ``rules`` from the config file are "the rules to apply before checking": only ``check`` passes
    ``config_rules=True``; ``report`` and ``apply`` take rules from the command line alone.
    """
    rules_setting = config.resolve("rules", list(rules or []), []) if config_rules else None
    if rules_setting is None:
        rules_setting = Setting(list(rules or []), "command line" if rules else "default")
    job = Job(
        model=_relative_to_config(config.resolve("model", model), config),
        input_shapes=config.resolve("input-shape", list(input_shapes or [])),
        weights=_relative_to_config(config.resolve("weights", weights), config),
        rules=rules_setting,
        include=config.resolve("include", list(include or []), []),
        exclude=config.resolve("exclude", list(exclude or []), []),
        min_channels=config.resolve("min-channels", min_channels, 0),
        config=config,
    )
    if job.input_shapes.source != "command line" and job.input_shapes.value:
        job.input_shapes = Setting(config_input_shapes(job.input_shapes.value), job.input_shapes.source)
    if require_model and not job.model.value:
        raise UsageError(
            "no MODEL given",
            hint="pass one (path/file.py[:NAME]) or set model in [tool.convrewrite] of pyproject.toml",
        )
    return job


def build_rules(job: Job) -> list[Any]:
    from convrewrite.rules.api import make_rule

    rules = []
    for spec in job.rules.value or []:
        rule = make_rule(spec)
        rule.config = rule.config.with_defaults(
            job.include.value or (), job.exclude.value or (), job.min_channels.value or 0
        )
        rules.append(rule)
    return rules


def run_job(job: Job) -> Any:
    """Load and analyse (rewriting when the job has rules); returns the engine result."""
    from convrewrite.engine.loading import load_model
    from convrewrite.engine.pipeline import analyse

    rules = build_rules(job)
    weights = Path(job.weights.value) if job.weights.value else None
    loaded = load_model(str(job.model.value), input_shapes=job.input_shapes.value or None, weights=weights)
    return analyse(loaded, rules)


def report(
    model: str,
    rules: Sequence[str] = (),
    input_shapes: Sequence[tuple[int, ...]] | None = None,
    weights: str | None = None,
) -> Any:
    """Analyse ``model`` (optionally rewritten by ``rules``) and return the ``Report``."""
    from convrewrite.report.builder import build_report

    job = make_job(ProjectConfig(), model=model, rules=list(rules), input_shapes=input_shapes, weights=weights)
    return build_report(run_job(job))
