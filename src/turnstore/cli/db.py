"""The ``turnstore db`` commands: schema migrations as a deployment step.

Exit codes: 0 success; 1 a migration failed; 2 bad usage or URL; 3 database unreachable;
4 unknown revision; 5 database refused by ``adopt``. Failures print one line to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable

from turnstore.errors import (
    DatabaseUnavailableError,
    ForeignDatabaseError,
    InvalidArgumentError,
    MigrationError,
    TurnstoreError,
    UnknownRevisionError,
)
from turnstore.schema import migrate

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_UNKNOWN_REVISION = 4
EXIT_REFUSED = 5

# Most specific first: the first matching class decides the exit code.
_EXIT_CODES: tuple[tuple[type[TurnstoreError], int], ...] = (
    (InvalidArgumentError, EXIT_USAGE),
    (DatabaseUnavailableError, EXIT_UNAVAILABLE),
    (UnknownRevisionError, EXIT_UNKNOWN_REVISION),
    (ForeignDatabaseError, EXIT_REFUSED),
    (MigrationError, EXIT_FAILED),
)


def add_db_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``db`` and its subcommands on the top-level parser's subcommands."""
    db = commands.add_parser("db", help="migrate the database schema (deployment step)")
    actions = db.add_subparsers(dest="db_command", required=True)

    def with_url(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help_text)
        parser.add_argument(
            "--url",
            default=os.environ.get(migrate.URL_VARIABLE),
            help=f"SQLAlchemy async URL (default: ${migrate.URL_VARIABLE})",
        )
        return parser

    upgrade = with_url("upgrade", "upgrade to a revision (default: head)")
    upgrade.add_argument("--revision", default="head")
    upgrade.add_argument(
        "--sql", action="store_true", help="print the DDL instead of running it (no connection)"
    )
    upgrade.add_argument(
        "--from", dest="from_revision", help="with --sql: the revision the database is at"
    )
    downgrade = with_url("downgrade", "downgrade to a revision (base drops every table)")
    downgrade.add_argument("--revision", required=True)
    with_url("current", "print the database's revision")
    stamp = with_url("stamp", "record a revision without running migrations")
    stamp.add_argument("--revision", default="head")
    with_url("adopt", "bring an Agents SDK AdvancedSQLiteSession database onto turnstore")
    actions.add_parser("history", help="list the migrations, oldest first")


def run_db(args: argparse.Namespace) -> int:
    """Run a parsed ``db`` command; returns the exit code."""
    try:
        _dispatch(args)
    except TurnstoreError as exc:
        print(f"turnstore db {args.db_command}: error: {_one_line(exc)}", file=sys.stderr)
        return next(code for kind, code in _EXIT_CODES if isinstance(exc, kind))
    return 0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _dispatch(args: argparse.Namespace) -> None:
    command: str = args.db_command
    if command == "history":
        for info in migrate.history():
            marker = " (head)" if info.is_head else ""
            origin = info.down_revision or "<base>"
            print(f"{origin} -> {info.revision}{marker}: {info.description}")
        return
    url: str | None = args.url
    if not url:
        raise InvalidArgumentError(f"No database URL: pass --url or set {migrate.URL_VARIABLE}")
    if command == "upgrade" and args.sql:
        sys.stdout.write(migrate.upgrade_sql(url, args.revision, from_revision=args.from_revision))
        return
    if args.from_revision if command == "upgrade" else False:
        raise InvalidArgumentError("--from only applies together with --sql")
    handlers: dict[str, Callable[[], None]] = {
        "upgrade": lambda: asyncio.run(migrate.upgrade(url, args.revision)),
        "downgrade": lambda: asyncio.run(migrate.downgrade(url, args.revision)),
        "stamp": lambda: asyncio.run(migrate.stamp(url, args.revision)),
        "current": lambda: _print_current(url),
        "adopt": lambda: _adopt(url),
    }
    handlers[command]()


def _print_current(url: str) -> None:
    revisions = asyncio.run(migrate.current(url))
    if not revisions:
        print("<none>")
    head = migrate.head()
    for revision in revisions:
        print(f"{revision} (head)" if revision == head else revision)


def _adopt(url: str) -> None:
    found = asyncio.run(migrate.adopt(url))
    print(f"adopted a {found.kind.value} database; now at {migrate.head()}")
