"""PostgreSQL's profile: row locks serialize writers of one session; readers never block."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Float,
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
    literal,
    literal_column,
    not_,
    select,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import ColumnElement
from sqlalchemy.util import await_only

from turnstore.persistence import citus, server_routines
from turnstore.persistence.dialects.base import (
    JSONScalar,
    _containment_fragments,
    _OnConflictProfile,
    _row_id_column,
)
from turnstore.persistence.driver_calls import AsyncpgCalls
from turnstore.persistence.server_routines import ServerRoutines

if TYPE_CHECKING:
    from turnstore.persistence.models import StoreTables


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
