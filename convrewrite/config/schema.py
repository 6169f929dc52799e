"""The one settings schema: every setting of every command, declared once.

From this table the command-line options are generated (``cli/``), ``[tool.convrewrite]`` and its
targets are validated (``config/project.py``), and settings are resolved with their provenance
(``config/job.py``): a new setting is one ``Setting(...)`` line here, plus the code that reads
it. Nothing here imports torch: ``--help`` and config validation stay instant.

Provenance, in order of precedence: the command line, then the table of ``[tool.convrewrite]``
that describes the model being run (see ``config/job.py``), then the default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: The commands that take settings from this schema.
COMMANDS = ("report", "apply", "check", "distill", "plan")
RUN_COMMANDS = ("report", "apply", "check")
#: The run commands plus ``plan`` (settings that describe the model and its calibration data).
RUN_AND_PLAN = (*RUN_COMMANDS, "plan")


@dataclass(frozen=True)
class Setting:
    """One setting: its name (the TOML key and, with ``--``, the flag), type, help and scope.

    ``kind`` is one of ``str``, ``int``, ``float``, ``bool``, ``path`` (a file, relative to the
    pyproject.toml it is written in), ``spec`` (a path or ``module:NAME``, relative like a path),
    ``shape`` (``1,3,224,224``), ``glob``, ``rule`` (``NAME[:key=value,...]``) or ``choice``.
    ``per_model`` settings describe one model and apply only to the model of the table that sets
    them; ``inherited`` ones are also taken by a named target from the top-level table.
    """

    name: str
    kind: str
    help: str
    default: Any = None
    commands: tuple[str, ...] = RUN_COMMANDS
    repeatable: bool = False
    toml: bool = True
    toml_commands: tuple[str, ...] | None = None
    per_model: bool = True
    inherited: bool = False
    argument: bool = False
    short: str | None = None
    flag: str | None = None
    negative_flag: str | None = None
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    below: float | None = None
    hidden: bool = False
    group: str = "run"

    @property
    def key(self) -> str:
        """The attribute name (``input_shape``) used in code and in function signatures."""
        return self.name.replace("-", "_")

    @property
    def option(self) -> str:
        return self.flag or f"--{self.name}"

    def applies_to(self, command: str) -> bool:
        return command in self.commands

    def read_from_toml(self, command: str) -> bool:
        if not self.toml:
            return False
        return self.toml_commands is None or command in self.toml_commands


def _schema() -> tuple[Setting, ...]:
    run_and_distill = (*RUN_COMMANDS, "distill")
    every_command = (*run_and_distill, "plan")
    return (
        # -- the model ------------------------------------------------------------------------------
        Setting(
            "model",
            "spec",
            "path/file.py, path/file.py:NAME, package.module:NAME, or a directory written by apply "
            "(default: model in [tool.convrewrite]). Importing a model file runs its code.",
            argument=True,
            metavar="MODEL",
            commands=RUN_AND_PLAN,
        ),
        Setting(
            "rules",
            "rule",
            "NAME[:key=value,...]; repeat to compose, applied in order.",
            repeatable=True,
            flag="--rule",
            short="-r",
            toml_commands=("check",),
        ),
        Setting(
            "input-shape",
            "shape",
            "Example input shape, batch first (1,3,224,224); repeat for several inputs.",
            repeatable=True,
            commands=every_command,
        ),
        Setting(
            "weights",
            "path",
            ".safetensors, or .pt/.pth read with torch.load(weights_only=True).",
            commands=every_command,
        ),
        Setting(
            "include",
            "glob",
            "Only rewrite layers matching this glob (repeatable).",
            repeatable=True,
            inherited=True,
            commands=RUN_AND_PLAN,
        ),
        Setting(
            "exclude",
            "glob",
            "Never rewrite layers matching this glob (repeatable).",
            repeatable=True,
            inherited=True,
            commands=RUN_AND_PLAN,
        ),
        Setting(
            "min-channels",
            "int",
            "Skip convs with fewer input or output channels.",
            default=0,
            minimum=0,
            inherited=True,
        ),
        # -- calibration data, fitting, distillation -----------------------------------------------
        Setting(
            "data",
            "spec",
            "Calibration data: a tensor file (.pt/.safetensors/.npy/.npz), file.py:function or "
            "package.module:function returning batches, or a directory of images. With data, the "
            "rewritten layers are fitted to the original's outputs.",
            commands=every_command,
            group="data",
        ),
        Setting(
            "holdout",
            "float",
            "Fraction of the calibration samples never fitted on; fidelity is measured on them.",
            default=0.1,
            minimum=0.0,
            below=1.0,
            commands=every_command,
            inherited=True,
            group="data",
        ),
        Setting(
            "batch-size",
            "int",
            "Calibration batch size.",
            default=32,
            minimum=1,
            commands=every_command,
            inherited=True,
            group="data",
        ),
        Setting(
            "mean",
            "str",
            "Per-channel mean to normalise calibration images with, e.g. 0.485,0.456,0.406.",
            commands=run_and_distill,
            group="data",
        ),
        Setting(
            "std",
            "str",
            "Per-channel standard deviation to normalise calibration images with, e.g. 0.229,0.224,0.225.",
            commands=run_and_distill,
            group="data",
        ),
        Setting(
            "fit",
            "bool",
            "Fit the rewritten layers to the original's outputs on the calibration data.",
            default=True,
            negative_flag="--no-fit",
            inherited=True,
            group="data",
        ),
        Setting(
            "fitted-weights",
            "path",
            "OUT.fitted-checkpoint directory an earlier apply kept when its write failed after fitting: "
            "load those weights instead of fitting again.",
            commands=("apply",),
            per_model=False,
            group="data",
        ),
        Setting(
            "fit-steps",
            "int",
            "Gradient steps per rewritten layer after its closed-form fit (0: the closed form alone; "
            "blocks without one get the gradient path's default of 500).",
            default=0,
            minimum=0,
            inherited=True,
            group="data",
        ),
        Setting(
            "fit-method",
            "choice",
            "How rewritten layers are fitted: statistics (one pass per layer and a closed-form solve, "
            "gradient steps only where a block has no closed form) or gradient (the probing path for every block).",
            default="statistics",
            choices=("statistics", "gradient"),
            inherited=True,
            group="data",
        ),
        Setting(
            "distill",
            "int",
            "Distill from the original model for this many steps on the calibration data.",
            default=0,
            minimum=0,
            metavar="STEPS",
            group="data",
        ),
        Setting(
            "distill-loss",
            "choice",
            "Distillation loss: auto (kl for class scores, mse otherwise), mse, kl or cosine.",
            default="auto",
            choices=("auto", "mse", "kl", "cosine"),
            commands=run_and_distill,
            inherited=True,
            group="data",
        ),
        Setting(
            "distill-temperature",
            "float",
            "Softmax temperature of the kl loss (the loss is scaled by its square).",
            default=4.0,
            minimum=0.0,
            commands=run_and_distill,
            inherited=True,
            group="data",
        ),
        Setting(
            "distill-lr",
            "float",
            "Peak learning rate of distillation (AdamW, warm-up then cosine).",
            default=3e-3,
            minimum=0.0,
            commands=run_and_distill,
            inherited=True,
            group="data",
        ),
        Setting(
            "layer-weight",
            "float",
            "Weight of matching each rewritten layer's output to the original's during distillation (0: off).",
            default=0.0,
            minimum=0.0,
            commands=run_and_distill,
            inherited=True,
            group="data",
        ),
        Setting(
            "steps",
            "int",
            "Distillation steps to run (in all: a resumed run continues up to this count).",
            commands=("distill",),
            toml=False,
            minimum=1,
            metavar="N",
            group="data",
        ),
        Setting(
            "device",
            "str",
            "Where fitting, distillation and the plan's statistics run: auto, cpu, cuda, cuda:N or mps.",
            default="auto",
            commands=every_command,
            per_model=False,
            group="data",
        ),
        # -- speed ----------------------------------------------------------------------------------
        Setting(
            "latency",
            "bool",
            "Time the original and the rewritten model side by side.",
            default=False,
            per_model=False,
            group="speed",
        ),
        Setting(
            "threads",
            "int",
            "CPU threads for --latency timings and latency=... budgets.",
            default=1,
            minimum=1,
            per_model=False,
            group="speed",
            commands=RUN_AND_PLAN,
        ),
        Setting(
            "latency-backend",
            "choice",
            "What --latency and latency=... budgets time: torch (eager) or onnxruntime (the exported ONNX model).",
            default="torch",
            choices=("torch", "onnxruntime"),
            per_model=False,
            group="speed",
            commands=RUN_AND_PLAN,
        ),
        Setting(
            "export",
            "choice",
            "Also write this format, verified like the rest (onnx: model.onnx checked in ONNX Runtime; "
            "needs pip install 'convrewrite[onnx]').",
            repeatable=True,
            choices=("onnx",),
            commands=("apply",),
            per_model=False,
            group="speed",
        ),
        # -- planning (``plan``, and ``apply --budget``) ---------------------------------------------
        Setting(
            "budget",
            "str",
            "params=0.25x, macs=0.3x, params=200k, latency=2x; repeat: every budget must hold. "
            "apply: plan to it and apply the plan.",
            repeatable=True,
            commands=("plan", "apply"),
            toml=False,
            per_model=False,
            group="plan",
        ),
        Setting(
            "candidates",
            "str",
            "Rules the plan chooses from (names or specs, comma-separated); default: all.",
            repeatable=True,
            commands=("plan",),
            group="plan",
        ),
        Setting(
            "sensitivity",
            "choice",
            "How the plan weighs layers: hutchinson (probe moments), isotropic or uniform.",
            default="hutchinson",
            choices=("hutchinson", "isotropic", "uniform"),
            commands=("plan",),
            inherited=True,
            group="plan",
        ),
        Setting(
            "save",
            "path",
            "Write the plan as PLAN.toml rule specs.",
            commands=("plan",),
            toml=False,
            per_model=False,
            group="plan",
        ),
        # -- check ------------------------------------------------------------------------------------
        Setting(
            "baseline",
            "path",
            "JSON from `report --format json` or `check --format json` (e.g. made on main) to diff against.",
            commands=("check",),
            inherited=True,
        ),
    )


SCHEMA: tuple[Setting, ...] = _schema()
BY_NAME: dict[str, Setting] = {setting.name: setting for setting in SCHEMA}


def default(name: str) -> Any:
    """The schema's default of setting ``name`` (the one place each default is written)."""
    return BY_NAME[name].default


