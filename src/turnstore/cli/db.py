"""The ``turnstore db`` commands: schema migrations as a deployment step.

JSON shapes (``--json``), stable: ``upgrade``/``downgrade``/``stamp`` print
``{"before": [rev...], "after": [rev...], "head": rev, "changed": bool}``; ``current`` prints
``{"revisions": [rev...], "head": rev, "at_head": bool}``; ``adopt`` prints
``{"found": "empty"|"sdk"|"turnstore", "other_tables": [...], "after": [rev...],
"head": rev}``; ``distribute`` prints ``{"citus_version": str, "tables": [...],
"reference_tables": [...], "functions": [...], "moved_data": [...], "changed": bool}`` (what was
distributed now); ``history`` prints a list of
``{"revision", "down_revision", "description", "is_head"}``.

Tables of other applications in the same database are left alone by every command (upgrade,
adopt, downgrade); only tables that clash with turnstore's own names and columns stop them.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Annotated, Any, TypeVar

import typer
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from turnstore.cli import common
from turnstore.errors import (
    DatabaseUnavailableError,
    InvalidArgumentError,
    MissingExtraError,
    SchemaMissingError,
    TurnstoreError,
)
from turnstore.persistence.dialects import profile_for
from turnstore.schema import migrate
from turnstore.schema.adoption import DatabaseKind

db = common.new_group(
    name="db",
    help=(
        "Migrate the database schema (a deployment step). "
        "Example: turnstore db upgrade --url postgresql+asyncpg://app@db/app"
    ),
)


def register(app: typer.Typer) -> None:
    """Add the ``db`` command group to ``app``."""
    app.add_typer(db)


def _revisions(revisions: Sequence[str]) -> str:
    head = migrate.head()
    if not revisions:
        return "<none>"
    return ", ".join(f"{rev} (head)" if rev == head else rev for rev in revisions)


def _move_data(move: migrate.Move) -> dict[str, object]:
    return {
        "before": list(move.before),
        "after": list(move.after),
        "head": migrate.head(),
        "changed": move.changed,
    }


_hidden = common.hidden_url


T = TypeVar("T")


def run_on_database(url: str, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a command's database work, its failures retold as the command line's errors.

    A database without turnstore's schema names the command that fixes it
    (:func:`schema_refusal`), a missing driver the extra to install, and an unreachable
    server or file exit code 3 (``DatabaseUnavailableError``).
    """
    try:
        return asyncio.run(main())
    except SchemaMissingError as exc:
        refusal = schema_refusal(exc, url)
        if refusal is exc:
            raise
        raise refusal from exc
    except ImportError as exc:
        if isinstance(exc, TurnstoreError):
            raise
        raise MissingExtraError(
            f"The driver for this URL is not installed ({exc.name}): install turnstore's "
            "extra for the database, e.g. pip install 'turnstore[postgres]'"
        ) from exc
    except (OSError, DBAPIError, TimeoutError) as exc:
        raise DatabaseUnavailableError(
            f"Cannot reach the database: {common.one_line(exc)}; check the URL and that the "
            "database is running and reachable"
        ) from exc


def schema_refusal(exc: SchemaMissingError, url: str) -> SchemaMissingError:
    """``exc`` (a command's database lacks turnstore's schema) retold with the exact fix.

    The session layer's message speaks to Python code (``create_tables=True``); a person at
    the command line needs the command to run, with the URL they gave: ``turnstore db adopt``
    for a file of the SDK's class, ``turnstore db upgrade`` otherwise. An error that already
    names its fix is returned as it is.
    """
    if exc.fix:
        return exc
    where = _hidden(url)
    try:
        found, recorded = asyncio.run(migrate.inspect_target(url))
    except Exception:  # the refusal stands without the detail
        found, recorded = None, ()
    if found is not None and found.kind is DatabaseKind.SDK:
        message = f"{where} is a database of the Agents SDK's class that turnstore has not adopted"
        fix = common.db_fix("adopt", url)
    elif migrate.head() in recorded:
        return exc  # at head yet incomplete (tables dropped by hand): no command fixes that
    elif recorded:
        message = (
            f"{where} is at revision {', '.join(recorded)}, behind this turnstore's "
            f"{migrate.head()}, and lacks what this command needs"
        )
        fix = common.db_fix("upgrade", url)
    else:
        message = f"{where} has no turnstore schema (it was never upgraded)"
        fix = common.db_fix("upgrade", url)
    return SchemaMissingError(message, fix=fix)


