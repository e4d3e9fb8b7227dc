"""Everything that differs between database dialects, and nothing else.

The repository writes one set of queries; the few places where SQL dialects genuinely disagree
(column types, upsert syntax, how a writer takes its lock, connection set-up) are answered here,
by a :class:`DialectProfile` chosen from the engine's dialect name. No other module branches on
the dialect name.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import TIMESTAMP, BigInteger, Integer, String, Table, Text, event, func
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.type_api import TypeEngine
from sqlalchemy.types import TypeDecorator

logger = logging.getLogger(__name__)

_MYSQL_NAMES = ("mysql", "mariadb")

# Primary keys and references to them. SQLite needs the exact type name INTEGER for a rowid
# alias (and AUTOINCREMENT); servers get 64 bits because message tables grow without bound.
ROW_ID: TypeEngine[int] = BigInteger().with_variant(Integer(), "sqlite")

# Session and branch identifiers. MySQL cannot index or key an unbounded TEXT column.
IDENTIFIER: TypeEngine[str] = Text().with_variant(String(255), *_MYSQL_NAMES)

# A serialized conversation item. MySQL's TEXT stops at 64 KiB; items can be megabytes.
DOCUMENT: TypeEngine[str] = Text().with_variant(mysql.LONGTEXT(), *_MYSQL_NAMES)

# Server-stamped creation times. Postgres stores an absolute instant so the server's TimeZone
# setting cannot shift what CURRENT_TIMESTAMP means; SQLite's CURRENT_TIMESTAMP is UTC already.
TIMESTAMP_UTC: TypeEngine[Any] = TIMESTAMP().with_variant(
    postgresql.TIMESTAMP(timezone=True), "postgresql"
)


class _JSONDeclaredText(Text):
    """Text that SQLite declares as ``JSON``, the column type the SDK's schema uses."""


@compiles(_JSONDeclaredText, "sqlite")
def _compile_json_declared_text(type_: _JSONDeclaredText, compiler: Any, **kw: Any) -> str:
    return "JSON"


