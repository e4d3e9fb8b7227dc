"""turnstore on a Citus cluster: what is distributed, what runs on one shard, conversions.

The whole Postgres suite also runs on Citus through the ``backend`` fixture (``citus``); these
tests check what only a cluster has: the catalog's record of distribution, the plans of the
per-turn statements, ``migrate.distribute`` / ``turnstore db distribute`` on a database that
holds data, and the refusals on a server without the extension.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tests.conftest import Backend, _postgres_backend, role_with_settings
from tests.helpers import function_call, function_output, run_result, turn, user
from tests.migration_helpers import run_cli
from turnstore import AdvancedSession, Store
from turnstore.errors import DistributionError
from turnstore.persistence import server_routines
from turnstore.persistence.dialects import profile_for
from turnstore.persistence.models import DEFAULT_SERVER_TABLES
from turnstore.persistence.statements import _statements
from turnstore.schema import migrate

# The revision before the server keys: tables Citus cannot distribute yet.
BEFORE_KEYS = next(
    str(info.down_revision)
    for info in migrate.history()
    if info.revision == migrate.SERVER_KEYS_REVISION
)


@pytest.fixture
async def citus(citus_url: str) -> AsyncIterator[Backend]:
    """A schema of the test's own on the Citus coordinator."""
    async for ready in _postgres_backend(citus_url, "citus"):
        yield ready


@pytest.fixture
async def plain_postgres(postgres_url: str) -> AsyncIterator[Backend]:
    """A schema on a Postgres server without the Citus extension."""
    async for ready in _postgres_backend(postgres_url):
        yield ready


async def distribution(engine: AsyncEngine) -> dict[str, tuple[str, str | None, int]]:
    """``{table: (method, distribution column, co-location group)}`` of the test's schema."""
    async with engine.connect() as conn:
        rows = await conn.exec_driver_sql(
            "SELECT c.relname, p.partmethod::text, "
            "CASE WHEN p.partmethod = 'h' "
            "THEN column_to_column_name(p.logicalrelid, p.partkey) END, p.colocationid "
            "FROM pg_dist_partition AS p JOIN pg_class AS c ON c.oid = p.logicalrelid "
            "WHERE c.relnamespace = current_schema()::regnamespace"
        )
        found: list[Any] = list(rows.all())
        return {str(r[0]): (str(r[1]), r[2], int(r[3])) for r in found}


async def distributed_functions(engine: AsyncEngine) -> dict[str, int]:
    """Distributed functions of the test's schema and the index of their distribution argument."""
    async with engine.connect() as conn:
        rows = await conn.exec_driver_sql(
            "SELECT p.proname, o.distribution_argument_index "
            "FROM pg_dist_object AS o JOIN pg_proc AS p ON p.oid = o.objid "
            "WHERE o.classid = 'pg_proc'::regclass "
            "AND p.pronamespace = current_schema()::regnamespace "
            "AND o.distribution_argument_index IS NOT NULL"
        )
        found: list[Any] = list(rows.all())
        return {str(r[0]): int(r[1]) for r in found}


async def assert_store_distributed(engine: AsyncEngine) -> None:
    """Every table of the models hash-distributed by session_id in one co-location group."""
    found = await distribution(engine)
    store = {table.name for table in DEFAULT_SERVER_TABLES.metadata.sorted_tables}
    assert store <= set(found), store - set(found)
    assert {found[name][:2] for name in store} == {("h", "session_id")}
    assert len({found[name][2] for name in store}) == 1
    assert found[migrate.VERSION_TABLE][0] == "n"  # a reference table
    newest = server_routines.routines_for(
        "agent_sessions", "agent_messages", default=True, version=server_routines.VERSION
    )
    functions = await distributed_functions(engine)
    assert functions == {newest.append_name: 0, newest.usage_name: 0}


async def conversation(session: AdvancedSession) -> None:
    """Two branches, tool calls, usage: something of every kind a session stores."""
    await session.add_items([*turn("hello"), function_call("lookup"), function_output()])
    await session.store_run_usage(run_result(input_tokens=11))
    await session.add_items(turn("and the weather?"))
    await session.store_run_usage(run_result(input_tokens=13, cached_tokens=2))
    await session.create_branch_from_turn(2, "side")
    await session.add_items(turn("on the side"))
    await session.store_run_usage(run_result(input_tokens=17))
    await session.switch_to_branch("main")