def _require_existing_sqlite_file(url: str) -> None:
    """Read-only commands never create files: a SQLite file that does not exist is an error.

    SQLite creates a missing file on connect; a typo in a path must not leave an empty
    database behind.
    """
    try:
        parsed = make_url(url)
        profile = profile_for(parsed.get_backend_name())
    except Exception:
        return  # the command reports the malformed or unsupported URL itself
    if profile.in_memory(parsed):
        # Each command is a new process with a new, empty in-memory database: what was
        # "no turnstore schema; run `turnstore db upgrade --url sqlite+aiosqlite://`" could
        # never be fixed that way.
        raise InvalidArgumentError(
            "An in-memory SQLite database starts empty in every command and is gone after it; "
            "give a file, e.g. --url sqlite+aiosqlite:///conversations.db"
        )
    missing = profile.missing_file(parsed)
    if missing is not None:
        raise DatabaseUnavailableError(
            f"Cannot open {_hidden(url)}: the file {missing} does not exist "
            "(read-only commands never create it)",
            fix=common.db_fix("upgrade", url),
        )


RevisionOption = Annotated[
    str,
    typer.Option(
        "--revision",
        "-r",
        help="Target revision id, or head (the newest). Example: --revision 0003",
    ),
]


@db.command()
def upgrade(
    url: common.UrlOption = None,
    revision: RevisionOption = "head",
    sql: Annotated[
        bool,
        typer.Option(
            "--sql",
            help=(
                "Print the DDL instead of running it; nothing connects, only the URL's dialect "
                "matters. Example: --sql --url postgresql+asyncpg://x@y/z > upgrade.sql"
            ),
        ),
    ] = False,
    from_revision: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="With --sql: the revision the database is already at. Example: --from 0002",
        ),
    ] = None,
    citus: Annotated[
        bool,
        typer.Option(
            "--citus",
            help=(
                "Refuse unless the database is a Citus coordinator (on one, the tables are "
                "distributed with or without this). Example: --citus"
            ),
        ),
    ] = False,
    as_json: common.JsonOption = False,
) -> None:
    """Upgrade the database to a revision (default: head); safe to run concurrently.

    A database with the Agents SDK's tables but no turnstore version is refused: adopt it
    first (turnstore db adopt). Other applications' tables are left alone. On a Citus
    coordinator the tables are created distributed by session_id.
    """
    target = common.resolve_url(url)
    if sql:
        sys.stdout.write(migrate.upgrade_sql(target, revision, from_revision=from_revision))
        return
    if from_revision is not None:
        raise InvalidArgumentError("--from only applies together with --sql")
    move = asyncio.run(migrate.upgrade(target, revision, require_citus=citus))
    text = (
        f"upgraded {_hidden(target)} from {_revisions(move.before)} to {_revisions(move.after)}"
        if move.changed
        else f"{_hidden(target)} is already at {_revisions(move.after)}; nothing to do"
    )
    common.emit(_move_data(move), text, as_json=as_json)


@db.command()
def downgrade(
    revision: Annotated[
        str,
        typer.Option(
            "--revision",
            "-r",
            help=(
                "Target revision id, or base (drops every turnstore table and its data). "
                "Example: --revision 0003"
            ),
        ),
    ],
    url: common.UrlOption = None,
    yes: common.YesOption = False,
    as_json: common.JsonOption = False,
) -> None:
    """Downgrade the database to a revision; asks first when that drops tables or columns."""
    target = common.resolve_url(url)
    _require_existing_sqlite_file(target)
    recorded = asyncio.run(migrate.current(target))
    dropping = migrate.data_dropping_steps(recorded, revision)
    if dropping:
        steps = "migration " + ", ".join(step.revision for step in dropping)
        common.confirm(
            f"Downgrading {_hidden(target)} to {revision} undoes {steps}, dropping tables or "
            "columns with their data. Go ahead?",
            yes=yes,
            refusal=(
                f"downgrading to {revision} undoes {steps}, which drops tables or columns "
                "with their data"
            ),
        )
    move = asyncio.run(migrate.downgrade(target, revision))
    text = (
        f"downgraded {_hidden(target)} from {_revisions(move.before)} to {_revisions(move.after)}"
        if move.changed
        else f"{_hidden(target)} is already at {_revisions(move.after)}; nothing to do"
    )
    common.emit(_move_data(move), text, as_json=as_json)


