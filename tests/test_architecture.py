"""Only ``turnstore.persistence.dialects`` may decide anything by the database's dialect name.

The scan walks each module's syntax tree and reports three shapes of dialect branching:
comparisons or ``match`` cases against a dialect name (``== "mysql"``, ``in ("sqlite", ...)``),
and reading a dialect name (``.dialect.name``, ``url.get_backend_name()``) for any purpose but
handing it to ``profile_for``, which is how code outside the dialect module asks what differs.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "turnstore"
DIALECT_NAMES = frozenset({"sqlite", "postgresql", "postgres", "mysql", "mariadb"})
NAME_READERS = frozenset({"get_backend_name", "get_dialect"})
# The dialect profiles (a package: the base and one module per backend) and the column types.
DIALECT_PACKAGE = Path("persistence/dialects")
DIALECT_PLACE = frozenset({Path("persistence/types.py")})


def _allowed(path: Path) -> bool:
    relative = path.relative_to(PACKAGE)
    # The migrations' env.py configures Alembic per dialect by design.
    return (
        relative in DIALECT_PLACE
        or relative.parent == DIALECT_PACKAGE
        or (relative.name == "env.py" and "migrations" in relative.parts)
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
    source = (PACKAGE / "persistence" / "repository.py").read_text(encoding="utf-8")
    assert dialect_branches(source, "repository.py") == []
    assert dialect_branches(f"{source}\n\n{branch}", "repository.py") != []


def test_handing_the_name_to_profile_for_is_allowed() -> None:
    source = (
        "profile = profile_for(engine.dialect.name)\nother = profile_for(url.get_backend_name())\n"
    )
    assert dialect_branches(source, "engines.py") == []


# -- imports -----------------------------------------------------------------------------------

# Which parts of the package each part may import at run time. The faces (the conversation,
# the store) sit on the persistence layer and schema management; the CLI is a client of all of
# them; nothing below imports anything above it.
_BASE = frozenset({"errors", "redaction"})
LAYERS: dict[str, frozenset[str]] = {
    "errors": frozenset(),
    "redaction": frozenset(),
    "persistence": _BASE,
    "schema": _BASE | {"persistence"},
    "sdk": _BASE | {"persistence"},
    "faces": _BASE | {"persistence", "schema", "sdk"},
    "cli": _BASE | {"persistence", "schema", "sdk", "faces"},
}


def _part(module: str) -> str:
    inner = module.split(".")[1] if "." in module else ""
    if inner in LAYERS:
        return inner
    return "faces"  # turnstore itself, session, store


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports at run time (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(inner) for inner in ast.walk(node))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("turnstore"):
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("turnstore"))
    return found


def _import_graph() -> dict[str, set[str]]:
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {
        name: {target for target in _runtime_imports(path) if target in paths and target != name}
        for name, path in paths.items()
    }


def test_no_import_circles() -> None:
    graph = _import_graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*trail[trail.index(target) :], target])
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # A package importing its own submodules (``turnstore`` re-exporting names) is not a circle.
    real = [
        cycle
        for cycle in cycles
        if not any(a.startswith(f"{b}.") for a, b in itertools.pairwise(cycle))
    ]
    assert real == []


def test_imports_flow_one_way() -> None:
    wrong = sorted(
        f"{source} imports {target}"
        for source, targets in _import_graph().items()
        for target in targets
        if _part(target) != _part(source) and _part(target) not in LAYERS[_part(source)]
    )
    assert wrong == []
