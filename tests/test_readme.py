"""The README's promises point at tests that exist, and its Python examples run."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

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


# -- every ```python block runs --------------------------------------------------------------
#
# The convention (also stated in the README's Testing section): every ```python block is a
# complete program that runs as written, offline, in an empty folder. A block that cannot (it
# needs a server or an API key) has `<!-- not run: REASON -->` as the nearest non-blank line
# above its fence; it is still compiled, so it cannot rot into a syntax error.

NOT_RUN = re.compile(r"<!--\s*not run:\s*(\S.*?)\s*-->")
FENCE = re.compile(r"^```python\s*$\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)

# Runs a block as __main__; a block written with top-level `await` (as in a notebook or an
# async REPL) is run in an event loop.
RUNNER = """
import ast, asyncio, pathlib, sys
path = sys.argv[1]
source = pathlib.Path(path).read_text(encoding="utf-8")
code = compile(source, path, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
result = eval(code, {"__name__": "__main__", "__file__": path})
if asyncio.iscoroutine(result):
    asyncio.run(result)
"""


@dataclass(frozen=True)
class Block:
    line: int
    code: str
    not_run: str | None


def python_blocks(markdown: str) -> list[Block]:
    blocks = []
    for match in FENCE.finditer(markdown):
        before = markdown[: match.start()].rstrip().splitlines()
        marker = NOT_RUN.fullmatch(before[-1].strip()) if before else None
        line = markdown.count("\n", 0, match.start()) + 1
        blocks.append(Block(line, match.group(1), marker.group(1) if marker else None))
    return blocks


README_BLOCKS = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))


def test_the_convention_is_parsed() -> None:
    sample = "x\n\n<!-- not run: needs a key -->\n```python\nprint(1)\n```\n\n```python\n2\n```\n"
    assert python_blocks(sample) == [Block(4, "print(1)\n", "needs a key"), Block(8, "2\n", None)]
    assert len(README_BLOCKS) >= 4
    assert any(block.not_run is None for block in README_BLOCKS)


@pytest.mark.parametrize("block", README_BLOCKS, ids=lambda block: f"README.md:{block.line}")
def test_readme_python_block(block: Block, tmp_path: Path) -> None:
    # Everything compiles, top-level await included.
    compile(block.code, f"README.md:{block.line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if block.not_run is not None:
        return
    script = tmp_path / "example.py"
    script.write_text(block.code, encoding="utf-8")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OPENAI_", "TURNSTORE_"))
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", RUNNER, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"README.md:{block.line}\n{result.stdout}\n{result.stderr}"
    assert result.stderr == "", result.stderr
