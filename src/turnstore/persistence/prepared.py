"""Per-turn statements compiled once and run on the driver's own cursor where that is exact.

Every agent turn runs the same handful of statements. Through ``Connection.execute`` each one
pays SQLAlchemy's execution machinery (an execution context, result metadata, a ``Row`` per
row): 50-100 µs a statement, more than SQLite itself spends on most of them, and for a long
history read twice what fetching the rows costs. A :class:`PreparedStatement` compiles its
statement once per dialect and, where the connection's profile allows it and the statement's
parameters and columns need no type conversion on that dialect (or only bind conversions it
applies itself), runs the compiled SQL directly on the DBAPI cursor of the same connection and
transaction. Anything else takes the ordinary ``Connection.execute`` path, so the result is the
same either way; only SQLAlchemy's statement events and echo logging do not see direct runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.sql import ClauseElement, Executable
from sqlalchemy.sql.compiler import SQLCompiler

#: A row as the driver returns it: indexable like a tuple.
DriverRow = Sequence[Any]
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class _Parameter:
    """Where one positional parameter's value comes from."""

    name: str
    optional: bool  # the statement carries a value (an OFFSET 0, say); a call may override it
    default: Any
    convert: Callable[[Any], Any] | None


@dataclass(frozen=True, slots=True)
class _DirectPlan:
    """Compiled SQL and how to turn named parameters into the driver's positional ones."""

    sql: str
    parameters: tuple[_Parameter, ...]

    def positional(self, params: Mapping[str, Any]) -> tuple[Any, ...]:
        values = []
        for parameter in self.parameters:
            name = parameter.name
            value = params.get(name, parameter.default) if parameter.optional else params[name]
            convert = parameter.convert
            values.append(value if convert is None or value is None else convert(value))
        return tuple(values)


# The compiled form depends on the dialect's class, server version and parameter style; keyed
# on those rather than on the dialect object, because every in-memory SQLite database brings
# an engine (and a dialect object) of its own.
_PlanKey = tuple[type, Any, str]


def _plan_key(dialect: Dialect) -> _PlanKey:
    return type(dialect), dialect.server_version_info, dialect.paramstyle


