"""The SDK Session protocol: get/add/pop/clear, limits, turn numbering, bad input, closing."""

from __future__ import annotations

import math
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.conftest import Backend
from tests.helpers import assistant, function_call, function_output, turn, user
from turnstore import (
    InvalidArgumentError,
    InvalidItemError,
    SessionClosedError,
    SessionSettings,
)
from turnstore.persistence.models import DEFAULT_TABLES


async def count_rows(backend: Backend, table: Any) -> int:
    async with backend.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(table)) or 0)


async def test_items_round_trip_in_order(backend: Backend) -> None:
    session = backend.session()
    items = [*turn("hello"), function_call("lookup"), function_output(), assistant("done")]
    await session.add_items(items[:2])
    await session.add_items(items[2:])
    assert await session.get_items() == items


async def test_unicode_round_trips_exactly(backend: Backend) -> None:
    session = backend.session()
    text = 'naïve 東京 🚀 "quoted" back\\slash %_ \u0000 nul'
    await session.add_items([user(text)])
    assert await session.get_items() == [user(text)]


async def test_limit_returns_newest_items_oldest_first(backend: Backend) -> None:
    session = backend.session()
    items = [user(f"m{i}") for i in range(6)]
    await session.add_items(items)
    assert await session.get_items(limit=2) == items[-2:]
    assert await session.get_items(limit=100) == items
    assert await session.get_items(limit=0) == []


async def test_session_settings_limit_is_the_default(backend: Backend) -> None:
    session = backend.session(session_settings={"limit": 3})
    items = [user(f"m{i}") for i in range(5)]
    await session.add_items(items)
    assert await session.get_items() == items[-3:]
    assert await session.get_items(limit=1) == items[-1:]
    assert session.session_settings.limit == 3


async def test_fallback_session_settings_type_is_honoured(backend: Backend) -> None:
    session = backend.session(session_settings=SessionSettings(limit=1))
    await session.add_items([user("a"), user("b")])
    assert await session.get_items() == [user("b")]


async def test_runner_batches_without_user_message_join_the_current_turn(
    backend: Backend,
) -> None:
    session = backend.session()
    await session.add_items([user("first")])
    await session.add_items([function_call("lookup"), function_output()])
    await session.add_items([assistant("answer")])
    await session.add_items([user("second")])
    await session.add_items([assistant("answer 2")])
    by_turn = await session.get_conversation_by_turns()
    assert {t: [i["type"] for i in items] for t, items in by_turn.items()} == {
        1: ["user", "function_call", "function_call_output", "assistant"],
        2: ["user", "assistant"],
    }


async def test_one_batch_with_several_user_messages_opens_several_turns(
    backend: Backend,
) -> None:
    session = backend.session()
    await session.add_items([user("a"), assistant("x"), user("b"), assistant("y")])
    turns = await session.get_conversation_turns()
    assert [(t["turn"], t["content"]) for t in turns] == [(1, "a"), (2, "b")]


async def test_items_before_any_user_message_are_turn_zero(backend: Backend) -> None:
    session = backend.session()
    await session.add_items([assistant("greeting")])
    await session.add_items(turn("hi"))
    by_turn = await session.get_conversation_by_turns()
    assert sorted(by_turn) == [0, 1]


async def test_pop_returns_newest_and_removes_it(backend: Backend) -> None:
    session = backend.session()
    await session.add_items(turn("one"))
    popped = await session.pop_item()
    assert popped == turn("one")[1]
    assert await session.get_items() == [user("one")]
    assert await session.pop_item() == user("one")
    assert await session.pop_item() is None
    assert await count_rows(backend, DEFAULT_TABLES.messages) == 0
    assert await count_rows(backend, DEFAULT_TABLES.structure) == 0


async def test_pop_on_unknown_session_is_none_and_creates_nothing(backend: Backend) -> None:
    session = backend.session()
    assert await session.pop_item() is None
    assert await count_rows(backend, DEFAULT_TABLES.sessions) == 0


async def test_clear_session_removes_everything_of_that_session_only(backend: Backend) -> None:
    kept, cleared = backend.session(), backend.session()
    await kept.add_items(turn("keep me"))
    await cleared.add_items(turn("drop me"))
    await cleared.create_branch_from_turn(1, "alt")
    await cleared.add_items(turn("on alt"))
    await cleared.clear_session()
    assert await cleared.get_items() == []
    assert await cleared.list_branches() == []
    assert await kept.get_items() == turn("keep me")
    assert await count_rows(backend, DEFAULT_TABLES.messages) == 2
    # After a clear the session starts over on main.
    await cleared.add_items(turn("again"))
    assert (await cleared.list_branches())[0]["branch_id"] == "main"
    assert (await cleared.get_conversation_turns())[0]["turn"] == 1


