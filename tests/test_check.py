"""``convrewrite check`` end to end: exit codes, precedence, levels, baselines, output formats.

Every test runs in its own directory with its own pyproject.toml (the repository's pyproject has a
[tool.convrewrite] table of its own) and a tiny model, so the whole file takes seconds. Human
output is pinned by golden files under tests/golden/check/; regenerate them with
``CONVREWRITE_UPDATE_GOLDEN=1 pytest tests/test_check.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from convrewrite.cli import run
from convrewrite.report.model import Report

GOLDEN = Path(__file__).parent / "golden" / "check"

# Measured by `convrewrite report tiny.py`: conv1 224, conv2 1,168, head 68 params.
TINY_PARAMS = 1_460
TINY_MACS = 366_592
TINY_PARAM_BYTES = 5_840
TINY_SEPARABLE_PARAMS = 354

TINY = """\
import torch
from torch import nn

INPUT_SHAPE = (1, 3, 16, 16)
WIDTH = {width}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, WIDTH, 3, padding=1)
        self.head = nn.Conv2d(WIDTH, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


def build_model():
    return Tiny()
"""

TDNN = """\
from torch import nn

INPUT_SHAPE = (1, 6, 20)


class Small1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tdnn = nn.Conv1d(6, 10, 3, padding=1)

    def forward(self, x):
        return self.tdnn(x)
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project directory (the working directory) holding tiny.py."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.py").write_text(TINY.format(width=16))
    return tmp_path


