"""Everything that differs between database dialects, and nothing else.

The repository writes one set of queries; the few places where SQL dialects genuinely disagree
(column types, upsert syntax, how a writer takes its lock, connection set-up) are answered here,
by a :class:`DialectProfile` chosen from the engine's dialect name. No other module branches on
the dialect name.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    Integer,
    Numeric,
    String,
    Table,
    Text,
    and_,
    any_,
    bindparam,
    case,
    cast,
    event,
    extract,
    func,
    insert,
    inspect,
    literal,
    literal_column,
    not_,
    or_,
    select,
    true,
    tuple_,
    type_coerce,
)
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.pool import StaticPool
from sqlalchemy.schema import PrimaryKeyConstraint
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.dml import Insert
from sqlalchemy.util import await_only

from turnstore.errors import MigrationError, SchemaLockTimeoutError
from turnstore.persistence import citus, server_routines
from turnstore.persistence.driver_calls import AsyncpgCalls
from turnstore.persistence.prepared import PreparedStatement
from turnstore.persistence.server_routines import ServerRoutines

if TYPE_CHECKING:
    from turnstore.persistence.models import StoreTables

from turnstore.persistence.types import (
    _MYSQL_CHARSET,
    IDENTIFIER_MAX_LENGTH,
    PADDED_IDENTIFIER_COLLATION,
    exact_identifier_collation,
)

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


class SQLiteProfile(_OnConflictProfile):
    """SQLite: one writer at a time, WAL for concurrent readers, foreign keys switched on."""

    name = "sqlite"
    async_drivers: ClassVar[Mapping[str, str | None]] = {"aiosqlite": None}
    serializes_writers_in_process = True
    lock_statement_may_read = True
    runs_prepared_statements_directly = True
    busy_timeout_seconds: ClassVar[float] = 30.0

    def insert(self, table: Table) -> sqlite_dialect.Insert:
        """Return SQLite's INSERT construct."""
        return sqlite_dialect.insert(table)

    def insert_returning_ids(
        self,
        conn: Connection,
        stmt: Insert,
        rows: Sequence[Mapping[str, Any]],
        locked_scope: Mapping[str, Any],
        *,
        max_statement_bytes: int | None = None,
    ) -> list[int]:
        """One single-row INSERT ... RETURNING per row, straight on the driver.

        In-process, a statement costs microseconds, less than building and matching the
        rows of one multi-row INSERT whose returned ids must be put back in order.
        """
        if not rows:
            return []
        insert_one = _single_row_insert(stmt, tuple(rows[0]))
        return [int(new_id) for new_id in insert_one.scalar_each(conn, rows)]

    def private_engine(self, url: URL) -> bool:
        """Every in-memory database is its own database, as with the SDK's class."""
        return url.database in (None, "", ":memory:")

    def engine_options(self, url: URL) -> dict[str, Any]:
        """One shared connection for in-memory databases; a busy timeout for files."""
        if self.private_engine(url):
            return {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
        return {"connect_args": {"timeout": self.busy_timeout_seconds}}

    def threaded_engine(self, url: URL) -> ThreadedEngine:
        """SQLite's own driver on threads: a transaction costs one hop, not several per statement.

        Connections move between the writer and reader threads (one thread at a time), so the
        driver's same-thread check is off. A database held in one connection (``:memory:``)
        gets no reader thread: reads queue on the writer thread behind writes.
        """
        sync_url = url.set(drivername="sqlite+pysqlite")
        if self.private_engine(url):
            return ThreadedEngine(
                sync_url,
                {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}},
                separate_reader=False,
            )
        options: dict[str, Any] = {
            "connect_args": {"timeout": self.busy_timeout_seconds, "check_same_thread": False},
            # Writer and reader hold one connection each; schema checks may take a third.
            "pool_size": 3,
            "max_overflow": 2,
        }
        database = url.database or ""
        if not database.startswith("file:") and not url.query:
            # A plain path: also readable where its directory is read-only.
            options["creator"] = _sqlite_file_connector(database, self.busy_timeout_seconds)
        return ThreadedEngine(sync_url, options)

    def prepare_engine(self, engine: Engine) -> None:
        """Switch on WAL, foreign keys and a busy timeout on every new connection."""
        if not event.contains(engine, "connect", _configure_sqlite_connection):
            event.listen(engine, "connect", _configure_sqlite_connection)

    def begin_write(self, conn: Connection) -> None:
        """BEGIN IMMEDIATE: take the write lock up front, so no read-then-write upgrade fails."""
        if not getattr(conn.connection.driver_connection, "in_transaction", False):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    def begin_snapshot(self, conn: Connection) -> None:
        """A deferred BEGIN: in WAL mode the first read fixes the snapshot for the rest."""
        if not getattr(conn.connection.driver_connection, "in_transaction", False):
            conn.exec_driver_sql("BEGIN")

    def lock_schema(self, conn: Connection) -> None:
        """The database write lock also serializes DDL."""
        self.begin_write(conn)

    def timestamp_column(self, column: ColumnElement[Any]) -> ColumnElement[Any]:
        """Stored as ``YYYY-MM-DD HH:MM:SS`` text: compared as that text (still indexed)."""
        return type_coerce(column, Text)

    def timestamp_value(self, value: datetime) -> ColumnElement[Any]:
        """The instant as the text ``CURRENT_TIMESTAMP`` stores."""
        stamp = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        return literal(stamp, Text)

    def shifted(self, stamp: ColumnElement[Any], seconds: ColumnElement[Any]) -> ColumnElement[Any]:
        """``datetime(stamp, 'N seconds')``."""
        return func.datetime(
            type_coerce(stamp, Text), func.printf("%d seconds", seconds), type_=Text
        )

    def period_start(self, wall_time: ColumnElement[Any], unit: str) -> ColumnElement[Any]:
        """``date()`` with modifiers: Sunday-ending weeks step back to their Monday."""
        if unit == "day":
            return func.date(wall_time, type_=Text)
        if unit == "week":
            return func.date(wall_time, "weekday 0", "-6 days", type_=Text)
        return func.strftime("%Y-%m-01", wall_time, type_=Text)

    def json_integer(self, document: ColumnElement[Any], key: str) -> ColumnElement[Any]:
        """``json_extract``, only on valid JSON: the SDK's column may hold any text."""
        text_document = type_coerce(document, Text)
        return case(
            (
                func.json_valid(text_document) == 1,
                cast(func.json_extract(text_document, f"$.{key}"), Integer),
            ),
            else_=None,
        )

    def table_names_equal(self, left: str, right: str) -> bool:
        """SQLite folds ASCII letters in identifiers."""
        return left.lower() == right.lower()

    def error_code(self, error: BaseException) -> str | None:
        """SQLite's name for the error (``SQLITE_READONLY``...)."""
        name = getattr(error, "sqlite_errorname", None)
        return str(name) if name else None

    def is_read_only_error(self, error: BaseException) -> bool:
        """SQLITE_READONLY and its extended codes (``mode=ro``, a read-only file)."""
        code = getattr(error, "sqlite_errorcode", None)
        return code is not None and code & 0xFF == sqlite3.SQLITE_READONLY

    def is_lock_conflict(self, error: BaseException) -> bool:
        """SQLITE_BUSY after the busy timeout: another writer held the file's lock."""
        code = getattr(error, "sqlite_errorcode", None)
        return code is not None and code & 0xFF == sqlite3.SQLITE_BUSY

    def missing_file(self, url: URL) -> Path | None:
        """The database file ``url`` names, if it does not exist (connecting would create it)."""
        database = url.database
        if database in (None, "", ":memory:") or database.startswith("file:"):
            return None
        path = Path(database).expanduser()
        return None if path.exists() else path

    def in_memory(self, url: URL) -> bool:
        """``sqlite://``, ``:memory:`` and ``file:...?mode=memory`` databases."""
        database = url.database or ""
        return (
            database in ("", ":memory:")
            or url.query.get("mode") == "memory"
            or (database.startswith("file:") and "mode=memory" in database)
        )

    def unreachable_reason(self, url: URL) -> str | None:
        """A file in a missing directory cannot be created.

        Checked up front because a failed aiosqlite connect leaves its worker thread reporting
        to the event loop after ``asyncio.run`` has closed it, which prints a stray traceback.
        """
        if url.database in (None, "", ":memory:") or url.database.startswith("file:"):
            return None
        directory = Path(url.database).expanduser().resolve().parent
        return None if directory.is_dir() else f"directory {directory} does not exist"

    def later_of(self, new: ColumnElement[Any], stored: ColumnElement[Any]) -> ColumnElement[Any]:
        """SQLite's many-argument ``max()`` is its greatest-of function."""
        return func.max(new, stored)

    def in_ids(self, column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
        """The ids as a JSON array text, unpacked by ``json_each``."""
        members = func.json_each(bindparam(name, type_=String())).table_valued("value")
        return column.in_(select(members.c.value))

    def ids_value(self, ids: Sequence[str]) -> Any:
        """A JSON array of the ids."""
        return json.dumps(list(ids))

    def now_micros(self) -> ColumnElement[int]:
        """Whole seconds and the milliseconds SQLite's clock has, both read from ``'now'``.

        ``'now'`` is one instant throughout a statement, so the two parts agree.
        """
        return self.epoch_micros(literal_column("'now'"))

    def epoch_micros(self, timestamp: ColumnElement[Any]) -> ColumnElement[int]:
        """Seconds from ``strftime('%s')`` plus milliseconds from ``'%f'`` (``SS.SSS``).

        Written as literal SQL: it runs on every write, where binding its constants as
        parameters cost more than evaluating them.
        """
        seconds = cast(func.strftime(literal_column("'%s'"), timestamp), Integer)
        millis = cast(
            func.substr(func.strftime(literal_column("'%f'"), timestamp), literal_column("4")),
            Integer,
        )
        return cast(
            seconds * literal_column("1000000") + millis * literal_column("1000"), BigInteger
        )

    def metadata_matches(
        self, document: ColumnElement[Any], wanted: Mapping[str, JSONScalar]
    ) -> ColumnElement[bool]:
        """One ``json_each`` lookup per key, comparing the member's JSON type and value."""
        conditions = []
        for key, value in wanted.items():
            members = func.json_each(document).table_valued("key", "value", "type")
            kind = members.c.type
            if value is None:
                same = kind == "null"
            elif isinstance(value, bool):
                same = kind == ("true" if value else "false")
            elif isinstance(value, str):
                same = and_(kind == "text", members.c.value == literal(value, String()))
            else:
                same = and_(kind.in_(("integer", "real")), members.c.value == literal(value))
            conditions.append(
                select(literal_column("1"))
                .select_from(members)
                .where(members.c.key == literal(key, String()), same)
                .exists()
            )
        return and_(true(), *conditions)


@cache
def _single_row_insert(stmt: Insert, column_keys: tuple[str, ...]) -> PreparedStatement:
    return PreparedStatement(stmt, direct=True, column_keys=column_keys)


def _configure_sqlite_connection(dbapi_connection: Any, _connection_record: Any) -> None:
    """Per-connection SQLite settings; runs synchronously inside the driver's connect."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLiteProfile.busy_timeout_seconds * 1000)}")
        # NORMAL is durable in WAL mode against process crashes; only an OS crash or power
        # loss can drop the last commits, and never corrupts the file.
        cursor.execute("PRAGMA synchronous=NORMAL")
        _enable_wal(cursor)
    finally:
        cursor.close()


def _enable_wal(cursor: Any) -> None:
    """Switch to WAL, retrying while another process holds the lock this briefly needs."""
    deadline = time.monotonic() + SQLiteProfile.busy_timeout_seconds
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as exc:
            if (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == sqlite3.SQLITE_READONLY:
                return  # a read-only database keeps its journal mode; reads work in any
            if "locked" not in str(exc).lower() or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)
        else:
            return


def _sqlite_file_connector(path: str, timeout: float) -> Any:
    """Connect to a database file, read-only if its directory lets nothing else happen.

    A WAL database is read through its ``-shm`` file, which SQLite creates next to the
    database; in a read-only directory it cannot, and the connection cannot even read. If
    no ``-wal`` file holds commits beyond the database file either (a writer closes both
    cleanly), the file is opened ``immutable``: read-only, and without the shared memory.
    """

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=timeout, check_same_thread=False)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError as exc:
            conn.close()
            code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
            wal = Path(path + "-wal")
            if (
                code != sqlite3.SQLITE_CANTOPEN
                or not Path(path).is_file()
                or (wal.exists() and wal.stat().st_size > 0)
            ):
                raise
            uri = f"{Path(path).as_uri()}?mode=ro&immutable=1"
            return sqlite3.connect(uri, uri=True, timeout=timeout, check_same_thread=False)
        return conn

    return connect


class PostgresProfile(_OnConflictProfile):
    """PostgreSQL: row locks serialize writers of one session; readers never block."""

    name = "postgresql"
    session_scoped_keys = True
    async_drivers: ClassVar[Mapping[str, str | None]] = {"asyncpg": "postgres"}
    read_execution_options: ClassVar[Mapping[str, Any]] = {"isolation_level": "AUTOCOMMIT"}
    # Any fixed 64-bit key; shared by every turnstore process touching the schema.
    schema_lock_key: ClassVar[int] = 0x7475726E73746F72  # "turnstor"

    def insert(self, table: Table) -> postgresql.Insert:
        """Return PostgreSQL's INSERT construct."""
        return postgresql.insert(table)

    def engine_options(self, url: URL) -> dict[str, Any]:
        """A pool sized for many concurrent conversations on a small server."""
        return {"pool_size": 10, "max_overflow": 20}

    def prepare_engine(self, engine: Engine) -> None:
        """Replace pooled connections the server has closed before handing them out.

        A server restart, ``pg_terminate_backend`` or an idle timeout closes connections
        that sit in the pool; the driver notices the close by itself, so checking costs no
        round trip, unlike ``pool_pre_ping`` (three round trips per checkout on asyncpg).
        """
        if not event.contains(engine, "checkout", _replace_closed_connection):
            event.listen(engine, "checkout", _replace_closed_connection)

    def begin_write(self, conn: Connection) -> None:
        """Keep the planner on index order for the rest of the write transaction.

        The per-turn counters are "the newest entry" of an index. Without statistics (a new
        table, or autovacuum not run yet) the planner expects one row per session and branch
        and may instead sort every row of the branch read through a smaller index, so that
        each append costs more as the history grows. A statement that needs a sort still
        gets one; sorting only becomes the last resort. (The server functions switch sorting
        off the same way.)
        """
        conn.exec_driver_sql("SET LOCAL enable_sort = off")

    def has_bulk_copy(self, conn: Connection) -> bool:
        """Where the driver is asyncpg."""
        return hasattr(conn.connection.driver_connection, "copy_records_to_table")

    def bulk_copy(
        self, conn: Connection, table: Table, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> bool:
        """Binary COPY through asyncpg, inside the connection's transaction.

        Values must be what asyncpg encodes for each column (aware datetimes for timestamps,
        JSON text for JSONB).
        """
        driver = conn.connection.driver_connection
        copy_records = getattr(driver, "copy_records_to_table", None)  # asyncpg only
        if copy_records is None:
            return False
        if rows:
            await_only(copy_records(table.name, records=rows, columns=list(columns)))
        return True

    def allocate_ids(self, conn: Connection, table: Table, count: int) -> list[int] | None:
        """``nextval`` of the key's sequence, ``count`` times in one statement (asyncpg only:
        only there are the rows then loaded by COPY)."""  # noqa: D205, D209
        if not self.has_bulk_copy(conn):
            return None
        if count == 0:
            return []
        id_column = _row_id_column(table)
        sequence = func.pg_get_serial_sequence(table.name, id_column.name)
        found = conn.execute(
            select(func.nextval(sequence)).select_from(func.generate_series(1, count))
        ).scalars()
        return sorted(int(value) for value in found)

    def begin_snapshot(self, conn: Connection) -> None:
        """REPEATABLE READ: every statement of the transaction sees the first one's snapshot."""
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")

    def prepare_ddl(self, conn: Connection) -> None:
        """Undo :meth:`begin_write`'s planner setting for a schema transaction, and no JIT.

        Schema checks query the catalogs; with sorting switched off their plans cost enough
        to cross the JIT threshold, and compiling them took over a second on a fresh
        connection (1,465 ms against 25 ms), which every short-lived process paid.
        """
        conn.exec_driver_sql("SET LOCAL enable_sort = on")
        conn.exec_driver_sql("SET LOCAL jit = off")

    def lock_schema(self, conn: Connection) -> None:
        """Transaction-scoped advisory lock, released by COMMIT or ROLLBACK.

        On a Citus coordinator the rest of the transaction also runs its distributed DDL
        sequentially, so that migrations may change several distributed tables and functions
        in one transaction.
        """
        conn.execute(func.pg_advisory_xact_lock(self.schema_lock_key).select())
        if self.cluster_node(conn) is not None:
            citus.allow_schema_changes_in_one_transaction(conn)

    def cluster_node(self, conn: Connection) -> citus.CitusNode | None:
        """The Citus node ``conn`` is on, where the database has the extension."""
        return citus.detect(conn)

    def server_routines(self, tables: StoreTables) -> tuple[ServerRoutines, ...]:
        """PL/pgSQL functions for the append and the usage write (one round trip each)."""
        return server_routines.released_routines(
            tables.sessions.name, tables.messages.name, default=tables.is_default
        )

    def timestamp_value(self, value: datetime) -> ColumnElement[Any]:
        """An aware instant: the column is ``timestamptz``."""
        return literal(value.astimezone(UTC), postgresql.TIMESTAMP(timezone=True))

    def shifted(self, stamp: ColumnElement[Any], seconds: ColumnElement[Any]) -> ColumnElement[Any]:
        """UTC wall time (independent of the session's TimeZone) plus an interval."""
        utc_wall = func.timezone("UTC", stamp)
        return utc_wall + func.make_interval(0, 0, 0, 0, 0, 0, cast(seconds, Float))

    def period_start(self, wall_time: ColumnElement[Any], unit: str) -> ColumnElement[Any]:
        """``date_trunc`` (its weeks start on Monday) rendered by ``to_char``."""
        return func.to_char(func.date_trunc(unit, wall_time), "YYYY-MM-DD", type_=Text)

    def json_integer(self, document: ColumnElement[Any], key: str) -> ColumnElement[Any]:
        """``->>`` on JSONB, only where the value is a number."""
        value = document.op("->")(literal(key, Text))
        return case(
            (
                func.jsonb_typeof(value) == "number",
                cast(cast(document.op("->>")(literal(key, Text)), Numeric), BigInteger),
            ),
            else_=None,
        )

    def driver_calls(self, engine: AsyncEngine) -> AsyncpgCalls | None:
        """Direct asyncpg calls, where the engine's driver is asyncpg."""
        return AsyncpgCalls(engine) if engine.dialect.driver == "asyncpg" else None

    def quoted_name(self, name: str) -> str:
        """Double-quoted where Postgres would fold or reject the bare name ("MySessions",
        "order"); bare otherwise."""  # noqa: D205, D209
        return _POSTGRES_QUOTER.quote(name)

    # Deadlock, serialization failure, lock_timeout: the statement (and, for the first two,
    # the transaction) was rolled back.
    _LOCK_CONFLICTS: ClassVar[frozenset[str]] = frozenset({"40P01", "40001", "55P03"})

    def error_code(self, error: BaseException) -> str | None:
        """The SQLSTATE."""
        code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        return str(code) if code else None

    def is_read_only_error(self, error: BaseException) -> bool:
        """read_only_sql_transaction: a standby, or default_transaction_read_only."""
        return self.error_code(error) == "25006"

    def is_lock_conflict(self, error: BaseException) -> bool:
        """A deadlock, a serialization failure or a lock_timeout."""
        return self.error_code(error) in self._LOCK_CONFLICTS

    def in_ids(self, column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
        """``column = ANY(:ids)`` with the ids as one text array."""
        return column == any_(bindparam(name, type_=postgresql.ARRAY(String())))

    def now_micros(self) -> ColumnElement[int]:
        """``statement_timestamp()``: the time of the statement, not of the transaction's start.

        Not ``clock_timestamp()``: Citus refuses volatile functions in an UPDATE of a
        distributed table, and evaluates stable ones like this on the coordinator.
        """
        return self.epoch_micros(func.statement_timestamp())

    def epoch_micros(self, timestamp: ColumnElement[Any]) -> ColumnElement[int]:
        """``EXTRACT(EPOCH ...)`` is exact (numeric) for timestamps with time zone."""
        return cast(extract("epoch", timestamp) * literal_column("1000000"), BigInteger)

    def metadata_matches(
        self, document: ColumnElement[Any], wanted: Mapping[str, JSONScalar]
    ) -> ColumnElement[bool]:
        """JSONB containment (``@>``), excluding array members (see ``_containment_fragments``)."""
        members, arrays = _containment_fragments(wanted)
        conditions = [
            document.op("@>", is_comparison=True)(
                cast(literal(members, String()), postgresql.JSONB)
            )
        ]
        conditions += [
            not_(
                document.op("@>", is_comparison=True)(
                    cast(literal(fragment, String()), postgresql.JSONB)
                )
            )
            for fragment in arrays
        ]
        return and_(*conditions)


_POSTGRES_QUOTER = postgresql.dialect().identifier_preparer  # type: ignore[no-untyped-call]


def _replace_closed_connection(
    dbapi_connection: Any, _connection_record: Any, _connection_proxy: Any
) -> None:
    """Make the pool reconnect instead of handing out a connection the driver knows is closed."""
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    is_closed = getattr(driver, "is_closed", None)  # asyncpg
    closed = is_closed() if callable(is_closed) else getattr(driver, "closed", False)  # psycopg
    if closed:
        raise DisconnectionError("the server closed this pooled connection")


class MySQLProfile(DialectProfile):
    """MySQL and MariaDB (InnoDB): row locks serialize writers of one session.

    Every connection gets ``time_zone = '+00:00'`` so ``CURRENT_TIMESTAMP`` is UTC, like on
    the other dialects. Reads run in autocommit, so each sees the latest committed state.

    Attributes:
        schema_lock_timeout_seconds: How long :meth:`lock_schema` waits for another process.
        prefer_returning: Use ``INSERT ... RETURNING`` where the server has it (MariaDB 10.5+);
            MySQL has none and always takes the fallback of :meth:`insert_returning_ids`.
    """

    name = "mysql"
    session_scoped_keys = True
    async_drivers: ClassVar[Mapping[str, str | None]] = {"asyncmy": "mysql", "aiomysql": None}
    read_execution_options: ClassVar[Mapping[str, Any]] = {"isolation_level": "AUTOCOMMIT"}
    schema_lock_timeout_seconds: ClassVar[int] = 300
    prefer_returning: bool = True
    # Key in a pooled connection's ``info``: how many schema locks it holds.
    _LOCK_COUNT_KEY: ClassVar[str] = "turnstore_schema_locks"
    # GET_LOCK names are server-wide and at most 64 characters; hashing the database name
    # scopes the lock to one database without running into that limit.
    _LOCK_NAME_SQL: ClassVar[str] = "CONCAT('turnstore_schema_', MD5(COALESCE(DATABASE(), '')))"

    def insert(self, table: Table) -> Insert:
        """Return MySQL's INSERT construct."""
        return mysql.insert(table)

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
        """INSERT ... ON DUPLICATE KEY UPDATE (takes the row lock on conflict).

        MySQL matches the new row against every unique key of the table, not a chosen one;
        turnstore's upsert targets have a single unique key besides an autoincrement id, so
        ``conflict_columns`` names the only key that can conflict.
        """
        stmt = mysql.insert(table).values(**values)
        assignments = dict(updates or {})
        assignments.update({column: stmt.inserted[column] for column in take_new_values})
        assignments.update({c: _greater(stmt.inserted[c], table.c[c]) for c in keep_greater})
        return stmt.on_duplicate_key_update(assignments)

    def insert_if_absent(self, table: Table, conflict_columns: Sequence[str]) -> Insert:
        """INSERT ... ON DUPLICATE KEY UPDATE with an assignment that changes nothing.

        ``INSERT IGNORE`` would be shorter, but it also downgrades other errors (foreign keys,
        truncation) to warnings, and the warning it raises for every skipped row is noise.
        """
        if not conflict_columns:
            raise ValueError("insert_if_absent needs the columns of the key that may conflict")
        first = conflict_columns[0]
        return mysql.insert(table).on_duplicate_key_update({first: table.c[first]})

    def engine_options(self, url: URL) -> dict[str, Any]:
        """Pool like Postgres; recycle and ping because servers drop idle connections."""
        options: dict[str, Any] = {
            "pool_size": 10,
            "max_overflow": 20,
            "pool_recycle": 3600,
            "pool_pre_ping": True,
        }
        if "charset" not in url.query:
            # utf8mb4 is the only MySQL charset that holds all of Unicode; say so explicitly
            # rather than trusting each driver's default.
            options["connect_args"] = {"charset": _MYSQL_CHARSET}
        return options

    def prepare_engine(self, engine: Engine) -> None:
        """Pin each connection to UTC; release a schema lock when a connection is returned."""
        target = engine
        if not event.contains(target, "connect", _configure_mysql_connection):
            event.listen(target, "connect", _configure_mysql_connection)
        if not event.contains(target, "reset", _release_mysql_schema_lock):
            event.listen(target, "reset", _release_mysql_schema_lock)

    def begin_write(self, conn: Connection) -> None:
        """Run the write transaction at READ COMMITTED.

        Under InnoDB's default REPEATABLE READ, the locking reads, upserts and deletes of a
        write take next-key (gap) locks that reach into the index ranges of neighbouring
        sessions, so writers of different sessions deadlock. The session row lock already
        serializes writers of one session; READ COMMITTED drops the gap locks.
        """
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")

    def begin_snapshot(self, conn: Connection) -> None:
        """InnoDB's REPEATABLE READ: the first read fixes the snapshot (set before it starts)."""
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")

    def insert_returning_ids(
        self,
        conn: Connection,
        stmt: Insert,
        rows: Sequence[Mapping[str, Any]],
        locked_scope: Mapping[str, Any],
        *,
        max_statement_bytes: int | None = None,
    ) -> list[int]:
        """RETURNING on MariaDB; elsewhere one multi-row INSERT, then read the ids back.

        Without RETURNING: one INSERT statement numbers its rows in increasing order, and its
        ``lastrowid`` is the first of them. Under the caller's lock nobody else adds rows to
        ``locked_scope``, so the scope's rows from that id on, by id, are exactly the new rows
        in order, whatever ``innodb_autoinc_lock_mode`` interleaves with other scopes.
        """
        if not rows:
            return []
        if max_statement_bytes is not None:
            chunks = _chunks_within(rows, max_statement_bytes // 2, self.sent_size)
            if len(chunks) > 1:
                # In order, under the caller's lock: the ids come out in the rows' order.
                return [
                    new_id
                    for chunk in chunks
                    for new_id in self.insert_returning_ids(conn, stmt, chunk, locked_scope)
                ]
        if self.prefer_returning and conn.dialect.insert_returning:
            return super().insert_returning_ids(conn, stmt, rows, locked_scope)
        table = stmt.table
        assert isinstance(table, Table)
        id_column = _row_id_column(table)
        result = conn.execute(insert(table).values(list(rows)))
        first_id = result.lastrowid
        scope = [table.c[column] == value for column, value in locked_scope.items()]
        ids = [
            int(value)
            for value in (
                conn.execute(
                    select(id_column)
                    .where(id_column >= first_id, *scope)
                    .order_by(id_column)
                    .limit(len(rows))
                )
            ).scalars()
        ]
        if len(ids) != len(rows):
            raise RuntimeError(
                f"Inserted {len(rows)} rows into {table.name} but found {len(ids)} of them "
                f"again from id {first_id}: locked_scope {dict(locked_scope)!r} does not cover "
                "the inserted rows, or the caller does not hold the lock that protects it"
            )
        return ids

    def shifted(self, stamp: ColumnElement[Any], seconds: ColumnElement[Any]) -> ColumnElement[Any]:
        """``TIMESTAMPADD(SECOND, n, stamp)`` (connections run in UTC, so stamps are UTC)."""
        return func.timestampadd(literal_column("SECOND"), seconds, stamp, type_=DateTime)

    def period_start(self, wall_time: ColumnElement[Any], unit: str) -> ColumnElement[Any]:
        """``DATE_FORMAT``; weeks step back ``WEEKDAY()`` days to their Monday."""
        if unit == "week":
            wall_time = func.subdate(wall_time, func.weekday(wall_time), type_=DateTime)
        pattern = "%Y-%m-01" if unit == "month" else "%Y-%m-%d"
        return func.date_format(wall_time, pattern, type_=Text)

    def json_integer(self, document: ColumnElement[Any], key: str) -> ColumnElement[Any]:
        """``JSON_EXTRACT`` cast to an integer."""
        return cast(func.json_extract(document, f"$.{key}"), mysql.BIGINT)

    def lock_schema(self, conn: Connection) -> None:
        """A named server lock; DDL commits implicitly, so no transactional lock survives it.

        The lock belongs to the connection, not the transaction: it is released when the
        connection goes back to the pool (or closes).

        Raises:
            SchemaLockTimeoutError: Another process kept the lock past the timeout.
        """
        # Callers such as migration scripts may hand over an engine no session prepared;
        # without the release hook the lock would outlive the connection's checkout.
        self.prepare_engine(conn.engine)
        acquired = conn.scalar(
            select(
                func.get_lock(literal_column(self._LOCK_NAME_SQL), self.schema_lock_timeout_seconds)
            )
        )
        if acquired != 1:
            raise SchemaLockTimeoutError(
                f"Waited {self.schema_lock_timeout_seconds}s for the turnstore schema lock of "
                "this database; another process is creating or migrating tables. Retry when "
                "it is done, or find the connection holding it with "
                "SELECT IS_USED_LOCK(<name>)."
            )
        info = conn.info
        info[self._LOCK_COUNT_KEY] = info.get(self._LOCK_COUNT_KEY, 0) + 1

    # 1290/1836: --read-only / read_only=ON; 1792: a READ ONLY transaction.
    _READ_ONLY_ERRORS: ClassVar[frozenset[int]] = frozenset({1290, 1792, 1836})
    # 1205: lock wait timeout; 1213: deadlock (the transaction was rolled back).
    _LOCK_CONFLICTS: ClassVar[frozenset[int]] = frozenset({1205, 1213})

    def error_code(self, error: BaseException) -> str | None:
        """The server's error number."""
        number = _mysql_error_number(error)
        return None if number is None else str(number)

    def is_read_only_error(self, error: BaseException) -> bool:
        """The server or the transaction is read-only."""
        return _mysql_error_number(error) in self._READ_ONLY_ERRORS

    def is_lock_conflict(self, error: BaseException) -> bool:
        """A lock wait timeout or a deadlock."""
        return _mysql_error_number(error) in self._LOCK_CONFLICTS

    def sent_size(self, value: str) -> int:
        """The drivers inline parameters as literals, escaping quotes and backslashes."""
        return len(value) + value.count('"') + value.count("\\") + value.count("'")

    def statement_size_limit(self, conn: Connection) -> int | None:
        """The server's ``max_allowed_packet``: a longer statement breaks the connection."""
        value = conn.exec_driver_sql("SELECT @@max_allowed_packet").scalar()
        return None if value is None else int(value)

    def table_names_equal(self, left: str, right: str) -> bool:
        """Case-insensitively: servers with lower_case_table_names fold them."""
        return left.lower() == right.lower()

    def convert_identifier_collation(self, conn: Connection, *, exact: bool) -> list[str]:
        """Switch identifier columns between the padded binary collation and the exact one.

        Identifier columns are found by inspection, not by a list: every ``VARCHAR`` column
        with the source collation in a table that has a ``session_id`` column (every table of
        turnstore's, of any table set, has one). Foreign keys on them are dropped and added
        again around the change, which InnoDB refuses otherwise.
        """
        exact_collation = exact_identifier_collation(conn.dialect)
        padded = PADDED_IDENTIFIER_COLLATION
        if exact_collation == padded:
            return []
        source, target = (padded, exact_collation) if exact else (exact_collation, padded)
        columns = _identifier_columns(conn, source)
        if not columns:
            return []
        _refuse_ids_that_change_identity(conn, columns, source, target)
        inspector = inspect(conn)
        tables = sorted({table for table, _, _ in columns})
        foreign_keys = {
            table: [
                key
                for key in inspector.get_foreign_keys(table)
                if any(
                    (table, column) in {(t, c) for t, c, _ in columns}
                    or (key["referred_table"], referred) in {(t, c) for t, c, _ in columns}
                    for column, referred in zip(
                        key["constrained_columns"], key["referred_columns"], strict=True
                    )
                )
            ]
            for table in tables
        }
        quote = conn.dialect.identifier_preparer.quote
        for table, keys in foreign_keys.items():
            for key in keys:
                conn.exec_driver_sql(
                    f"ALTER TABLE {quote(table)} DROP FOREIGN KEY {quote(str(key['name']))}"
                )
        for table in tables:
            changes = ", ".join(
                f"MODIFY {quote(column)} VARCHAR({IDENTIFIER_MAX_LENGTH}) CHARACTER SET "
                f"{_MYSQL_CHARSET} COLLATE {target}{definition}"
                for name, column, definition in columns
                if name == table
            )
            conn.exec_driver_sql(f"ALTER TABLE {quote(table)} {changes}")
        for table, keys in foreign_keys.items():
            for key in keys:
                ondelete = (key.get("options") or {}).get("ondelete")
                conn.exec_driver_sql(
                    f"ALTER TABLE {quote(table)} ADD CONSTRAINT {quote(str(key['name']))} "
                    f"FOREIGN KEY ({', '.join(map(quote, key['constrained_columns']))}) "
                    f"REFERENCES {quote(key['referred_table'])} "
                    f"({', '.join(map(quote, key['referred_columns']))})"
                    + (f" ON DELETE {ondelete}" if ondelete else "")
                )
        return [f"{table}.{column}" for table, column, _ in columns]

    def now_micros(self) -> ColumnElement[int]:
        """Microseconds since the epoch of ``UTC_TIMESTAMP(6)``, whatever the session's zone."""
        return self.epoch_micros(func.utc_timestamp(literal_column("6")))

    def epoch_micros(self, timestamp: ColumnElement[Any]) -> ColumnElement[int]:
        """``TIMESTAMPDIFF`` from the epoch: stored DATETIMEs are UTC wall times."""
        return func.timestampdiff(
            literal_column("MICROSECOND"), literal_column("'1970-01-01 00:00:00'"), timestamp
        )

    def keyset_before(
        self, columns: Sequence[ColumnElement[Any]], values: Sequence[Any]
    ) -> ColumnElement[bool]:
        """The comparison spelt out as ``a < x OR (a = x AND b < y)``.

        MariaDB and MySQL evaluate a row-value comparison row by row along the index instead
        of seeking to it, so a deep page would cost as much as every page before it; the
        spelt-out form becomes index ranges.
        """
        bound = _bound(columns, values)
        alternatives = []
        for position in range(len(columns)):
            equal = [columns[i] == bound[i] for i in range(position)]
            alternatives.append(and_(*equal, columns[position] < bound[position]))
        return or_(*alternatives)

    def metadata_matches(
        self, document: ColumnElement[Any], wanted: Mapping[str, JSONScalar]
    ) -> ColumnElement[bool]:
        """``JSON_CONTAINS``, excluding array members (see ``_containment_fragments``)."""
        members, arrays = _containment_fragments(wanted)
        conditions = [func.json_contains(document, literal(members, String())) == 1]
        conditions += [
            func.json_contains(document, literal(fragment, String())) == 0 for fragment in arrays
        ]
        return and_(*conditions)


def _identifier_columns(conn: Connection, collation: str) -> list[tuple[str, str, str]]:
    """``(table, column, NULL/DEFAULT clause)`` of identifier columns with ``collation``.

    Read with SHOW statements: information_schema skips tables whose definition the same
    transaction is changing (as the migrations before this one may have), which would leave
    their columns unconverted.
    """
    quote = conn.dialect.identifier_preparer.quote
    found = []
    for table in inspect(conn).get_table_names():
        rows = conn.exec_driver_sql(f"SHOW FULL COLUMNS FROM {quote(table)}").mappings().all()
        if not any(row["Field"] == "session_id" for row in rows):
            continue
        for row in rows:
            if not str(row["Type"]).lower().startswith("varchar") or row["Collation"] != collation:
                continue
            definition = "" if row["Null"] == "YES" else " NOT NULL"
            if row["Default"] is not None:
                definition += " DEFAULT '" + str(row["Default"]).replace("'", "''") + "'"
            found.append((table, str(row["Field"]), definition))
    return found


def _refuse_ids_that_change_identity(
    conn: Connection, columns: list[tuple[str, str, str]], source: str, target: str
) -> None:
    """Refuse, listing them, ids the padded collation takes for one that differ in bytes."""
    quote = conn.dialect.identifier_preparer.quote
    by_column: dict[str, list[str]] = {}
    for table, column, _ in columns:
        by_column.setdefault(column, []).append(table)
    problems: list[str] = []
    for column, tables in sorted(by_column.items()):
        scoped = column != "session_id"
        parts = [
            f"SELECT {'CAST(session_id AS BINARY)' if scoped else 'NULL'} AS s, "
            f"{quote(column)} AS v FROM {quote(table)}"
            for table in tables
        ]
        union = " UNION ALL ".join(parts)
        found = conn.exec_driver_sql(
            f"SELECT s, GROUP_CONCAT(DISTINCT HEX(v) SEPARATOR ',') FROM ({union}) AS ids "
            f"GROUP BY s, v COLLATE {PADDED_IDENTIFIER_COLLATION} "
            "HAVING COUNT(DISTINCT CAST(v AS BINARY)) > 1 LIMIT 20"
        ).all()
        for session, variants in found:
            names = " / ".join(
                repr(bytes.fromhex(h).decode("utf-8", "replace")) for h in variants.split(",")
            )
            where = "" if session is None else f" in session {bytes(session).decode()!r}"
            problems.append(f"{column} {names}{where} (tables {', '.join(tables)})")
    if problems:
        change = "split into several" if target != PADDED_IDENTIFIER_COLLATION else "merge"
        raise MigrationError(
            f"Cannot change identifier columns from {source} to {target}: these stored ids "
            f"differ only in trailing spaces, and would {change}: "
            + "; ".join(problems)
            + ". Rename or delete one of each so every id is stored one way, then migrate again."
        )


def _chunks_within(
    rows: Sequence[Mapping[str, Any]], budget: int, size: Any
) -> list[Sequence[Mapping[str, Any]]]:
    """``rows`` split, in order, into runs whose text values add up to at most ``budget``.

    A row larger than the budget on its own gets a run of its own.
    """
    chunks: list[Sequence[Mapping[str, Any]]] = []
    start, used = 0, 0
    for index, row in enumerate(rows):
        row_size = sum(size(value) for value in row.values() if isinstance(value, str))
        if index > start and used + row_size > budget:
            chunks.append(rows[start:index])
            start, used = index, 0
        used += row_size
    chunks.append(rows[start:])
    return chunks


def _mysql_error_number(error: BaseException) -> int | None:
    """The error number MySQL drivers put first in an error's ``args``."""
    args = getattr(error, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


@compiles(PrimaryKeyConstraint, "mysql")
@compiles(PrimaryKeyConstraint, "mariadb")
def _mysql_primary_key(constraint: PrimaryKeyConstraint, compiler: Any, **kw: Any) -> str:
    """Leave out the name of a turnstore primary key on MySQL, which ignores it anyway.

    MySQL calls every primary key ``PRIMARY``; given a name, MariaDB answers each CREATE TABLE
    with a note ("Name 'pk_agent_sessions' ignored for PRIMARY key") that asyncmy logs as a
    warning, seven lines on the first schema creation. Only the names turnstore's naming
    convention (``pk_<table>``) and Alembic's version table (``<table>_pkc``) give are left
    out, so other DDL compiles as before.
    """
    table = getattr(constraint, "table", None)
    name = constraint.name
    if table is None or name not in (f"pk_{table.name}", f"{table.name}_pkc"):
        return str(compiler.visit_primary_key_constraint(constraint, **kw))
    constraint.name = None
    try:
        return str(compiler.visit_primary_key_constraint(constraint, **kw))
    finally:
        constraint.name = name


def _configure_mysql_connection(dbapi_connection: Any, _connection_record: Any) -> None:
    """Per-connection MySQL settings; runs inside the driver's connect."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SET time_zone = '+00:00'")
    finally:
        cursor.close()


def _release_mysql_schema_lock(
    dbapi_connection: Any, connection_record: Any, _reset_state: Any
) -> None:
    """Release the schema locks a connection took before it serves anyone else."""
    held = connection_record.info.pop(MySQLProfile._LOCK_COUNT_KEY, 0)
    if not held:
        return
    cursor = dbapi_connection.cursor()
    try:
        for _ in range(held):
            cursor.execute(f"DO RELEASE_LOCK({MySQLProfile._LOCK_NAME_SQL})")
    finally:
        cursor.close()


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


_MYSQL_PROFILE = MySQLProfile()

_PROFILES: dict[str, DialectProfile] = {
    profile.name: profile for profile in (SQLiteProfile(), PostgresProfile(), _MYSQL_PROFILE)
}
# SQLAlchemy names the dialect "mariadb" for mariadb:// URLs and "mysql" for mysql:// ones,
# whichever server answers; both speak the same SQL here.
_PROFILES["mariadb"] = _MYSQL_PROFILE


def profile_for(dialect_name: str) -> DialectProfile:
    """Return the profile for a SQLAlchemy dialect name.

    Raises:
        NotImplementedError: The dialect is not supported (yet).
    """
    try:
        return _PROFILES[dialect_name]
    except KeyError:
        supported = ", ".join(sorted(_PROFILES))
        raise NotImplementedError(
            f"turnstore does not support the {dialect_name!r} dialect; supported: {supported}"
        ) from None


def utc_now() -> ColumnElement[Any]:
    """SQL for the current time, as stored in turnstore's timestamp columns."""
    return func.current_timestamp()