async def every_read(session: AdvancedSession) -> dict[str, Any]:
    """What every read method answers, for comparing a store before and after a change."""
    branches = await session.list_branches()
    by_branch: dict[str, Any] = {}
    for branch in branches:
        name = branch["branch_id"]
        by_branch[name] = {
            "items": await session.get_items(branch_id=name),
            "latest": await session.get_items(limit=2, branch_id=name),
            "streamed": [item async for item in session.iter_items(name, batch_size=2)],
            "usage": await session.get_session_usage(branch_id=name),
            "turn_usage": await session.get_turn_usage(branch_id=name),
            "turns": await session.get_conversation_turns(branch_id=name),
            "by_turns": await session.get_conversation_by_turns(branch_id=name),
            "tools": await session.get_tool_usage(branch_id=name),
        }
    info = await session.get_info()
    return {
        "branches": [{k: v for k, v in b.items() if k != "created_at"} for b in branches],
        "by_branch": by_branch,
        "session_usage": await session.get_session_usage(),
        "found": await session.find_turns_by_content("weather"),
        "info": None
        if info is None
        else (info.session_id, info.title, info.user_turns, info.items, info.total_tokens),
    }


async def test_sessions_create_the_store_distributed(citus: Backend) -> None:
    session = citus.session(create_tables=True)
    await conversation(session)
    await assert_store_distributed(citus.engine)
    assert len(await session.get_items()) == 6


async def test_upgrade_distributes_and_is_idempotent(citus: Backend) -> None:
    await migrate.upgrade(citus.engine, require_citus=True)
    await assert_store_distributed(citus.engine)
    before = await distribution(citus.engine)
    moved = await migrate.upgrade(citus.engine, require_citus=True)
    assert not moved.changed
    report = await migrate.distribute(citus.engine)
    assert not report.changed
    assert await distribution(citus.engine) == before


async def test_custom_table_sets_are_distributed_too(citus: Backend) -> None:
    session = citus.session(sessions_table="my_sessions", messages_table="my_messages")
    await conversation(session)
    found = await distribution(citus.engine)
    custom = {"my_sessions", "my_messages", "message_structure", "turn_usage"}
    assert custom <= set(found)
    assert {found[name][:2] for name in custom} == {("h", "session_id")}
    assert len(await session.list_branches()) == 2


async def test_distribute_converts_a_store_holding_data(citus: Backend) -> None:
    # A store written on the coordinator before turnstore distributed (its tables local).
    await migrate.upgrade(citus.engine, BEFORE_KEYS)
    sessions = [citus.session(f"before-{n}", create_tables=False) for n in range(3)]
    for session in sessions:
        await conversation(session)
    await sessions[0].set_info(title="first", user_id="ana")
    expected = [await every_read(session) for session in sessions]
    assert await distribution(citus.engine) == {}

    # Upgrading alone never moves data.
    with pytest.raises(DistributionError, match="turnstore db distribute"):
        await migrate.upgrade(citus.engine)
    assert await migrate.current(citus.engine) == (BEFORE_KEYS,)

    report = await migrate.distribute(citus.engine)
    assert set(report.moved_data) >= {"agent_sessions", "agent_messages", "message_structure"}
    await assert_store_distributed(citus.engine)
    assert await migrate.current(citus.engine) == (migrate.head(),)
    reopened = [citus.session(f"before-{n}", create_tables=False) for n in range(3)]
    assert [await every_read(session) for session in reopened] == expected
    listed = await Store(engine=citus.engine).get_session_info("before-0")
    assert listed is not None
    assert listed.title == "first"

    # The coordinator keeps no copy of the moved rows; the shards hold them.
    async with citus.engine.connect() as conn:
        local = await conn.exec_driver_sql(
            "SELECT count(*) FROM pg_class c WHERE c.relnamespace = current_schema()::regnamespace "
            "AND c.relkind = 'r' AND pg_relation_size(c.oid) > 0 "
            "AND c.relname = ANY(ARRAY['agent_messages', 'message_structure'])"
        )
        assert local.scalar() == 0

    # Idempotent, and the store keeps working: new turns run on the workers. (A process
    # that started before, holding the dropped functions' names, must be restarted.)
    assert not (await migrate.distribute(citus.engine)).changed
    engine = citus.new_engine()
    try:
        restarted = AdvancedSession(session_id="before-0", engine=engine)
        await restarted.add_items(turn("after distributing"))
        await restarted.store_run_usage(run_result())
        assert (await restarted.get_items())[-2:] == turn("after distributing")
        await restarted.aclose()
    finally:
        await engine.dispose()


