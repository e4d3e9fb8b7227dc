"""Migrations: one head, round trips, no drift, create_tables parity, concurrency, offline SQL."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select, text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import Backend
from tests.helpers import function_call, function_output, turn
from tests.migration_helpers import (
    ROOT,
    child_env,
    engine_drift,
    fresh_postgres_database,
    run_cli,
    usage_result,
)
from turnstore.errors import DistributionError, UnknownRevisionError
from turnstore.persistence.dialects.postgres import PostgresProfile
from turnstore.persistence.models import DEFAULT_TABLES
from turnstore.schema import migrate


async def table_names(backend: Backend) -> set[str]:
    async with backend.engine.connect() as conn:
        return set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))


def test_scripts_have_a_single_head() -> None:
    scripts = ScriptDirectory.from_config(migrate.alembic_config())
    assert len(scripts.get_heads()) == 1
    assert migrate.head() == scripts.get_current_head()
    assert [info.revision for info in migrate.history()][-1] == migrate.head()
    assert migrate.history()[0].down_revision is None


def test_the_scripts_found_are_the_checkouts_scripts() -> None:
    # Installed from a wheel (as nox does) this finds the packaged copy; in an editable
    # install, the checkout's. Either way it must be the same scripts, file for file.
    found, checkout = migrate.script_location(), ROOT / "migrations"

    def scripts(folder: Path) -> dict[str, str]:
        return {
            str(path.relative_to(folder)): path.read_text()
            for path in sorted(folder.rglob("*"))
            if path.suffix in (".py", ".mako") and "__pycache__" not in path.parts
        }

    assert scripts(found) == scripts(checkout)
    assert "versions/0001_initial_schema.py" in scripts(found)


async def test_round_trip_keeps_data_on_the_way_up(backend: Backend) -> None:
    assert await migrate.current(backend.engine) == ()
    await migrate.upgrade(backend.engine)
    assert await migrate.current(backend.engine) == (migrate.head(),)

    session = backend.session("s1", create_tables=False)
    await session.add_items(turn("before"))
    await session.store_run_usage(usage_result(input_tokens=7))
    await migrate.upgrade(backend.engine)  # already at head: must not touch the data
    assert await session.get_items() == turn("before")
    assert await session.get_session_usage() == {
        "requests": 1,
        "input_tokens": 7,
        "output_tokens": 5,
        "total_tokens": 12,
        "total_turns": 1,
    }

    await migrate.downgrade(backend.engine, "base")
    assert await migrate.current(backend.engine) == ()
    assert await table_names(backend) <= {migrate.VERSION_TABLE}

    await migrate.upgrade(backend.engine, "head")
    assert set(DEFAULT_TABLES.names) <= await table_names(backend)
    fresh = backend.session("s2", create_tables=False)
    await fresh.add_items(turn("after"))
    assert await fresh.get_items() == turn("after")
    assert await engine_drift(backend.engine) == []


async def structure_indexes(backend: Backend) -> dict[str, list[str]]:
    async with backend.engine.connect() as conn:
        found = await conn.run_sync(lambda sync: inspect(sync).get_indexes("message_structure"))
    return {
        index["name"]: [str(column) for column in index["column_names"]]
        for index in found
        if index["name"]
    }


async def test_each_revision_steps_up_and_down_with_data(backend: Backend) -> None:
    """Every script, one at a time, with a conversation in the store at each step."""
    revisions = [info.revision for info in migrate.history()]
    await migrate.upgrade(backend.engine, revisions[0])
    session = backend.session("stepped", create_tables=False)
    await session.add_items([*turn("first"), function_call("lookup"), function_output()])
    await session.add_items(turn("second"))
    await session.create_branch_from_turn(2, "side")  # shares the first turn's messages
    await session.add_items(turn("on the side"))
    await session.switch_to_branch("main")
    expected = {
        "main": await session.get_items(),
        "side": await session.get_items(branch_id="side"),
    }

    async def unchanged() -> None:
        for branch, items in expected.items():
            assert await session.get_items(branch_id=branch) == items

    for revision in revisions[1:]:
        if backend.name == "citus" and revision == revisions[-1]:
            # Tables holding rows on a coordinator are distributed only when asked to.
            with pytest.raises(DistributionError, match="turnstore db distribute"):
                await migrate.upgrade(backend.engine, revision)
            await migrate.distribute(backend.engine)
        else:
            await migrate.upgrade(backend.engine, revision)
        assert await migrate.current(backend.engine) == (revision,)
        await unchanged()
    assert "idx_structure_message_session" in await structure_indexes(backend)
    assert await engine_drift(backend.engine) == []
    # Deleting a branch relies on the index: it must still find shared and unshared messages.
    await session.delete_branch("side", force=True)
    del expected["side"]
    for revision in reversed(revisions[:-1]):
        await migrate.downgrade(backend.engine, revision)
        assert await migrate.current(backend.engine) == (revision,)
        await unchanged()
    indexes = await structure_indexes(backend)
    assert indexes["idx_structure_message"] == ["message_id"]
    assert "idx_structure_message_session" not in indexes


async def test_migrated_schema_has_no_drift(backend: Backend) -> None:
    await migrate.upgrade(backend.engine)
    assert await engine_drift(backend.engine) == []


async def test_create_tables_builds_the_migrated_schema_and_stamps_it(backend: Backend) -> None:
    session = backend.session("s1", create_tables=True)
    await session.add_items([*turn("hi"), function_call("search"), function_output()])
    assert await migrate.current(backend.engine) == (migrate.head(),)
    assert await engine_drift(backend.engine) == []
    await migrate.upgrade(backend.engine)  # nothing left to do, nothing lost
    assert len(await session.get_items()) == 4


async def test_stamp_records_without_migrating(backend: Backend) -> None:
    await migrate.stamp(backend.engine, migrate.head())
    assert await migrate.current(backend.engine) == (migrate.head(),)
    assert await table_names(backend) == {migrate.VERSION_TABLE}


async def test_database_at_unknown_revision_is_refused(backend: Backend) -> None:
    await migrate.upgrade(backend.engine)
    async with backend.engine.begin() as conn:
        await conn.execute(text(f"UPDATE {migrate.VERSION_TABLE} SET version_num = 'ffff9999'"))
    with pytest.raises(UnknownRevisionError, match="ffff9999"):
        await migrate.current(backend.engine)
    with pytest.raises(UnknownRevisionError, match="ffff9999"):
        await migrate.upgrade(backend.engine)


async def test_unknown_target_revision_is_refused(backend: Backend) -> None:
    with pytest.raises(UnknownRevisionError, match="nosuchrev"):
        await migrate.upgrade(backend.engine, "nosuchrev")
    assert await table_names(backend) == set()


# -- concurrency ---------------------------------------------------------------------------

_UPGRADE_CHILD = """
import asyncio, sys
from turnstore.schema import migrate
print("ready", flush=True)
asyncio.run(migrate.upgrade(sys.argv[1]))
print("upgraded", flush=True)
"""


def start_upgrader(url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _UPGRADE_CHILD, url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )


def finish(process: subprocess.Popen[str]) -> str:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert err == ""
    return out


async def assert_upgraded_once(url: str) -> None:
    engine = create_async_engine(url)
    try:
        assert await migrate.current(engine) == (migrate.head(),)
        async with engine.connect() as conn:
            rows = await conn.scalar(select(func.count()).select_from(text(migrate.VERSION_TABLE)))
        assert rows == 1
        assert await engine_drift(engine) == []
    finally:
        await engine.dispose()


async def test_concurrent_upgrades_on_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "race.db"
    url = f"sqlite+aiosqlite:///{path}"
    # Hold the write lock so both children queue on it, then let them race for it.
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("BEGIN IMMEDIATE")
    children = [start_upgrader(url), start_upgrader(url)]
    for child in children:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
    holder.execute("COMMIT")
    holder.close()
    for child in children:
        assert finish(child).strip() == "upgraded"
    await assert_upgraded_once(url)


async def test_concurrent_upgrades_on_postgres(postgres_url: str) -> None:
    async with fresh_postgres_database(postgres_url) as url:
        holder = create_async_engine(url)
        try:
            async with holder.connect() as conn:
                trans = await conn.begin()
                await conn.execute(
                    select(func.pg_advisory_xact_lock(PostgresProfile.schema_lock_key))
                )
                children = [start_upgrader(url), start_upgrader(url)]
                # Release only once both children wait on the schema lock, so they contend.
                waiting = 0
                while waiting < 2:
                    for child in children:
                        assert child.poll() is None, child.communicate()
                    waiting = int(
                        await conn.scalar(
                            text(
                                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                "AND NOT granted AND database = "
                                "(SELECT oid FROM pg_database WHERE datname = current_database())"
                            )
                        )
                        or 0
                    )
                await trans.commit()
        finally:
            await holder.dispose()
        for child in children:
            assert finish(child).splitlines() == ["ready", "upgraded"]
        await assert_upgraded_once(url)


# -- offline SQL ---------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="sqlite3 CLI not installed")
async def test_offline_sql_applies_with_sqlite3(tmp_path: Path) -> None:
    result = run_cli(["db", "upgrade", "--sql", "--url", "sqlite+aiosqlite:///unused.db"])
    assert result.returncode == 0, result.stderr
    assert not (Path.cwd() / "unused.db").exists()
    path = tmp_path / "offline.db"
    applied = await asyncio.to_thread(
        subprocess.run,
        ["sqlite3", "-bail", str(path)],
        input=result.stdout,
        capture_output=True,
        text=True,
    )
    assert applied.returncode == 0, applied.stderr
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    try:
        assert await migrate.current(engine) == (migrate.head(),)
        assert await engine_drift(engine) == []
    finally:
        await engine.dispose()


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql not installed")
async def test_offline_sql_applies_with_psql(postgres_url: str) -> None:
    sql = migrate.upgrade_sql("postgresql+asyncpg://nobody@unreachable.invalid/none")
    async with fresh_postgres_database(postgres_url) as url:
        from sqlalchemy.engine import make_url

        target = make_url(url)
        applied = await asyncio.to_thread(
            subprocess.run,
            [
                "psql",
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                target.host or "127.0.0.1",
                "-p",
                str(target.port or 5432),
                "-U",
                target.username or "postgres",
                "-d",
                target.database or "",
            ],
            input=sql,
            capture_output=True,
            text=True,
        )
        assert applied.returncode == 0, applied.stderr
        engine = create_async_engine(url)
        try:
            assert await migrate.current(engine) == (migrate.head(),)
            assert await engine_drift(engine) == []
        finally:
            await engine.dispose()


# -- plain alembic -------------------------------------------------------------------------


async def test_plain_alembic_upgrades_with_the_ini_file(tmp_path: Path) -> None:
    alembic = Path(sys.executable).with_name("alembic")
    url = f"sqlite+aiosqlite:///{tmp_path / 'plain.db'}"
    result = await asyncio.to_thread(
        subprocess.run,
        [str(alembic), "-c", str(ROOT / "alembic.ini"), "upgrade", "head"],
        capture_output=True,
        text=True,
        env={**child_env(), "TURNSTORE_DATABASE_URL": url},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert await migrate.current(url) == (migrate.head(),)
