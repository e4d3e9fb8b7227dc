"""Postgres's one-round-trip appends and usage writes (turnstore.server_routines).

The functions must behave exactly like the statements they replace, be created by the
migrations and by ``create_tables``, and be optional: a database without them keeps working.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from tests.conftest import Backend, _postgres_backend
from tests.helpers import function_call, function_output, run_result, turn, user
from turnstore import AdvancedSession, migrate, server_routines
from turnstore.driver_calls import AsyncpgCalls
from turnstore.models import DEFAULT_TABLES

# sha256 of version 1 of the functions as migration 0003 creates them.
FROZEN_V1_DIGEST = "059f84324a7ac8adc41295dd1b1a781feeed82679fef821b10231e04da93126e"
APPEND_V1 = "turnstore_append_v1(text, text, integer, text[], text[], boolean[], text[])"


@pytest.fixture
async def pg_backend(postgres_url: str) -> AsyncIterator[Backend]:
    """A Postgres schema of the test's own."""
    async for ready in _postgres_backend(postgres_url):
        yield ready


@pytest.fixture
async def second_pg_backend(postgres_url: str) -> AsyncIterator[Backend]:
    """Another Postgres schema, for comparing two stores."""
    async for ready in _postgres_backend(postgres_url):
        yield ready


async def function_exists(engine: AsyncEngine, signature: str) -> bool:
    async with engine.connect() as conn:
        found = await conn.scalar(
            text("SELECT to_regprocedure(:sig) IS NOT NULL"),
            {"sig": signature},
        )
    return bool(found)


async def play(engine: AsyncEngine, create_tables: bool) -> dict[str, Any]:
    """A conversation touching every path of the functions; everything it can read back."""
    session = AdvancedSession(session_id="play", engine=engine, create_tables=create_tables)
    stale = AdvancedSession(session_id="play", engine=engine, create_tables=create_tables)
    for number in range(1, 4):
        await session.add_items(
            [
                user(f"question {number}"),
                function_call("lookup", f"call-{number}"),
                function_output(f"call-{number}", "found"),
            ]
        )
        await session.add_items(turn(f"follow-up {number}")[1:])  # continues the turn
        await session.store_run_usage(run_result(requests=number, input_tokens=10 * number))
    await session.store_run_usage(run_result(requests=9))  # replaces turn 3's usage
    branch = await session.create_branch_from_turn(2, "retry")
    await session.add_items(turn("on the branch"))
    await session.store_run_usage(run_result(requests=7, output_tokens=70))
    await stale.switch_to_branch(branch)
    await session.switch_to_branch("main")
    popped = await session.pop_item()
    before_clear = await snapshot(session)
    await session.clear_session()
    # The stale instance still believes it is on the cleared branch: its usage is dropped
    # and its items land on main.
    await stale.store_run_usage(run_result(requests=100))
    await stale.add_items(turn("after the clear"))
    await stale.store_run_usage(run_result(requests=5))
    return {
        "popped": popped,
        "before_clear": before_clear,
        "after_clear": await snapshot(session),
        "stale_branch": stale._pointer.branch_id,
    }


async def snapshot(session: AdvancedSession) -> dict[str, Any]:
    branches = await session.list_branches()
    return {
        "items": await session.get_items(),
        "latest": await session.get_items(limit=2),
        "turns": [(t["turn"], t["content"]) for t in await session.get_conversation_turns()],
        "usage": await session.get_session_usage(),
        "turn_usage": await session.get_turn_usage(),
        "branch_usage": {
            b["branch_id"]: await session.get_turn_usage(branch_id=b["branch_id"]) for b in branches
        },
        "branches": [(b["branch_id"], b["message_count"], b["user_turns"]) for b in branches],
        "tools": await session.get_tool_usage(),
    }


async def test_functions_replace_the_statements_exactly(
    pg_backend: Backend, second_pg_backend: Backend
) -> None:
    # One store with the functions, one migrated to 0002, which has none.
    await migrate.upgrade(second_pg_backend.engine, "0002")
    assert not await function_exists(second_pg_backend.engine, APPEND_V1)

    with_functions = await play(pg_backend.engine, create_tables=True)
    assert await function_exists(pg_backend.engine, APPEND_V1)
    without_functions = await play(second_pg_backend.engine, create_tables=False)

    assert with_functions == without_functions
    assert with_functions["stale_branch"] == "main"
    assert [item["content"] for item in with_functions["after_clear"]["items"][:1]] == [
        "after the clear"
    ]


async def test_sessions_call_the_functions(pg_backend: Backend) -> None:
    session = pg_backend.session()
    await session.add_items(turn("first"))
    # Replace the function with one that refuses: the next append must go through it.
    async with pg_backend.engine.begin() as conn:
        await conn.exec_driver_sql(f"DROP FUNCTION {APPEND_V1}")
        await conn.exec_driver_sql(
            f"CREATE FUNCTION {APPEND_V1} RETURNS TABLE (b text, g integer) LANGUAGE plpgsql "
            "AS $f$ BEGIN RAISE EXCEPTION 'the append function ran'; END $f$"
        )
    with pytest.raises(DBAPIError, match="the append function ran"):
        await session.add_items(turn("second"))
    assert [item["content"] for item in await session.get_items()][:1] == ["first"]


