"""MySQL's and MariaDB's profile (InnoDB): row locks serialize writers of one session.

Also what only they need: a schema lock by ``GET_LOCK``, the identifier collation's
conversion, batches split to fit ``max_allowed_packet``, and unnamed primary keys in DDL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from sqlalchemy import (
    DateTime,
    String,
    Table,
    Text,
    and_,
    cast,
    event,
    func,
    insert,
    inspect,
    literal,
    literal_column,
    or_,
    select,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.schema import PrimaryKeyConstraint
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.dml import Insert

from turnstore.errors import MigrationError, SchemaLockTimeoutError
from turnstore.persistence.dialects.base import (
    DialectProfile,
    JSONScalar,
    _bound,
    _containment_fragments,
    _greater,
    _row_id_column,
)
from turnstore.persistence.types import (
    _MYSQL_CHARSET,
    IDENTIFIER_MAX_LENGTH,
    PADDED_IDENTIFIER_COLLATION,
    exact_identifier_collation,
)


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
