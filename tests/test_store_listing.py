"""Listing, counting and filtering sessions: order, keyset paging, filters, hostile input."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from tests.conftest import Backend
from tests.helpers import turn
from turnstore import InvalidArgumentError, SessionPage, Store
from turnstore.persistence.models import DEFAULT_TABLES

INFO = DEFAULT_TABLES.info
BASE = datetime(2026, 1, 1, tzinfo=UTC)


def store_on(backend: Backend, **options: Any) -> Store:
    options.setdefault("create_tables", True)
    return Store(engine=backend.engine, **options)


def micros(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


async def set_activity(backend: Backend, session_id: str, moment: datetime) -> None:
    """Move a session's last activity (tests need ties and old sessions)."""
    async with backend.engine.begin() as conn:
        await conn.execute(
            update(INFO)
            .where(INFO.c.session_id == session_id)
            .values(last_activity_us=micros(moment))
        )


async def make_sessions(store: Store, count: int, prefix: str = "s", **info: Any) -> list[str]:
    ids = [f"{prefix}{n:03d}" for n in range(count)]
    for session_id in ids:
        await store.session(session_id, **info).add_items(turn(f"hello from {session_id}"))
    return ids


async def all_pages(store: Store, limit: int, **filters: Any) -> list[SessionPage]:
    pages = []
    cursor = None
    while True:
        page = await store.list_sessions(limit=limit, cursor=cursor, **filters)
        pages.append(page)
        if page.next_cursor is None:
            return pages
        cursor = page.next_cursor


