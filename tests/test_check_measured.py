"""check holds measured metrics too: a floor on agreement, a ceiling on output error, a maximum
drop of the user's own evaluate() metric against the original model, all measured in one run."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from convrewrite.errors import UsageError
from convrewrite.gate.budgets import parse_budget

from .conftest import ASSETS


def _project(tmp_path: Path, budgets: str) -> None:
    (tmp_path / "calibrated.py").write_text((ASSETS / "calibrated.py").read_text())
    (tmp_path / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [tool.convrewrite]
            model = "calibrated.py"
            rules = ["separable"]
            fit-steps = 5
            """
        )
        + textwrap.dedent(budgets)
    )


def test_measured_budgets_pass_and_report_their_values(cli, tmp_path: Path) -> None:
    _project(
        tmp_path,
        """
        [[tool.convrewrite.budgets]]
        metric = "agreement"
        minimum = "50%"

        [[tool.convrewrite.budgets]]
        metric = "output-error"
        limit = 0.9

        [[tool.convrewrite.budgets]]
        metric = "eval:mean_logit"
        max-drop = 100
        """,
    )
    result = cli("check", "--format", "json")
    assert result.code == 0, result.err
    document = json.loads(result.out)
    outcomes = {o["metric"]: o for o in document["check"]["budgets"]}
    assert outcomes["agreement"]["bound"] == "floor" and outcomes["agreement"]["limit"] == 0.5
    assert outcomes["agreement"]["measured"] == document["after"]["metrics"]["agreement"]
    drop = outcomes["eval:mean_logit"]
    assert drop["limit"] == pytest.approx(drop["original"] - 100)
    assert drop["original"] == document["before"]["metrics"]["eval:mean_logit"]


def test_a_floor_that_is_not_met_fails_with_what_was_measured(cli, tmp_path: Path) -> None:
    _project(tmp_path, '\n[[tool.convrewrite.budgets]]\nmetric = "cosine"\nminimum = 1.5\n')
    result = cli("check")
    assert result.code == 1
    assert "output cosine similarity" in result.out and "< minimum 1.5: under by" in result.out


def test_a_metric_the_run_did_not_measure_is_a_usage_error(cli, tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        f'[tool.convrewrite]\nmodel = "{ASSETS / "tiny.py"}"\nrules = ["separable"]\n'
        '[[tool.convrewrite.budgets]]\nmetric = "agreement"\nminimum = 0.9\n'
    )
    result = cli("check")
    assert result.code == 2
    assert "did not measure agreement; it needs calibration data (--data)" in result.err


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"metric": "agreement", "minimum": 0.9, "limit": 1}, "exactly one of limit, minimum and max-drop"),
        ({"metric": "agreement", "max-increase": "1%"}, "max-increase compares with a baseline"),
        ({"metric": "params", "minimum": 5}, "minimum is for measured metrics"),
        ({"metric": "agreement", "max-drop": 0.1}, "only evaluate\\(\\) measures"),
        ({"metric": "agreement", "minimum": "lots"}, "is not a number"),
    ],
)
def test_measured_budget_configuration_errors(raw: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_budget(raw, "pyproject.toml [tool.convrewrite] budgets[0]", None)


def test_percentages_read_as_fractions_for_floors_and_of_the_original_for_drops() -> None:
    floor = parse_budget({"metric": "agreement", "minimum": "98%"}, "x", None)
    assert floor.minimum is not None and floor.minimum.value == pytest.approx(0.98)
    drop = parse_budget({"metric": "eval:accuracy", "max-drop": "1%"}, "x", None)
    assert drop.max_drop is not None and drop.max_drop.resolve(0.9) == pytest.approx(0.009)
