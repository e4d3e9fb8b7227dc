"""SQLite's profile: one writer at a time, WAL for concurrent readers, foreign keys on.

Also how its connections are set up (pragmas, WAL, a read-only directory's file).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Integer,
    String,
    Table,
    Text,
    and_,
    bindparam,
    case,
    cast,
    event,
    func,
    literal,
    literal_column,
    select,
    true,
    type_coerce,
)
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.dml import Insert

from turnstore.persistence.dialects.base import JSONScalar, ThreadedEngine, _OnConflictProfile
from turnstore.persistence.prepared import PreparedStatement


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
