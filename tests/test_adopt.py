"""``turnstore db adopt``: an SDK AdvancedSQLiteSession database reads back identically."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from agents.extensions.memory import AdvancedSQLiteSession as SDKSession
from sqlalchemy.ext.asyncio import create_async_engine

from tests.helpers import assistant, function_call, function_output, turn, user
from tests.migration_helpers import engine_drift, run_cli, usage_result
from turnstore import AdvancedSQLiteSession
from turnstore.schema import migrate

SESSIONS = ("alpha", "beta")


async def build_sdk_database(path: Path) -> None:
    """Several turns, tool calls, usage and branches, written by the SDK itself."""
    for index, session_id in enumerate(SESSIONS):
        sdk: Any = SDKSession(session_id=session_id, db_path=path, create_tables=True)
        try:
            await sdk.add_items(turn(f"hello {session_id}"))
            await sdk.store_run_usage(usage_result(input_tokens=10 + index, cached_tokens=2))
            await sdk.add_items(
                [
                    user("what is the weather"),
                    function_call("weather", "call_w"),
                    function_output("call_w", "sunny"),
                    function_call("clock", "call_c"),
                    function_output("call_c", "noon"),
                    assistant("sunny at noon"),
                ]
            )
            await sdk.store_run_usage(usage_result(input_tokens=30, output_tokens=9))
            await sdk.add_items(turn("thanks"))
            await sdk.store_run_usage(usage_result())
            await sdk.create_branch_from_turn(2, "retry")
            await sdk.add_items([user("weather again please"), function_call("weather", "c2")])
            await sdk.add_items([function_output("c2", "rain"), assistant("rain")])
            await sdk.store_run_usage(usage_result(input_tokens=50))
            await sdk.switch_to_branch("main")
            await sdk.create_branch_from_turn(3, "side")
        finally:
            sdk.close()


SDK_COSMETIC_DRIFT = {
    ("modify_nullable", "agent_sessions", "session_id"),
    ("modify_nullable", "agent_messages", "id"),
    ("modify_nullable", "message_structure", "id"),
    ("modify_nullable", "turn_usage", "id"),
    ("modify_nullable", "session_clear_generations", "session_id"),
    ("add_constraint", "turn_usage", "session_id,branch_id,user_turn_number"),
}


def describe(diff: Any) -> tuple[str, str, str]:
    if isinstance(diff, list):  # column modifications come wrapped in a list
        (kind, _schema, table, column, *_), *_ = diff
        return (kind, table, column)
    kind, constraint = diff
    return (kind, constraint.table.name, ",".join(c.name for c in constraint.columns))


def strip_times(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "created_at"} for row in rows]


async def snapshot(session: Any) -> dict[str, Any]:
    """Everything the read methods return, for every branch of the session."""
    branches = await session.list_branches()
    result: dict[str, Any] = {
        "branches": strip_times(branches),
        "session_usage": await session.get_session_usage(),
        "turn_usage_all": await session.get_turn_usage(),
        "search": await session.find_turns_by_content("weather"),
    }
    for branch in sorted(row["branch_id"] for row in branches):
        await session.switch_to_branch(branch)
        result[branch] = {
            "items": await session.get_items(),
            "last_two": await session.get_items(limit=2),
            "turns": await session.get_conversation_turns(),
            "by_turns": await session.get_conversation_by_turns(),
            "tools": await session.get_tool_usage(),
            "usage": await session.get_session_usage(branch_id=branch),
            "turn_usage": await session.get_turn_usage(branch_id=branch),
            "turn_1_usage": await session.get_turn_usage(user_turn_number=1, branch_id=branch),
        }
    await session.switch_to_branch("main")
    return result


async def sdk_snapshots(path: Path) -> dict[str, Any]:
    snapshots = {}
    for session_id in SESSIONS:
        sdk = SDKSession(session_id=session_id, db_path=path)
        try:
            snapshots[session_id] = await snapshot(sdk)
        finally:
            sdk.close()
    return snapshots


async def turnstore_snapshots(path: Path) -> dict[str, Any]:
    snapshots = {}
    for session_id in SESSIONS:
        async with AdvancedSQLiteSession(session_id=session_id, db_path=path) as session:
            snapshots[session_id] = await snapshot(session)
    return snapshots


def row_counts(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as conn:
        listed = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        names = [row[0] for row in listed]
        return {name: conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0] for name in names}


@pytest.mark.parametrize("sdk_generation", ["current", "before_bookkeeping_tables"])
async def test_adopted_sdk_database_reads_back_identically(
    sqlite_path: Path, sdk_generation: str
) -> None:
    await build_sdk_database(sqlite_path)
    if sdk_generation == "before_bookkeeping_tables":
        # Older SDK releases had neither bookkeeping table; adoption must create and backfill.
        with sqlite3.connect(sqlite_path) as conn:
            conn.execute("DROP TABLE branch_reservations")
            conn.execute("DROP TABLE session_clear_generations")
    before = await sdk_snapshots(sqlite_path)
    assert before["alpha"]["main"]["tools"], "the fixture should record tool usage"
    counts = row_counts(sqlite_path)

    url = f"sqlite+aiosqlite:///{sqlite_path}"
    adopted = run_cli(["db", "adopt", "--url", url])
    assert adopted.returncode == 0, adopted.stderr
    assert "adopted an Agents SDK database; now at" in adopted.stdout

    after = row_counts(sqlite_path)
    for table, count in counts.items():
        if table not in ("branch_reservations", "sqlite_sequence"):
            assert after[table] == count, table
    with sqlite3.connect(sqlite_path) as conn:
        reserved = set(conn.execute("SELECT session_id, branch_id FROM branch_reservations"))
        used = set(conn.execute("SELECT DISTINCT session_id, branch_id FROM message_structure"))
        indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert used <= reserved
    assert "idx_structure_message_session" in indexes

    assert await turnstore_snapshots(sqlite_path) == before
    assert await migrate.current(url) == (migrate.head(),)
    engine = create_async_engine(url)
    try:
        # Adoption adds, it does not rebuild the SDK's tables, so two cosmetic differences of
        # the SDK's DDL remain: primary-key columns declared without NOT NULL, and an unnamed
        # UNIQUE on turn_usage. Anything else is real drift.
        remaining = {describe(diff) for diff in await engine_drift(engine)}
        assert remaining <= SDK_COSMETIC_DRIFT
    finally:
        await engine.dispose()
    # Adopting twice is harmless; the SDK keeps reading the adopted file too.
    assert run_cli(["db", "adopt", "--url", url]).returncode == 0
    assert await sdk_snapshots(sqlite_path) == before


async def test_create_tables_completes_an_sdk_file_and_stamps_it(sqlite_path: Path) -> None:
    await build_sdk_database(sqlite_path)
    before = await sdk_snapshots(sqlite_path)
    async with AdvancedSQLiteSession(
        session_id="alpha", db_path=sqlite_path, create_tables=True
    ) as session:
        await session.get_items()
    assert await turnstore_snapshots(sqlite_path) == before
    assert await migrate.current(f"sqlite+aiosqlite:///{sqlite_path}") == (migrate.head(),)


async def test_empty_database_is_adopted_by_migrating_it(sqlite_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{sqlite_path}"
    # A file that does not exist is a typo, not an empty database: nothing is created.
    missing = run_cli(["db", "adopt", "--url", url])
    assert missing.returncode == 3, missing.stderr
    assert not await asyncio.to_thread(sqlite_path.exists)
    await asyncio.to_thread(sqlite_path.touch)
    result = run_cli(["db", "adopt", "--url", url])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("adopted an empty database; now at ")
    assert await migrate.current(url) == (migrate.head(),)


async def test_incompatible_store_table_is_refused_untouched(sqlite_path: Path) -> None:
    with sqlite3.connect(sqlite_path) as conn:
        conn.execute("CREATE TABLE agent_sessions (session_id TEXT PRIMARY KEY, owner TEXT)")
    before = row_counts(sqlite_path)
    url = f"sqlite+aiosqlite:///{sqlite_path}"
    for command in ("adopt", "upgrade"):
        result = run_cli(["db", command, "--url", url])
        assert result.returncode == 5, result.stderr
        assert result.stderr.count("\n") == 1
        assert "lacks column(s)" in result.stderr
        assert row_counts(sqlite_path) == before


@pytest.mark.parametrize("command", ["adopt", "upgrade"])
async def test_other_applications_tables_are_left_alone(sqlite_path: Path, command: str) -> None:
    # One rule for adopt and upgrade: turnstore shares a database with other applications
    # (its version table has a name of its own) and never touches their tables.
    with sqlite3.connect(sqlite_path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total INTEGER)")
        conn.execute("INSERT INTO invoices VALUES (1, 42)")
    url = f"sqlite+aiosqlite:///{sqlite_path}"
    result = run_cli(["db", command, "--url", url])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    if command == "adopt":
        assert "adopted an empty database" in result.stdout
        assert "left 1 other table(s) alone: invoices" in result.stdout
    assert await migrate.current(url) == (migrate.head(),)
    with sqlite3.connect(sqlite_path) as conn:
        assert conn.execute("SELECT * FROM invoices").fetchall() == [(1, 42)]
    # Going back to base removes turnstore's tables only.
    down = run_cli(["db", "downgrade", "--revision", "base", "--yes", "--url", url])
    assert down.returncode == 0, down.stderr
    with sqlite3.connect(sqlite_path) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        names = {row[0] for row in rows} - {"sqlite_sequence"}
    assert names == {"invoices", migrate.VERSION_TABLE}
