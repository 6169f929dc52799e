"""The manual's links hold, and the docs site builds with ``mkdocs build --strict``.

The link checks need nothing but the text: every relative link of the README and of ``docs/*.md``
names a file that exists and, where it names an anchor of a Markdown page, a heading of that page
(as GitHub renders the README, as the site renders its pages, snippet includes expanded). The
build tests need the ``docs`` extra (mkdocs, mkdocs-material): the real build must pass strict
mode, and the same build must fail on a page given a link to a missing anchor, which is what makes
``--strict`` the broken-link check of CI (``python3 dev.py test`` builds the site too).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from . import doc_pages
from .doc_pages import DOCS, README, ROOT, page_name, pages

PAGES = pages()


@pytest.mark.parametrize("page", [*PAGES, ROOT / "benchmarks" / "README.md"], ids=page_name)
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target, anchor in doc_pages.links(page):
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in doc_pages.anchors(path):
            broken.append(f"{target}#{anchor}: {path.name} has no such heading")
    assert not broken, f"{page_name(page)}: " + "; ".join(broken)


def test_the_readme_sections_the_home_page_includes_exist_and_hold_no_links() -> None:
    """index.md includes README sections; a link in them would resolve from docs/ there and from the root here."""
    included = doc_pages._SNIPPET.findall((DOCS / "index.md").read_text())
    assert {name for _, name in included} >= {"intro", "setup", "quick-start", "recovery", "python-api", "ci"}
    for file, name in included:
        text = doc_pages.snippet_section(ROOT / file, name)
        assert "](" not in text.replace("](#", ""), f"{file}:{name} holds a relative link"


def test_the_nav_lists_every_page_and_only_pages_that_exist() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = [next(iter(entry.values())) for entry in config["nav"]]
    assert sorted(listed) == sorted(p.name for p in DOCS.glob("*.md"))
    assert config["theme"]["font"] is False  # nothing fetched from Google Fonts


def test_one_exit_code_table_in_the_whole_manual() -> None:
    tables = [page_name(p) for p in PAGES if "| 3 | the model could not be loaded" in p.read_text()]
    assert tables == ["docs/exit-codes.md"], tables


mkdocs_missing = pytest.mark.skipif(
    shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None,
    reason="needs the docs extra (pip install -c constraints.txt '.[docs]')",
)


def _build(root: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )


@mkdocs_missing
def test_the_site_builds_strict(tmp_path: Path) -> None:
    built = _build(ROOT, tmp_path / "site")
    assert built.returncode == 0, built.stderr[-3000:]
    assert "WARNING" not in built.stderr, built.stderr[-3000:]
    home = (tmp_path / "site" / "index.html").read_text()
    # The README's quick start, included from README.md, is on the home page.
    assert "Params                 5,551,360       781,450       7.10x" in home
    for page in DOCS.glob("*.md"):
        name = "index.html" if page.stem == "index" else f"{page.stem}/index.html"
        assert (tmp_path / "site" / name).is_file(), name
    assert "fonts.googleapis" not in home


@mkdocs_missing
def test_a_link_to_a_missing_anchor_fails_the_build(tmp_path: Path) -> None:
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    shutil.copy(README, tmp_path)
    page = tmp_path / "docs" / "development.md"
    page.write_text(page.read_text() + "\nSee [the rules](rules.md#no-such-heading).\n")
    built = _build(tmp_path, tmp_path / "site")
    assert built.returncode != 0
    assert "does not contain an anchor '#no-such-heading'" in built.stderr, built.stderr[-3000:]


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=page_name)
def test_lists_are_written_the_way_the_site_renders_them(page: Path) -> None:
    """Python-Markdown, unlike GitHub, needs a blank line before a list and 4 spaces before a nested item."""
    lines = page.read_text().splitlines()
    wrong = []
    for index, line in doc_pages.lines_outside_code(page.read_text()):
        previous = lines[index - 1] if index else ""
        if re.match(r"(- |\* |\d+\. )", line) and previous.strip() and not re.match(r"(\s|- |\* |\d+\. )", previous):
            wrong.append(f"line {index + 1}: a list right after a paragraph (add a blank line)")
        if re.match(r" {1,3}(- |\* |\d+\. )", line):
            wrong.append(f"line {index + 1}: a nested item indented less than 4 spaces")
    assert not wrong, f"{page_name(page)}: " + "; ".join(wrong)