async def test_turn_path_statements_run_on_one_shard(citus: Backend) -> None:
    session = citus.session(create_tables=True)
    await conversation(session)
    tables = DEFAULT_SERVER_TABLES
    routines = server_routines.routines_for(
        tables.sessions.name, tables.messages.name, default=True
    )
    history = _statements(tables, profile_for("postgresql")).latest
    plan = history.driver_plan(citus.engine.dialect)
    assert plan is not None
    sid = session.session_id
    statements = {
        "history": (plan.sql, plan.positional({"sid": sid, "bid": "main", "limit": 20})),
        "append": (
            routines.append_call,
            (
                *server_routines.append_arguments(sid, "main", 0, [("{}", "user", True, None)]),
                None,
                None,
                None,
            ),
        ),
        "usage": (
            routines.usage_call,
            (
                *(sid, "main", 0, 1, 2, 3, 5, None, None, None, None, None),
                # The models that served the turn (version 4 on): names, then six counts.
                *(["gpt-4o"], *(server_routines.count_array([1]) for _ in range(6))),
            )[: routines.usage_call.count("$")],
        ),
    }
    raw = await citus.engine.raw_connection()
    try:
        driver = raw.driver_connection
        assert driver is not None
        for name, (sql, arguments) in statements.items():
            # Outside a transaction block, as turnstore runs them.
            lines = [row[0] for row in await driver.fetch(f"EXPLAIN {sql}", *arguments)]
            assert lines[0].startswith("Custom Scan (Citus Adaptive)"), (name, lines)
            assert "Task Count: 1" in [line.strip() for line in lines], (name, lines)
            worker = next(line for line in lines if "Node: host=" in line)
            assert "port=9700" not in worker, (name, lines)  # a worker, not the coordinator
    finally:
        raw.close()


async def test_ids_need_not_grow_for_branch_order(citus: Backend) -> None:
    # Appends run on a worker (ids from its range), the first structure rows of a fork are
    # copied by a coordinator statement: branch order must come from the data, not ids.
    session = citus.session(create_tables=True)
    await session.add_items([user("one")])
    await session.add_items([user("two")])
    for name in ("b", "a", "c"):
        await session.create_branch_from_turn(2, name)
        await session.switch_to_branch("main")
    assert [b["branch_id"] for b in await session.list_branches()] == ["main", "b", "a", "c"]


async def test_refused_without_the_extension(plain_postgres: Backend) -> None:
    with pytest.raises(DistributionError, match="does not have the Citus extension"):
        await migrate.distribute(plain_postgres.engine)
    with pytest.raises(DistributionError, match="does not have the Citus extension"):
        await migrate.upgrade(plain_postgres.engine, require_citus=True)
    assert await migrate.current(plain_postgres.engine) == ()


@pytest.fixture
async def citus_role_url(citus: Backend, citus_url: str) -> AsyncIterator[str]:
    """A URL on the coordinator whose role's default schema is the test's (for the CLI).

    The command line takes a URL only; the role's own ``search_path`` points it at the
    test's schema. Roles propagate to the workers.
    """
    async with citus.engine.connect() as conn:
        schema = await conn.scalar(text("SELECT current_schema()"))
    async with role_with_settings(citus_url, {"search_path": schema}) as url:
        yield url


async def test_cli_distribute_and_upgrade(citus_role_url: str, postgres_url: str) -> None:
    engine = create_async_engine(citus_role_url)
    try:
        await migrate.upgrade(engine, BEFORE_KEYS)
        session = AdvancedSession(session_id="cli", engine=engine)
        await conversation(session)
        expected = await every_read(session)
        await session.aclose()
    finally:
        await engine.dispose()

    refused = run_cli(["db", "upgrade", "--url", citus_role_url])
    assert refused.returncode == 5, refused.stderr
    assert "turnstore db distribute" in refused.stderr

    done = run_cli(["db", "distribute", "--url", citus_role_url])
    assert done.returncode == 0, done.stderr
    assert "distributed" in done.stdout
    assert "moving the rows" in done.stdout
    again = run_cli(["db", "distribute", "--url", citus_role_url, "--json"])
    assert again.returncode == 0, again.stderr
    assert '"changed": false' in again.stdout
    assert run_cli(["db", "upgrade", "--citus", "--url", citus_role_url]).returncode == 0

    engine = create_async_engine(citus_role_url)
    try:
        await assert_store_distributed(engine)
        session = AdvancedSession(session_id="cli", engine=engine)
        assert await every_read(session) == expected
        await session.aclose()
    finally:
        await engine.dispose()

    # A plain Postgres server: both refuse before changing anything, in one line, code 5.
    for args in (["db", "distribute"], ["db", "upgrade", "--citus"]):
        result = run_cli([*args, "--url", postgres_url])
        assert result.returncode == 5, result.stderr
        assert "does not have the Citus extension" in result.stderr
        assert result.stdout == ""


async def test_delegated_calls_see_their_schema(citus: Backend) -> None:
    # A worker runs a delegated call in a connection of its own, whose search_path is not
    # the caller's: the functions must still find the tables of the schema they live in.
    session = citus.session(create_tables=True)
    await session.add_items(turn("in a schema of its own"))
    async with citus.engine.connect() as conn:
        config = await conn.execute(
            text(
                "SELECT p.proconfig FROM pg_proc p WHERE p.proname = :name "
                "AND p.pronamespace = current_schema()::regnamespace"
            ),
            {"name": f"turnstore_append_v{server_routines.VERSION}"},
        )
        schema = await conn.scalar(text("SELECT current_schema()"))
    assert f"search_path={schema}" in config.scalar_one()
    assert await session.get_items() == turn("in a schema of its own")
