"""Session info: owner, title and metadata given to a session or set later, and the summary."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import Backend
from tests.helpers import run_result, turn
from turnstore import (
    AdvancedSession,
    AdvancedSQLiteSession,
    InvalidArgumentError,
    SessionSummary,
    Store,
)


def store_on(backend: Backend, **options: Any) -> Store:
    options.setdefault("create_tables", True)
    return Store(engine=backend.engine, **options)


async def test_constructor_keywords_become_the_info_of_a_new_session(backend: Backend) -> None:
    async with store_on(backend) as store:
        session = store.session("chat-1", user_id="alice", title="Trip", metadata={"p": 1})
        assert await store.get_session_info("chat-1") is None
        before = datetime.now(UTC) - timedelta(seconds=5)
        await session.add_items(turn("Plan a trip to Lisbon", "Sure"))
        info = await store.get_session_info("chat-1")
        assert isinstance(info, SessionSummary)
        assert (info.session_id, info.user_id, info.title, info.metadata) == (
            "chat-1",
            "alice",
            "Trip",
            {"p": 1},
        )
        assert (info.items, info.user_turns, info.branches, info.total_tokens) == (2, 1, 1, 0)
        assert info.preview == "Plan a trip to Lisbon"
        assert before <= info.created_at <= info.last_activity <= datetime.now(UTC)
        assert info == await session.get_info()


async def test_an_existing_sessions_info_is_not_overwritten_by_keywords(backend: Backend) -> None:
    async with store_on(backend) as store:
        await store.session("c", user_id="alice", title="Mine").add_items(turn("hi"))
        other = store.session("c", user_id="mallory", title="Taken", metadata={"x": 1})
        await other.add_items(turn("more"))
        info = await store.get_session_info("c")
        assert info is not None
        assert (info.user_id, info.title, info.metadata, info.user_turns) == (
            "alice",
            "Mine",
            {},
            2,
        )


async def test_set_info_changes_only_what_it_is_given(backend: Backend) -> None:
    async with store_on(backend) as store:
        session = store.session("c", user_id="alice", title="Old", metadata={"a": 1})
        await session.add_items(turn("hi"))
        first = await session.get_info()
        assert first is not None
        await session.set_info(title="New")
        await session.set_info(metadata={"b": [1, 2, {"c": None}]})
        info = await session.get_info()
        assert info is not None
        assert (info.user_id, info.title, info.metadata) == (
            "alice",
            "New",
            {"b": [1, 2, {"c": None}]},
        )
        # Info is not conversation activity.
        assert info.last_activity == first.last_activity
        await session.set_info(user_id=None, title=None, metadata=None)
        cleared = await session.get_info()
        assert cleared is not None
        assert (cleared.user_id, cleared.title, cleared.metadata) == (None, None, {})


async def test_set_info_before_any_item_lists_an_empty_session(backend: Backend) -> None:
    async with store_on(backend) as store:
        session = store.session("new-chat")
        await session.set_info(user_id="bob", title="New chat")
        info = await store.get_session_info("new-chat")
        assert info is not None
        assert (info.user_id, info.title, info.items, info.preview) == ("bob", "New chat", 0, None)
        assert await session.get_items() == []


async def test_every_write_moves_the_last_activity_forward(backend: Backend) -> None:
    async with store_on(backend) as store:
        session = store.session("c")
        seen: list[datetime] = []

        async def activity() -> datetime:
            info = await session.get_info()
            assert info is not None
            return info.last_activity

        await session.add_items(turn("one", "reply"))
        seen.append(await activity())
        for write in (
            lambda: session.store_run_usage(run_result()),
            lambda: session.add_items(turn("two")),
            lambda: session.create_branch_from_turn(2, "fork"),
            lambda: session.delete_branch("fork", force=True),
            session.pop_item,
            session.clear_session,
        ):
            await asyncio.sleep(0.002)
            await write()
            seen.append(await activity())
        assert all(later > earlier for earlier, later in itertools.pairwise(seen)), seen


async def test_summary_counts_main_branches_and_tokens(backend: Backend) -> None:
    async with store_on(backend) as store:
        session = store.session("c")
        await session.add_items(turn("first question", "answer"))
        await session.store_run_usage(run_result())
        await session.add_items(turn("second question", "answer"))
        await session.store_run_usage(run_result())
        await session.create_branch_from_turn(2, "alt")
        await session.add_items(turn("on the branch"))
        info = await store.get_session_info("c")
        assert info is not None
        usage = await session.get_session_usage()
        assert usage is not None
        assert (info.items, info.user_turns, info.branches) == (4, 2, 2)
        assert info.total_tokens == usage["total_tokens"] > 0
        assert info.preview == "first question"


async def test_clear_keeps_the_info_and_empties_the_summary(backend: Backend) -> None:
    async with store_on(backend) as store:
        session = store.session("c", user_id="alice", title="Keep me")
        await session.add_items(turn("hello"))
        await session.clear_session()
        info = await store.get_session_info("c")
        assert info is not None
        assert (info.user_id, info.title, info.items, info.branches, info.preview) == (
            "alice",
            "Keep me",
            0,
            0,
            None,
        )


async def test_long_previews_are_cut(backend: Backend) -> None:
    async with store_on(backend) as store:
        session = store.session("c")
        await session.add_items([{"role": "user", "content": "x" * 500}])
        info = await store.get_session_info("c")
        assert info is not None
        assert info.preview == "x" * 100 + "..."


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"user_id": 7}, "user_id must be a str"),
        ({"user_id": ""}, "must not be empty"),
        ({"title": b"bytes"}, "title must be a str"),
        ({"title": "t" * 1001}, "at most 1000"),
        ({"metadata": ["not", "a", "dict"]}, "metadata must be a dict"),
        ({"metadata": {1: "int key"}}, "JSON keys are str"),
        ({"metadata": {"when": datetime(2026, 1, 1)}}, "not JSON"),
        ({"metadata": {"x": float("nan")}}, "JSON cannot hold"),
        ({"metadata": {"big": 2**70}}, "beyond 64 bits"),
        ({"metadata": {"blob": "x" * 70_000}}, "at most 65536"),
        ({"user_id": "ali\x00ce"}, "NUL character"),
        ({"title": "lone \ud800"}, "unpaired surrogate"),
        ({"metadata": {"k": "nul \x00"}}, "NUL character"),
        ({"metadata": {"k\x00": 1}}, "a key of metadata"),
        ({"metadata": {"k": ["\udfff"]}}, "unpaired surrogate"),
    ],
)
async def test_bad_info_is_refused_before_anything_is_stored(
    backend: Backend, keywords: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        AdvancedSession(session_id="c", engine=backend.engine, **keywords)
    async with store_on(backend) as store:
        session = store.session("c", title="Good")
        await session.add_items(turn("hi"))
        with pytest.raises(InvalidArgumentError, match=message):
            await session.set_info(**keywords)
        info = await session.get_info()
        assert info is not None
        assert (info.user_id, info.title, info.metadata) == (None, "Good", {})


async def test_user_ids_are_identities(backend: Backend) -> None:
    async with store_on(backend) as store:
        for user in ("Alice", "alice", " alice", "alicé"):
            await store.session(f"s-{user}", user_id=user).add_items(turn("hi"))
        owners = {
            (await store.get_session_info(f"s-{user}")).user_id  # type: ignore[union-attr]
            for user in ("Alice", "alice", " alice", "alicé")
        }
        assert owners == {"Alice", "alice", " alice", "alicé"}


async def test_too_long_user_id_is_refused_on_every_backend(backend: Backend) -> None:
    # Ids are at most 255 characters everywhere (MariaDB's id columns hold no more).
    async with store_on(backend) as store:
        session = store.session("c", user_id="u" * 300)
        with pytest.raises(InvalidArgumentError, match="User ids must be at most 255"):
            await session.add_items(turn("hi"))
        assert await store.get_session_info("c") is None
        with pytest.raises(InvalidArgumentError, match="at most 255"):
            await store.list_sessions(user_id="u" * 300)


async def test_too_long_user_id_is_refused_where_the_column_is_bounded(backend: Backend) -> None:
    # Ids follow one rule on every backend (README "Ids, names and limits"): 255 characters.
    async with store_on(backend) as store:
        session = store.session("c", user_id="u" * 256)
        with pytest.raises(InvalidArgumentError, match="User ids must be at most 255"):
            await session.add_items(turn("hi"))
        assert await store.get_session_info("c") is None
        fitting = store.session("c", user_id="u" * 255)
        await fitting.add_items(turn("hi"))
        info = await store.get_session_info("c")
        assert info is not None
        assert info.user_id == "u" * 255


async def test_the_drop_in_class_takes_the_keywords(sqlite_path: Any) -> None:
    session = AdvancedSQLiteSession(
        session_id="c", db_path=sqlite_path, create_tables=True, user_id="alice", title="T"
    )
    await session.add_items(turn("hi"))
    info = await session.get_info()
    assert info is not None
    assert (info.user_id, info.title) == ("alice", "T")
    from_url = AdvancedSession.from_url(
        session_id="d", url=f"sqlite+aiosqlite:///{sqlite_path}", metadata={"k": "v"}
    )
    await from_url.add_items(turn("hi"))
    other = await from_url.get_info()
    assert other is not None
    assert other.metadata == {"k": "v"}
    await session.aclose()
    await from_url.aclose()
