"""The pre-commit hook, run for real by pre-commit in a scratch git repository.

* ``pre-commit try-repo`` of this repository (its ``.pre-commit-hooks.yaml``), with the manual's
  "run it now" options, on a model that holds its budget and on one that breaks it;
* the manual's ``local`` hook snippet and its commands, taken from its text (docs/check.md,
  "pre-commit").

The hook is ``language: system``: pre-commit builds no environment and nothing is downloaded; the
hook finds ``convrewrite`` (and torch) on PATH, here this test environment's.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from . import doc_pages

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = [
    pytest.mark.skipif(shutil.which("git") is None, reason="pre-commit needs git, which is not installed"),
    pytest.mark.skipif(not (BIN / "convrewrite").exists(), reason="needs the convrewrite script next to python"),
]
pre_commit = pytest.importorskip("pre_commit", reason="pre-commit comes with the test extra (pip install '.[test]')")

MODEL = """\
from torch import nn

INPUT_SHAPE = (1, 3, 8, 8)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.conv(x)
"""

#: Net has 3*8*9 + 8 = 224 parameters.
PYPROJECT = """\
[tool.convrewrite]
model = "net.py"

[[tool.convrewrite.budgets]]
name = "params"
metric = "params"
limit = "{limit}"
"""


def _environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "PRE_COMMIT"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PRE_COMMIT_HOME=str(home / "pre-commit-cache"),  # not the user's ~/.cache
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.invalid",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.invalid",
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_CONFIG_NOSYSTEM="1",
        OMP_NUM_THREADS="1",
    )
    return env


def _scratch_repository(tmp_path: Path, limit: str) -> tuple[Path, dict[str, str]]:
    repo = tmp_path / "project"
    repo.mkdir()
    (repo / "net.py").write_text(MODEL)
    (repo / "pyproject.toml").write_text(PYPROJECT.format(limit=limit))
    env = _environment(tmp_path)
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "model"]):
        subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True)
    return repo, env


def _pre_commit(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pre_commit", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )


def test_try_repo_runs_the_published_hook(tmp_path: Path) -> None:
    """A model over its budget: the hook fails the push, with convrewrite's message."""
    repo, env = _scratch_repository(tmp_path, "200")
    result = _pre_commit(
        repo, env, "try-repo", str(ROOT), "convrewrite-check", "--hook-stage", "manual", "--all-files", "--verbose"
    )
    output = result.stdout + result.stderr
    assert "convrewrite check (parameter, MAC and size budgets)" in output, output
    assert result.returncode == 1, output
    assert re.search(r"size budgets\)\.+Failed", output) and "params 224 > limit 200" in output, output
    # No hook environment was built: nothing installed, torch not downloaded.
    cache = tmp_path / "pre-commit-cache"
    assert not list(cache.glob("repo*/py_env-*")), sorted(p.name for p in cache.rglob("*"))[:20]


def test_the_readme_local_hook_and_its_commands_work(tmp_path: Path) -> None:
    section = doc_pages.section(doc_pages.DOCS / "check.md", "pre-commit")
    snippets = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    local = next(s for s in snippets if "repo: local" in s)
    commands = [
        line[2:] for block in re.findall(r"```console\n(.*?)```", section, flags=re.S) for line in block.splitlines()
    ]
    commands = [c.split("  #")[0].strip() for c in commands if c.startswith("pre-commit ")]
    assert commands == [
        "pre-commit install --hook-type pre-push",
        "pre-commit run convrewrite-check --hook-stage manual --all-files",
    ]
    repo, env = _scratch_repository(tmp_path, "1k")  # within the budget: the hook passes
    (repo / ".pre-commit-config.yaml").write_text("repos:\n" + local)
    subprocess.run(["git", "add", "-A"], cwd=repo, env=env, check=True)
    installed = _pre_commit(repo, env, *shlex.split(commands[0])[1:])
    assert installed.returncode == 0, installed.stderr
    assert (repo / ".git" / "hooks" / "pre-push").is_file()
    ran = _pre_commit(repo, env, *shlex.split(commands[1])[1:])
    output = ran.stdout + ran.stderr
    assert ran.returncode == 0 and re.search(r"convrewrite check\.+Passed", output), output
    # Without --all-files and nothing staged, pre-commit skips the hook: why the manual asks for it.
    subprocess.run(["git", "commit", "-q", "-m", "config"], cwd=repo, env=env, check=True)
    skipped = _pre_commit(repo, env, "run", "convrewrite-check", "--hook-stage", "manual")
    assert skipped.returncode == 0 and "no files to check" in skipped.stdout + skipped.stderr


def test_documentation_links_of_the_hook_and_the_action_resolve() -> None:
    """.pre-commit-hooks.yaml and action.yml point to sections of the manual that exist."""
    for name in (".pre-commit-hooks.yaml", "action.yml"):
        links = re.findall(r"\b([\w./-]+\.md)(#[\w-]+)?", (ROOT / name).read_text())
        assert links, name
        for path, anchor in links:
            assert (ROOT / path).is_file(), f"{name} links to {path}, which does not exist"
            if anchor:
                assert anchor[1:] in doc_pages.anchors(ROOT / path), f"{name} links to {path}{anchor}: no such heading"
