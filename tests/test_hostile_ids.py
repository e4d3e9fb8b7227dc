"""Hostile ids, branch names, numbers and table names: exact isolation or a clean refusal.

Every case runs on SQLite, Postgres and MariaDB/MySQL and expects one outcome on all of them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import event

from tests.conftest import Backend
from tests.helpers import run_result, turn, user
from tests.hostile_support import row_counts, snapshot, unchanged, with_history
from turnstore import (
    AdvancedSession,
    AdvancedSQLiteSession,
    BranchNotFoundError,
    InvalidArgumentError,
    TableSetConflictError,
    TurnNotFoundError,
)

# Ids that no backend stores exactly: refused everywhere, before any statement.
BAD_IDS = {
    "256 characters": "s" * 256,
    "a megabyte": "m" * 1_000_000,
    "NUL": "user\x0042",
    "only NUL": "\x00",
    "lone high surrogate": "user-\ud800",
    "lone low surrogate": "\udfff",
    "swapped pair": "\ude00\ud83d",
}
NOT_TEXT: list[Any] = [42, None, b"user-42", ["user-42"]]

# Ids a collation or a careless comparison could take for "user-42": all distinct sessions.
LOOKALIKES = [
    "user-42 ",
    "user-42  ",
    " user-42",
    "user-42\t",
    "user-42\n",
    "USER-42",
    "User-42",
    "user-42\u00a0",
    "user-42\u200b",
    "\uff55ser-42",  # fullwidth u
    "user\u201042",
    "usér-42",
    "use\u0301r-42",
]


class StatementCounter:
    """Counts statements sent through an engine."""

    def __init__(self, backend: Backend) -> None:
        self.engine = backend.engine.sync_engine
        self.statements: list[str] = []

    def _count(self, *args: Any) -> None:
        self.statements.append(str(args[2]))

    def __enter__(self) -> StatementCounter:
        event.listen(self.engine, "before_cursor_execute", self._count)
        return self

    def __exit__(self, *exc_info: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._count)


# -- session ids -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", [*BAD_IDS.values(), *NOT_TEXT], ids=[*BAD_IDS, "int", "None", "bytes", "list"]
)
async def test_bad_session_ids_are_refused_at_construction(backend: Backend, bad: Any) -> None:
    await with_history(backend, "bystander")
    counts = await row_counts(backend)
    with (
        StatementCounter(backend) as counter,
        pytest.raises(InvalidArgumentError, match="session_id"),
    ):
        AdvancedSession(session_id=bad, engine=backend.engine, create_tables=True)
    assert counter.statements == []
    assert await row_counts(backend) == counts


@pytest.mark.parametrize("bad", BAD_IDS.values(), ids=BAD_IDS.keys())
def test_the_drop_in_refuses_them_too(tmp_path: Any, bad: str) -> None:
    path = tmp_path / "never.db"
    with pytest.raises(InvalidArgumentError, match="session_id"):
        AdvancedSQLiteSession(session_id=bad, db_path=path)
    assert not path.exists()


@pytest.mark.parametrize("lookalike", LOOKALIKES)
async def test_lookalike_session_ids_are_separate_sessions(
    backend: Backend, lookalike: str
) -> None:
    victim = await with_history(backend, "user-42")
    attacker = backend.session(lookalike)
    async with unchanged(backend, victim):
        assert await attacker.get_items() == []
        assert await attacker.list_branches() == []
        assert await attacker.get_session_usage() is None
        assert await attacker.pop_item() is None
        with pytest.raises(BranchNotFoundError):
            await attacker.switch_to_branch("alt")
    # What the look-alike writes is its own.
    await attacker.add_items(turn("mine"))
    await attacker.store_run_usage(run_result(input_tokens=100))
    assert await attacker.get_items() == turn("mine")
    assert (await attacker.get_session_usage() or {})["input_tokens"] == 100
    victim_view = await snapshot(victim)
    await attacker.clear_session()
    await attacker.clear_session()
    assert await snapshot(victim) == victim_view
    assert victim_view["usage"]["input_tokens"] == 8
    await attacker.clear_session()
    assert await snapshot(victim) == victim_view
    assert await backend.session(lookalike).get_items() == []


@pytest.mark.parametrize(
    "name", ["main ", " main", "Main", "MAIN", "main\t", "alt ", "\uff41lt", "alt\u200b"]
)
async def test_lookalike_branch_names_are_separate_branches(backend: Backend, name: str) -> None:
    session = await with_history(backend)
    before = await snapshot(session)
    assert await session.create_branch_from_turn(2, name) == name
    await session.add_items(turn("on the look-alike"))
    assert await session.get_items(branch_id=name) == [
        *turn("first question"),
        *turn("on the look-alike"),
    ]
    after = await snapshot(session)
    for branch in ("main", "alt"):
        assert after[f"branch {branch}"] == before[f"branch {branch}"]
    await session.switch_to_branch("main")
    await session.delete_branch(name)
    assert {b["branch_id"] for b in await session.list_branches()} == {"main", "alt"}
    assert await snapshot(session) == before


# -- branch ids ------------------------------------------------------------------------------

BRANCH_ID_READS: dict[str, Callable[[AdvancedSession, Any], Awaitable[Any]]] = {
    "get_items": lambda s, b: s.get_items(branch_id=b),
    "get_session_usage": lambda s, b: s.get_session_usage(b),
    "get_turn_usage": lambda s, b: s.get_turn_usage(branch_id=b),
    "get_conversation_turns": lambda s, b: s.get_conversation_turns(b),
    "find_turns_by_content": lambda s, b: s.find_turns_by_content("question", b),
    "get_conversation_by_turns": lambda s, b: s.get_conversation_by_turns(b),
    "get_tool_usage": lambda s, b: s.get_tool_usage(b),
    "iter_items": lambda s, b: _drain(s.iter_items(b)),
    "switch_to_branch": lambda s, b: s.switch_to_branch(b),
    "delete_branch": lambda s, b: s.delete_branch(b, force=True),
    "create_branch_from_turn": lambda s, b: s.create_branch_from_turn(1, b),
    "create_branch_from_content": lambda s, b: s.create_branch_from_content("first", b),
}


async def _drain(items: Any) -> list[Any]:
    return [item async for item in items]


@pytest.mark.parametrize("bad", [*BAD_IDS.values(), 7, b"main"], ids=[*BAD_IDS, "int", "bytes"])
async def test_bad_branch_ids_are_refused_by_every_method(backend: Backend, bad: Any) -> None:
    session = await with_history(backend)
    async with unchanged(backend, session):
        for name, call in BRANCH_ID_READS.items():
            with pytest.raises(InvalidArgumentError, match=r"branch_id|branch_name"):
                await call(session, bad)
            assert session._pointer.branch_id == "main", name


async def test_an_idempotency_key_follows_the_id_rules(backend: Backend) -> None:
    session = await with_history(backend)
    async with unchanged(backend, session):
        bad_keys: list[Any] = [*BAD_IDS.values(), 7]
        for bad in bad_keys:
            with pytest.raises(InvalidArgumentError, match="idempotency_key"):
                await session.add_items(turn("never"), idempotency_key=bad)


# -- numbers ---------------------------------------------------------------------------------

HUGE = [2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**40]


@pytest.mark.parametrize("limit", HUGE)
async def test_huge_limits_mean_everything(backend: Backend, limit: int) -> None:
    session = await with_history(backend)
    everything = await session.get_items()
    async with unchanged(backend, session):
        assert await session.get_items(limit=limit) == everything
        assert await session.get_items(limit=limit, branch_id="alt") == await session.get_items(
            branch_id="alt"
        )
        assert [item async for item in session.iter_items(batch_size=limit)] == everything
    settings_session = backend.session(session.session_id, session_settings={"limit": limit})
    assert await settings_session.get_items() == everything


@pytest.mark.parametrize("limit", [True, False, 1.5, "3", [1]])
async def test_limits_must_be_ints(backend: Backend, limit: Any) -> None:
    session = await with_history(backend)
    async with unchanged(backend, session):
        with pytest.raises(InvalidArgumentError, match="limit must be an int"):
            await session.get_items(limit=limit)
        with pytest.raises(InvalidArgumentError, match="batch_size must be a positive int"):
            await _drain(session.iter_items(batch_size=limit))


@pytest.mark.parametrize("limit", [-1, -(2**63), -(10**40)])
async def test_negative_limits_mean_everything_as_in_the_sdk(backend: Backend, limit: int) -> None:
    session = await with_history(backend)
    assert await session.get_items(limit=limit) == await session.get_items()


@pytest.mark.parametrize("number", HUGE)
async def test_huge_turn_numbers_name_no_turn(backend: Backend, number: int) -> None:
    session = await with_history(backend)
    async with unchanged(backend, session):
        with pytest.raises(TurnNotFoundError, match=f"Turn {number} does not contain"):
            await session.create_branch_from_turn(number, "never")
        assert await session.get_turn_usage(number) == {}
        assert await session.get_turn_usage(number, branch_id="alt") == {}


@pytest.mark.parametrize("size", [0, -1, True, 1.0])
async def test_max_item_bytes_must_be_a_positive_int(backend: Backend, size: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="max_item_bytes"):
        backend.session(max_item_bytes=size)


# -- table sets ------------------------------------------------------------------------------

CUSTOM = {"sessions_table": "MySessions", "messages_table": "order"}


@pytest.mark.parametrize("first_custom", [False, True], ids=["default first", "custom first"])
async def test_a_second_table_set_in_one_database_is_refused(
    backend: Backend, first_custom: bool
) -> None:
    first_options: dict[str, Any] = CUSTOM if first_custom else {}
    second_options: dict[str, Any] = {} if first_custom else CUSTOM
    first = backend.session("owner", **first_options)
    await first.add_items(turn("first set"))
    await first.store_run_usage(run_result())
    await first.create_branch_from_turn(1, "alt")
    for create_tables in (True, False):
        second = backend.session("owner", create_tables=create_tables, **second_options)
        async with unchanged(backend, first):
            with pytest.raises(TableSetConflictError, match="give this pair its own"):
                await second.add_items(turn("second set"))
            with pytest.raises(TableSetConflictError):
                await second.get_items()
            with pytest.raises(TableSetConflictError):
                await second.clear_session()


@pytest.mark.parametrize(
    "names",
    [
        {"sessions_table": "MySessions", "messages_table": "MyMessages"},
        {"sessions_table": "order", "messages_table": "user"},
        {"sessions_table": "select", "messages_table": "Group"},
    ],
    ids=["mixed case", "reserved", "reserved mixed"],
)
async def test_custom_names_that_need_quoting_work_everywhere(
    backend: Backend, names: dict[str, Any]
) -> None:
    session = backend.session("quoted", **names)
    await session.add_items([user("hello"), *turn("x", "hi")[1:]])
    await session.store_run_usage(run_result(input_tokens=3))
    await session.add_items(turn("again"))
    assert await session.create_branch_from_turn(2, "b") == "b"
    await session.add_items(turn("on b"))
    state = await snapshot(session)
    assert state["branch main"]["items"][0] == user("hello")
    assert state["usage"]["input_tokens"] == 3
    assert await session.pop_item() == turn("on b")[1]
    await session.switch_to_branch("main")
    await session.delete_branch("b")
    await session.clear_session()
    assert await session.get_items() == []
    # A new engine (another process) finds the tables and, on Postgres, the functions.
    engine = backend.new_engine()
    other = AdvancedSession(session_id="quoted", engine=engine, **names)
    try:
        await other.add_items(turn("from elsewhere"))
        assert await session.get_items() == turn("from elsewhere")
    finally:
        await other.aclose()
        await engine.dispose()


@pytest.mark.parametrize(
    ("argument", "name"),
    [
        ("messages_table", "Message_Structure"),
        ("sessions_table", "TURN_USAGE"),
        ("messages_table", "Agent_Sessions"),
    ],
)
def test_names_that_fold_onto_another_table_are_refused(argument: str, name: Any) -> None:
    with pytest.raises(InvalidArgumentError, match=rf"{argument}|must differ"):
        AdvancedSession(session_id="t", url="sqlite+aiosqlite:///:memory:", **{argument: name})
