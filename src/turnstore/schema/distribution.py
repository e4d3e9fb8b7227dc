"""Distribute a store on a Citus coordinator: every table by ``session_id``, co-located.

A conversation store shards by session: every turnstore table has ``session_id`` in each of
its keys (on servers; see :mod:`turnstore.persistence.models`), so each table is
hash-distributed by it and co-located with the sessions table, and every per-session
statement, join and foreign key stays on one shard. The tables to distribute are read from the
table set's metadata, so tables added later are covered without naming them here. The migration
bookkeeping becomes a reference table (a copy on every node), and the server functions are
distributed by their session argument, so that a call outside a transaction block runs whole
on the worker holding the session (one round trip, coordinator to worker).

Everything here is idempotent: what is already distributed is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Table, exists, inspect, select, text
from sqlalchemy.engine import Connection

from turnstore.errors import DistributionError
from turnstore.persistence import citus, server_routines
from turnstore.persistence.dialects import profile_for
from turnstore.persistence.models import StoreTables

#: The column every table is distributed by.
DISTRIBUTION_COLUMN = "session_id"


@dataclass(frozen=True)
class DistributionReport:
    """What :func:`distribute_store` did.

    Attributes:
        node: The coordinator's Citus version and role.
        tables: Tables distributed now (already distributed ones are not listed).
        reference_tables: Tables made reference tables now.
        functions: Functions distributed now, as ``name(argument types)``.
        moved_data: Tables whose existing rows were moved into shards.
    """

    node: citus.CitusNode
    tables: tuple[str, ...] = ()
    reference_tables: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    moved_data: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        """Whether anything was distributed."""
        return bool(self.tables or self.reference_tables or self.functions)


def citus_node(connection: Connection) -> citus.CitusNode | None:
    """The Citus node of ``connection``, or ``None`` on a server without the extension."""
    return profile_for(connection.dialect.name).cluster_node(connection)


def require_coordinator(connection: Connection) -> citus.CitusNode:
    """The coordinator ``connection`` is on.

    Raises:
        DistributionError: The database lacks the Citus extension, or this is a worker.
    """
    node = citus_node(connection)
    if node is None:
        raise DistributionError(
            "This database does not have the Citus extension, so its tables cannot be "
            "distributed. Run CREATE EXTENSION citus in it on a Citus coordinator (with "
            "workers added by citus_add_node), or use turnstore db upgrade without --citus "
            "on a single server."
        )
    _check_coordinator(node)
    return node


def _check_coordinator(node: citus.CitusNode) -> None:
    if not node.is_coordinator:
        raise DistributionError(
            "This is a Citus worker node; schema changes and distribution run on the "
            "coordinator. Point --url at the coordinator."
        )


def distribute_store(
    connection: Connection,
    tables: StoreTables,
    *,
    version_table: str | None = None,
    move_data: bool = False,
) -> DistributionReport | None:
    """On a Citus coordinator, distribute whatever of the store is not distributed yet.

    Runs inside the caller's transaction, which must have taken the schema lock (the
    Postgres profile's lock also switches Citus to sequential DDL, which lets table and
    function distribution share the transaction).

    Args:
        connection: A connection in the caller's transaction.
        tables: The table set; every table of its metadata is distributed.
        version_table: The migration bookkeeping table, made a reference table if present.
        move_data: Whether tables that hold rows may be distributed (their rows are copied
            into shards, then removed from the coordinator). Without it such tables are
            refused, so that moving a database's data is always an explicit step.

    Returns:
        What was done, or ``None`` where the database has no Citus extension.

    Raises:
        DistributionError: A worker node; a table distributed some other way; or tables
            holding rows without ``move_data``.
    """
    node = citus_node(connection)
    if node is None:
        return None
    _check_coordinator(node)
    present = set(inspect(connection).get_table_names())
    current = citus.tables(connection)
    order = [tables.sessions] + [
        t for t in tables.metadata.sorted_tables if t is not tables.sessions
    ]
    pending = [t for t in order if t.name in present and t.name not in current]
    for table in order:
        _check_distributed_by_session(table, current)
    held = [t.name for t in pending if _holds_rows(connection, t)]
    reference = (
        [version_table]
        if version_table is not None and version_table in present and version_table not in current
        else []
    )
    if held and not move_data:
        raise DistributionError(
            f"This Citus coordinator holds undistributed turnstore tables with rows "
            f"({', '.join(held)}). Run turnstore db distribute to move them into shards "
            "(it copies every row; see the README's 'Scaling out')."
        )
    colocate_with = tables.sessions.name if tables.sessions.name in current else "default"
    for table in pending:
        citus.distribute_table(connection, table.name, DISTRIBUTION_COLUMN, colocate_with)
        colocate_with = tables.sessions.name
    for name in reference:
        citus.make_reference_table(connection, name)
    moved = [*held, *(name for name in reference if _table_holds_rows(connection, name))]
    for name in moved:
        citus.drop_local_copy(connection, name)
    functions = _distribute_functions(connection, tables)
    return DistributionReport(
        node=node,
        tables=tuple(t.name for t in pending),
        reference_tables=tuple(reference),
        functions=functions,
        moved_data=tuple(moved),
    )


def _check_distributed_by_session(table: Table, current: dict[str, citus.DistributedTable]) -> None:
    if DISTRIBUTION_COLUMN not in table.c:
        raise DistributionError(
            f"Table {table.name} has no {DISTRIBUTION_COLUMN} column, so it cannot be "
            "distributed with the rest of the store"
        )
    found = current.get(table.name)
    if found is not None and (found.method != citus.HASH or found.column != DISTRIBUTION_COLUMN):
        how = "a reference table" if found.method == citus.REFERENCE else f"by {found.column}"
        raise DistributionError(
            f"Table {table.name} is distributed as {how}; turnstore needs it distributed by "
            f"{DISTRIBUTION_COLUMN}. Undistribute it (SELECT undistribute_table(...)) and run "
            "this again."
        )


def _holds_rows(connection: Connection, table: Table) -> bool:
    return bool(connection.execute(select(exists().select_from(table))).scalar())


def _table_holds_rows(connection: Connection, name: str) -> bool:
    quoted = connection.dialect.identifier_preparer.quote(name)
    return bool(connection.execute(text(f"SELECT EXISTS (SELECT 1 FROM {quoted})")).scalar())


def _distribute_functions(connection: Connection, tables: StoreTables) -> tuple[str, ...]:
    """Distribute the server functions that run on Citus by their session argument; drop the rest.

    A delegated call runs in a worker's own connection, whose ``search_path`` is not the
    caller's; the functions name their tables unqualified, so each is pinned to the schema it
    lives in (as are its tables: both are created through the same ``search_path``).
    """
    distributed = []
    for routines in profile_for(connection.dialect.name).server_routines(tables):
        if not routines.distributable:
            # Their upserts call CURRENT_TIMESTAMP, which Citus refuses on distributed
            # tables; Citus 13.2's coordinator even crashes on such a call. Without them,
            # processes of older releases fail cleanly instead ("function does not exist").
            for statement in server_routines.drop_ddl(routines):
                connection.exec_driver_sql(statement)
            continue
        for signature in routines.signatures:
            if not citus.function_exists(connection, signature):
                continue
            if citus.is_distributed_function(connection, signature):
                continue
            citus.pin_search_path(connection, signature)
            citus.distribute_function(
                connection,
                signature,
                server_routines.DISTRIBUTION_ARGUMENT,
                colocate_with=tables.sessions.name,
            )
            distributed.append(signature)
    return tuple(distributed)
