"""What one command runs: every setting resolved, with where it came from.

Settings come from the command line, then from the ``[tool.convrewrite]`` table that describes the
model being run, then from the schema's defaults (``convrewrite/config/schema.py``). Which table
describes a model:

- no MODEL on the command line: the top-level table (its ``model`` is the one run);
- a MODEL that is the model of the top-level table or of a named target
  (``[tool.convrewrite.targets.NAME]``): that table;
- a top-level table without ``model`` describes whatever model is given;
- any other MODEL: no table. Only the settings that are not about one model (``device``,
  ``threads``...) are taken from the top level, so one model's input shape or weights never leak
  onto another; ``--verbose`` says so.

Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convrewrite.config import schema
from convrewrite.config.project import ProjectConfig, Value
from convrewrite.errors import UsageError


@dataclass
class Job:
    """The resolved settings of one command on one model."""

    command: str
    values: dict[str, Value]
    config: ProjectConfig = field(default_factory=ProjectConfig)
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> Any:
        return self.values[name].value

    def get(self, name: str, default: Any = None) -> Any:
        value = self.values.get(name)
        return default if value is None or value.value is None else value.value

    def source(self, name: str) -> str:
        value = self.values.get(name)
        return value.source if value is not None else "default"

    def settings(self) -> dict[str, Value]:
        """Every setting, for ``--verbose``."""
        return dict(self.values)

    def describe(self) -> list[str]:
        """``--verbose``: the notes, then every setting and where it came from."""
        lines = [f"note: {note}" for note in self.notes]
        for name, value in self.values.items():
            shown = [list(v) for v in value.value] if name == "input-shape" and value.value else value.value
            lines.append(f"  {name} = {shown!r}  ({value.source})")
        return lines

    def settings_values(self) -> dict[str, Any]:
        """Every setting's value by name (what the pipeline's stages read)."""
        return {name: value.value for name, value in self.values.items()}


def split_model_spec(text: str) -> tuple[str, str | None]:
    """``path/file.py:NAME`` -> (``path/file.py``, ``NAME``); a Windows drive is not a NAME."""
    head, sep, tail = text.rpartition(":")
    if sep and head and len(head) > 1 and "/" not in tail and "\\" not in tail:
        return head, tail
    return text, None


def same_model(a: str, a_base: Path, b: str, b_base: Path) -> bool:
    """True when two MODEL specs name the same model (a file and an object in it may be implied)."""
    target_a, name_a = split_model_spec(a)
    target_b, name_b = split_model_spec(b)
    if name_a is not None and name_b is not None and name_a != name_b:
        return False
    path_a, path_b = (a_base / target_a), (b_base / target_b)
    if path_a.exists() or path_b.exists():
        try:
            return path_a.resolve() == path_b.resolve()
        except OSError:
            return False
    return target_a == target_b


def _relative_to_config(value: Value, config: ProjectConfig, kind: str) -> Value:
    """Paths written in pyproject.toml are relative to that file's directory.

    A ``spec`` (MODEL, --data) may also be ``package.module:NAME``: it is only taken as a path
    when that path exists.
    """
    if value.value is None or config.path is None or value.source in ("command line", "default"):
        return value
    if kind == "path":
        return Value(str(config.path.parent / str(value.value)), value.source)
    target, name = split_model_spec(str(value.value))
    candidate = config.path.parent / target
    if candidate.exists():
        return Value(str(candidate) + (f":{name}" if name is not None else ""), value.source)
    return value


def _describing_table(project: ProjectConfig, cli_model: str | None) -> tuple[ProjectConfig, list[str]]:
    """The config table whose per-model settings apply to the model being run (see the module doc)."""
    if project.path is None:
        return project, []
    from convrewrite.gate.budgets import config_targets

    data = project.data
    if cli_model is None:
        return project, []
    base = project.path.parent
    if "model" in data and same_model(cli_model, Path.cwd(), str(data["model"]), base):
        return project, []
    _, named = config_targets(project)
    for target in named:
        if same_model(cli_model, Path.cwd(), str(target.config.data["model"]), base):
            return target.config, [f"MODEL {cli_model} is target {target.name}: its settings apply"]
    if "model" not in data:
        return project, []
    shared = {k: v for k, v in data.items() if k in schema.BY_NAME and not schema.BY_NAME[k].per_model}
    note = (
        f"MODEL {cli_model} is not the model of [tool.convrewrite] ({data['model']}) nor of a target: "
        "that table's per-model settings (input shape, weights, data, layer selection...) are not used"
    )
    return ProjectConfig(project.path, shared), [note]


def make_job(
    command: str,
    cli: dict[str, Any],
    project: ProjectConfig,
    *,
    table: ProjectConfig | None = None,
    require_model: bool = True,
) -> Job:
    """Resolve every setting of ``command``: command line, then the model's config table, then default.

    ``cli`` maps setting names to the raw command-line values (None or empty: not given).
    ``table`` forces the config table (``check`` passes each target's); by default it is chosen
    by the model, as the module doc says.
    """
    notes: list[str] = []
    if table is None:
        table, notes = _describing_table(project, cli.get("model"))
    values: dict[str, Value] = {}
    for setting in schema.settings_for(command):
        raw = schema.command_line_value(setting, cli.get(setting.name))
        config_value = table if setting.read_from_toml(command) else ProjectConfig()
        value = config_value.resolve(setting.name, raw, setting.default)
        if value.source not in ("command line", "default"):
            value = Value(schema.toml_value(setting, value.value), value.source)
        if setting.kind in ("path", "spec"):
            value = _relative_to_config(value, table, setting.kind)
        if setting.repeatable and value.value is None:
            value = Value([], value.source)
        values[setting.name] = value
    job = Job(command, values, project, notes)
    if require_model and "model" in values and not job.get("model"):
        raise UsageError(
            "no MODEL given",
            hint="pass one (path/file.py[:NAME]) or set model in [tool.convrewrite] of pyproject.toml",
        )
    return job
