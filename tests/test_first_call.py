"""The first call of a process on an up-to-date database: no schema work beyond one query.

``create_tables=True`` is what the README's examples use, and every short-lived process (a
CLI, a serverless handler, a test) pays its first call. On a database already at the newest
migration that call reads the version row and goes on: no schema lock, no catalog queries,
no planner settings. The figures are in ``benchmarks/cold_start.py``.
"""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
from typing import Any

import pytest
from sqlalchemy import event

from tests.conftest import Backend, fresh_mysql_backend
from tests.helpers import turn
from tests.migration_helpers import child_env
from turnstore.schema import check, migrate

CATALOG_WORDS = ("sqlite_master", "pg_catalog", "pg_class", "information_schema", "pragma")


def record_statements(backend: Backend) -> list[str]:
    statements: list[str] = []

    def remember(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(backend.engine.sync_engine, "before_cursor_execute", remember)
    return statements


async def test_create_tables_on_a_database_at_head_only_reads_the_version(
    backend: Backend,
) -> None:
    await migrate.upgrade(backend.engine)
    statements = record_statements(backend)
    session = backend.session("first", create_tables=True)
    await session.add_items(turn("hello"))
    schema_work = [
        statement
        for statement in statements
        if check.VERSION_TABLE in statement
        or any(word in statement.lower() for word in CATALOG_WORDS)
        or "enable_sort" in statement
        or "advisory" in statement
        or "GET_LOCK" in statement
    ]
    assert len(schema_work) == 1, schema_work
    assert check.VERSION_TABLE in schema_work[0]
    assert len(await session.get_items()) == 2


async def test_create_tables_on_an_older_database_still_migrates(backend: Backend) -> None:
    revisions = [info.revision for info in migrate.history()]
    await migrate.upgrade(backend.engine, revisions[0])
    session = backend.session("older", create_tables=True)
    await session.add_items(turn("hello"))
    assert await migrate.current(backend.engine) == (migrate.head(),)


def test_the_head_read_from_the_scripts_is_alembics() -> None:
    assert check.head_revision() == migrate.head()


def test_a_plain_session_imports_neither_the_sdk_nor_alembic(tmp_path: Any) -> None:
    code = f"""
import asyncio, sys
from turnstore import AdvancedSession, dispose_engines
from turnstore.schema import migrate

url = "sqlite+aiosqlite:///{tmp_path / "x.db"}"
asyncio.run(migrate.upgrade(url))
for name in [name for name in sys.modules if name == "alembic" or name.startswith("alembic.")]:
    del sys.modules[name]

async def main():
    session = AdvancedSession.from_url(session_id="s", url=url, create_tables=True)
    await session.add_items([{{"role": "user", "content": "hi"}}])
    await session.aclose()
    await dispose_engines()

asyncio.run(main())
print("agents" in sys.modules, "alembic" in sys.modules)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_importing_turnstore_does_not_import_alembic() -> None:
    # Alembic (with Mako and Pygments) costs a few hundred milliseconds of every process's
    # start; only schema changes need it.
    code = "import sys, turnstore; print(sorted({n.split('.')[0] for n in sys.modules}))"
    result = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    imported = set(ast.literal_eval(result.stdout.strip()))
    assert "turnstore" in imported
    assert imported.isdisjoint({"alembic", "mako", "pygments", "agents"})


async def test_first_schema_creation_on_mysql_logs_no_driver_warning(
    mysql_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # MariaDB noted "Name 'pk_...' ignored for PRIMARY key" for every table, which asyncmy
    # logs as a warning: seven lines on the console of a first run.
    caplog.set_level(logging.INFO, logger="asyncmy")
    async for backend in fresh_mysql_backend(mysql_url):
        session = backend.session("pk", create_tables=True)
        await session.add_items(turn("hello"))
        await session.aclose()
    assert [record.getMessage() for record in caplog.records if record.name == "asyncmy"] == []


async def test_from_url_passes_engine_kwargs_to_the_engine_it_creates(backend: Backend) -> None:
    from turnstore import AdvancedSession, InvalidArgumentError

    # The backend's own options keep the test inside its private schema (Postgres).
    kwargs = {**backend.engine_options, "pool_size": 4}
    session = AdvancedSession.from_url(
        session_id="kw", url=backend.url, create_tables=True, engine_kwargs=kwargs
    )
    twin = AdvancedSession.from_url(
        session_id="kw", url=backend.url, create_tables=True, engine_kwargs=dict(kwargs)
    )
    await session.add_items(turn("hello"))
    engine: Any = session._binding().handle.engine
    assert engine.pool.size() == 4
    assert twin._binding().handle is session._binding().handle  # same kwargs: one engine
    # Written where the backend's own engine reads.
    assert len(await backend.session("kw", create_tables=False).get_items()) == 2
    await session.aclose()
    await twin.aclose()
    with pytest.raises(InvalidArgumentError, match="engine_kwargs"):
        AdvancedSession(session_id="x", engine=backend.engine, engine_kwargs={"echo": True})
