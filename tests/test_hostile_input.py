"""Hostile and malformed input: refused with a precise, typed error and nothing changed, or
stored and read back exactly, on every backend."""

from __future__ import annotations

import json
import logging
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from agents.extensions.memory import AdvancedSQLiteSession as SDKSession
from sqlalchemy import event, func, insert, inspect, select

from tests.conftest import Backend
from tests.helpers import assistant, run_result, turn, user
from turnstore import (
    AdvancedSession,
    AdvancedSQLiteSession,
    BranchNotFoundError,
    InvalidArgumentError,
    InvalidItemError,
    TurnNotFoundError,
)
from turnstore.persistence.models import DEFAULT_TABLES


async def snapshot(session: AdvancedSession) -> dict[str, Any]:
    """Everything a caller can read back, timestamps left out."""
    branches = await session.list_branches()
    state: dict[str, Any] = {
        "branches": [{k: v for k, v in b.items() if k != "created_at"} for b in branches],
        "usage": await session.get_session_usage(),
        "current": await session.get_items(),
    }
    for branch in branches:
        name = branch["branch_id"]
        state[name] = (
            await session.get_items(branch_id=name),
            await session.get_turn_usage(branch_id=name),
            await session.get_conversation_by_turns(name),
        )
    return state


async def with_history(backend: Backend) -> AdvancedSession:
    """A session with two turns, usage and a second branch, so a change would show."""
    session = backend.session()
    await session.add_items(turn("first question"))
    await session.store_run_usage(run_result(input_tokens=7, output_tokens=3))
    await session.add_items(turn("second question"))
    await session.create_branch_from_turn(2, "alt")
    await session.add_items(turn("alternative"))
    return session


class Unserializable:
    """Not something json.dumps knows."""


def circular() -> dict[str, Any]:
    item: dict[str, Any] = {"role": "user", "content": "loop"}
    item["self"] = item
    return item


# -- items ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ({"role": "user", "content": {"a", "set"}}, "not JSON serializable"),
        ({"type": "function_call_output", "output": Unserializable()}, "not JSON serializable"),
        ({"role": "user", "content": b"bytes"}, "not JSON serializable"),
        ({"role": "user", "content": "x", ("tuple", "key"): 1}, "not JSON serializable"),
        (circular(), "not JSON serializable"),
        (None, "must be a dict"),
        ("a plain string", "must be a dict"),
        (42, "must be a dict"),
        (["role", "user"], "must be a dict"),
    ],
    ids=["set", "object", "bytes", "tuple-key", "circular", "None", "str", "int", "list"],
)
async def test_a_bad_third_item_refuses_the_whole_batch(
    backend: Backend, bad: Any, fragment: str
) -> None:
    session = await with_history(backend)
    before = await snapshot(session)
    with pytest.raises(InvalidItemError, match=f"Item 2 .*{fragment}") as raised:
        await session.add_items([user("fine"), assistant("also fine"), bad, user("after")])
    assert isinstance(raised.value, TypeError)  # what the SDK's json.dumps would raise
    assert await snapshot(session) == before


@pytest.mark.parametrize("items", ["not a list", {"role": "user", "content": "a dict"}, 7, None])
async def test_items_must_be_a_list(backend: Backend, items: Any) -> None:
    session = await with_history(backend)
    before = await snapshot(session)
    with pytest.raises(InvalidItemError, match="items must be a list"):
        await session.add_items(items)
    assert await snapshot(session) == before


async def test_nan_and_infinity_are_stored_as_json_dumps_writes_them(backend: Backend) -> None:
    # The SDK stores json.dumps(item), which writes NaN and Infinity; reading them back with
    # json.loads gives the same floats. turnstore must accept what the SDK accepts.
    session = backend.session()
    item = {"role": "user", "content": "scores", "values": [math.nan, math.inf, -math.inf]}
    await session.add_items([item])
    [stored] = await session.get_items()
    assert math.isnan(stored["values"][0])
    assert stored["values"][1:] == [math.inf, -math.inf]
    assert json.dumps(stored) == json.dumps(item)


async def test_the_sdk_class_accepts_nan_too(tmp_path: Path) -> None:
    sdk: Any = SDKSession(session_id="nan", db_path=tmp_path / "sdk.db", create_tables=True)
    try:
        await sdk.add_items([{"role": "user", "content": "x", "value": math.nan}])
        [stored] = await sdk.get_items()
        assert math.isnan(stored["value"])
    finally:
        sdk.close()


