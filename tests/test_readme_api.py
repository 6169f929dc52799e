"""The README's Python API example runs as written (the block after its marker comment)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_python_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    text = README.read_text()
    match = re.search(
        r"<!-- the test suite runs this block \(tests/test_readme_api.py\) -->\n```python\n(.*?)```", text, re.S
    )
    assert match, "the marked python block is missing from README.md"
    monkeypatch.chdir(tmp_path)
    exec(compile(match.group(1), "README.md", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert "Conv2d->SeparableConv2d" in out
    assert "26 held-out calibration samples" in out
    assert sorted(p.name for p in (tmp_path / "net-separable").iterdir()) == [
        "model.py",
        "report.json",
        "weights.safetensors",
    ]


def test_the_readme_settings_table_is_the_schema() -> None:
    from convrewrite.config import schema as settings

    assert settings.markdown_table() in README.read_text(), (
        "README.md's settings table differs from the schema: paste convrewrite.config.schema.markdown_table()"
    )