async def test_database_without_the_functions_warns_and_works(
    pg_backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    await migrate.upgrade(pg_backend.engine, "0002")
    with caplog.at_level(logging.WARNING, logger="turnstore"):
        session = pg_backend.session(create_tables=False)
        await session.add_items(turn("hello"))
        await session.store_run_usage(run_result(requests=2))
    assert any("lacks turnstore's server functions" in r.getMessage() for r in caplog.records)
    assert await session.get_session_usage() == {
        "requests": 2,
        "input_tokens": 10,
        "output_tokens": 5,
        "total_tokens": 15,
        "total_turns": 1,
    }

    # Upgrading adds them; a new engine (a restarted process) finds and uses them.
    await migrate.upgrade(pg_backend.engine)
    assert await function_exists(pg_backend.engine, APPEND_V1)


async def test_custom_tables_get_functions_of_their_own(pg_backend: Backend) -> None:
    session = pg_backend.session(sessions_table="my_sessions", messages_table="my_messages")
    await session.add_items(turn("custom"))
    await session.store_run_usage(run_result())
    routines = server_routines.routines_for("my_sessions", "my_messages", default=False)
    assert routines.append_name != "turnstore_append_v1"
    signature = APPEND_V1.replace("turnstore_append_v1", routines.append_name)
    assert await function_exists(pg_backend.engine, signature)
    assert not await function_exists(pg_backend.engine, APPEND_V1)
    assert (await session.get_session_usage() or {})["total_turns"] == 1


def test_released_function_definitions_are_frozen() -> None:
    # Migration 0003 creates version 1 from routine_ddl: editing it would change what an
    # applied migration means. A change belongs in a new version and a new revision.
    routines = server_routines.routines_for(
        "agent_sessions", "agent_messages", default=True, version=1
    )
    ddl = "\n".join(server_routines.routine_ddl(routines, **DEFAULT_TABLES.routine_tables))
    assert hashlib.sha256(ddl.encode()).hexdigest() == FROZEN_V1_DIGEST


async def test_driver_errors_come_out_as_sqlalchemy_errors(pg_backend: Backend) -> None:
    calls = AsyncpgCalls(pg_backend.engine)
    with pytest.raises(ProgrammingError, match="no_such_table"):
        await calls.fetch("SELECT * FROM no_such_table", (), writes=False)
    assert await calls.fetch("SELECT $1::int", (7,), writes=False) == [(7,)]


async def test_a_cancelled_call_does_not_return_its_connection_to_the_pool(
    pg_backend: Backend,
) -> None:
    # One connection only: had the cancelled call's connection gone back to the pool while
    # asyncpg still waited for the server, the next call would fail on it.
    engine = create_async_engine(
        pg_backend.url, pool_size=1, max_overflow=0, **pg_backend.engine_options
    )
    try:
        calls = AsyncpgCalls(engine)
        sleeping = asyncio.create_task(calls.fetch("SELECT pg_sleep(30)", (), writes=False))
        await asyncio.sleep(0.3)
        sleeping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sleeping
        assert await calls.fetch("SELECT $1::int", (1,), writes=False) == [(1,)]
    finally:
        await engine.dispose()


async def test_unversioned_tables_get_the_functions_when_completed(pg_backend: Backend) -> None:
    # Tables created without the migrations (as by an older turnstore): completing and
    # stamping the schema must add the functions the stamped revision includes.
    async with pg_backend.engine.begin() as conn:
        await conn.run_sync(DEFAULT_TABLES.metadata.create_all)
    assert not await function_exists(pg_backend.engine, APPEND_V1)
    session = pg_backend.session(create_tables=True)
    await session.add_items(turn("adopted"))
    assert await function_exists(pg_backend.engine, APPEND_V1)
    assert await migrate.current(pg_backend.engine) == (migrate.head(),)


async def test_a_single_connection_engine_queues_instead_of_sharing_it(
    pg_backend: Backend,
) -> None:
    # A caller's engine with one connection for everything: direct calls would use it from
    # several tasks at once, which asyncpg refuses; such engines keep the queued path.
    engine = create_async_engine(pg_backend.url, poolclass=StaticPool, **pg_backend.engine_options)
    try:
        sessions = [
            AdvancedSession(session_id=f"one-{i}", engine=engine, create_tables=True)
            for i in range(5)
        ]
        await asyncio.gather(*(s.add_items(turn(f"hello {i}")) for i, s in enumerate(sessions)))
        await asyncio.gather(*(s.store_run_usage(run_result()) for s in sessions))
        read = await asyncio.gather(*(s.get_items() for s in sessions))
        assert [items[0]["content"] for items in read] == [f"hello {i}" for i in range(5)]
    finally:
        await engine.dispose()
