"""What a dialect profile answers, and the answers most dialects share.

:class:`DialectProfile` names each thing SQL dialects disagree on and gives the common
answer; the backends' profiles (:mod:`.sqlite`, :mod:`.postgres`, :mod:`.mysql`) override
what differs. :class:`_OnConflictProfile` is the ``INSERT ... ON CONFLICT`` family
(SQLite and PostgreSQL).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import Column, DateTime, Table, bindparam, case, func, insert, literal, tuple_
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.dml import Insert

from turnstore.persistence import citus, server_routines
from turnstore.persistence.driver_calls import AsyncpgCalls
from turnstore.persistence.server_routines import ServerRoutines

if TYPE_CHECKING:
    from turnstore.persistence.models import StoreTables


#: A value a metadata filter may compare with.
JSONScalar = str | int | float | bool | None


def _containment_fragments(wanted: Mapping[str, JSONScalar]) -> tuple[str, list[str]]:
    """JSON for "document contains these members" and, per key, "contains an array there".

    Containment of a scalar member is equality, except that an array holding the scalar
    contains it too; a document whose member is an array contains ``{key: []}``, which rules
    those out.
    """
    return json.dumps(dict(wanted)), [json.dumps({key: []}) for key in wanted]


@dataclass(frozen=True)
class ThreadedEngine:
    """How to build a synchronous engine whose units of work run on worker threads.

    Attributes:
        url: The synchronous driver's URL.
        engine_options: Keyword arguments for ``create_engine``.
        separate_reader: Whether reads get a thread of their own beside the writer thread.
    """

    url: URL
    engine_options: dict[str, Any] = field(default_factory=dict)
    separate_reader: bool = True


class DialectProfile:
    """How one SQL dialect does the handful of things dialects disagree on.

    Attributes:
        serializes_writers_in_process: Whether writers in one process should queue on an
            asyncio lock before opening a transaction. True where the database allows a single
            writer at a time (SQLite), so that in-process writers wait on a cheap lock instead
            of polling the database's busy handler.
        read_execution_options: Execution options for read-only connections.
        lock_statement_may_read: Whether a write transaction's locking statement may also
            return what it reads. True where :meth:`begin_write` already excludes every other
            writer (SQLite), so nothing read can change before the transaction ends. Not on
            servers: a statement that waited for a row lock still reads with the snapshot it
            took before waiting, and would miss what the lock holder committed.
        session_scoped_keys: Whether the tables take the server key layout, ``session_id`` in
            every key (see :mod:`turnstore.persistence.models`); SQLite keeps the SDK's.
        runs_prepared_statements_directly: Whether the per-turn statements may run as compiled
            SQL on the driver's cursor (see :mod:`turnstore.persistence.prepared`). True where the
            driver
            is in-process and cheap per call, so SQLAlchemy's per-statement work would be most
            of the cost.
    """

    name: ClassVar[str] = "generic"
    runs_prepared_statements_directly: ClassVar[bool] = False
    serializes_writers_in_process: ClassVar[bool] = False
    lock_statement_may_read: ClassVar[bool] = False
    read_execution_options: ClassVar[Mapping[str, Any]] = {}
    max_identifier_length: ClassVar[int | None] = None
    session_scoped_keys: ClassVar[bool] = False
    # The asyncio drivers turnstore supports, first the recommended one, each with the
    # turnstore extra that installs it (None: a core dependency, or no extra ships it).
    async_drivers: ClassVar[Mapping[str, str | None]] = {}

    def insert(self, table: Table) -> Insert:
        """Return the dialect's INSERT construct (with its upsert extensions) for ``table``."""
        raise NotImplementedError

    def driver_hint(self, url: URL) -> str:
        """What to install or write so that ``url``'s driver can be loaded.

        Names the turnstore extra for a supported driver that is not installed, and the
        recommended asyncio driver for a URL naming another (or no) driver.
        """
        driver = url.get_driver_name()
        backend = url.get_backend_name()
        if driver in self.async_drivers:
            extra = self.async_drivers[driver]
            install = f"pip install 'turnstore[{extra}]'" if extra else f"pip install {driver}"
            return f"the {driver} driver is not installed: {install}"
        recommended = next(iter(self.async_drivers), None)
        if recommended is None:
            return f"turnstore has no asyncio driver for {backend}"
        extra = self.async_drivers[recommended]
        install = f" (pip install 'turnstore[{extra}]')" if extra else ""
        return (
            f"turnstore needs an asyncio driver, not {driver}: "
            f"use {backend}+{recommended}://...{install}"
        )

    def upsert(
        self,
        table: Table,
        values: Mapping[str, Any],
        conflict_columns: Sequence[str],
        updates: Mapping[str, Any] | None = None,
        *,
        take_new_values: Sequence[str] = (),
        keep_greater: Sequence[str] = (),
    ) -> Insert:
        """INSERT one row, or UPDATE the row that has the same ``conflict_columns``.

        Args:
            table: Target table.
            values: Column values of the new row.
            conflict_columns: Columns of the unique key that identifies an existing row.
            updates: Column assignments applied to an existing row (SQL expressions allowed).
            take_new_values: Columns of an existing row to overwrite with the new row's values.
            keep_greater: Columns of an existing row to set to the greater of its value and
                the new row's.
        Only the new row's values and the existing row's columns appear in the assignments:
        Citus refuses functions that are not immutable there (``CURRENT_TIMESTAMP`` and the
        like), so any time must come in through ``values``.
        """
        raise NotImplementedError

    def later_of(self, new: ColumnElement[Any], stored: ColumnElement[Any]) -> ColumnElement[Any]:
        """The greater of two values (``GREATEST``), as an expression Citus accepts anywhere.

        Citus refuses functions that are not immutable inside ``CASE``, so "the later time"
        is spelled with the dialect's own greatest-of function.
        """
        return func.greatest(new, stored)

    def insert_if_absent(self, table: Table, conflict_columns: Sequence[str]) -> Insert:
        """INSERT that silently skips rows whose ``conflict_columns`` already exist."""
        raise NotImplementedError

    def private_engine(self, url: URL) -> bool:
        """Whether every session opening ``url`` must get an engine of its own.

        True where the URL names a database that lives inside one connection (SQLite's
        ``:memory:``): sharing the engine would share the database between sessions.
        """
        return False

    def engine_options(self, url: URL) -> dict[str, Any]:
        """Keyword arguments for ``create_async_engine`` when turnstore creates the engine."""
        return {}

    def threaded_engine(self, url: URL) -> ThreadedEngine | None:
        """A synchronous engine to run units of work on threads, instead of asyncio, if any.

        Returned where a synchronous driver on a worker thread is much cheaper than the
        asyncio driver (one thread hop per transaction instead of several per statement).
        """
        return None

    def returning_insert(self, table: Table) -> Insert:
        """The INSERT that :meth:`insert_returning_ids` runs on ``table``; build it once.

        Args:
            table: A table whose primary key has an autoincrement column.
        """
        return insert(table).returning(_row_id_column(table), sort_by_parameter_order=True)

    def insert_returning_ids(
        self,
        conn: Connection,
        stmt: Insert,
        rows: Sequence[Mapping[str, Any]],
        locked_scope: Mapping[str, Any],
        *,
        max_statement_bytes: int | None = None,
    ) -> list[int]:
        """INSERT ``rows`` and return their generated primary keys in the order of ``rows``.

        Args:
            conn: A connection inside the caller's write transaction.
            stmt: The table's :meth:`returning_insert`.
            rows: Column values of the new rows.
            locked_scope: Column values shared by every row, naming a scope the caller's lock
                keeps other writers out of (say, one session). Dialects that cannot return ids
                from the INSERT use it to find the new rows again.
            max_statement_bytes: The server's limit on one statement, where it has one: rows
                are then split over as many statements as it takes.
        """
        return [int(value) for value in conn.execute(stmt, list(rows)).scalars()]

    def prepare_engine(self, engine: Engine) -> None:
        """Install per-connection set-up on an engine (idempotent).

        Args:
            engine: The engine, or an ``AsyncEngine``'s ``sync_engine``.
        """

    def begin_write(self, conn: Connection) -> None:
        """Start a write transaction that cannot interleave with another writer's."""

    def has_bulk_copy(self, conn: Connection) -> bool:
        """Whether :meth:`bulk_copy` works on ``conn``."""
        return False

    def bulk_copy(
        self, conn: Connection, table: Table, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> bool:
        """Load ``rows`` (values in ``columns`` order) by the database's bulk-load path.

        Returns:
            Whether it did; ``False`` where the dialect has no such path (the caller inserts).
        """
        return False

    def allocate_ids(self, conn: Connection, table: Table, count: int) -> list[int] | None:
        """Reserve ``count`` new ids of ``table``'s key in increasing order, where the
        database hands them out ahead of the insert (``None`` elsewhere)."""  # noqa: D205, D209
        return None

    def begin_snapshot(self, conn: Connection) -> None:
        """Make the transaction just begun on ``conn`` read one snapshot throughout, read-only.

        For reads spread over several statements that must agree with one another (a session
        exported batch by batch while writers write).
        """

    def prepare_ddl(self, conn: Connection) -> None:
        """Settings for a schema-creating transaction begun by :meth:`begin_write`."""

    def lock_schema(self, conn: Connection) -> None:
        """Serialize schema changes across processes for the rest of the transaction."""

    def cluster_node(self, conn: Connection) -> citus.CitusNode | None:
        """The distributed-database node ``conn`` is on (Citus), or ``None`` on a plain server."""
        return None

    def server_routines(self, tables: StoreTables) -> tuple[ServerRoutines, ...]:
        """Server-side functions doing an append or a usage write in one call, if any.

        Every released version, newest first: a database may hold older ones only.
        """
        return ()

    def create_server_routines(self, conn: Connection, tables: StoreTables) -> list[str]:
        """Create or replace every version of :meth:`server_routines`; the names created."""
        created = []
        names = {role: self.quoted_name(name) for role, name in tables.routine_tables.items()}
        for routines in self.server_routines(tables):
            for statement in server_routines.routine_ddl(routines, **names):
                conn.exec_driver_sql(statement)
            created += [routines.append_name, routines.usage_name]
        return created

    def driver_calls(self, engine: AsyncEngine) -> AsyncpgCalls | None:
        """A way to run single statements on the driver itself, bypassing SQLAlchemy."""
        return None

    def quoted_name(self, name: str) -> str:
        """``name`` as SQL text written by hand must spell it: quoted where the dialect needs it.

        A name that needs no quotes is returned as it is, so SQL built from the default
        names (the released server functions, whose text is frozen) does not change.
        """
        return name

    def missing_file(self, url: URL) -> Path | None:
        """The database file ``url`` names, if it is a file that does not exist yet.

        Read-only commands check it so that they never create a database by connecting.
        """
        return None

    def unreachable_reason(self, url: URL) -> str | None:
        """Why connecting to ``url`` must fail, when that is knowable without connecting."""
        return None

    def in_memory(self, url: URL) -> bool:
        """Whether ``url`` names a database that lives only as long as its connection.

        Commands that read refuse one: each command would see a new, empty database.
        """
        return False

    # -- time and JSON in store-wide queries (rollups) ---------------------------------------

    def timestamp_column(self, column: ColumnElement[Any]) -> ColumnElement[Any]:
        """A timestamp column as :meth:`timestamp_value` compares with it."""
        return column

    def timestamp_value(self, value: datetime) -> ColumnElement[Any]:
        """A UTC instant to compare with :meth:`timestamp_column` (``value`` is aware)."""
        return literal(value.astimezone(UTC).replace(tzinfo=None), DateTime())

    def shifted(self, stamp: ColumnElement[Any], seconds: ColumnElement[Any]) -> ColumnElement[Any]:
        """A stored UTC timestamp moved by ``seconds`` (an integer expression), as wall time."""
        raise NotImplementedError

    def period_start(self, wall_time: ColumnElement[Any], unit: str) -> ColumnElement[Any]:
        """The first day of the ``day``, ``week`` (from Monday) or ``month`` holding a
        :meth:`shifted` wall time, as ``YYYY-MM-DD`` text."""  # noqa: D205, D209
        raise NotImplementedError

    def json_integer(self, document: ColumnElement[Any], key: str) -> ColumnElement[Any]:
        """The integer at top-level ``key`` of a JSON document column (NULL if absent)."""
        raise NotImplementedError

    def error_code(self, error: BaseException) -> str | None:
        """The driver's code for a database error (SQLSTATE, error number, SQLite's name)."""
        return None

    def is_read_only_error(self, error: BaseException) -> bool:
        """Whether ``error`` (a driver exception) says the database refuses writes."""
        return False

    def is_lock_conflict(self, error: BaseException) -> bool:
        """Whether ``error`` says a write lost a lock wait or a deadlock and was rolled back.

        Such a write left nothing behind and may simply be run again.
        """
        return False

    def sent_size(self, value: str) -> int:
        """How many bytes ``value`` (ASCII text) takes in a statement sent to this server."""
        return len(value)

    def statement_size_limit(self, conn: Connection) -> int | None:
        """The most bytes one statement sent to this server may have (``None``: no limit).

        Asked once per engine (see ``EngineHandle.statement_size_limit``).
        """
        return None

    def table_names_equal(self, left: str, right: str) -> bool:
        """Whether two table names name the same table here."""
        return left == right

    def convert_identifier_collation(self, conn: Connection, *, exact: bool) -> list[str]:
        """Make every identifier column compare exactly (``exact``) or as before (not).

        Only where identifiers have a collation to change (MySQL); elsewhere text compares
        exactly already and nothing is done.

        Returns:
            The ``table.column`` names changed.

        Raises:
            MigrationError: Stored ids differ only in what the old collation ignores, so the
                change would split one id into several (or merge several into one).
        """
        return []

    def in_ids(self, column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
        """``column`` is one of a list of ids bound as the one parameter ``name``.

        One parameter whatever the list's length, so the statement compiles once and runs
        as prepared; bind the list through :meth:`ids_value`. This default expands the list
        into one parameter per id at run time.
        """
        return column.in_(bindparam(name, expanding=True))

    def ids_value(self, ids: Sequence[str]) -> Any:
        """The value of an :meth:`in_ids` parameter."""
        return list(ids)

    def now_micros(self) -> ColumnElement[int]:
        """The database clock's current time, in microseconds since the Unix epoch (UTC)."""
        raise NotImplementedError

    def epoch_micros(self, timestamp: ColumnElement[Any]) -> ColumnElement[int]:
        """A stored ``TIMESTAMP_UTC`` value in microseconds since the Unix epoch."""
        raise NotImplementedError

    def keyset_before(
        self, columns: Sequence[ColumnElement[Any]], values: Sequence[Any]
    ) -> ColumnElement[bool]:
        """``columns`` sort strictly before ``values`` (a keyset position), as an index range.

        ``values`` may be plain values or SQL expressions (bind parameters, say).

        A row-value comparison, which SQLite and Postgres turn into one range of an index on
        ``columns``.
        """
        return tuple_(*columns) < tuple_(*_bound(columns, values))

    def metadata_matches(
        self, document: ColumnElement[Any], wanted: Mapping[str, JSONScalar]
    ) -> ColumnElement[bool]:
        """Each top-level key of ``wanted`` holds the equal JSON scalar in ``document``.

        Equality is JSON's on every database: strings compare exactly (case and accents
        count), numbers by value (``1`` equals ``1.0``), ``true`` is not ``1``, and ``None``
        matches a stored ``null`` only, not a missing key.
        """
        raise NotImplementedError


class _OnConflictProfile(DialectProfile):
    """Dialects that spell upserts ``INSERT ... ON CONFLICT`` (SQLite and PostgreSQL).

    On PostgreSQL the DO UPDATE branch takes the existing row's lock, which is what makes the
    session upsert serialize writers of one session.
    """

    def insert(self, table: Table) -> sqlite_dialect.Insert | postgresql.Insert:
        """Return the dialect's INSERT construct, which has the ON CONFLICT clauses."""
        raise NotImplementedError

    def upsert(
        self,
        table: Table,
        values: Mapping[str, Any],
        conflict_columns: Sequence[str],
        updates: Mapping[str, Any] | None = None,
        *,
        take_new_values: Sequence[str] = (),
        keep_greater: Sequence[str] = (),
    ) -> Insert:
        """INSERT ... ON CONFLICT DO UPDATE."""
        stmt = self.insert(table).values(**values)
        assignments = dict(updates or {})
        assignments.update({column: stmt.excluded[column] for column in take_new_values})
        assignments.update({c: _greater(stmt.excluded[c], table.c[c]) for c in keep_greater})
        return stmt.on_conflict_do_update(index_elements=list(conflict_columns), set_=assignments)

    def insert_if_absent(self, table: Table, conflict_columns: Sequence[str]) -> Insert:
        """INSERT ... ON CONFLICT DO NOTHING."""
        return self.insert(table).on_conflict_do_nothing(index_elements=list(conflict_columns))


def _bound(columns: Sequence[ColumnElement[Any]], values: Sequence[Any]) -> list[Any]:
    """Values as SQL: expressions (bind parameters) as they are, plain values bound."""
    return [
        value if isinstance(value, ColumnElement) else literal(value, column.type)
        for column, value in zip(columns, values, strict=True)
    ]


def _greater(new: ColumnElement[Any], stored: ColumnElement[Any]) -> ColumnElement[Any]:
    return case((new > stored, new), else_=stored)


def _row_id_column(table: Table) -> Column[Any]:
    """The autoincrement column of ``table``'s primary key (alone or beside ``session_id``)."""
    column = table.autoincrement_column
    if column is None:
        raise ValueError(
            f"{table.name} needs an autoincrement column in its primary key to return new ids; "
            f"its primary key is {[column.name for column in table.primary_key.columns]}"
        )
    return column


def utc_now() -> ColumnElement[Any]:
    """SQL for the current time, as stored in turnstore's timestamp columns."""
    return func.current_timestamp()
