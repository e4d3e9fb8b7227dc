"""The README's promises point at tests that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `tests/file.py::test_name`, or `::test_name` continuing the previous file in the same cell.
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)?::(\w+)`")


def test_every_test_named_in_the_readme_exists() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    named: list[tuple[str, str]] = []
    current: str | None = None
    for match in REFERENCE.finditer(readme):
        current = match.group(1) or current
        assert current is not None, f"{match.group(0)} names no file"
        named.append((current, match.group(2)))
    assert len(named) >= 20  # the Guarantees table
    missing = [
        f"{path}::{name}"
        for path, name in named
        if not re.search(rf"^(async )?def {name}\(", (ROOT / path).read_text(), re.MULTILINE)
    ]
    assert missing == []