def write_config(directory: Path, body: str) -> None:
    (directory / "pyproject.toml").write_text("[project]\nname = 'demo'\n\n" + body)


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(["check", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("CONVREWRITE_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.is_file(), f"no golden file {path}: run with CONVREWRITE_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{name} differs from its golden file (CONVREWRITE_UPDATE_GOLDEN=1 updates it)"


TINY_BUDGETS = """\
[tool.convrewrite]
model = "tiny.py"

[[tool.convrewrite.budgets]]
name = "params"
metric = "params"
limit = "{params}"

[[tool.convrewrite.budgets]]
name = "macs"
metric = "macs"
limit = "400k"

[[tool.convrewrite.budgets]]
name = "size"
metric = "param-bytes"
limit = "{size}"
level = "{size_level}"
"""


def tiny_budgets(params: str = "1.5k", size: str = "6KB", size_level: str = "error") -> str:
    return TINY_BUDGETS.format(params=params, size=size, size_level=size_level)


# -- exit codes --------------------------------------------------------------------------------------


def test_pass_prints_every_budget_and_its_headroom(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(project, tiny_budgets())
    code, out, err = check(capsys, "--width", "120")
    assert code == 0, err
    assert err == ""
    assert_golden("pass.txt", out)
    assert "40 (2.7%)" in out
    assert "Result: all 3 budgets hold (1 model)" in out


def test_one_budget_is_spoken_of_in_the_singular(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(
        project,
        '[tool.convrewrite]\nmodel = "tiny.py"\nrules = ["separable"]\n\n'
        '[[tool.convrewrite.budgets]]\nmetric = "params"\nlimit = "1.5k"\n',
    )
    code, out, err = check(capsys, "--width", "120")
    assert code == 0, err
    assert "Result: the 1 budget holds (1 model)" in out
    assert "all 1 budget" not in out


def test_exceeded_budget_exits_1_and_says_why(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(project, tiny_budgets(params="1.4k"))
    code, out, err = check(capsys, "--width", "120")
    assert code == 1
    # The failure names the budget, limit and measured value, how far over (absolute and %),
    # the layers that contribute most, and where the limit is configured.
    assert "FAIL params: params 1,460 > limit 1,400: over by 60 (+4.3%)" in out
    assert "limit 1.4k set by pyproject.toml [tool.convrewrite] budgets[0]" in out
    assert "largest contributors (share of params): conv2 1,168 (80.0%), conv1 224 (15.3%), head 68 (4.7%)" in out
    assert_golden("fail.txt", out)
    assert err.count("\n") == 1
    assert err.startswith("convrewrite: error: 1 budget exceeded: params (params 1,460 > limit 1,400")


def test_warn_level_breach_still_exits_0(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(project, tiny_budgets(size="5KiB", size_level="warn"))
    code, out, err = check(capsys, "--width", "120")
    assert code == 0
    assert "WARN size: parameter bytes 5,840 B > limit 5,120 B: over by 720 B (+14.1%)" in out
    assert "3 budgets (1 model): 1 over at warn level, 2 within limits" in out
    assert err.startswith("convrewrite: warning: budget size exceeded (level warn)")


def test_same_breach_at_error_level_exits_1(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(project, tiny_budgets(size="5KiB", size_level="error"))
    code, out, _ = check(capsys, "--width", "120")
    assert code == 1
    assert "FAIL size: parameter bytes 5,840 B > limit 5,120 B" in out


def test_exit_zero_reports_without_failing(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(project, tiny_budgets(params="1k"))
    code, out, err = check(capsys, "--exit-zero", "--width", "120")
    assert code == 0
    assert "FAIL params" in out
    assert "(--exit-zero: not failing)" in out
    assert err.startswith("convrewrite: 1 budget exceeded: params (params 1,460 > limit 1,000")
    assert err.endswith("(--exit-zero: not failing)\n")


def test_json_reports_exit_code_and_outcomes(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(project, tiny_budgets(params="1k"))
    code, out, _ = check(capsys, "--format", "json")
    assert code == 1
    document = json.loads(out)
    outcome = {b["name"]: b for b in document["check"]["budgets"]}["params"]
    assert document["check"]["status"] == "fail"
    assert document["check"]["exit_code"] == 1
    assert outcome["status"] == "fail"
    assert (outcome["limit"], outcome["measured"], outcome["over"]) == (1_000, TINY_PARAMS, 460)
    assert outcome["headroom_percent"] == -46.0
    assert outcome["source"] == "pyproject.toml [tool.convrewrite] budgets[0]"
    assert [c["layer"] for c in outcome["contributors"]] == ["conv2", "conv1", "head"]


def test_model_that_cannot_be_loaded_exits_3(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "broken.py").write_text("import torch\nraise RuntimeError('no weights here')\n")
    code, out, err = check(capsys, "broken.py", "--max-params", "1M")
    assert code == 3
    assert out == ""
    assert "importing broken.py raised RuntimeError at broken.py:2: no weights here" in err


def test_named_target_failure_says_which_target(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "broken.py").write_text("raise ValueError('bad')\n")
    write_config(
        project,
        """
[tool.convrewrite.targets.good]
model = "tiny.py"
budgets = [{ metric = "params", limit = "1M" }]

[tool.convrewrite.targets.bad]
model = "broken.py"
budgets = [{ metric = "params", limit = "1M" }]
""",
    )
    code, _, err = check(capsys)
    assert code == 3
    assert err.startswith("convrewrite: error: target bad: importing broken.py raised ValueError")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('model = "tiny.py"\nbudget = []\n', "unknown key [tool.convrewrite] 'budget'"),
        (
            'model = "tiny.py"\nbudgets = [{ metric = "params", limit = "1M", levle = "warn" }]\n',
            "pyproject.toml [tool.convrewrite] budgets[0]: unknown key 'levle'",
        ),
        (
            'model = "tiny.py"\nbudgets = [{ metric = "params", limit = "1Mb" }]\n',
            "pyproject.toml [tool.convrewrite] budgets[0] limit = '1Mb': params is a count, not a size",
        ),
        (
            'model = "tiny.py"\nbudgets = [{ metric = "param-bytes", limit = "3 mb" }]\n',
            "budgets[0] limit = '3 mb': unit 'mb' is ambiguous (bits or bytes?)",
        ),
        (
            'model = "tiny.py"\nbudgets = [{ metric = "macs", limit = -5 }]\n',
            "pyproject.toml [tool.convrewrite] budgets[0] limit is negative (-5)",
        ),
        (
            'model = "tiny.py"\nbudgets = [{ metric = "macs", limit = "-5M" }]\n',
            "budgets[0] limit is negative ('-5M')",
        ),
        (
            'model = "tiny.py"\nbudgets = [{ metric = "latency", limit = "5" }]\n',
            "pyproject.toml [tool.convrewrite] budgets[0] metric: unknown metric 'latency'; choose one of params, ",
        ),
        (
            'model = "tiny.py"\nbudgets = [{ metric = "params", limit = "1M", level = "info" }]\n',
            "budgets[0] level = 'info' is not one of error, warn",
        ),
        ('model = "tiny.py"\nbudgets = { metric = "params" }\n', "budgets must be a list of tables"),
        ("[tool.convrewrite.targets.x]\nmodel = 1\n", "[tool.convrewrite.targets.x] model must be a string"),
        ("[tool.convrewrite]\nmodel = 'tiny.py'\nbudgets = [\n", "is not valid TOML"),
    ],
)
def test_malformed_config_exits_2_naming_key_and_problem(
    project: Path, capsys: pytest.CaptureFixture[str], config: str, message: str
) -> None:
    header = "" if config.startswith("[tool") else "[tool.convrewrite]\n"
    write_config(project, header + config)
    code, out, err = check(capsys)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert message in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tiny.py"], "no budgets to check for (top level); pass --max-params/--max-macs/--max-size"),
        (["tiny.py", "--max-params", "1M", "--format", "yaml"], "unknown --format 'yaml'"),
        (["tiny.py", "--max-params", "1.5MB"], "--max-params = '1.5MB': params is a count"),
        (["tiny.py", "--max-size", "3M"], "--max-size = '3M': param-bytes is a size in bytes: write MB"),
        (["tiny.py", "--max-increase", "params:2%"], "budget params-increase (command line --max-increase"),
        (["tiny.py", "--max-params", "1M", "--baseline", "missing.json"], "baseline missing.json does not exist"),
        (["tiny.py", "--max-params", "1M", "--rule", "nosuchrule"], "unknown rule 'nosuchrule'"),
        (["missing.py", "--max-params", "1M"], "model file missing.py does not exist"),
        ([], "no MODEL given"),
        (["tiny.py", "--max-params"], "Option '--max-params' requires an argument"),
    ],
)
def test_usage_errors_exit_2(project: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    code, out, err = check(capsys, *args)
    assert code == 2
    assert out == ""
    assert message in err


def test_bad_baseline_file_exits_2(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "base.json").write_text('{"schema": "something/else"}')
    code, _, err = check(capsys, "tiny.py", "--max-increase", "params:2%", "--baseline", "base.json")
    assert code == 2
    assert "baseline base.json is not a convrewrite JSON report" in err
    (project / "base.json").write_text("{not json")
    code, _, err = check(capsys, "tiny.py", "--max-increase", "params:2%", "--baseline", "base.json")
    assert code == 2
    assert "baseline base.json is not readable JSON" in err


# -- precedence: command line over pyproject ------------------------------------------------------------


def test_command_line_limit_overrides_config(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(project, tiny_budgets(params="1k"))
    assert check(capsys)[0] == 1
    code, out, err = check(capsys, "--max-params", "2k", "--verbose", "--width", "120")
    assert code == 0
    assert "budget params: params <= 2k, level error  (command line --max-params (overrides pyproject.toml" in err
    assert "2,000" in out
    # ...and the other way round: the command line can tighten a limit.
    write_config(project, tiny_budgets(params="2k"))
    assert check(capsys)[0] == 0
    code, out, _ = check(capsys, "--max-params", "1k", "--width", "120")
    assert code == 1
    assert "limit 1k set by command line --max-params (overrides pyproject.toml [tool.convrewrite] budgets[0])" in out


def test_command_line_model_and_rules_override_config(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "other.py").write_text(TINY.format(width=32))
    write_config(project, '[tool.convrewrite]\nmodel = "tiny.py"\nbudgets = [{ metric = "params", limit = "1.5k" }]\n')
    assert check(capsys)[0] == 0
    code, _, err = check(capsys, "other.py", "--verbose")
    assert code == 1
    assert "model = 'other.py'  (command line)" in err
    # The config's rules are "the rules to apply before checking"; --rule replaces them.
    write_config(
        project,
        '[tool.convrewrite]\nmodel = "tiny.py"\nrules = ["separable"]\n'
        'budgets = [{ metric = "params", limit = "400" }]\n',
    )
    code, out, err = check(capsys, "--verbose", "--format", "json")
    assert code == 0
    assert json.loads(out)["check"]["budgets"][0]["measured"] == TINY_SEPARABLE_PARAMS
    assert "rules = ['separable']  (pyproject.toml [tool.convrewrite] rules)" in err
    code, _, err = check(capsys, "--verbose", "--rule", "separable:multiplier=2")
    assert code == 1
    assert "rules = ['separable:multiplier=2']  (command line)" in err


# -- baselines ------------------------------------------------------------------------------------------


RELATIVE = """\
[tool.convrewrite]
model = "tiny.py"
baseline = "base.json"

[[tool.convrewrite.budgets]]
name = "params-growth"
metric = "params"
max-increase = "2%"

[[tool.convrewrite.budgets]]
name = "macs-growth"
metric = "macs"
max-increase = "100k"
level = "warn"
"""


def test_check_json_is_a_report_and_a_baseline(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = check(capsys, "tiny.py", "--max-params", "1M", "--format", "json")
    assert code == 0
    document = json.loads(out)
    report = Report.from_dict(document)  # the JSON of a one-model check is that model's report
    assert report.final.params == TINY_PARAMS
    assert document["check"]["targets"][0]["report"]["before"]["params"] == TINY_PARAMS
    (project / "base.json").write_text(out)
    write_config(project, RELATIVE)
    code, out, err = check(capsys, "--width", "120")
    assert code == 0, err
    assert "+0 (+0.0%)" in out  # the diff against the baseline


def test_report_json_serves_as_baseline(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["report", "tiny.py", "--format", "json", "--output", "base.json"]) == 0
    capsys.readouterr()
    code, out, err = check(capsys, "tiny.py", "--baseline", "base.json", "--max-increase", "params:0", "--width", "120")
    assert code == 0, err
    assert "params-increase" in out


def test_growth_over_baseline_fails_and_names_layers_that_grew(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(["check", "tiny.py", "--max-params", "1M", "--format", "json"])
    (project / "base.json").write_text(capsys.readouterr().out)
    assert code == 0
    (project / "tiny.py").write_text(TINY.format(width=20))  # conv2 and head grow
    write_config(project, RELATIVE)
    code, out, err = check(capsys, "--width", "120")
    assert code == 1
    # conv2 8->20: 1,460 params (+292); head 20->4: 84 (+16); the baseline's 1,460 may grow 2% (29).
    assert "FAIL params-growth: params 1,768 > limit 1,489 (baseline 1,460 + 2%): over by 279 (+18.7%)" in out
    assert "limit max-increase 2% set by pyproject.toml [tool.convrewrite] budgets[0]" in out
    assert "largest contributors (growth of params since the baseline): conv2 +292 (94.8%), head +16 (5.2%)" in out
    assert "WARN macs-growth" not in out  # MACs grew by 77,824 < 100k
    assert_golden("baseline-fail.txt", out)
    assert "params-growth" in err


def test_relative_budgets_without_a_baseline_are_skipped_visibly(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The job that makes the baseline (on main) runs the same config, with no baseline yet.
    write_config(project, RELATIVE.replace('baseline = "base.json"\n', ""))
    code, out, err = check(capsys, "--width", "120")
    assert code == 0
    assert "no baseline  skip" in out
    assert "2 budgets (1 model): 0 within limits, 2 skipped (relative, no baseline)" in out
    assert err == (
        "convrewrite: note: 2 relative budgets skipped, no baseline: params-growth, macs-growth "
        "(pass --baseline FILE to compare)\n"
    )
    code, out, _ = check(capsys, "--format", "json")
    assert [b["status"] for b in json.loads(out)["check"]["budgets"]] == ["skip", "skip"]


def test_a_configured_baseline_that_is_missing_is_an_error(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A baseline that was asked for but is not there (a failed artifact download) never passes.
    write_config(project, RELATIVE)
    code, out, err = check(capsys)
    assert code == 2
    assert out == ""
    assert "baseline base.json does not exist; make one with `convrewrite check --format json > baseline.json`" in err


# -- several models from one pyproject ----------------------------------------------------------------------


TARGETS = """\
[tool.convrewrite]
exclude = ["head"]

[tool.convrewrite.targets.tiny]
model = "tiny.py"
rules = ["separable"]
budgets = [
  { name = "params", metric = "params", limit = "1k" },
  { name = "macs", metric = "macs", limit = "{tiny_macs}" },
]

[tool.convrewrite.targets.small1d]
model = "models/small1d.py"
budgets = [{ name = "params", metric = "params", limit = "200" }]
"""


def test_named_targets_gate_several_models(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "models").mkdir()
    (project / "models" / "small1d.py").write_text(TDNN)
    write_config(project, TARGETS.replace("{tiny_macs}", "90k"))
    code, out, err = check(capsys, "--width", "120", "--verbose")
    assert code == 0, err
    assert "tiny/params" in out and "small1d/params" in out
    assert "Result: all 3 budgets hold (2 models)" in out
    assert "exclude = ['head']  (pyproject.toml [tool.convrewrite] exclude)" in err  # inherited
    # A multi-model JSON document holds each model's report and serves as a baseline, by target name.
    code = run(["check", "--format", "json"])
    document = json.loads(capsys.readouterr().out)
    assert document["schema"] == "convrewrite.check/1"
    assert [t["name"] for t in document["check"]["targets"]] == ["tiny", "small1d"]
    (project / "base.json").write_text(json.dumps(document))
    code, out, err = check(capsys, "--baseline", "base.json", "--max-increase", "macs:0", "--width", "120")
    assert code == 0, err
    assert "tiny/macs-increase" in out and "small1d/macs-increase" in out
    # The command line's MODEL replaces the named targets.
    code, _, err = check(capsys, "tiny.py", "--max-params", "2k", "--verbose")
    assert code == 0
    assert "named targets not checked (tiny, small1d)" in err


def test_markdown_and_github_formats(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "models").mkdir()
    (project / "models" / "small1d.py").write_text(TDNN)
    write_config(project, TARGETS.replace("{tiny_macs}", "50k").replace('limit = "200"', 'limit = "180"'))
    code, markdown, _ = check(capsys, "--format", "markdown")
    assert code == 1
    assert_golden("fail.md", markdown)
    code, github, _ = check(capsys, "--format", "github")
    assert code == 1
    assert_golden("fail.github.txt", github)
    annotations = [line for line in github.splitlines() if line.startswith("::")]
    assert len(annotations) == 2
    assert annotations[0].startswith("::error title=convrewrite check%3A budget tiny/macs exceeded::MACs 80,640 > ")
    assert "(+61.3%25)" in annotations[0]  # '%' is escaped in workflow commands
    assert github.endswith(markdown)  # the rest is the job summary


def test_github_format_on_pass_has_no_annotations(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(project, tiny_budgets())
    code, out, _ = check(capsys, "--format", "github")
    assert code == 0
    assert not any(line.startswith("::") for line in out.splitlines())
    assert_golden("pass.md", out)


def test_workflow_command_escaping() -> None:
    from convrewrite.gate.views import escape_data, escape_property

    assert escape_data("50%\r\nnext: a, b") == "50%25%0D%0Anext: a, b"
    assert escape_property("t: a, b%") == "t%3A a%2C b%25"


def test_check_modules_do_not_import_torch() -> None:
    """Config and unit errors answer in milliseconds: parsing, planning and views need no torch."""
    code = (
        "import sys, convrewrite.gate.budgets, convrewrite.gate.check, convrewrite.gate.views, convrewrite.cli; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
