"""Budget parsing for ``convrewrite check``: units, limits, levels, targets, command-line precedence.

Pure parsing, no torch: every malformed budget is a one-line ``UsageError`` (exit 2) that names
the key and the problem.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from convrewrite.config.project import ProjectConfig
from convrewrite.errors import UsageError
from convrewrite.gate.budgets import (
    METRICS,
    command_line_budgets,
    config_targets,
    parse_amount,
    parse_budget,
    parse_budgets,
    with_command_line,
)

PARAMS = METRICS["params"]
BYTES = METRICS["param-bytes"]


@pytest.mark.parametrize(
    ("raw", "metric", "expected"),
    [
        (800000, PARAMS, 800_000),
        ("800000", PARAMS, 800_000),
        ("1_000_000", PARAMS, 1_000_000),
        ("1.5k", PARAMS, 1_500),
        ("1M", PARAMS, 1_000_000),
        ("0.5G", PARAMS, 500_000_000),
        (" 2 M ", PARAMS, 2_000_000),
        (0, PARAMS, 0),
        (1234.9, PARAMS, 1234),
        (3000000, BYTES, 3_000_000),
        ("512B", BYTES, 512),
        ("3MB", BYTES, 3_000_000),
        ("3kB", BYTES, 3_000),
        ("3KB", BYTES, 3_000),
        ("1GB", BYTES, 1_000_000_000),
        ("1KiB", BYTES, 1_024),
        ("2.5MiB", BYTES, 2_621_440),
        ("1GiB", BYTES, 1_073_741_824),
        ("1.1KiB", BYTES, 1_126),  # 1126.4 bytes: measured sizes are whole bytes, so floor
    ],
)
def test_limits_with_units(raw: object, metric: object, expected: int) -> None:
    assert parse_amount(raw, metric, "limit").value == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "metric", "message"),
    [
        ("1m", PARAMS, "ambiguous (milli or mega?)"),
        ("1K", PARAMS, "unknown unit 'K'"),
        ("1MB", PARAMS, "params is a count, not a size"),
        ("1M", BYTES, "param-bytes is a size in bytes: write MB"),
        ("3mb", BYTES, "ambiguous (bits or bytes?)"),
        ("3Mb", BYTES, "ambiguous (bits or bytes?)"),
        ("3MiBs", BYTES, "unknown unit 'MiBs'"),
        ("1X", PARAMS, "unknown unit 'X'"),
        ("lots", PARAMS, "is not a number with an optional unit"),
        ("-1M", PARAMS, "is negative"),
        (-5, PARAMS, "is negative"),
        (True, PARAMS, "must be a number or a string"),
        ("2%", PARAMS, "a percentage needs a baseline"),
    ],
)
def test_bad_limits_name_the_key_and_problem(raw: object, metric: object, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_amount(raw, metric, "pyproject.toml [tool.convrewrite] budgets[0] limit")  # type: ignore[arg-type]
    line = caught.value.one_line()
    assert "budgets[0] limit" in line
    assert message in line
    assert "\n" not in line


def test_percent_is_accepted_for_max_increase() -> None:
    amount = parse_amount("2%", PARAMS, "max-increase", allow_percent=True)
    assert amount.resolve(781_450) == 15_629  # floor(2% of 781,450)
    assert parse_amount("10k", PARAMS, "max-increase", allow_percent=True).resolve(781_450) == 10_000


def test_budget_defaults_and_aliases() -> None:
    budget = parse_budget({"metric": "trainable_params", "limit": "1M"}, "b", None)
    assert budget.name == "trainable-params"
    assert budget.level == "error"
    assert not budget.relative
    relative = parse_budget({"metric": "size", "max-increase": "1%", "level": "warn"}, "b", "crnn")
    assert relative.metric.name == "param-bytes"
    assert relative.name == "param-bytes-increase"
    assert relative.qualified_name == "crnn/param-bytes-increase"
    assert relative.level == "warn"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"metric": "params", "limt": "1M"}, "unknown key 'limt'"),
        ({"metric": "flops", "limit": "1M"}, "unknown metric 'flops' (MACs are the unit"),
        ({"metric": "latency", "limit": "1M"}, "unknown metric 'latency'"),
        ({"limit": "1M"}, "has no metric"),
        ({"metric": "params", "limit": "1M", "level": "fatal"}, "level = 'fatal' is not one of error, warn"),
        ({"metric": "params"}, "needs exactly one of limit"),
        ({"metric": "params", "limit": "1M", "max-increase": "2%"}, "needs exactly one of limit"),
        ({"metric": "params", "limit": "1M", "name": "a/b"}, "name must be a non-empty string without '/'"),
        ("params <= 1M", "must be a table"),
    ],
)
def test_malformed_budgets(raw: object, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_budget(raw, "[tool.convrewrite] budgets[3]", None)
    assert "budgets[3]" in caught.value.one_line()
    assert message in caught.value.one_line()


def test_budget_names_are_unique_per_target() -> None:
    with pytest.raises(UsageError, match=r"budgets\[1\]: budget name 'params' is already used by .*budgets\[0\]"):
        parse_budgets([{"metric": "params", "limit": 1}, {"metric": "params", "limit": 2}], "budgets", None)
    with pytest.raises(UsageError, match="must be a list of tables"):
        parse_budgets({"metric": "params"}, "budgets", None)


def _project(tmp_path: Path, data: dict[str, object]) -> ProjectConfig:
    path = tmp_path / "pyproject.toml"
    path.write_text("")
    return ProjectConfig(path, data)


def test_targets_inherit_layer_selection_and_baseline_only(tmp_path: Path) -> None:
    project = _project(
        tmp_path,
        {
            "model": "top.py",
            "rules": ["separable"],
            "exclude": ["head"],
            "baseline": "base.json",
            "targets": {"small": {"model": "small.py", "budgets": [{"metric": "macs", "limit": "1M"}]}},
        },
    )
    top, named = config_targets(project)
    assert top is None  # a top-level model without budgets is only report/apply's default
    (small,) = named
    assert small.budgets[0].qualified_name == "small/macs"
    assert small.config.resolve("exclude", None).value == ["head"]
    assert "[tool.convrewrite] exclude" in small.config.resolve("exclude", None).source
    assert small.config.resolve("baseline", None).value == "base.json"
    assert small.config.resolve("rules", None).value is None  # rules belong to one model
    assert "[tool.convrewrite.targets.small] model" in small.config.resolve("model", None).source


def test_top_level_model_is_a_target_with_budgets_or_alone(tmp_path: Path) -> None:
    budgets = [{"metric": "params", "limit": "1M"}]
    named = {"small": {"model": "small.py", "budgets": budgets}}
    top, _ = config_targets(_project(tmp_path, {"model": "top.py"}))
    assert top is not None and top.budgets == []  # check then says "no budgets"
    top, _ = config_targets(_project(tmp_path, {"model": "top.py", "budgets": budgets, "targets": named}))
    assert top is not None and top.budgets[0].qualified_name == "params"
    top, _ = config_targets(_project(tmp_path, {"targets": named}))
    assert top is None


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ({"crnn": {"model": "m.py", "modle": "x"}}, "[tool.convrewrite.targets.crnn]: unknown key 'modle'"),
        ({"crnn": {"budgets": []}}, "[tool.convrewrite.targets.crnn] has no model"),
        ({"a b": {"model": "m.py"}}, "a target name takes letters, digits"),
        ({"crnn": "m.py"}, "must be a table"),
        ({"crnn": {"model": "m.py", "min-channels": -1}}, "targets.crnn] min-channels must be a non-negative"),
        (
            {"crnn": {"model": "m.py", "budgets": [{"metric": "params", "limit": "9mb"}]}},
            "targets.crnn] budgets[0] limit = '9mb': params is a count",
        ),
        (["m.py"], "must be a table of named targets"),
    ],
)
def test_malformed_targets(tmp_path: Path, targets: object, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        config_targets(_project(tmp_path, {"targets": targets}))
    assert message in caught.value.one_line()


def test_command_line_limit_overrides_error_budgets_of_its_metric() -> None:
    config = parse_budgets(
        [
            {"name": "hard", "metric": "params", "limit": "1M"},
            {"name": "early", "metric": "params", "limit": "900k", "level": "warn"},
            {"name": "growth", "metric": "params", "max-increase": "2%"},
            {"name": "macs", "metric": "macs", "limit": "1G"},
        ],
        "pyproject.toml [tool.convrewrite] budgets",
        None,
    )
    cli = command_line_budgets("2M", None, "3MB", ["macs:5%"])
    merged = {b.name: b for b in with_command_line(config, cli, None)}
    assert merged["hard"].limit is not None and merged["hard"].limit.value == 2_000_000
    assert merged["hard"].source.startswith("command line --max-params (overrides pyproject.toml")
    assert merged["early"].limit is not None and merged["early"].limit.value == 900_000  # warn level stays
    assert merged["growth"].max_increase is not None and merged["growth"].max_increase.text == "2%"
    assert merged["macs"].limit is not None and merged["macs"].limit.value == 1_000_000_000
    assert merged["max-size"].limit is not None and merged["max-size"].limit.value == 3_000_000
    assert merged["macs-increase"].max_increase is not None and merged["macs-increase"].max_increase.text == "5%"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("1.5MB", None, None, None), "--max-params = '1.5MB': params is a count"),
        ((None, "-3M", None, None), "--max-macs is negative"),
        ((None, None, "3M", None), "--max-size = '3M': param-bytes is a size in bytes: write MB"),
        ((None, None, None, ["2%"]), "--max-increase '2%' is not METRIC:AMOUNT"),
        ((None, None, None, ["flops:2%"]), "unknown metric 'flops'"),
    ],
)
def test_command_line_budget_errors(args: tuple[object, ...], message: str) -> None:
    with pytest.raises(UsageError) as caught:
        command_line_budgets(*args)  # type: ignore[arg-type]
    assert message in caught.value.one_line()


def test_the_projects_own_budget_config_is_valid() -> None:
    """The dogfood gate of .ci/run: both sample models, with budgets (parsed without torch)."""
    from convrewrite.config.project import load_project_config

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    top, named = config_targets(load_project_config(pyproject))
    assert top is None
    assert {t.name: t.config.data["model"] for t in named} == {
        "crnn": "sample_models/crnn.py",
        "tdnn": "sample_models/tdnn.py",
    }
    assert all(t.budgets for t in named)
    assert named[0].config.data["rules"] == ["separable"]


@pytest.mark.parametrize(
    ("raw", "kind", "described", "where"),
    [
        ({"metric": "params", "limit": "1M"}, "limit", "params <= 1M, level error", "limit 1M set by b"),
        (
            {"metric": "params", "max-increase": "2%"},
            "max-increase",
            "params <= baseline + 2%, level error",
            "limit max-increase 2% set by b",
        ),
        (
            {"metric": "agreement", "minimum": 0.9},
            "minimum",
            "agreement >= 0.9, level error",
            "limit minimum 0.9 set by b",
        ),
        (
            {"metric": "eval:accuracy", "max-drop": 0.01},
            "max-drop",
            "eval:accuracy >= original - 0.01, level error",
            "limit max-drop 0.01 set by b",
        ),
    ],
)
def test_each_kind_of_bound_is_told_apart_once(raw: dict, kind: str, described: str, where: str) -> None:
    """``Budget.bound`` names the kind; ``describe`` and the failure's where-sentence read it."""
    from convrewrite.gate.views import where_sentence

    budget = parse_budget(raw, "b", None)
    assert budget.bound[0] == kind
    assert budget.describe() == described

    class _Outcome:
        pass

    outcome = _Outcome()
    outcome.budget = budget  # type: ignore[attr-defined]
    assert where_sentence(outcome) == where  # type: ignore[arg-type]