async def test_a_ten_megabyte_item_round_trips(backend: Backend) -> None:
    # MariaDB's default max_allowed_packet is 16 MiB, so one 10 MiB item fits in a statement.
    text = ("ten megabytes of words, " * 440_000)[:10_000_000] + " 東京🙂 end"
    item = {"role": "user", "content": text}
    session = backend.session()
    await session.add_items([item, assistant("noted")])
    assert await session.get_items() == [item, assistant("noted")]
    assert await session.get_items(limit=2) == [item, assistant("noted")]
    assert [t["turn"] for t in await session.find_turns_by_content("東京🙂 END")] == [1]
    assert await session.pop_item() == assistant("noted")
    assert await session.pop_item() == item


@pytest.mark.parametrize(
    "text",
    ["lone \ud800 high", "lone \udfff low", "nul \x00 inside", "\x00", "\ud83d\x00\ude00"],
    ids=["high-surrogate", "low-surrogate", "nul", "only-nul", "split-pair"],
)
async def test_surrogates_and_nul_round_trip_exactly(backend: Backend, text: str) -> None:
    # json.dumps escapes both (\ud800, \u0000), so the stored text is plain ASCII that every
    # backend's text column holds; json.loads restores the exact string.
    session = backend.session()
    item = {"role": "user", "content": text, "extra": {"k": text}}
    await session.add_items([item])
    assert await session.get_items() == [item]
    [found] = await session.find_turns_by_content(text)
    assert found["full_content"] == text
    assert [t["content"] for t in await session.get_conversation_turns()] == [text]


async def test_emoji_and_cjk_round_trip_and_are_found(backend: Backend) -> None:
    session = backend.session()
    texts = ["東京の天気は", "Ça va? 🙂👍🏽", "한국어 텍스트", "emoji family 👨‍👩‍👧"]
    for text in texts:
        await session.add_items(turn(text))
    assert await session.get_items() == [item for text in texts for item in turn(text)]
    for term, turns in [("東京", [1]), ("🙂", [2]), ("👍🏽", [2]), ("한국어", [3]), ("👩", [4])]:
        found = await session.find_turns_by_content(term)
        assert [t["turn"] for t in found] == turns, term
    branch = await session.create_branch_from_content("🙂", "emoji")
    assert branch == "emoji"
    assert await session.get_items() == turn(texts[0])


# -- branch names ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", " ", "   \t\n"], ids=["empty", "space", "whitespace"])
async def test_blank_branch_names_are_refused(backend: Backend, name: str) -> None:
    session = await with_history(backend)
    before = await snapshot(session)
    with pytest.raises(InvalidArgumentError, match="Branch name cannot be empty"):
        await session.create_branch_from_turn(1, name)
    with pytest.raises(InvalidArgumentError, match="Branch name cannot be empty"):
        await session.create_branch_from_content("first", name)
    with pytest.raises(InvalidArgumentError, match="Branch ID cannot be empty"):
        await session.delete_branch(name)
    with pytest.raises(BranchNotFoundError):
        await session.switch_to_branch(name)
    assert await snapshot(session) == before


async def test_ids_of_the_longest_allowed_length_round_trip(backend: Backend) -> None:
    # The limit counts characters, not bytes: 255 four-byte characters fit everywhere.
    longest = "🙂" * 255
    session = backend.session(longest)
    await session.add_items(turn("stored"))
    assert await session.get_items() == turn("stored")
    assert await session.create_branch_from_turn(1, "b" * 255) == "b" * 255
    await session.add_items(turn("on the long branch"))
    assert await session.get_items(branch_id="b" * 255) == turn("on the long branch")
    await session.switch_to_branch("main")
    await session.delete_branch("b" * 255)
    assert [b["branch_id"] for b in await session.list_branches()] == ["main"]


@pytest.mark.parametrize(
    "name",
    [
        "x'; DROP TABLE agent_messages; --",
        'x"); DELETE FROM message_structure; --',
        "main' OR '1'='1",
        "%",
        "_",
        "back\\slash",
    ],
)
async def test_sql_in_branch_names_is_just_text(backend: Backend, name: str) -> None:
    session = await with_history(backend)
    neighbour = backend.session()
    await neighbour.add_items(turn("someone else's conversation"))

    assert await session.create_branch_from_turn(2, name) == name
    await session.add_items(turn("on the odd branch"))
    await session.switch_to_branch("main")
    await session.switch_to_branch(name)
    expected = [*turn("first question"), *turn("on the odd branch")]
    assert await session.get_items() == expected
    assert await session.get_items(branch_id=name) == expected
    assert name in {b["branch_id"] for b in await session.list_branches()}
    # A LIKE pattern or a quote in the name matches only itself.
    assert await session.get_items(branch_id=name + "x") == []
    await session.switch_to_branch("main")
    await session.delete_branch(name)
    assert {b["branch_id"] for b in await session.list_branches()} == {"main", "alt"}

    async with backend.engine.connect() as conn:
        tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    assert set(DEFAULT_TABLES.names) <= tables
    assert await neighbour.get_items() == turn("someone else's conversation")