class PreparedStatement:
    """A statement of the hot path, compiled once per dialect.

    Args:
        statement: The statement. Its bind parameters must all be named ``bindparam``s whose
            values come with each call.
        direct: Whether the dialect profile lets compiled SQL run on the driver's cursor.
        column_keys: For an INSERT without values: the columns every row supplies.
    """

    def __init__(
        self,
        statement: Executable,
        *,
        direct: bool,
        column_keys: Sequence[str] | None = None,
    ) -> None:
        self.statement = statement
        self._direct = direct
        self._column_keys = list(column_keys) if column_keys is not None else None
        self._plans: dict[_PlanKey, _DirectPlan | None] = {}
        self._driver_plans: dict[_PlanKey, _DirectPlan | None] = {}
        self._last: tuple[Dialect, _DirectPlan | None] | None = None

    def rows(self, conn: Connection, params: Mapping[str, Any]) -> list[DriverRow]:
        """Run the statement and return every row it produces."""
        plan = self._plan_for(conn.dialect)
        if plan is None:
            return list(conn.execute(self.statement, params).all())
        return _direct_rows(conn, plan, params)

    def first(self, conn: Connection, params: Mapping[str, Any]) -> DriverRow | None:
        """The first row the statement produces, or ``None``."""
        found = self.rows(conn, params)
        return found[0] if found else None

    def scalars(self, conn: Connection, params: Mapping[str, Any]) -> list[Any]:
        """The first column of every row."""
        return [row[0] for row in self.rows(conn, params)]

    def scalar(self, conn: Connection, params: Mapping[str, Any]) -> Any:
        """The first column of the first row, or ``None`` without rows."""
        row = self.first(conn, params)
        return None if row is None else row[0]

    def scalar_each(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> list[Any]:
        """Run the statement once per parameter set; the first column each run returns.

        For a single-row ``INSERT ... RETURNING`` over several rows: the new keys in order.
        """
        plan = self._plan_for(conn.dialect)
        if plan is None:
            return [conn.execute(self.statement, row).scalar() for row in rows]

        def each(cursor: Any) -> list[Any]:
            found = []
            for row in rows:
                cursor.execute(plan.sql, plan.positional(row))
                first = cursor.fetchone()
                found.append(None if first is None else first[0])
            return found

        return _on_driver(conn, plan, each)

    def execute(self, conn: Connection, params: Mapping[str, Any]) -> int:
        """Run a statement whose rows are not needed; the number of rows it changed."""
        plan = self._plan_for(conn.dialect)
        if plan is None:
            return int(conn.execute(self.statement, params).rowcount)

        def run(cursor: Any) -> int:
            cursor.execute(plan.sql, plan.positional(params))
            return int(cursor.rowcount)

        return _on_driver(conn, plan, run)

    def execute_many(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run the statement once per parameter set (an INSERT of several rows, say)."""
        if not rows:
            return
        plan = self._plan_for(conn.dialect)
        if plan is None:
            conn.execute(self.statement, list(rows))
            return
        positional = [plan.positional(row) for row in rows]
        _on_driver(conn, plan, lambda cursor: cursor.executemany(plan.sql, positional))

    def driver_plan(self, dialect: Dialect) -> _DirectPlan | None:
        """The compiled SQL and parameter order for running the statement on the driver.

        For callers that run it on a driver connection of their own (see
        :mod:`turnstore.persistence.driver_calls`), whatever the profile says about direct runs
        inside
        a unit of work. ``None`` where the statement needs SQLAlchemy at run time.
        """
        key = _plan_key(dialect)
        try:
            return self._driver_plans[key]
        except KeyError:
            plan = self._driver_plans[key] = _compile_direct(self, dialect)
            return plan

    def runs_directly_on(self, dialect: Dialect) -> bool:
        """Whether the statement runs on the driver's cursor (not through SQLAlchemy) there."""
        return self._plan_for(dialect) is not None

    def _plan_for(self, dialect: Dialect) -> _DirectPlan | None:
        # Nearly every call comes from the dialect of the call before: skip the key lookup.
        last = self._last
        if last is not None and last[0] is dialect:
            return last[1]
        key = _plan_key(dialect)
        try:
            plan = self._plans[key]
        except KeyError:
            plan = self._plans[key] = _compile_direct(self, dialect) if self._direct else None
        self._last = (dialect, plan)
        return plan


def _direct_rows(conn: Connection, plan: _DirectPlan, params: Mapping[str, Any]) -> list[DriverRow]:
    """Run ``plan`` once on the driver; the driver's list of rows."""

    def run(cursor: Any) -> list[DriverRow]:
        cursor.execute(plan.sql, plan.positional(params))
        rows: list[DriverRow] = cursor.fetchall()
        return rows

    return _on_driver(conn, plan, run)


def _on_driver(conn: Connection, plan: _DirectPlan, run: Callable[[Any], R]) -> R:
    """``run`` a cursor of the DBAPI connection under ``conn``, inside its transaction.

    Driver errors come out as SQLAlchemy's wrappers, as from ``Connection.execute``.
    """
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        return run(cursor)
    except _driver_error(conn) as exc:
        raise _wrapped(conn, plan, exc) from exc
    finally:
        cursor.close()


def _driver_error(conn: Connection) -> type[Exception]:
    error: type[Exception] = conn.dialect.loaded_dbapi.Error
    return error


def _wrapped(conn: Connection, plan: _DirectPlan, exc: Exception) -> StatementError:
    """A driver error as SQLAlchemy's wrapper (``sqlalchemy.exc.IntegrityError``...).

    The same class ``Connection.execute`` would raise, so callers see one family of errors
    whichever path a statement took.
    """
    return DBAPIError.instance(plan.sql, None, exc, _driver_error(conn), dialect=conn.dialect)


# Parameter styles whose compiled ``positiontup`` maps one-to-one onto the driver's positional
# parameters, checked against real drivers: sqlite3's qmark always, and asyncpg's numbered
# $1 style as long as no parameter repeats (a repeated one is numbered once).
_POSITIONAL_STYLES = frozenset({"qmark"})
_NUMBERED_STYLES = frozenset({"numeric_dollar"})


def _compile_direct(prepared: PreparedStatement, dialect: Dialect) -> _DirectPlan | None:
    """Compile for direct runs, or ``None`` if the statement needs SQLAlchemy at run time."""
    numbered = dialect.paramstyle in _NUMBERED_STYLES
    if not numbered and dialect.paramstyle not in _POSITIONAL_STYLES:
        return None
    statement = prepared.statement
    assert isinstance(statement, ClauseElement)
    compiled = statement.compile(dialect=dialect, column_keys=prepared._column_keys)
    assert isinstance(compiled, SQLCompiler)
    names = compiled.positiontup
    if names is None or compiled.literal_execute_params or compiled.post_compile_params:
        return None
    if numbered and len(set(names)) != len(names):
        return None
    # Result columns the dialect would convert (dates parsed from text, JSON...) need
    # SQLAlchemy's result processing.
    columns = getattr(statement, "exported_columns", ())
    for column in columns:
        if column.type.dialect_impl(dialect).result_processor(dialect, None) is not None:
            return None
    parameters = []
    for name in names:
        bind = compiled.binds[name]
        if bind.callable is not None:
            return None  # a value computed per execution; keep SQLAlchemy in charge
        parameters.append(
            _Parameter(
                name,
                optional=not bind.required,
                default=bind.value,
                convert=bind.type.dialect_impl(dialect).bind_processor(dialect),
            )
        )
    return _DirectPlan(compiled.string, tuple(parameters))
