"""AdvancedSQLiteSession as a drop-in for the SDK's class: same answers, same files."""

from __future__ import annotations

import inspect
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from agents.extensions.memory import AdvancedSQLiteSession as SDKSession

from tests.helpers import assistant, function_call, function_output, run_result, turn, user
from turnstore import (
    AdvancedSQLiteSession,
    InvalidArgumentError,
    SchemaMissingError,
)

Script = Callable[[Any], Awaitable[None]]


async def conversation(session: Any) -> None:
    """Turns, tools, usage, branches, a pop and a delete: most of the API's writes."""
    await session.add_items([user("What's the status of ORD-123?")])
    await session.add_items([function_call("check_order", "c1"), function_output("c1")])
    await session.add_items([assistant("Shipped.")])
    await session.store_run_usage(run_result(requests=2, input_tokens=30, output_tokens=12))
    await session.add_items(turn("When will it arrive? 100% sure?"))
    await session.store_run_usage(run_result(input_tokens=15, output_tokens=4, cached_tokens=2))
    await session.add_items(turn("Change the address"))
    await session.store_run_usage(run_result(input_tokens=9, output_tokens=9))
    await session.create_branch_from_turn(2, "alt")
    await session.add_items([user("Cancel it"), function_call("cancel", "c2")])
    await session.store_run_usage(run_result(input_tokens=8, output_tokens=1))
    await session.create_branch_from_content("cancel", "addr")
    await session.add_items(turn("New address is 1 Main St"))
    await session.pop_item()
    await session.switch_to_branch("main")
    await session.add_items(turn("Thanks"))