# -- turn numbers ----------------------------------------------------------------------------


@pytest.mark.parametrize("number", [0, 99, 2**31 - 1, 2**31, 2**63, 2**64, 10**40])
async def test_turns_that_do_not_exist(backend: Backend, number: int) -> None:
    session = await with_history(backend)
    before = await snapshot(session)
    with pytest.raises(TurnNotFoundError, match=f"Turn {number} does not contain a user message"):
        await session.create_branch_from_turn(number, "never")
    assert await session.get_turn_usage(number) == {}
    assert await snapshot(session) == before
    # The refused name was not reserved.
    assert await session.create_branch_from_turn(1, "never") == "never"


@pytest.mark.parametrize("number", [True, False, 1.0, "1", None, [1]])
async def test_turn_numbers_must_be_ints(backend: Backend, number: Any) -> None:
    session = await with_history(backend)
    before = await snapshot(session)
    with pytest.raises(InvalidArgumentError, match="turn_number must be an int"):
        await session.create_branch_from_turn(number, "never")
    if number is not None:  # None asks get_turn_usage for every turn
        with pytest.raises(InvalidArgumentError, match="user_turn_number must be an int"):
            await session.get_turn_usage(number)
    assert await snapshot(session) == before


@pytest.mark.parametrize("number", [-1, -(2**31), -(2**63) - 1])
async def test_negative_turn_numbers_are_refused(backend: Backend, number: int) -> None:
    session = await with_history(backend)
    before = await snapshot(session)
    with pytest.raises(InvalidArgumentError, match="turn_number must be at least 0"):
        await session.create_branch_from_turn(number, "never")
    with pytest.raises(InvalidArgumentError, match="user_turn_number must be at least 0"):
        await session.get_turn_usage(number)
    assert await snapshot(session) == before


# -- search terms ----------------------------------------------------------------------------


async def test_search_terms_match_literally(backend: Backend) -> None:
    session = backend.session()
    texts = [
        "50% off",  # 1
        "500 items",  # 2
        "snake_case",  # 3
        "snakeXcase",  # 4
        "back\\slash",  # 5
        "it's here",  # 6
        'say "hi"',  # 7
        "backXslash",  # 8
    ]
    for text in texts:
        await session.add_items([user(text)])
    expectations = {
        "50%": [1],
        "%": [1],
        "0%": [1],
        "_": [3],
        "e_c": [3],
        "\\": [5],
        "k\\s": [5],
        "'": [6],
        "it's": [6],
        '"': [7],
        '"hi"': [7],
        "%%": [],
        "\\\\": [],
        "'; --": [],
        "50": [1, 2],
    }
    for term, turns in expectations.items():
        found = [t["turn"] for t in await session.find_turns_by_content(term)]
        assert found == turns, term
    assert await session.create_branch_from_content("e_c", "underscore") == "underscore"
    assert await session.get_items() == [user(text) for text in texts[:2]]


# -- table names -----------------------------------------------------------------------------

BAD_TABLE_NAMES = [
    "agent messages",
    "x; DROP TABLE agent_messages; --",
    'quoted"name',
    "1starts_with_digit",
    "",
    "a" * 64,
    "naïve",
    "message_structure",
]


@pytest.mark.parametrize("argument", ["sessions_table", "messages_table"])
@pytest.mark.parametrize("name", BAD_TABLE_NAMES)
async def test_bad_table_names_are_refused_before_any_sql(
    backend: Backend, argument: str, name: str
) -> None:
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(str(args[2]))

    event.listen(backend.engine.sync_engine, "before_cursor_execute", count)
    try:
        options: dict[str, Any] = {argument: name}
        with pytest.raises(InvalidArgumentError, match=argument):
            AdvancedSession(session_id="t", engine=backend.engine, create_tables=True, **options)
    finally:
        event.remove(backend.engine.sync_engine, "before_cursor_execute", count)
    assert statements == []


async def test_long_table_names_fit_every_database(backend: Backend) -> None:
    # 50 characters is a valid table name everywhere. In the SDK's layout (SQLite, no name
    # limit) its messages index is named idx_<name>_session_id, 65 characters; the servers'
    # layout has no index named after the messages table (the primary key covers it), and
    # SQLAlchemy shortens the constraint names the naming convention builds.
    name = "m" * 50
    session = backend.session(messages_table=name, sessions_table="s" * 50)
    await session.add_items(turn("stored"))
    assert await session.get_items() == turn("stored")
    async with backend.engine.connect() as conn:
        tables = await conn.run_sync(lambda sync_conn: inspect(sync_conn).get_table_names())
    assert name in tables