@pytest.mark.parametrize(
    ("bad_item", "message"),
    [
        ({"role": "user", "content": object()}, "Item 1 is not JSON serializable"),
        ({"role": "user", "content": math.nan, "x": {1, 2}}, "Item 1 is not JSON serializable"),
        ("just a string", "Item 1 must be a dict"),
        (None, "Item 1 must be a dict"),
    ],
)
async def test_bad_items_raise_and_store_nothing_of_the_batch(
    backend: Backend, bad_item: Any, message: str
) -> None:
    session = backend.session()
    await session.add_items(turn("existing"))
    with pytest.raises(InvalidItemError, match=message) as raised:
        await session.add_items([user("fine"), bad_item, user("also fine")])
    assert isinstance(raised.value, TypeError)
    assert await session.get_items() == turn("existing")


async def test_items_must_be_a_list(backend: Backend) -> None:
    session = backend.session()
    with pytest.raises(InvalidItemError, match="must be a list"):
        await session.add_items(user("not wrapped"))  # type: ignore[arg-type]


async def test_empty_batch_is_a_no_op(backend: Backend) -> None:
    session = backend.session()
    assert await session.get_items() == []
    await session.add_items([])
    assert await count_rows(backend, DEFAULT_TABLES.sessions) == 0


async def test_limit_must_be_an_int(backend: Backend) -> None:
    session = backend.session()
    with pytest.raises(InvalidArgumentError, match="limit must be an int"):
        await session.get_items(limit="3")  # type: ignore[arg-type]


async def test_closed_session_refuses_every_call(backend: Backend) -> None:
    session = backend.session()
    await session.add_items(turn("hi"))
    session.close()
    for call in (
        session.add_items([user("x")]),
        session.add_items([]),
        session.get_items(),
        session.pop_item(),
        session.clear_session(),
        session.list_branches(),
    ):
        with pytest.raises(SessionClosedError) as raised:
            await call
        assert isinstance(raised.value, RuntimeError)
    session.close()  # closing twice is harmless


async def test_async_context_manager_closes(backend: Backend) -> None:
    async with backend.session() as session:
        await session.add_items(turn("hi"))
    with pytest.raises(SessionClosedError):
        await session.get_items()


async def test_sessions_are_isolated_by_id(backend: Backend) -> None:
    a, b = backend.session("same-prefix"), backend.session("same-prefix-2")
    await a.add_items(turn("for a"))
    await b.add_items(turn("for b"))
    assert await a.get_items() == turn("for a")
    assert await b.get_items() == turn("for b")


async def test_second_instance_continues_the_conversation(backend: Backend) -> None:
    first = backend.session("shared")
    await first.add_items(turn("one"))
    second = backend.session("shared")
    await second.add_items(turn("two"))
    assert await first.get_items() == [*turn("one"), *turn("two")]
    assert [t["turn"] for t in await first.get_conversation_turns()] == [1, 2]


async def test_iter_items_streams_every_branch_item_page_by_page(backend: Backend) -> None:
    async with backend.session("streamed") as session:
        for n in range(7):
            await session.add_items(turn(f"turn {n}"))
        await session.create_branch_from_turn(3, "side")
        await session.add_items(turn("side only"))
        await session.switch_to_branch("main")
        # Main's later items are numbered after the side branch's: a gap to page across.
        await session.add_items(turn("main again"))
        for batch_size in (1, 3, 4, 500):
            for branch in ("main", "side"):
                streamed = [
                    item async for item in session.iter_items(branch, batch_size=batch_size)
                ]
                assert streamed == await session.get_items(branch_id=branch)
            current = [item async for item in session.iter_items(batch_size=batch_size)]
            assert current == await session.get_items()
        assert len(current) == 16
        assert [item async for item in session.iter_items("no-such-branch")] == []


@pytest.mark.parametrize("batch_size", [0, -1, True, 2.5, "10"])
async def test_iter_items_rejects_bad_batch_sizes(backend: Backend, batch_size: Any) -> None:
    async with backend.session("bad-batch") as session:
        await session.add_items(turn("kept"))
        with pytest.raises(InvalidArgumentError, match="batch_size must be a positive int"):
            async for _ in session.iter_items(batch_size=batch_size):
                pass
        assert await session.get_items() == turn("kept")