@db.command()
def current(url: common.UrlOption = None, as_json: common.JsonOption = False) -> None:
    """Print the database's revision (<none> if never migrated); changes nothing."""
    target = common.resolve_url(url)
    _require_existing_sqlite_file(target)
    revisions = asyncio.run(migrate.current(target))
    head = migrate.head()
    data = {"revisions": list(revisions), "head": head, "at_head": revisions == (head,)}
    common.emit(data, lambda: common.line(_revisions(revisions)), as_json=as_json)


@db.command()
def stamp(
    url: common.UrlOption = None,
    revision: RevisionOption = "head",
    as_json: common.JsonOption = False,
) -> None:
    """Record a revision without running any migration (for schemas applied by hand)."""
    target = common.resolve_url(url)
    _require_existing_sqlite_file(target)
    before = asyncio.run(migrate.current(target))
    asyncio.run(migrate.stamp(target, revision))
    after = asyncio.run(migrate.current(target))
    move = migrate.Move(before=before, after=after)
    common.emit(
        _move_data(move), f"stamped {_hidden(target)} at {_revisions(after)}", as_json=as_json
    )


@db.command()
def distribute(url: common.UrlOption = None, as_json: common.JsonOption = False) -> None:
    """Distribute a database on a Citus coordinator by session_id, in place; idempotent.

    Upgrades the schema to head, then hash-distributes every turnstore table by session_id
    (co-located), copying the rows already stored into shards, makes the version table a
    reference table and distributes the server functions, in one transaction. Tables are
    locked while their rows are copied. Refused on a server without the citus extension.
    """
    target = common.resolve_url(url)
    report = asyncio.run(migrate.distribute(target))
    data = {
        "citus_version": report.node.version,
        "tables": list(report.tables),
        "reference_tables": list(report.reference_tables),
        "functions": list(report.functions),
        "moved_data": list(report.moved_data),
        "changed": report.changed,
    }
    if report.changed:
        moved = f", moving the rows of {len(report.moved_data)}" if report.moved_data else ""
        text = (
            f"distributed {_hidden(target)} (Citus {report.node.version}): "
            f"{len(report.tables)} table(s) by session_id{moved}, "
            f"{len(report.reference_tables)} reference table(s), "
            f"{len(report.functions)} function(s)"
        )
    else:
        text = f"{_hidden(target)} is already distributed; nothing to do"
    common.emit(data, text, as_json=as_json)


_FOUND = {
    "empty": "an empty database",
    "sdk": "an Agents SDK database",
    "turnstore": "a turnstore database",
}


@db.command()
def adopt(url: common.UrlOption = None, as_json: common.JsonOption = False) -> None:
    """Bring an Agents SDK AdvancedSQLiteSession database under turnstore's migrations.

    Only adds (tables, an index, branch reservations, the version record); no row changes.
    Other applications' tables are left alone. Back the file up first.
    """
    target = common.resolve_url(url)
    _require_existing_sqlite_file(target)
    found = asyncio.run(migrate.adopt(target))
    after = asyncio.run(migrate.current(target))
    others = (
        f"; left {len(found.other_tables)} other table(s) alone: " + ", ".join(found.other_tables)
        if found.other_tables
        else ""
    )
    data = {
        "found": found.kind.value,
        "other_tables": list(found.other_tables),
        "after": list(after),
        "head": migrate.head(),
    }
    text = f"adopted {_FOUND[found.kind.value]}; now at {_revisions(after)}{others}"
    common.emit(data, text, as_json=as_json)


@db.command()
def history(as_json: common.JsonOption = False) -> None:
    """List turnstore's migrations, oldest first (needs no database)."""
    infos = migrate.history()
    data = [
        {
            "revision": info.revision,
            "down_revision": info.down_revision,
            "description": info.description,
            "is_head": info.is_head,
        }
        for info in infos
    ]

    def text() -> None:
        for info in infos:
            marker = " (head)" if info.is_head else ""
            origin = info.down_revision or "<base>"
            common.line(f"{origin} -> {info.revision}{marker}: {info.description}")

    common.emit(data, text, as_json=as_json)