class JSONDocument(TypeDecorator[Any]):
    """A small JSON document: native JSONB/JSON on servers, JSON text on SQLite.

    Reading is lenient on SQLite, where the column holds free text written by any client: a
    value that is not valid JSON reads back as ``None`` (as the SDK's class does) instead of
    failing the whole query.
    """

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        """Pick the storage type for the dialect."""
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.JSONB(none_as_null=True))
        if dialect.name in _MYSQL_NAMES:
            return dialect.type_descriptor(mysql.JSON(none_as_null=True))
        return dialect.type_descriptor(_JSONDeclaredText())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        """Serialize on text storage; native JSON types serialize for themselves."""
        if value is None or dialect.name == "postgresql" or dialect.name in _MYSQL_NAMES:
            return value
        return json.dumps(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        """Parse text storage, reading invalid JSON as ``None``."""
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except ValueError:
            logger.warning("Ignoring a token-details value that is not valid JSON")
            return None


class DialectProfile:
    """How one SQL dialect does the handful of things dialects disagree on.

    Attributes:
        serializes_writers_in_process: Whether writers in one process should queue on an
            asyncio lock before opening a transaction. True where the database allows a single
            writer at a time (SQLite), so that in-process writers wait on a cheap lock instead
            of polling the database's busy handler.
        read_execution_options: Execution options for read-only connections.
    """

    name: ClassVar[str] = "generic"
    serializes_writers_in_process: ClassVar[bool] = False
    read_execution_options: ClassVar[Mapping[str, Any]] = {}

    def insert(self, table: Table) -> Insert:
        """Return the dialect's INSERT construct (with its upsert extensions) for ``table``."""
        raise NotImplementedError

    def upsert(
        self,
        table: Table,
        values: Mapping[str, Any],
        conflict_columns: Sequence[str],
        updates: Mapping[str, Any] | None = None,
        *,
        take_new_values: Sequence[str] = (),
    ) -> Insert:
        """INSERT one row, or UPDATE the row that has the same ``conflict_columns``.

        Args:
            table: Target table.
            values: Column values of the new row.
            conflict_columns: Columns of the unique key that identifies an existing row.
            updates: Column assignments applied to an existing row (SQL expressions allowed).
            take_new_values: Columns of an existing row to overwrite with the new row's values.
        """
        raise NotImplementedError

    def insert_if_absent(self, table: Table, conflict_columns: Sequence[str]) -> Insert:
        """INSERT that silently skips rows whose ``conflict_columns`` already exist."""
        raise NotImplementedError

    def engine_options(self, url: URL) -> dict[str, Any]:
        """Keyword arguments for ``create_async_engine`` when turnstore creates the engine."""
        return {}

    def prepare_engine(self, engine: AsyncEngine) -> None:  # noqa: B027 - optional hook
        """Install per-connection set-up on an engine (idempotent)."""

    async def begin_write(self, conn: AsyncConnection) -> None:  # noqa: B027 - optional hook
        """Start a write transaction that cannot interleave with another writer's."""

    async def lock_schema(self, conn: AsyncConnection) -> None:  # noqa: B027 - optional hook
        """Serialize schema changes across processes for the rest of the transaction."""

    def unreachable_reason(self, url: URL) -> str | None:
        """Why connecting to ``url`` must fail, when that is knowable without connecting."""
        return None


class SQLiteProfile(DialectProfile):
    """SQLite: one writer at a time, WAL for concurrent readers, foreign keys switched on."""

    name = "sqlite"
    serializes_writers_in_process = True
    busy_timeout_seconds: ClassVar[float] = 30.0

    def insert(self, table: Table) -> Insert:
        """Return SQLite's INSERT construct."""
        return sqlite_dialect.insert(table)

    def upsert(
        self,
        table: Table,
        values: Mapping[str, Any],
        conflict_columns: Sequence[str],
        updates: Mapping[str, Any] | None = None,
        *,
        take_new_values: Sequence[str] = (),
    ) -> Insert:
        """INSERT ... ON CONFLICT DO UPDATE."""
        stmt = sqlite_dialect.insert(table).values(**values)
        assignments = dict(updates or {})
        assignments.update({column: stmt.excluded[column] for column in take_new_values})
        return stmt.on_conflict_do_update(index_elements=list(conflict_columns), set_=assignments)

    def insert_if_absent(self, table: Table, conflict_columns: Sequence[str]) -> Insert:
        """INSERT ... ON CONFLICT DO NOTHING."""
        return sqlite_dialect.insert(table).on_conflict_do_nothing(
            index_elements=list(conflict_columns)
        )

    def engine_options(self, url: URL) -> dict[str, Any]:
        """One shared connection for in-memory databases; a busy timeout for files."""
        if url.database in (None, "", ":memory:"):
            return {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
        return {"connect_args": {"timeout": self.busy_timeout_seconds}}

    def prepare_engine(self, engine: AsyncEngine) -> None:
        """Switch on WAL, foreign keys and a busy timeout on every new connection."""
        if not event.contains(engine.sync_engine, "connect", _configure_sqlite_connection):
            event.listen(engine.sync_engine, "connect", _configure_sqlite_connection)

    async def begin_write(self, conn: AsyncConnection) -> None:
        """BEGIN IMMEDIATE: take the write lock up front, so no read-then-write upgrade fails."""
        raw = await conn.get_raw_connection()
        if not getattr(raw.driver_connection, "in_transaction", False):
            await conn.exec_driver_sql("BEGIN IMMEDIATE")

    async def lock_schema(self, conn: AsyncConnection) -> None:
        """The database write lock also serializes DDL."""
        await self.begin_write(conn)

    def unreachable_reason(self, url: URL) -> str | None:
        """A file in a missing directory cannot be created.

        Checked up front because a failed aiosqlite connect leaves its worker thread reporting
        to the event loop after ``asyncio.run`` has closed it, which prints a stray traceback.
        """
        if url.database in (None, "", ":memory:") or url.database.startswith("file:"):
            return None
        directory = Path(url.database).expanduser().resolve().parent
        return None if directory.is_dir() else f"directory {directory} does not exist"


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
            if "locked" not in str(exc).lower() or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)
        else:
            return


class PostgresProfile(DialectProfile):
    """PostgreSQL: row locks serialize writers of one session; readers never block."""

    name = "postgresql"
    read_execution_options: ClassVar[Mapping[str, Any]] = {"isolation_level": "AUTOCOMMIT"}
    # Any fixed 64-bit key; shared by every turnstore process touching the schema.
    schema_lock_key: ClassVar[int] = 0x7475726E73746F72  # "turnstor"

    def insert(self, table: Table) -> Insert:
        """Return PostgreSQL's INSERT construct."""
        return postgresql.insert(table)

    def upsert(
        self,
        table: Table,
        values: Mapping[str, Any],
        conflict_columns: Sequence[str],
        updates: Mapping[str, Any] | None = None,
        *,
        take_new_values: Sequence[str] = (),
    ) -> Insert:
        """INSERT ... ON CONFLICT DO UPDATE (takes the row lock on conflict)."""
        stmt = postgresql.insert(table).values(**values)
        assignments = dict(updates or {})
        assignments.update({column: stmt.excluded[column] for column in take_new_values})
        return stmt.on_conflict_do_update(index_elements=list(conflict_columns), set_=assignments)

    def insert_if_absent(self, table: Table, conflict_columns: Sequence[str]) -> Insert:
        """INSERT ... ON CONFLICT DO NOTHING."""
        return postgresql.insert(table).on_conflict_do_nothing(
            index_elements=list(conflict_columns)
        )

    def engine_options(self, url: URL) -> dict[str, Any]:
        """A pool sized for many concurrent conversations on a small server."""
        return {"pool_size": 10, "max_overflow": 20}

    async def lock_schema(self, conn: AsyncConnection) -> None:
        """Transaction-scoped advisory lock, released by COMMIT or ROLLBACK."""
        await conn.execute(func.pg_advisory_xact_lock(self.schema_lock_key).select())


_PROFILES: dict[str, DialectProfile] = {
    profile.name: profile for profile in (SQLiteProfile(), PostgresProfile())
}


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