def settings_for(command: str) -> list[Setting]:
    return [setting for setting in SCHEMA if setting.applies_to(command)]


def toml_keys() -> set[str]:
    """Keys of settings that ``[tool.convrewrite]`` may hold (besides budgets and targets)."""
    return {setting.name for setting in SCHEMA if setting.toml}


def inherited_keys() -> tuple[str, ...]:
    return tuple(setting.name for setting in SCHEMA if setting.toml and setting.inherited)


# -- values --------------------------------------------------------------------------------------


def parse_shape(text: str, where: str = "--input-shape") -> tuple[int, ...]:
    """``"1,1,32,320"`` (or ``1x1x32x320``) to a shape; batch included."""
    from convrewrite.errors import UsageError

    cleaned = text.strip().strip("()[]").replace("x", ",").replace("×", ",")
    parts = [p.strip() for p in cleaned.split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"{where} {text!r} is not a list of integers", hint="write it like 1,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"{where} {text!r} needs positive dimensions, batch first", hint="write it like 1,3,224,224")
    return shape


def _toml_type_problem(setting: Setting, value: Any) -> str | None:
    """What is wrong with a TOML value for ``setting`` (a phrase), or None."""
    kind = setting.kind
    if kind == "shape":
        shapes = value if value and isinstance(value, list) and isinstance(value[0], list) else [value]
        if not isinstance(value, list) or not all(
            isinstance(s, list) and s and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in s)
            for s in shapes
        ):
            return (
                "must be a list of positive integers, batch first, such as [1, 3, 224, 224] (or a list of such lists)"
            )
        return None
    if kind == "rule":
        if not isinstance(value, list) or not all(isinstance(r, (str, dict)) for r in value):
            return (
                "must be a list of rule specs such as ['separable:multiplier=2'] "
                "or tables such as {name = 'separable', multiplier = 2}"
            )
        return None
    if kind == "glob":
        if not (isinstance(value, list) and all(isinstance(g, str) for g in value)):
            return "must be a list of glob strings"
        return None
    if setting.repeatable:
        if not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
            return "must be a list of strings"
        return next((range_problem(setting, item) for item in value if range_problem(setting, item)), None)
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            return "must be an integer"
    elif kind == "float":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return "must be a number"
    elif kind == "bool":
        if not isinstance(value, bool):
            return "must be true or false"
    elif kind == "path":
        if not isinstance(value, str):
            return "must be a path string"
    elif kind == "spec":
        if not isinstance(value, str):
            return "must be a string such as 'models/net.py:build_model'"
    elif kind in ("str", "choice") and not isinstance(value, str):
        return "must be a string"
    return range_problem(setting, value)


