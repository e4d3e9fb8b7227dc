"""Schema and locking details that differ by dialect, checked through the public behaviour.

The first tests run on every backend: they pin down behaviour (exact identifier equality, any
Unicode in every column) that a dialect's defaults could silently change. The rest exercise
the MySQL profile's own mechanisms on the MySQL/MariaDB backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, func, literal_column, select
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.sql import ColumnElement

from tests.conftest import Backend, fresh_mysql_backend
from tests.helpers import assistant, function_call, function_output, turn, user
from turnstore import AdvancedSession, BranchNameTakenError
from turnstore.errors import SchemaLockTimeoutError
from turnstore.persistence.dialects import profile_for
from turnstore.persistence.dialects.mysql import MySQLProfile

WIDE_TEXT = "emoji 🚀👩‍💻 CJK 東京 漢字 한국어 𠜎 and astral 🀄"


async def test_identifiers_differing_only_in_case_are_distinct(backend: Backend) -> None:
    lower, upper = backend.session("conversation"), backend.session("Conversation")
    await lower.add_items(turn("first") + turn("second"))
    await upper.add_items(turn("other session"))
    assert await lower.get_items() == turn("first") + turn("second")
    # Branch names are unique per session; "Main" and "Draft" must not collide with
    # "main" and "draft".
    for name in ("Main", "draft", "Draft"):
        await lower.switch_to_branch("main")
        await lower.create_branch_from_turn(2, name)
    await lower.switch_to_branch("main")
    with pytest.raises(BranchNameTakenError):
        await lower.create_branch_from_turn(2, "draft")
    names = {branch["branch_id"] for branch in await lower.list_branches()}
    assert names == {"main", "Main", "draft", "Draft"}


async def test_unicode_in_every_column_round_trips(backend: Backend) -> None:
    session = backend.session(f"会话-🚀-{WIDE_TEXT[:10]}")
    items = [
        user(WIDE_TEXT),
        function_call("工具_🔧", call_id="c1"),
        function_output("c1", WIDE_TEXT),
        assistant(WIDE_TEXT),
    ]
    await session.add_items([*items, *turn("second")])
    await session.create_branch_from_turn(2, "分支-🌿")
    assert await session.get_items() == items
    assert [name for name, _, _ in await session.get_tool_usage()] == ["工具_🔧"]
    assert "分支-🌿" in {branch["branch_id"] for branch in await session.list_branches()}
    found = await session.find_turns_by_content("東京")
    assert [match["turn"] for match in found] == [1]
    reopened = backend.session(f"会话-🚀-{WIDE_TEXT[:10]}")
    assert await reopened.get_items() == [*items, *turn("second")]


@pytest.fixture
async def mysql_backend(mysql_url: str) -> AsyncIterator[Backend]:
    """Only the MySQL backend: these tests exercise the MySQL profile alone."""
    async for ready in fresh_mysql_backend(mysql_url):
        yield ready


async def test_created_at_is_utc_whatever_the_connection_time_zone(
    mysql_backend: Backend,
) -> None:
    # A caller's engine whose connections start in UTC+05:00: the profile must pin UTC.
    engine = create_async_engine(
        mysql_backend.url, connect_args={"init_command": "SET time_zone = '+05:00'"}
    )
    try:
        session = AdvancedSession(session_id="utc-check", engine=engine, create_tables=True)
        await session.add_items(turn("what time is it?"))
        stamp = (await session.get_conversation_turns())[0]["timestamp"]
        await session.aclose()
    finally:
        await engine.dispose()
    stored = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    # Five hours off would be the unpinned zone; a generous bound keeps clock skew harmless.
    assert abs(stored - datetime.now(UTC)) < timedelta(minutes=30)


async def test_ids_without_returning_keep_batch_order(
    mysql_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MariaDB has RETURNING; MySQL does not. Take MySQL's path here and prove it is exact.
    monkeypatch.setattr(profile_for("mysql"), "prefer_returning", False)
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    first, second = mysql_backend.session(), mysql_backend.session()
    await first.get_items()  # schema creation (and its version stamp) is not under test
    event.listen(mysql_backend.engine.sync_engine, "before_cursor_execute", record)
    batch = [user(f"u{i}") if i % 3 == 0 else assistant(f"a{i}") for i in range(25)]
    await first.add_items(batch[:10])
    await second.add_items(turn("interleaved"))
    await first.add_items(batch[10:])
    assert await first.get_items() == batch
    assert await second.get_items() == turn("interleaved")
    assert await first.pop_item() == batch[-1]
    assert not [s for s in statements if "RETURNING" in s.upper()]


async def test_schema_lock_is_released_with_the_connection(mysql_backend: Backend) -> None:
    profile = profile_for("mysql")
    assert isinstance(profile, MySQLProfile)
    lock_name: ColumnElement[str] = literal_column(MySQLProfile._LOCK_NAME_SQL)
    engine = mysql_backend.engine
    async with engine.connect() as holder:
        await holder.run_sync(profile.lock_schema)
        async with engine.connect() as other:
            assert await other.scalar(select(func.is_free_lock(lock_name))) == 0
    async with engine.connect() as after:
        assert await after.scalar(select(func.is_free_lock(lock_name))) == 1


async def test_schema_lock_times_out_with_a_clear_error(
    mysql_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    profile = profile_for("mysql")
    monkeypatch.setattr(profile, "schema_lock_timeout_seconds", 1)
    engine = mysql_backend.engine
    async with engine.connect() as holder:
        await holder.run_sync(profile.lock_schema)
        async with engine.connect() as waiter:
            with pytest.raises(SchemaLockTimeoutError, match="schema lock"):
                await waiter.run_sync(profile.lock_schema)
