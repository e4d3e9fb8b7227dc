"""Only ``turnstore.dialects`` may decide anything by the database's dialect name.

The scan walks each module's syntax tree and reports three shapes of dialect branching:
comparisons or ``match`` cases against a dialect name (``== "mysql"``, ``in ("sqlite", ...)``),
and reading a dialect name (``.dialect.name``, ``url.get_backend_name()``) for any purpose but
handing it to ``profile_for``, which is how code outside the dialect module asks what differs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "turnstore"
DIALECT_NAMES = frozenset({"sqlite", "postgresql", "postgres", "mysql", "mariadb"})
NAME_READERS = frozenset({"get_backend_name", "get_dialect"})


def _allowed(path: Path) -> bool:
    relative = path.relative_to(PACKAGE)
    # The migrations' env.py configures Alembic per dialect by design.
    return relative == Path("dialects.py") or (
        relative.name == "env.py" and "migrations" in relative.parts
    )


def _names_a_dialect(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and node.value.lower() in DIALECT_NAMES
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return any(_names_a_dialect(element) for element in node.elts)
    return False


def _reads_dialect_name(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute) and node.attr == "name":
        inner = node.value
        return (isinstance(inner, ast.Attribute) and inner.attr == "dialect") or (
            isinstance(inner, ast.Name) and inner.id == "dialect"
        )
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr in NAME_READERS
    return False


def dialect_branches(source: str, filename: str) -> list[str]:
    """Where ``source`` branches on a dialect name, as ``file:line: what`` strings."""
    tree = ast.parse(source, filename)
    handed_to_profile_for: set[int] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "profile_for"
        ):
            handed_to_profile_for.update(id(argument) for argument in node.args)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(
            _names_a_dialect(operand) for operand in (node.left, *node.comparators)
        ):
            found.append(f"{filename}:{node.lineno}: compares with a dialect name")
        elif isinstance(node, ast.MatchValue) and _names_a_dialect(node.value):
            found.append(f"{filename}:{node.lineno}: matches a dialect name")
        elif (
            isinstance(node, ast.Attribute | ast.Call)
            and _reads_dialect_name(node)
            and id(node) not in handed_to_profile_for
        ):
            found.append(f"{filename}:{node.lineno}: reads the dialect name outside profile_for")
    return found


def test_no_module_but_dialects_branches_on_the_dialect_name() -> None:
    modules = sorted(path for path in PACKAGE.rglob("*.py") if not _allowed(path))
    assert any(path.name == "repository.py" for path in modules)
    found = [
        finding
        for path in modules
        for finding in dialect_branches(path.read_text(encoding="utf-8"), str(path))
    ]
    assert found == []


@pytest.mark.parametrize(
    "branch",
    [
        "if conn.dialect.name == 'mysql':\n    pass\n",
        "if self._handle.engine.dialect.name in ('mariadb', 'mysql'):\n    pass\n",
        "if url.get_backend_name() != 'sqlite':\n    pass\n",
        "use_lock = 'postgresql' == name\n",
        "match engine.dialect.name:\n    case 'sqlite':\n        pass\n",
        "is_server = engine.dialect.name\n",
    ],
)
def test_a_branch_added_to_the_repository_is_caught(branch: str) -> None:
    source = (PACKAGE / "repository.py").read_text(encoding="utf-8")
    assert dialect_branches(source, "repository.py") == []
    assert dialect_branches(f"{source}\n\n{branch}", "repository.py") != []


def test_handing_the_name_to_profile_for_is_allowed() -> None:
    source = (
        "profile = profile_for(engine.dialect.name)\nother = profile_for(url.get_backend_name())\n"
    )
    assert dialect_branches(source, "engines.py") == []