def range_problem(setting: Setting, value: Any) -> str | None:
    """What is wrong with a value's range or choice (a phrase), or None."""
    if setting.choices and value not in setting.choices:
        return f"must be one of {', '.join(setting.choices)}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if setting.minimum is not None and value < setting.minimum:
            if setting.minimum == 0 and setting.kind == "int":
                return "must be a non-negative integer"
            return f"must be >= {setting.minimum:g}"
        if setting.below is not None and value >= setting.below:
            return f"must be below {setting.below:g}"
    return None


def validate_table(table: dict[str, Any], where: Callable[[str], str]) -> None:
    """Check every known setting in a (normalised) config table; a usage error names the key."""
    from convrewrite.errors import UsageError

    for key, value in table.items():
        setting = BY_NAME.get(key)
        if setting is None or not setting.toml:
            continue
        problem = _toml_type_problem(setting, value)
        if problem:
            raise UsageError(f"{where(key)} {problem}")


def command_line_value(setting: Setting, raw: Any) -> Any:
    """A command-line value in the form the rest of the code reads (shapes parsed, ranges checked)."""
    from convrewrite.errors import UsageError

    if raw is None or (setting.repeatable and not raw):
        return None
    if setting.kind == "shape":
        return [parse_shape(text) for text in raw]
    if setting.repeatable:
        for item in raw:
            problem = range_problem(setting, item)
            if problem:
                raise UsageError(f"{setting.option} {item!r}: {problem}")
        return list(raw)
    problem = range_problem(setting, raw)
    if problem:
        raise UsageError(f"{setting.option} {problem}")
    return raw


def toml_value(setting: Setting, value: Any) -> Any:
    """A validated TOML value in the same form as a command-line value."""
    if setting.kind == "shape":
        if not value:
            return []
        return [tuple(v) for v in value] if isinstance(value[0], list) else [tuple(value)]
    return value


def markdown_table() -> str:
    """The README's settings table, generated from the schema (a test keeps the README in step)."""
    lines = [
        "| option | config key | default | commands | applies to | what it does |",
        "|---|---|---|---|---|---|",
    ]
    for setting in SCHEMA:
        if setting.argument:
            continue
        flag = setting.option
        if setting.kind == "bool":
            flag += f"/{setting.negative_flag or '--no-' + setting.name}"
        default = setting.default
        shown = "--" if default in (None, []) else str(default).lower() if isinstance(default, bool) else str(default)
        key = f"`{setting.name}`" if setting.toml else "--"
        if setting.toml and setting.toml_commands:
            key += f" ({', '.join(setting.toml_commands)} only)"
        scope = "the model's table" if setting.per_model else "any model"
        help_text = setting.help.replace("|", "\\|")
        lines.append(f"| `{flag}` | {key} | {shown} | {', '.join(setting.commands)} | {scope} | {help_text} |")
    return "\n".join(lines) + "\n"
