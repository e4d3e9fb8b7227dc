"""The store beside the SDK's own class and older schemas: files both ways, adopt, 0005."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from agents.extensions.memory import AdvancedSQLiteSession as SDKSession
from sqlalchemy import func, inspect, select

from tests.conftest import Backend
from tests.helpers import run_result, turn
from tests.migration_helpers import run_cli
from tests.test_adopt import build_sdk_database, sdk_snapshots
from turnstore import AdvancedSQLiteSession, SchemaMissingError, Store
from turnstore.persistence.models import DEFAULT_TABLES
from turnstore.schema import migrate


async def test_the_sdk_reads_and_writes_a_file_with_session_info(sqlite_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{sqlite_path}"
    async with Store(url=url, create_tables=True) as store:
        owned = store.session("owned", user_id="alice", title="Trip", metadata={"k": [1]})
        await owned.add_items(turn("first question"))
        await owned.store_run_usage(run_result())
        await owned.add_items(turn("second question"))
        await owned.create_branch_from_turn(2, "alt")
        expected = await owned.get_items(branch_id="main")
        await owned.aclose()
    # Say turnstore last wrote it long ago; the SDK's write below then is its latest activity.
    with sqlite3.connect(sqlite_path) as conn:
        conn.execute("UPDATE turnstore_session_info SET last_activity_us = 1577836800000000")
    async with Store(url=url) as store:
        before = await store.get_session_info("owned")

    sdk: Any = SDKSession(session_id="owned", db_path=sqlite_path)
    try:
        assert await sdk.get_items(branch_id="main") == expected
        assert {b["branch_id"] for b in await sdk.list_branches()} == {"main", "alt"}
        await sdk.switch_to_branch("main")
        await sdk.add_items(turn("from the SDK"))
        await sdk.store_run_usage(run_result())
        # Usage rows of turns 1 and 3 (turn 2 stored none).
        assert (await sdk.get_session_usage() or {})["total_turns"] == 2
    finally:
        sdk.close()
    sdk_new: Any = SDKSession(session_id="sdk-only", db_path=sqlite_path)
    try:
        await sdk_new.add_items(turn("written by the SDK alone"))
    finally:
        sdk_new.close()

    async with Store(url=url) as store:
        # The SDK's write reaches the items; the info (owner, title, metadata) is untouched.
        info = await store.get_session_info("owned")
        assert info is not None
        assert before is not None
        assert (info.user_id, info.title, info.metadata) == ("alice", "Trip", {"k": [1]})
        assert info.items == len(expected) + 2
        # Sessions the SDK writes get their info from turnstore's next write, or from
        # track_sessions (which also moves the SDK-written session's activity forward).
        assert await store.get_session_info("sdk-only") is None
        assert await store.track_sessions() == 2  # sdk-only recorded, owned moved forward
        moved = await store.get_session_info("owned")
        assert moved is not None
        assert moved.last_activity > before.last_activity
        tracked = await store.get_session_info("sdk-only")
        assert tracked is not None
        assert (tracked.user_id, tracked.items, tracked.preview) == (
            None,
            2,
            "written by the SDK alone",
        )
        assert await store.track_sessions() == 0
        session = store.session("owned")
        assert (await session.get_items())[-2:] == turn("from the SDK")


async def test_an_adopted_sdk_file_is_listed(sqlite_path: Path) -> None:
    await build_sdk_database(sqlite_path)
    before = await sdk_snapshots(sqlite_path)
    url = f"sqlite+aiosqlite:///{sqlite_path}"
    adopted = run_cli(["db", "adopt", "--url", url])
    assert adopted.returncode == 0, adopted.stderr
    async with Store(url=url) as store:
        page = await store.list_sessions()
        assert sorted(s.session_id for s in page.sessions) == ["alpha", "beta"]
        assert all(s.user_id is None and s.items > 0 for s in page.sessions)
        with sqlite3.connect(sqlite_path) as conn:
            updated = dict(conn.execute("SELECT session_id, updated_at FROM agent_sessions"))
        for summary in page.sessions:
            stamped = datetime.fromisoformat(updated[summary.session_id]).replace(tzinfo=UTC)
            assert summary.last_activity == stamped
        await store.session("alpha").set_info(user_id="alice")
        assert await store.count_sessions(user_id="alice") == 1
    # The SDK still reads the adopted file as before.
    assert await sdk_snapshots(sqlite_path) == before


async def test_migration_0005_up_and_down_with_data(backend: Backend) -> None:
    await migrate.upgrade(backend.engine, "0004")
    old = backend.session("before-0005", create_tables=False)
    await old.add_items(turn("written at 0004"))
    await old.store_run_usage(run_result())
    with pytest.raises(SchemaMissingError, match="turnstore_session_info"):
        await old.set_info(title="no table yet")
    async with Store(engine=backend.engine) as store:
        with pytest.raises(SchemaMissingError, match="migration 0005"):
            await store.list_sessions()
    expected = await old.get_items()

    await migrate.upgrade(backend.engine, "0005")
    async with backend.engine.connect() as conn:
        updated_at = await conn.scalar(
            select(DEFAULT_TABLES.sessions.c.updated_at).where(
                DEFAULT_TABLES.sessions.c.session_id == "before-0005"
            )
        )
    async with Store(engine=backend.engine) as store:
        info = await store.get_session_info("before-0005")
        assert info is not None
        assert (info.user_id, info.items, info.total_tokens) == (None, 2, 15)
        assert isinstance(updated_at, datetime)
        stamped = updated_at if updated_at.tzinfo else updated_at.replace(tzinfo=UTC)
        assert abs(info.last_activity - stamped) < timedelta(seconds=1)
        session = store.session("before-0005")
        await session.set_info(user_id="alice", title="Kept up")
        await session.add_items(turn("written at 0005"))
        assert (await store.list_sessions(user_id="alice")).sessions[0].user_turns == 2

    await migrate.downgrade(backend.engine, "0004")
    async with backend.engine.connect() as conn:
        tables = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
    assert "turnstore_session_info" not in tables
    again = backend.session("before-0005", create_tables=False)
    assert await again.get_items() == [*expected, *turn("written at 0005")]

    if backend.name == "citus":
        # A coordinator's tables holding rows are distributed only when asked to.
        await migrate.distribute(backend.engine)
    else:
        await migrate.upgrade(backend.engine)
    async with backend.engine.connect() as conn:
        rows = await conn.scalar(select(func.count()).select_from(DEFAULT_TABLES.info))
    assert rows == 1


async def test_sessions_on_an_older_schema_work_until_they_use_info(sqlite_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{sqlite_path}"
    await migrate.upgrade(url, "0004")
    plain = AdvancedSQLiteSession(session_id="plain", db_path=sqlite_path)
    await plain.add_items(turn("works"))
    assert len(await plain.get_items()) == 2
    for call in (plain.get_info, lambda: plain.set_info(title="x")):
        with pytest.raises(SchemaMissingError, match="turnstore db upgrade"):
            await call()
    owned = AdvancedSQLiteSession(session_id="owned", db_path=sqlite_path, user_id="alice")
    with pytest.raises(SchemaMissingError):
        await owned.add_items(turn("refused"))
    assert await owned.get_items() == []
    await plain.aclose()
    await owned.aclose()
