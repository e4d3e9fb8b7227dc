"""Postgres's one-round-trip appends and usage writes (turnstore.persistence.server_routines).

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
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from tests.conftest import Backend, _postgres_backend
from tests.helpers import function_call, function_output, run_result, turn, user
from tests.read_counters import grow_to, keep_postgres_from_analyzing, reads_by
from turnstore import AdvancedSession, SchemaMissingError, StorageError
from turnstore.persistence import server_routines
from turnstore.persistence.driver_calls import AsyncpgCalls
from turnstore.persistence.models import DEFAULT_TABLES
from turnstore.schema import migrate

# sha256 of each released version of the functions, as migrations 0003, 0004, 0005, 0007 and
# 0008
# create them.
FROZEN_DIGESTS = {
    1: "059f84324a7ac8adc41295dd1b1a781feeed82679fef821b10231e04da93126e",
    2: "8bdde440e1b32e1bcc2f8e17f83245da6a41ac8730963b6a504afe09a78f5977",
    3: "917bbfd6a82cd76408324279adfa6c4302b4538ce3337a8bc06e6424db45a093",
    4: "0d780843948adeecea5eb75111ac563ff8d80ad3eda2dbcca9b9a5f88243f3d9",
    5: "803aa841d14a067e9361d5b377fe9ab26f60ded8e003583aa3da87c1271b19eb",
}
APPEND_ARGUMENTS = "(text, text, integer, text[], text[], boolean[], text[])"
# Version 3 also takes the session info a write creates: owner, title, metadata.
APPEND_V3_ARGUMENTS = "(text, text, integer, text[], text[], boolean[], text[], text, text, text)"
APPEND_V1 = f"turnstore_append_v1{APPEND_ARGUMENTS}"
APPEND_V2 = f"turnstore_append_v2{APPEND_ARGUMENTS}"
APPEND_V3 = f"turnstore_append_v3{APPEND_V3_ARGUMENTS}"
# Version 4 appends as version 3 does (only its usage function takes more).
APPEND_V4 = f"turnstore_append_v4{APPEND_V3_ARGUMENTS}"


def append_arguments(version: int) -> str:
    return APPEND_V3_ARGUMENTS if version >= 3 else APPEND_ARGUMENTS


APPEND_NEWEST = (
    f"turnstore_append_v{server_routines.VERSION}{append_arguments(server_routines.VERSION)}"
)


@pytest.fixture(params=["postgres", "citus"])
def pg_server(request: pytest.FixtureRequest) -> tuple[str, str]:
    """``(name, URL)`` of a Postgres server: a plain one, then a Citus coordinator."""
    name: str = request.param
    return name, request.getfixturevalue(f"{name}_url")


@pytest.fixture
async def pg_backend(pg_server: tuple[str, str]) -> AsyncIterator[Backend]:
    """A Postgres (or Citus) schema of the test's own."""
    name, url = pg_server
    async for ready in _postgres_backend(url, name):
        yield ready


@pytest.fixture
async def second_pg_backend(pg_server: tuple[str, str]) -> AsyncIterator[Backend]:
    """Another schema on the same server, for comparing two stores."""
    name, url = pg_server
    async for ready in _postgres_backend(url, name):
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
    assert await function_exists(pg_backend.engine, APPEND_NEWEST)
    without_functions = await play(second_pg_backend.engine, create_tables=False)

    assert with_functions == without_functions
    assert with_functions["stale_branch"] == "main"
    assert [item["content"] for item in with_functions["after_clear"]["items"][:1]] == [
        "after the clear"
    ]


async def replace_with_refusal(engine: AsyncEngine, signature: str) -> None:
    """Swap an append function for one that raises, to see which one a session calls."""
    async with engine.begin() as conn:
        await conn.exec_driver_sql(f"DROP FUNCTION {signature}")
        await conn.exec_driver_sql(
            f"CREATE FUNCTION {signature} RETURNS TABLE (b text, g integer) LANGUAGE plpgsql "
            "AS $f$ BEGIN RAISE EXCEPTION 'the append function ran'; END $f$"
        )


