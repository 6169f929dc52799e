"""The manual as the tests read it: the README and the pages of the docs site (``docs/*.md``).

Tests that check what the documentation says (its transcripts, its examples, its links, the settings
table) find the text here, so a section that moves between pages moves in one place. Headings are
found at any level, outside code blocks; anchors are computed the way the two renderers compute
them (GitHub for the README, Python-Markdown's ``toc`` for the site), and the site's snippet
includes (``--8<-- "README.md:NAME"``) are expanded the way ``pymdownx.snippets`` expands them.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

#: The marker before a python block that the suite runs (tests/test_docs_examples.py).
RUN_BLOCK = "<!-- the test suite runs this block (tests/test_docs_examples.py) -->"
#: The marker before a console transcript whose commands the suite runs and compares.
RUN_TRANSCRIPT = "<!-- the test suite runs this transcript (tests/test_docs_examples.py) -->"

_SNIPPET = re.compile(r'^--8<-- "([^":]+)(?::([\w-]+))?"$', re.M)


def pages() -> list[Path]:
    """The README, then every page of the site, in name order."""
    return [README, *sorted(DOCS.glob("*.md"))]


def in_site(page: Path) -> bool:
    """Whether the page is one of the site's (rendered by MkDocs) rather than GitHub's (the READMEs)."""
    return page.resolve().parent == DOCS.resolve()


def page_name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def lines_outside_code(text: str) -> Iterator[tuple[int, str]]:
    """(index, line) of every line that is not inside a fenced code block (fences themselves excluded)."""
    fence: str | None = None
    for index, line in enumerate(text.splitlines()):
        stripped = line.lstrip()
        if fence is None and stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            continue
        if fence is not None:
            if stripped.startswith(fence):
                fence = None
            continue
        yield index, line


def headings(text: str) -> list[tuple[int, int, str]]:
    """(line index, level, title) of every Markdown heading outside code blocks."""
    found = []
    for index, line in lines_outside_code(text):
        match = re.match(r"(#{1,6}) (.+?)\s*#*\s*$", line)
        if match:
            found.append((index, len(match.group(1)), match.group(2)))
    return found


def section(page: Path, title: str) -> str:
    """The text of the heading whose title starts with ``title``, up to the next heading of its level or above."""
    text = page.read_text()
    lines = text.splitlines(keepends=True)
    found = headings(text)
    for position, (index, level, heading) in enumerate(found):
        if heading.startswith(title):
            end = next((i for i, lvl, _ in found[position + 1 :] if lvl <= level), len(lines))
            return "".join(lines[index:end])
    raise AssertionError(f"{page_name(page)} has no heading starting with {title!r}")


def _plain(title: str) -> str:
    """A heading's text as rendered: code spans, emphasis and links reduced to their text."""
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)
    return title.replace("`", "").replace("*", "")


def github_anchor(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", _plain(title).strip().lower()).replace(" ", "-")


def site_anchor(title: str) -> str:
    """Python-Markdown's ``toc`` slug (MkDocs'): ASCII, no punctuation, runs of spaces and hyphens one hyphen."""
    value = unicodedata.normalize("NFKD", _plain(title)).encode("ascii", "ignore").decode("ascii")
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def snippet_section(path: Path, name: str) -> str:
    """The lines between ``--8<-- [start:NAME]`` and ``--8<-- [end:NAME]`` of ``path``."""
    text = path.read_text()
    start = re.search(rf"--8<-- \[start:{re.escape(name)}\].*\n", text)
    end = re.search(rf".*--8<-- \[end:{re.escape(name)}\]", text)
    assert start and end and start.end() <= end.start(), f"{page_name(path)} has no snippet section {name!r}"
    return text[start.end() : end.start()]


def expanded(page: Path) -> str:
    """The page as the site renders it: every ``--8<-- "FILE:NAME"`` line replaced by that section."""

    def include(match: re.Match[str]) -> str:
        path = ROOT / match.group(1)
        assert path.is_file(), f"{page_name(page)} includes {match.group(1)}, which does not exist"
        return snippet_section(path, match.group(2)) if match.group(2) else path.read_text()

    return _SNIPPET.sub(include, page.read_text())


def anchors(page: Path) -> set[str]:
    """The anchors a link may name on this page, as its renderer makes them."""
    if not in_site(page):
        return {github_anchor(title) for _, _, title in headings(page.read_text())}
    return {site_anchor(title) for _, _, title in headings(expanded(page))}


def links(page: Path) -> Iterator[tuple[str, str]]:
    """(target, anchor) of every relative Markdown link of the page, outside code blocks and code spans."""
    text = expanded(page) if in_site(page) else page.read_text()
    for _, line in lines_outside_code(text):
        line = re.sub(r"`[^`]*`", "", line)
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            yield path, anchor


def marked_blocks(marker: str, language: str) -> list[tuple[Path, str]]:
    """(page, code) of every ``language`` block right after ``marker``, over all pages."""
    pattern = re.compile(re.escape(marker) + rf"\n```{language}\n(.*?)```", re.S)
    return [(page, code) for page in pages() for code in pattern.findall(page.read_text())]
