"""Recognise what a database holds, and complete an Agents-SDK database to turnstore's schema.

A database written by the SDK's ``AdvancedSQLiteSession`` already has turnstore's tables (the
models reproduce the SDK's layout); depending on the SDK version it lacks the two bookkeeping
tables, and it always lacks turnstore's ``idx_structure_message_session`` index. Completing it only
adds: no existing table is rebuilt and no row is changed or removed. Every session gets a row
in turnstore's own ``turnstore_session_info`` (its times taken from ``agent_sessions``), so the
store lists the adopted sessions.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from sqlalchemy import exists, func, insert, inspect, select
from sqlalchemy.engine import Connection

from turnstore.persistence.dialects import profile_for
from turnstore.persistence.models import DEFAULT_TABLES, STRUCTURE_TABLE
from turnstore.persistence.store_queries import track_untracked


class DatabaseKind(enum.Enum):
    """What a database holds, as far as adoption is concerned."""

    EMPTY = "empty"
    TURNSTORE = "turnstore"
    SDK = "sdk"
    FOREIGN = "foreign"


@dataclass(frozen=True)
class Inspection:
    """The result of :func:`inspect_database`.

    Attributes:
        kind: The verdict.
        store_tables: turnstore/SDK tables present.
        other_tables: Tables that belong to neither (other applications'; left alone).
        incompatible: Whether a store table lacks columns turnstore needs, or history would
            be invisible to turnstore.
        reason: Why turnstore cannot use the database (empty otherwise).
    """

    kind: DatabaseKind
    store_tables: tuple[str, ...] = ()
    other_tables: tuple[str, ...] = ()
    incompatible: bool = False
    reason: str = ""
    problems: tuple[str, ...] = field(default=(), repr=False)


def inspect_database(connection: Connection, version_table: str) -> Inspection:
    """Classify the database on ``connection`` (in its default schema)."""
    inspector = inspect(connection)
    present = set(inspector.get_table_names())
    wanted = {table.name: table for table in DEFAULT_TABLES.metadata.sorted_tables}
    store = tuple(name for name in wanted if name in present)
    others = tuple(sorted(present - set(wanted) - {version_table}))

    problems: list[str] = []
    for name in store:
        have = {column["name"] for column in inspector.get_columns(name)}
        lacking = sorted(set(wanted[name].columns.keys()) - have)
        if lacking:
            problems.append(f"table {name} lacks column(s) {', '.join(lacking)}")
    messages = DEFAULT_TABLES.messages
    if not problems and messages.name in present and STRUCTURE_TABLE not in present:
        stored = connection.scalar(select(func.count()).select_from(messages))
        if stored:
            # Written by the SDK's plain SQLiteSession: its items have no structure rows, so
            # turnstore (which reads through message_structure) would not see them.
            problems.append(
                f"{messages.name} holds {stored} item(s) without {STRUCTURE_TABLE} rows "
                "(a plain SQLiteSession database, not an AdvancedSQLiteSession one)"
            )

    # Tables of other applications do not change the verdict: turnstore shares a database
    # with them (its version table has a name of its own for that) and never touches them.
    if version_table in present and not problems:
        kind = DatabaseKind.TURNSTORE
    elif problems:
        kind = DatabaseKind.FOREIGN
    elif store:
        kind = DatabaseKind.SDK
    else:
        kind = DatabaseKind.EMPTY
    return Inspection(
        kind=kind,
        store_tables=store,
        other_tables=others,
        incompatible=bool(problems),
        reason="; ".join(problems),
        problems=tuple(problems),
    )


def complete_schema(connection: Connection) -> list[str]:
    """Add the tables, indexes and server functions the database lacks; backfill reservations.

    Returns:
        What was done, one entry per change, for reporting.
    """
    done: list[str] = []
    profile = profile_for(connection.dialect.name)
    # Tables made before migration 0006 (by a turnstore without migrations) still compare
    # ids with a padded collation on MySQL: stamping head must not skip its conversion. First,
    # so that new tables' foreign keys meet columns of their own collation.
    converted = profile.convert_identifier_collation(connection, exact=True)
    if converted:
        done.append(f"made {len(converted)} identifier column(s) exact")
    inspector = inspect(connection)
    present = set(inspector.get_table_names())
    for table in DEFAULT_TABLES.metadata.sorted_tables:
        if table.name not in present:
            table.create(connection)
            done.append(f"created table {table.name}")
            continue
        indexes = {index["name"] for index in inspector.get_indexes(table.name)}
        for index in sorted(table.indexes, key=lambda index: str(index.name)):
            if index.name not in indexes:
                index.create(connection)
                done.append(f"created index {index.name}")
    created = profile.create_server_routines(connection, DEFAULT_TABLES)
    if created:
        done.append(f"created functions {', '.join(created)}")
    backfilled = _reserve_used_branches(connection)
    if backfilled:
        done.append(f"reserved {backfilled} branch name(s) already in use")
    tracked = _track_sessions(connection)
    if tracked:
        done.append(f"recorded the info of {tracked} session(s) for the store's listings")
    return done


def _track_sessions(connection: Connection) -> int:
    """Give every session an info row (as migration 0005 does for the sessions it finds)."""
    profile = profile_for(connection.dialect.name)
    total, after = 0, None
    while True:
        changed, after = track_untracked(connection, DEFAULT_TABLES, profile, after, 10_000)
        total += changed
        if after is None:
            return total


def _reserve_used_branches(connection: Connection) -> int:
    """Reserve every (session, branch) that has structure rows, so names are never reused."""
    structure, reservations = DEFAULT_TABLES.structure, DEFAULT_TABLES.reservations
    unreserved = (
        select(structure.c.session_id, structure.c.branch_id)
        .distinct()
        .where(
            ~exists().where(
                reservations.c.session_id == structure.c.session_id,
                reservations.c.branch_id == structure.c.branch_id,
            )
        )
    )
    result = connection.execute(
        insert(reservations).from_select(["session_id", "branch_id"], unreserved)
    )
    return max(result.rowcount, 0)