async def test_sessions_call_the_functions(pg_backend: Backend) -> None:
    session = pg_backend.session()
    await session.add_items(turn("first"))
    # The next append must go through the newest version.
    await replace_with_refusal(pg_backend.engine, APPEND_NEWEST)
    # Database errors come out as StorageError; the database's own error stays attached.
    with pytest.raises(StorageError, match=r"add_items failed .* \[P0001\]") as raised:
        await session.add_items(turn("second"))
    assert "the append function ran" in str(raised.value.original)
    assert [item["content"] for item in await session.get_items()][:1] == ["first"]


async def test_a_database_with_only_version_1_calls_it(
    pg_backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    # A database the previous release migrated (0003): version 1 still serves the new code.
    await migrate.upgrade(pg_backend.engine, "0003")
    assert not await function_exists(pg_backend.engine, APPEND_V2)
    with caplog.at_level(logging.INFO, logger="turnstore"):
        session = pg_backend.session(create_tables=False)
        await session.add_items(turn("first"))
    assert any("Using version 1" in r.getMessage() for r in caplog.records)
    await replace_with_refusal(pg_backend.engine, APPEND_V1)
    # Database errors come out as StorageError; the database's own error stays attached.
    with pytest.raises(StorageError, match=r"add_items failed .* \[P0001\]") as raised:
        await session.add_items(turn("second"))
    assert "the append function ran" in str(raised.value.original)


async def test_a_database_before_the_turn_models_table_calls_version_3(
    pg_backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    # Migrated to 0005 (the store) but not 0007: no model table, no version 4. Usage is stored
    # through version 3 without models; the SDK's usage reads are unchanged.
    await migrate.upgrade(pg_backend.engine, "0005")
    assert not await function_exists(pg_backend.engine, APPEND_V4)
    with caplog.at_level(logging.INFO, logger="turnstore"):
        session = pg_backend.session(create_tables=False)
        await session.add_items(turn("first"))
        await session.store_run_usage(run_result(), model="gpt-4o")
        await session.create_branch_from_turn(1, "side")
    messages = [r.getMessage() for r in caplog.records]
    assert any("Using version 3" in message for message in messages)
    assert any("turnstore_turn_models" in message for message in messages)
    assert (await session.get_session_usage() or {})["total_turns"] == 1
    assert await session.get_turn_models(branch_id="main") == {}
    if pg_backend.name == "citus":
        # A coordinator's tables holding rows are distributed only when asked to.
        await migrate.distribute(pg_backend.engine)
    else:
        await migrate.upgrade(pg_backend.engine)
    # A process started after the upgrade (an engine of its own) records them.
    engine = pg_backend.new_engine()
    try:
        fresh = AdvancedSession(session_id=session.session_id, engine=engine)
        await fresh.store_run_usage(run_result(), model="gpt-4o")
        models = await fresh.get_turn_models(branch_id="main")
        assert [m["model"] for m in models[1]] == ["gpt-4o"]
        await fresh.aclose()
    finally:
        await engine.dispose()


async def test_a_database_before_the_info_table_calls_version_2(
    pg_backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    # Migrated by the previous release (0004): no info table, no version 3. Sessions work
    # through version 2; only the features that need the info table refuse.
    await migrate.upgrade(pg_backend.engine, "0004")
    assert not await function_exists(pg_backend.engine, APPEND_V3)
    with caplog.at_level(logging.INFO, logger="turnstore"):
        session = pg_backend.session(create_tables=False)
        await session.add_items(turn("first"))
        await session.store_run_usage(run_result())
    assert any("Using version 2" in r.getMessage() for r in caplog.records)
    assert (await session.get_session_usage() or {})["total_turns"] == 1
    with pytest.raises(SchemaMissingError, match="turnstore_session_info"):
        await session.get_info()
    owned = pg_backend.session(session.session_id, create_tables=False, user_id="alice")
    with pytest.raises(SchemaMissingError, match="migration 0005"):
        await owned.add_items(turn("not stored"))
    assert len(await session.get_items()) == 2
    await replace_with_refusal(pg_backend.engine, APPEND_V2)
    # Database errors come out as StorageError; the database's own error stays attached.
    with pytest.raises(StorageError, match=r"add_items failed .* \[P0001\]") as raised:
        await session.add_items(turn("second"))
    assert "the append function ran" in str(raised.value.original)


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

    # Upgrading adds them; a new engine (a restarted process) finds and uses them. On a
    # Citus coordinator, where moving the rows into shards is a step of its own, only the
    # versions that run on distributed tables are kept.
    older = pg_backend.name != "citus"
    if older:
        await migrate.upgrade(pg_backend.engine)
    else:
        await migrate.distribute(pg_backend.engine)
    assert await function_exists(pg_backend.engine, APPEND_V1) == older
    assert await function_exists(pg_backend.engine, APPEND_V2) == older
    assert await function_exists(pg_backend.engine, APPEND_NEWEST)
    engine = pg_backend.new_engine()
    try:
        restarted = AdvancedSession(session_id=session.session_id, engine=engine)
        await restarted.add_items(turn("after upgrading"))
        assert len(await restarted.get_items()) == 4
        await restarted.aclose()
    finally:
        await engine.dispose()


async def test_custom_tables_get_functions_of_their_own(pg_backend: Backend) -> None:
    session = pg_backend.session(sessions_table="my_sessions", messages_table="my_messages")
    await session.add_items(turn("custom"))
    await session.store_run_usage(run_result())
    for version in server_routines.VERSIONS:
        routines = server_routines.routines_for(
            "my_sessions", "my_messages", default=False, version=version
        )
        assert routines.append_name != f"turnstore_append_v{version}"
        signature = f"{routines.append_name}{append_arguments(version)}"
        # A Citus coordinator keeps only the versions that run on distributed tables.
        kept = pg_backend.name != "citus" or routines.distributable
        assert await function_exists(pg_backend.engine, signature) == kept
    assert not await function_exists(pg_backend.engine, APPEND_V1)
    assert not await function_exists(pg_backend.engine, APPEND_V2)
    assert not await function_exists(pg_backend.engine, APPEND_V3)
    assert (await session.get_session_usage() or {})["total_turns"] == 1


@pytest.mark.parametrize("version", server_routines.VERSIONS)
def test_released_function_definitions_are_frozen(version: int) -> None:
    # Migrations 0003, 0004, 0005 and 0007 create the versions from routine_ddl: editing one
    # would change what an applied migration means. A change belongs in a new version and a
    # new revision.
    routines = server_routines.routines_for(
        "agent_sessions", "agent_messages", default=True, version=version
    )
    ddl = "\n".join(server_routines.routine_ddl(routines, **DEFAULT_TABLES.routine_tables))
    assert hashlib.sha256(ddl.encode()).hexdigest() == FROZEN_DIGESTS[version]
    assert set(FROZEN_DIGESTS) == set(server_routines.VERSIONS)


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
    # A Citus coordinator keeps only the versions that run on distributed tables.
    older = pg_backend.name != "citus"
    assert await function_exists(pg_backend.engine, APPEND_V1) == older
    assert await function_exists(pg_backend.engine, APPEND_V2) == older
    assert await function_exists(pg_backend.engine, APPEND_NEWEST)
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


async def test_the_functions_read_the_same_at_any_history_length(pg_backend: Backend) -> None:
    # Version 1 read the counters with max(), which Postgres without statistics may run as an
    # aggregate over the whole branch: an append cost more the longer the history was.
    session = pg_backend.session()
    await session.add_items(turn("first"))
    await keep_postgres_from_analyzing(pg_backend)
    routines = server_routines.routines_for("agent_sessions", "agent_messages", default=True)
    arguments = {"session": session.session_id, "data": ['{"role": "user", "content": "next"}']}

    async def append_and_store_usage(conn: AsyncConnection) -> None:
        await conn.execute(
            text(
                f"SELECT * FROM {routines.append_name}(:session, 'main', 0, "
                "CAST(:data AS text[]), ARRAY['user'], ARRAY[true], ARRAY[NULL::text], "
                "NULL, NULL, NULL)"
            ),
            arguments,
        )
        await conn.execute(
            text(
                f"SELECT {routines.usage_name}(:session, 'main', 0, 1, 10, 5, 15, NULL, NULL, "
                "NULL, NULL, NULL, ARRAY['gpt-4o'], ARRAY[1], ARRAY[10], ARRAY[0], ARRAY[5], "
                "ARRAY[0], ARRAY[15])"
            ),
            {"session": session.session_id},
        )

    await grow_to(session, 20)
    small = await reads_by(pg_backend, append_and_store_usage)
    await grow_to(session, 300)
    assert await reads_by(pg_backend, append_and_store_usage) == small
