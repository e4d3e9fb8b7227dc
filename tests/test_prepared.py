"""PreparedStatement: compiled SQL on the driver's cursor gives what Connection.execute gives."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from functools import cached_property
from typing import Any

import pytest
from sqlalchemy import (
    TIMESTAMP,
    Column,
    Integer,
    MetaData,
    Table,
    Text,
    bindparam,
    create_engine,
    func,
    insert,
    select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from turnstore.persistence.prepared import PreparedStatement
from turnstore.persistence.types import JSONDocument

metadata = MetaData()
notes = Table(
    "notes",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("owner", Text, nullable=False),
    Column("body", Text),
    Column("details", JSONDocument()),
    Column("created_at", TIMESTAMP, server_default=func.current_timestamp()),
)


@pytest.fixture
def conn() -> Iterator[Connection]:
    engine = create_engine("sqlite+pysqlite://")
    with engine.begin() as connection:
        metadata.create_all(connection)
        yield connection
    engine.dispose()


def both(statement: Any, **options: Any) -> tuple[PreparedStatement, PreparedStatement]:
    return (
        PreparedStatement(statement, direct=True, **options),
        PreparedStatement(statement, direct=False, **options),
    )


def test_rows_inserted_directly_read_back_the_same_both_ways(conn: Connection) -> None:
    direct_insert, _ = both(insert(notes), column_keys=["owner", "body", "details"])
    direct_insert.execute_many(
        conn,
        [
            {"owner": "a", "body": "first", "details": {"k": [1, 2]}},
            {"owner": "a", "body": "second", "details": None},
            {"owner": "b", "body": "other", "details": {"k": None}},
        ],
    )
    query = (
        select(notes.c.id, notes.c.body, notes.c.details)
        .where(notes.c.owner == bindparam("owner", type_=Text))
        .order_by(notes.c.id.desc())
        .limit(bindparam("limit", type_=Integer))
    )
    direct, through_sqlalchemy = both(query)
    params = {"owner": "a", "limit": 5}
    expected = [tuple(row) for row in through_sqlalchemy.rows(conn, params)]
    assert expected == [(2, "second", None), (1, "first", {"k": [1, 2]})]
    # The JSON column needs result processing, so this statement runs through SQLAlchemy.
    assert not direct.runs_directly_on(conn.dialect)
    assert [tuple(row) for row in direct.rows(conn, params)] == expected


def test_a_bind_processor_is_applied_on_the_direct_path(conn: Connection) -> None:
    direct_insert = PreparedStatement(
        insert(notes).returning(notes.c.id), direct=True, column_keys=["owner", "details"]
    )
    assert direct_insert.runs_directly_on(conn.dialect)
    new_id = direct_insert.scalar(conn, {"owner": "a", "details": {"nested": ["x"]}})
    stored = conn.execute(select(notes.c.details).where(notes.c.id == new_id)).scalar_one()
    assert stored == {"nested": ["x"]}
    raw = conn.exec_driver_sql("SELECT details FROM notes WHERE id = ?", (new_id,)).scalar_one()
    assert raw == '{"nested": ["x"]}'


def test_statements_with_converted_result_columns_fall_back(conn: Connection) -> None:
    conn.execute(insert(notes).values(owner="a"))
    stamped = PreparedStatement(select(notes.c.created_at), direct=True)
    (created_at,) = stamped.first(conn, {}) or (None,)
    assert created_at is not None
    assert not isinstance(created_at, str)  # parsed by SQLAlchemy


def test_a_value_fixed_in_the_statement_is_sent_and_may_be_overridden(conn: Connection) -> None:
    direct_insert = PreparedStatement(insert(notes), direct=True, column_keys=["owner", "body"])
    direct_insert.execute_many(conn, [{"owner": "a", "body": str(n)} for n in range(4)])
    # SQLite renders LIMIT ? OFFSET ?; the offset's 0 comes from the statement.
    query = (
        select(notes.c.body)
        .order_by(notes.c.id)
        .limit(bindparam("limit", type_=Integer))
        .offset(bindparam("skip", 1, type_=Integer))
    )
    direct, through_sqlalchemy = both(query)
    assert direct.runs_directly_on(conn.dialect)
    assert not through_sqlalchemy.runs_directly_on(conn.dialect)
    assert direct.scalars(conn, {"limit": 2}) == through_sqlalchemy.scalars(conn, {"limit": 2})
    assert direct.scalars(conn, {"limit": 2}) == ["1", "2"]
    assert direct.scalars(conn, {"limit": 2, "skip": 3}) == ["3"]


def test_driver_errors_come_out_as_sqlalchemy_errors(conn: Connection) -> None:
    direct_insert = PreparedStatement(insert(notes), direct=True, column_keys=["owner"])
    assert direct_insert.runs_directly_on(conn.dialect)
    with pytest.raises(IntegrityError, match="NOT NULL") as raised:
        direct_insert.execute_many(conn, [{"owner": None}])
    assert isinstance(raised.value.orig, sqlite3.IntegrityError)


def test_nothing_to_run_runs_nothing(conn: Connection) -> None:
    for prepared in both(insert(notes), column_keys=["owner"]):
        prepared.execute_many(conn, [])
    assert conn.execute(select(func.count()).select_from(notes)).scalar_one() == 0


def test_each_run_of_a_returning_insert_gives_its_key_in_order(conn: Connection) -> None:
    statement = insert(notes).returning(notes.c.id)
    rows = [{"owner": "a", "body": str(n)} for n in range(3)]
    direct, through_sqlalchemy = both(statement, column_keys=["owner", "body"])
    assert direct.runs_directly_on(conn.dialect)
    first_ids = direct.scalar_each(conn, rows)
    assert first_ids == sorted(first_ids)
    assert len(set(first_ids)) == 3
    later_ids = through_sqlalchemy.scalar_each(conn, rows)
    assert later_ids[0] > first_ids[-1]
    stored = conn.execute(select(notes.c.id, notes.c.body).order_by(notes.c.id)).all()
    assert [tuple(row) for row in stored] == [
        (key, row["body"]) for key, row in zip(first_ids + later_ids, rows + rows, strict=True)
    ]


def test_a_statement_without_result_runs_both_ways(conn: Connection) -> None:
    for n, prepared in enumerate(both(insert(notes), column_keys=["owner"])):
        prepared.execute(conn, {"owner": f"owner {n}"})
    owners = conn.execute(select(notes.c.owner).order_by(notes.c.id)).scalars().all()
    assert owners == ["owner 0", "owner 1"]


def test_no_row_gives_none(conn: Connection) -> None:
    for prepared in both(select(notes.c.id).where(notes.c.owner == bindparam("owner"))):
        assert prepared.first(conn, {"owner": "nobody"}) is None
        assert prepared.scalar(conn, {"owner": "nobody"}) is None


def test_the_per_turn_statements_run_directly_on_sqlite() -> None:
    from sqlalchemy.dialects import sqlite

    from turnstore.persistence.dialects import profile_for
    from turnstore.persistence.models import DEFAULT_TABLES
    from turnstore.persistence.statements import _statements

    statements = _statements(DEFAULT_TABLES, profile_for("sqlite"))
    # Each statement is built on first use (a cached property of the class).
    built = {
        name: getattr(statements, name)
        for name, attribute in vars(type(statements)).items()
        if isinstance(attribute, cached_property)
    }
    prepared = {
        name: value for name, value in built.items() if isinstance(value, PreparedStatement)
    }
    assert len(prepared) >= 10
    dialect = sqlite.dialect()
    assert [name for name, p in prepared.items() if not p.runs_directly_on(dialect)] == []
