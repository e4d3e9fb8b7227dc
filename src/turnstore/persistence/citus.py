"""Citus (distributed Postgres): recognise a coordinator and call its distribution functions.

Postgres-only; :class:`turnstore.persistence.dialects.postgres.PostgresProfile` uses it. What to
distribute, and how, is decided in :mod:`turnstore.schema.distribution`; this module only
knows Citus's catalog and functions. Every query here is scoped to the connection's current
schema (``current_schema()``), the schema turnstore's unqualified table names resolve to.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Connection

EXTENSION = "citus"
#: ``pg_dist_partition.partmethod`` of a table distributed by hash of a column.
HASH = "h"
#: ``pg_dist_partition.partmethod`` of a reference table (a copy on every node).
REFERENCE = "n"


@dataclass(frozen=True)
class CitusNode:
    """The Citus node a connection is on.

    Attributes:
        version: The extension's version in this database.
        is_coordinator: Whether the node is the coordinator (where distributed DDL runs).
    """

    version: str
    is_coordinator: bool


@dataclass(frozen=True)
class DistributedTable:
    """How Citus holds one table of the current schema.

    Attributes:
        method: ``h`` (hash-distributed) or ``n`` (reference table).
        column: The distribution column (``None`` for a reference table).
        colocation_id: The table's co-location group.
    """

    method: str
    column: str | None
    colocation_id: int


def detect(conn: Connection) -> CitusNode | None:
    """The Citus node ``conn`` is on, or ``None`` where the database lacks the extension."""
    version = conn.execute(
        text("SELECT extversion FROM pg_catalog.pg_extension WHERE extname = :name"),
        {"name": EXTENSION},
    ).scalar()
    if version is None:
        return None
    coordinator = conn.exec_driver_sql("SELECT citus_is_coordinator()").scalar()
    return CitusNode(str(version), bool(coordinator))


def allow_schema_changes_in_one_transaction(conn: Connection) -> None:
    """Let DDL on several distributed tables and function DDL share one transaction.

    By default Citus runs multi-shard DDL over parallel connections, after which the same
    transaction may not create or alter a function ("cannot run function command because
    there was a parallel operation on a distributed table"). Sequential mode uses one
    connection per worker for the rest of the transaction.
    """
    conn.exec_driver_sql("SET LOCAL citus.multi_shard_modify_mode = 'sequential'")


def tables(conn: Connection) -> dict[str, DistributedTable]:
    """Tables of the current schema that Citus distributes, by name."""
    rows = conn.exec_driver_sql(
        "SELECT c.relname, p.partmethod::text, "
        "CASE WHEN p.partmethod = 'h' "
        "THEN column_to_column_name(p.logicalrelid, p.partkey) END, p.colocationid "
        "FROM pg_catalog.pg_dist_partition AS p "
        "JOIN pg_catalog.pg_class AS c ON c.oid = p.logicalrelid "
        "WHERE c.relnamespace = current_schema()::regnamespace"
    ).all()
    return {
        str(name): DistributedTable(str(method), column, int(colocation))
        for name, method, column, colocation in rows
    }


def distribute_table(conn: Connection, table: str, column: str, colocate_with: str) -> None:
    """Hash-distribute ``table`` by ``column``, co-located with ``colocate_with``.

    Rows the table holds are copied into its shards; :func:`drop_local_copy` then frees the
    coordinator's copy.

    Args:
        conn: A connection on the coordinator.
        table: The table's name as created (not quoted).
        column: The distribution column.
        colocate_with: A table's name (not quoted), or ``"default"`` for the co-location
            group Citus picks by the column's type.
    """
    # Citus parses both names as SQL identifiers: "MySessions" unquoted would fold to
    # mysessions. The keyword "default" must stay bare (quoted, it names a table).
    colocation = colocate_with if colocate_with == "default" else _quoted(conn, colocate_with)
    conn.execute(
        text(
            "SELECT create_distributed_table("
            "CAST(:table AS regclass), :column, colocate_with => :with)"
        ),
        {"table": _quoted(conn, table), "column": column, "with": colocation},
    )


def make_reference_table(conn: Connection, table: str) -> None:
    """Keep a copy of ``table`` on every node."""
    conn.execute(
        text("SELECT create_reference_table(CAST(:table AS regclass))"),
        {"table": _quoted(conn, table)},
    )


def drop_local_copy(conn: Connection, table: str) -> None:
    """Empty the coordinator's own copy of rows that distributing ``table`` moved to shards."""
    conn.execute(
        text("SELECT truncate_local_data_after_distributing_table(CAST(:table AS regclass))"),
        {"table": _quoted(conn, table)},
    )


def function_exists(conn: Connection, signature: str) -> bool:
    """Whether the function ``name(argument types)`` exists."""
    found = conn.execute(
        text("SELECT to_regprocedure(:signature) IS NOT NULL"), {"signature": signature}
    ).scalar()
    return bool(found)


def is_distributed_function(conn: Connection, signature: str) -> bool:
    """Whether the function ``name(argument types)`` is distributed by an argument."""
    found = conn.execute(
        text(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_object "
            "WHERE classid = 'pg_catalog.pg_proc'::regclass "
            "AND objid = to_regprocedure(:signature) "
            "AND distribution_argument_index IS NOT NULL)"
        ),
        {"signature": signature},
    ).scalar()
    return bool(found)


def distribute_function(
    conn: Connection, signature: str, argument: str, colocate_with: str
) -> None:
    """Distribute a function by one of its arguments, so calls run on that value's worker.

    Called outside a transaction block, the coordinator sends the whole call to the worker
    holding the shard of the argument's value (function call delegation).
    """
    conn.execute(
        text(
            "SELECT create_distributed_function("
            "CAST(:signature AS regprocedure), :argument, colocate_with => :with)"
        ),
        {"signature": signature, "argument": argument, "with": _quoted(conn, colocate_with)},
    )


def pin_search_path(conn: Connection, signature: str) -> None:
    """Resolve a function's unqualified names in the schema it lives in, whoever calls it.

    A call delegated to a worker runs in a connection of Citus's own, with that node's
    default ``search_path``.
    """
    schema = conn.execute(
        text(
            "SELECT quote_ident(n.nspname) FROM pg_catalog.pg_proc AS p "
            "JOIN pg_catalog.pg_namespace AS n ON n.oid = p.pronamespace "
            "WHERE p.oid = to_regprocedure(:signature)"
        ),
        {"signature": signature},
    ).scalar_one()
    procedure = conn.execute(
        text("SELECT to_regprocedure(:signature)::text"), {"signature": signature}
    ).scalar_one()
    conn.exec_driver_sql(f"ALTER FUNCTION {procedure} SET search_path = {schema}")


def _quoted(conn: Connection, name: str) -> str:
    """``name`` as an SQL identifier that resolves to exactly it (``"MySessions"``, ``"order"``)."""
    return conn.dialect.identifier_preparer.quote(name)