@pytest.mark.parametrize("name", [*BAD_TABLE_NAMES, None, 42])
def test_bad_table_names_are_refused_without_a_database(tmp_path: Path, name: Any) -> None:
    # Nothing listens at these addresses: reaching a database would fail differently.
    for url in ("postgresql+asyncpg://nobody@127.0.0.1:9/none", "mysql+asyncmy://x@127.0.0.1:9/y"):
        with pytest.raises(InvalidArgumentError, match="messages_table"):
            AdvancedSession(session_id="t", url=url, messages_table=name)
    path = tmp_path / "never.db"
    with pytest.raises(InvalidArgumentError, match="sessions_table"):
        AdvancedSQLiteSession(session_id="t", db_path=path, sessions_table=name)
    assert not path.exists()


# -- corrupt rows ----------------------------------------------------------------------------


async def insert_corrupt_rows(backend: Backend, session_id: str, texts: list[str]) -> None:
    """Append rows with unparsable JSON to a session's main branch, behind the SDK's back."""
    m, s = DEFAULT_TABLES.messages, DEFAULT_TABLES.structure
    async with backend.engine.begin() as conn:
        for text in texts:
            sequence = await conn.scalar(
                select(func.max(s.c.sequence_number)).where(s.c.session_id == session_id)
            )
            result = await conn.execute(insert(m).values(session_id=session_id, message_data=text))
            assert result.inserted_primary_key is not None
            message_id = result.inserted_primary_key[0]
            await conn.execute(
                insert(s).values(
                    session_id=session_id,
                    message_id=message_id,
                    branch_id="main",
                    message_type="user",
                    sequence_number=sequence + 1,
                    user_turn_number=9,
                    branch_turn_number=9,
                )
            )


CORRUPT = ["{not json", "", '{"role": "user", "content": "cut off', "NaN]"]


async def test_corrupt_rows_are_skipped_with_a_warning(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    session = backend.session()
    await session.add_items(turn("good one"))
    await insert_corrupt_rows(backend, session.session_id, CORRUPT)
    await session.add_items(turn("good two"))

    with caplog.at_level(logging.WARNING, logger="turnstore"):
        assert await session.get_items() == [*turn("good one"), *turn("good two")]
    warnings = [r for r in caplog.records if "not valid JSON" in r.getMessage()]
    assert len(warnings) == len(CORRUPT)
    assert all(r.levelno == logging.WARNING for r in warnings)
    # limit counts readable items, reading further back past the corrupt ones.
    assert await session.get_items(limit=3) == [turn("good one")[1], *turn("good two")]
    turns = await session.get_conversation_turns()
    assert [t["full_content"] for t in turns] == ["good one", "good two"]
    assert await session.find_turns_by_content("not") == []
    # pop_item drops corrupt rows on its way to the newest readable item, as the SDK does.
    assert await session.pop_item() == turn("good two")[1]
    assert await session.pop_item() == turn("good two")[0]
    assert await session.pop_item() == turn("good one")[1]
    assert await session.get_items() == [turn("good one")[0]]
    assert await session.list_branches() != []


async def test_corrupt_rows_read_as_the_sdk_reads_them(tmp_path: Path, sqlite_path: Path) -> None:
    """The same corrupt file, read by the SDK's class and by turnstore."""
    # Typed loosely: the SDK types items as its TypedDicts, these tests pass plain dicts.
    sdk: Any = SDKSession(session_id="c", db_path=sqlite_path, create_tables=True)
    await sdk.add_items(turn("good one"))
    sdk.close()
    with sqlite3.connect(sqlite_path) as conn:
        for text in CORRUPT:
            message_id = conn.execute(
                "INSERT INTO agent_messages (session_id, message_data) VALUES ('c', ?)", (text,)
            ).lastrowid
            conn.execute(
                "INSERT INTO message_structure (session_id, message_id, branch_id, message_type,"
                " sequence_number, user_turn_number, branch_turn_number)"
                " SELECT 'c', ?, 'main', 'user', MAX(sequence_number) + 1, 9, 9"
                " FROM message_structure",
                (message_id,),
            )
    sdk = SDKSession(session_id="c", db_path=sqlite_path)
    try:
        await sdk.add_items(turn("good two"))
        expected = {
            "items": await sdk.get_items(),
            "limited": await sdk.get_items(limit=3),
            "turns": [t["turn"] for t in await sdk.get_conversation_turns()],
        }
    finally:
        sdk.close()
    async with AdvancedSQLiteSession(session_id="c", db_path=sqlite_path) as ours:
        assert {
            "items": await ours.get_items(),
            "limited": await ours.get_items(limit=3),
            "turns": [t["turn"] for t in await ours.get_conversation_turns()],
        } == expected