async def read_everything(session: Any) -> dict[str, Any]:
    """Every read method's answer, timestamps left out (they differ run to run)."""

    def untimed(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
        return [{k: v for k, v in row.items() if k != key} for row in rows]

    result: dict[str, Any] = {}
    branches = await session.list_branches()
    # Branches created within one second tie on created_at; the SDK leaves their order open.
    result["branches"] = sorted(untimed(branches, "created_at"), key=lambda b: b["branch_id"])
    result["session_usage"] = await session.get_session_usage()
    result["main_usage"] = await session.get_session_usage("main")
    for branch in sorted(b["branch_id"] for b in branches):
        result[f"{branch}.items"] = await session.get_items(branch_id=branch)
        result[f"{branch}.items3"] = await session.get_items(limit=3, branch_id=branch)
        result[f"{branch}.turns"] = untimed(
            await session.get_conversation_turns(branch), "timestamp"
        )
        result[f"{branch}.by_turns"] = await session.get_conversation_by_turns(branch)
        result[f"{branch}.tools"] = await session.get_tool_usage(branch)
        result[f"{branch}.turn_usage"] = await session.get_turn_usage(branch_id=branch)
        result[f"{branch}.turn1"] = await session.get_turn_usage(1, branch_id=branch)
        for term in ("ORD", "100%", "address", "zzz"):
            result[f"{branch}.find.{term}"] = untimed(
                await session.find_turns_by_content(term, branch), "timestamp"
            )
    result["current.items"] = await session.get_items()
    return result


async def test_same_answers_as_the_sdk_class(tmp_path: Path, sqlite_path: Path) -> None:
    sdk = SDKSession(session_id="c", db_path=tmp_path / "sdk.db", create_tables=True)
    ours = AdvancedSQLiteSession(session_id="c", db_path=sqlite_path, create_tables=True)
    try:
        await conversation(sdk)
        await conversation(ours)
        assert await read_everything(ours) == await read_everything(sdk)
    finally:
        sdk.close()
        await ours.aclose()


async def test_opens_and_continues_a_file_written_by_the_sdk(sqlite_path: Path) -> None:
    sdk = SDKSession(session_id="c", db_path=sqlite_path, create_tables=True)
    await conversation(sdk)
    before = await read_everything(sdk)
    sdk.close()

    async with AdvancedSQLiteSession(session_id="c", db_path=sqlite_path) as ours:
        assert await read_everything(ours) == before
        await ours.add_items(turn("Written by turnstore"))
        await ours.store_run_usage(run_result(input_tokens=1, output_tokens=1))
        after = await read_everything(ours)

    # And the SDK reads what turnstore wrote.
    sdk_again = SDKSession(session_id="c", db_path=sqlite_path)
    try:
        assert await read_everything(sdk_again) == after
    finally:
        sdk_again.close()


async def test_create_tables_on_sdk_file_adds_only_what_is_missing(sqlite_path: Path) -> None:
    sdk = SDKSession(session_id="c", db_path=sqlite_path, create_tables=True)
    await conversation(sdk)
    before = await read_everything(sdk)
    sdk.close()
    async with AdvancedSQLiteSession(
        session_id="c", db_path=sqlite_path, create_tables=True
    ) as ours:
        assert await read_everything(ours) == before
    with sqlite3.connect(sqlite_path) as conn:
        indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "idx_structure_message_session" in indexes


def test_constructor_matches_the_sdk() -> None:
    ours = inspect.signature(AdvancedSQLiteSession.__init__).parameters
    theirs = inspect.signature(SDKSession.__init__).parameters
    for name in ("session_id", "db_path", "create_tables", "logger", "session_settings"):
        assert ours[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert ours[name].default == theirs[name].default
    assert ours["sessions_table"].default == "agent_sessions"
    assert ours["messages_table"].default == "agent_messages"
    with pytest.raises(TypeError):
        AdvancedSQLiteSession("positional")  # type: ignore[call-arg]


async def test_in_memory_sessions_are_private_databases() -> None:
    first = AdvancedSQLiteSession(session_id="same", create_tables=True)
    second = AdvancedSQLiteSession(session_id="same", create_tables=True)
    try:
        await first.add_items(turn("only in first"))
        assert await second.get_items() == []
        assert await first.get_items() == turn("only in first")
    finally:
        await first.aclose()
        await second.aclose()


async def test_path_objects_and_relative_paths(tmp_path: Path, sqlite_path: Path) -> None:
    async with AdvancedSQLiteSession(
        session_id="p", db_path=sqlite_path, create_tables=True
    ) as session:
        await session.add_items(turn("hi"))
        assert session.db_path == sqlite_path
    async with AdvancedSQLiteSession(session_id="p", db_path=str(sqlite_path)) as again:
        assert await again.get_items() == turn("hi")


async def test_custom_table_names(sqlite_path: Path) -> None:
    async with AdvancedSQLiteSession(
        session_id="t",
        db_path=sqlite_path,
        create_tables=True,
        sessions_table="my_sessions",
        messages_table="my_messages",
    ) as session:
        await session.add_items(turn("hi"))
        await session.create_branch_from_turn(1, "b")
        assert await session.get_items(branch_id="main") == turn("hi")
    with sqlite3.connect(sqlite_path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"my_sessions", "my_messages", "message_structure"} <= tables
    assert "agent_messages" not in tables


@pytest.mark.parametrize(
    "name", ["agent messages", "x;DROP TABLE y", "1abc", "", "a" * 64, "message_structure"]
)
def test_table_names_must_be_plain_identifiers(name: str) -> None:
    with pytest.raises(InvalidArgumentError):
        AdvancedSQLiteSession(session_id="t", messages_table=name)


async def test_missing_tables_without_create_tables(sqlite_path: Path) -> None:
    async with AdvancedSQLiteSession(session_id="t", db_path=sqlite_path) as session:
        with pytest.raises(SchemaMissingError, match="create_tables=True") as raised:
            await session.get_items()
        assert isinstance(raised.value, ValueError)
    with sqlite3.connect(sqlite_path) as conn:
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)


async def test_file_uses_wal_and_enforces_foreign_keys(sqlite_path: Path) -> None:
    async with AdvancedSQLiteSession(
        session_id="t", db_path=sqlite_path, create_tables=True
    ) as session:
        await session.add_items(turn("hi"))
    with sqlite3.connect(sqlite_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    async with AdvancedSQLiteSession(session_id="t", db_path=sqlite_path) as session:
        store = await session._store()
        pragma = await store._handle.read(
            lambda conn: conn.exec_driver_sql("PRAGMA foreign_keys").scalar()
        )
        assert pragma == 1