def expected_order(activity: dict[str, datetime]) -> list[str]:
    return [
        session_id
        for session_id, _ in sorted(activity.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
    ]


async def test_pages_follow_activity_then_session_id(backend: Backend) -> None:
    async with store_on(backend) as store:
        ids = await make_sessions(store, 23)
        rng = random.Random(5)
        # Many ties: only 6 distinct times among 23 sessions.
        activity = {sid: BASE + timedelta(seconds=rng.randrange(6)) for sid in ids}
        for session_id, moment in activity.items():
            await set_activity(backend, session_id, moment)
        for limit in (1, 4, 23, 50):
            pages = await all_pages(store, limit)
            listed = [s.session_id for page in pages for s in page.sessions]
            assert listed == expected_order(activity), limit
            assert all(len(page.sessions) == limit for page in pages[:-1])
            assert 1 <= len(pages[-1].sessions) <= limit
        first = (await store.list_sessions(limit=1)).sessions[0]
        assert first.last_activity == max(activity.values())
        assert first.preview == f"hello from {first.session_id}"


async def test_an_empty_store_lists_nothing(backend: Backend) -> None:
    async with store_on(backend) as store:
        assert await store.list_sessions() == SessionPage([], None)
        assert await store.count_sessions() == 0
        assert [s async for s in store.iter_sessions()] == []


async def test_per_user_listing_and_counts(backend: Backend) -> None:
    async with store_on(backend) as store:
        for n in range(12):
            owner = ["alice", "bob", "carol"][n % 3]
            await store.session(f"c{n:02d}", user_id=owner).add_items(turn(f"q{n}"))
        await store.session("nobody's").add_items(turn("q"))
        alice = [s async for s in store.iter_sessions(user_id="alice", page_size=3)]
        assert {s.session_id for s in alice} == {f"c{n:02d}" for n in range(0, 12, 3)}
        assert all(s.user_id == "alice" for s in alice)
        activity = [s.last_activity for s in alice]
        assert activity == sorted(activity, reverse=True)
        assert await store.count_sessions(user_id="alice") == 4
        assert await store.count_sessions() == 13
        assert await store.count_sessions(user_id="Alice") == 0
        assert (await store.list_sessions(user_id="dave")).sessions == []


async def test_activity_window(backend: Backend) -> None:
    async with store_on(backend) as store:
        ids = await make_sessions(store, 6)
        for n, session_id in enumerate(ids):
            await set_activity(backend, session_id, BASE + timedelta(days=n))
        window: dict[str, Any] = {
            "active_after": BASE + timedelta(days=2),
            "active_before": BASE + timedelta(days=5),
        }
        listed = [s.session_id for s in (await store.list_sessions(**window)).sessions]
        assert listed == ["s004", "s003", "s002"]
        assert await store.count_sessions(**window) == 3
        # Naive datetimes are UTC.
        naive: dict[str, Any] = {"active_after": datetime(2026, 1, 5)}
        assert [s.session_id for s in (await store.list_sessions(**naive)).sessions] == [
            "s005",
            "s004",
        ]


METADATA: dict[str, dict[str, Any] | None] = {
    "m-str": {"team": "Red", "n": 1},
    "m-lower": {"team": "red"},
    "m-float": {"n": 1.0, "team": "Red"},
    "m-true": {"n": True, "flag": True},
    "m-null": {"team": None},
    "m-array": {"team": ["Red"], "n": [1]},
    "m-odd-key": {'we"ird.key $[0]': "ü", "team": "Red"},
    "m-none": None,
}


@pytest.mark.parametrize(
    ("wanted", "matches"),
    [
        ({"team": "Red"}, {"m-str", "m-float", "m-odd-key"}),
        ({"team": "red"}, {"m-lower"}),
        ({"n": 1}, {"m-str", "m-float"}),
        ({"n": 1.0}, {"m-str", "m-float"}),
        ({"n": True}, {"m-true"}),
        ({"flag": True}, {"m-true"}),
        ({"flag": False}, set()),
        ({"team": None}, {"m-null"}),
        ({"team": "Red", "n": 1}, {"m-str", "m-float"}),
        ({'we"ird.key $[0]': "ü"}, {"m-odd-key"}),
        ({"absent": "x"}, set()),
        ({}, set(METADATA)),
    ],
)
async def test_metadata_filters_compare_json_values(
    backend: Backend, wanted: dict[str, Any], matches: set[str]
) -> None:
    async with store_on(backend) as store:
        for session_id, metadata in METADATA.items():
            await store.session(session_id, metadata=metadata).add_items(turn("hi"))
        listed = {s.session_id for s in (await store.list_sessions(metadata=wanted)).sessions}
        assert listed == matches
        assert await store.count_sessions(metadata=wanted) == len(matches)


async def test_paging_while_writers_write(backend: Backend) -> None:
    """No session twice; every session nobody wrote exactly once; written ones at most once."""
    async with store_on(backend) as store:
        ids = await make_sessions(store, 40)
        for n, session_id in enumerate(ids):
            await set_activity(backend, session_id, BASE + timedelta(seconds=n % 13))
        written: set[str] = set()
        created: list[str] = []
        rng = random.Random(7)
        stop = asyncio.Event()

        async def writer(number: int) -> None:
            sessions = {sid: store.session(sid) for sid in ids}
            count = 0
            while not stop.is_set():
                if rng.random() < 0.3:
                    new_id = f"new-{number}-{count}"
                    created.append(new_id)
                    await store.session(new_id).add_items(turn("fresh"))
                else:
                    target = rng.choice(ids)
                    written.add(target)  # before the write: it may land at any moment now
                    await sessions[target].add_items(turn(f"again {count}"))
                count += 1
                await asyncio.sleep(0)

        writers = [asyncio.create_task(writer(n)) for n in range(3)]
        seen: Counter[str] = Counter()
        try:
            cursor = None
            pages = 0
            while True:
                page = await store.list_sessions(limit=3, cursor=cursor)
                seen.update(s.session_id for s in page.sessions)
                pages += 1
                await asyncio.sleep(0.01)  # let the writers move sessions between pages
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
        finally:
            stop.set()
            await asyncio.gather(*writers)
        assert pages > 5
        assert written, "the writers wrote nothing during the paging"
        twice = {sid: n for sid, n in seen.items() if n > 1}
        assert twice == {}
        untouched = set(ids) - written
        assert {sid for sid in untouched if seen[sid] != 1} == set()
        assert set(seen) <= set(ids) | set(created)


async def test_a_cursor_survives_a_new_store_object(backend: Backend) -> None:
    async with store_on(backend) as store:
        await make_sessions(store, 5)
        page = await store.list_sessions(limit=2)
    async with Store(engine=backend.engine) as again:
        rest = await again.list_sessions(limit=10, cursor=page.next_cursor)
        assert len(rest.sessions) == 3


# -- hostile input ------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [0, -1, 1001, 10**12, True, 2.5, "10", None])
async def test_bad_limits_are_refused(backend: Backend, limit: Any) -> None:
    async with store_on(backend) as store:
        await make_sessions(store, 2)
        with pytest.raises(InvalidArgumentError, match="limit must be"):
            await store.list_sessions(limit=limit)


async def test_forged_and_foreign_cursors_are_refused(backend: Backend) -> None:
    async with store_on(backend) as store:
        await make_sessions(store, 5)
        for owner in ("alice", "bob"):
            await make_sessions(store, 3, prefix=owner, user_id=owner)
        page = await store.list_sessions(limit=2)
        cursor = page.next_cursor
        assert cursor is not None
        version, payload, mac = cursor.split(".")
        flipped = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1]
        forged = [
            "",
            "garbage",
            "c1.e30.AAAA",
            cursor[:-1],
            cursor + "x",
            f"{version}.{flipped}.{mac}",
            f"c2.{payload}.{mac}",
            f"{version}.{payload}.{payload}",
            "c1." + "A" * 20_000 + ".A",
            "c1.\u00e9\u00e9.\u00e9",
        ]
        for bad in forged:
            with pytest.raises(InvalidArgumentError, match="not a cursor of this store"):
                await store.list_sessions(limit=2, cursor=bad)
        for wrong_type in (b"bytes", 12, ["c1"]):
            with pytest.raises(InvalidArgumentError, match="cursor must be a str"):
                await store.list_sessions(limit=2, cursor=wrong_type)  # type: ignore[arg-type]
        # Another filter, even one that matches the same sessions.
        for other in (
            {"user_id": "alice"},
            {"metadata": {"k": 1}},
            {"active_after": BASE},
            {"active_before": datetime(2100, 1, 1, tzinfo=UTC)},
        ):
            with pytest.raises(InvalidArgumentError, match="another filter"):
                await store.list_sessions(limit=2, cursor=cursor, **other)
        alice = await store.list_sessions(user_id="alice", limit=1)
        assert alice.next_cursor is not None
        with pytest.raises(InvalidArgumentError, match="another filter"):
            await store.list_sessions(user_id="bob", cursor=alice.next_cursor)
        # A store with a key of its own does not take this store's cursors.
        async with Store(engine=backend.engine, cursor_key="secret") as keyed:
            with pytest.raises(InvalidArgumentError, match="not a cursor of this store"):
                await keyed.list_sessions(limit=2, cursor=cursor)
        # Nothing changed, and the genuine cursor still works.
        assert await store.count_sessions() == 11
        rest = await store.list_sessions(limit=100, cursor=cursor)
        assert len(rest.sessions) == 9


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"user_id": 5}, "user_id must be a str"),
        ({"user_id": ""}, "must not be empty"),
        ({"metadata": "team=red"}, "metadata filter must be a dict"),
        ({"metadata": {"team": ["red"]}}, "compare top-level keys"),
        ({"metadata": {"team": {"a": 1}}}, "compare top-level keys"),
        ({"metadata": {1: "x"}}, "keys must be str"),
        ({"metadata": {"x": float("inf")}}, "JSON cannot hold"),
        ({"metadata": {"x": object()}}, "not JSON"),
        ({"user_id": "a\x00"}, "NUL character"),
        ({"metadata": {"k": "\x00"}}, "NUL character"),
        ({"active_after": "2026-01-01"}, "active_after must be a datetime"),
        ({"active_before": 1767225600}, "active_before must be a datetime"),
    ],
)
async def test_bad_filters_are_refused(
    backend: Backend, filters: dict[str, Any], message: str
) -> None:
    async with store_on(backend) as store:
        await make_sessions(store, 1)
        with pytest.raises(InvalidArgumentError, match=message):
            await store.list_sessions(**filters)
        with pytest.raises(InvalidArgumentError, match=message):
            await store.count_sessions(**filters)
        assert await store.count_sessions() == 1
