"""Golden-file comparison; ``CONVREWRITE_UPDATE_GOLDEN=1`` rewrites the expected files."""

from __future__ import annotations

import os
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"


def assert_matches_golden(text: str, name: str) -> None:
    path = GOLDEN / name
    # Rich pads table cells; trailing spaces carry no meaning, so they are not pinned.
    normalized = "\n".join(line.rstrip() for line in text.splitlines()) + "\n"
    if os.environ.get("CONVREWRITE_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(normalized)
    assert path.exists(), f"missing golden file {path}; run with CONVREWRITE_UPDATE_GOLDEN=1 to create it"
    assert normalized == path.read_text(), f"output differs from {path} (CONVREWRITE_UPDATE_GOLDEN=1 updates it)"
