"""The cheap schema check a fresh process runs before its first operation.

``create_tables=True`` must cost a short-lived process (a CLI, a serverless handler, a test)
next to nothing on a database that is already up to date. So before taking the schema lock
and asking Alembic, a session reads the one row of turnstore's version table and compares it
with the newest revision, found by reading the migration scripts' ``revision`` and
``down_revision`` lines (without importing Alembic, which costs a few hundred milliseconds,
and without parsing the scripts, which costs tens).
Only a database that is not at head goes on to :func:`turnstore.schema.migrate.bring_to_head`.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import column, select, table
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import Select

from turnstore.errors import MigrationError

# Not Alembic's default name, so an application's own migrations can share the database.
VERSION_TABLE = "turnstore_alembic_version"

_VERSION_QUERY: Select[tuple[Any]] = select(column("version_num")).select_from(table(VERSION_TABLE))


def script_location() -> Path:
    """The folder holding ``env.py`` and ``versions/``: the installed copy, else the checkout's.

    Raises:
        MigrationError: Neither copy exists (a broken installation).
    """
    # The package's own folder, found from this file: ``importlib.resources`` would answer
    # the same for an installed package, and cost a fresh process's first call a few imports.
    here = Path(__file__).resolve()
    candidates = [here.parents[1] / "migrations", here.parents[3] / "migrations"]
    for candidate in candidates:
        if (candidate / "env.py").is_file():
            return candidate
    raise MigrationError(
        "turnstore's migration scripts are missing (looked in "
        f"{', '.join(str(c) for c in candidates)}); reinstall the turnstore package"
    )


# A top-level assignment on one line, as Alembic writes them:
# ``down_revision: str | None = "0001"``.
_ASSIGNMENT = re.compile(
    r"^(?P<name>revision|down_revision)\s*(?::[^=\n]*)?=\s*(?P<value>[^\n]*)$", re.MULTILINE
)


def _header(source: str) -> dict[str, object]:
    """The first ``revision`` and ``down_revision`` assignments of a script, as values.

    Raises:
        ValueError: An assigned value is not a literal on one line (``ast.literal_eval``).
        SyntaxError: The same.
    """
    found: dict[str, object] = {}
    for match in _ASSIGNMENT.finditer(source):
        name = match["name"]
        if name not in found:
            found[name] = ast.literal_eval(match["value"].strip())
    return found


@cache
def head_revision() -> str | None:
    """The newest revision, from the scripts' source; ``None`` if that is not one revision.

    ``None`` (several heads, or a script this reading does not understand) sends callers to
    Alembic, which answers exactly.
    """
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in sorted((script_location() / "versions").glob("*.py")):
        try:
            header = _header(path.read_text(encoding="utf-8"))
            revision, down = header.get("revision"), header.get("down_revision")
        except (SyntaxError, ValueError, OSError):
            return None
        if not isinstance(revision, str):
            continue
        revisions.add(revision)
        if isinstance(down, str):
            parents.add(down)
        elif isinstance(down, tuple | list):
            parents.update(str(parent) for parent in down)
    heads = revisions - parents
    return next(iter(heads)) if len(heads) == 1 else None


def at_head(connection: Connection) -> bool:
    """Whether the database records exactly the newest revision (one cheap query).

    A database without the version table (never migrated) is simply not at head.
    """
    head = head_revision()
    if head is None:
        return False
    try:
        recorded = connection.execute(_VERSION_QUERY).scalars().all()
    except DBAPIError:
        return False
    return list(recorded) == [head]
