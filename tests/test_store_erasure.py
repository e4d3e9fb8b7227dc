"""Deleting a session, erasing a user, expiring old sessions: whole sessions, in batches."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from scripts.stress import integrity_problems, process_context
from sqlalchemy import func, select, update

from tests.conftest import Backend
from tests.helpers import run_result, turn
from tests.prune_worker import prune_until_killed
from turnstore import InvalidArgumentError, Removed, Store
from turnstore.persistence.models import DEFAULT_TABLES

T = DEFAULT_TABLES
# Every table that holds rows of a session: deleting a session must empty each of them.
TABLES = tuple(table for table in T.metadata.sorted_tables if "session_id" in table.c)
OLD = datetime(2020, 1, 1, tzinfo=UTC)
MARKER = re.compile(r"\[(\d+)\]")


def store_on(backend: Backend, **options: Any) -> Store:
    options.setdefault("create_tables", True)
    return Store(engine=backend.engine, **options)


def micros(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


async def age(backend: Backend, session_ids: list[str], moment: datetime = OLD) -> None:
    async with backend.engine.begin() as conn:
        await conn.execute(
            update(T.info)
            .where(T.info.c.session_id.in_(session_ids))
            .values(last_activity_us=micros(moment))
        )


async def rows_of(backend: Backend, session_id: str) -> dict[str, int]:
    """Rows per table of one session (tables without rows left out)."""
    found = {}
    async with backend.engine.connect() as conn:
        for table in TABLES:
            count = await conn.scalar(select(func.count()).where(table.c.session_id == session_id))
            if count:
                found[table.name] = int(count)
    return found


def assert_batched(totals: list[int], *, most: int, total: int) -> None:
    """Progress totals of batches of at most ``most`` sessions (fewer on a slow machine)."""
    steps = [b - a for a, b in zip([0, *totals], totals, strict=False)]
    assert all(1 <= step <= most for step in steps), totals
    assert totals[-1] == total
    assert len(totals) >= -(-total // most)


async def rich_session(store: Store, session_id: str, **info: Any) -> None:
    """A session with every kind of row: branches, usage, a reservation, a clear generation."""
    session = store.session(session_id, **info)
    await session.add_items(turn("to be cleared"))
    await session.clear_session()
    for n in range(3):
        await session.add_items(turn(f"question {n}"))
        await session.store_run_usage(run_result())
    await session.create_branch_from_turn(2, "alt")
    await session.add_items(turn("on alt"), idempotency_key="retry-safe-1")
    await session.store_run_usage(run_result())


async def test_delete_session_removes_every_row_of_it(backend: Backend) -> None:
    async with store_on(backend) as store:
        await rich_session(store, "doomed", user_id="alice", title="Bye")
        await rich_session(store, "kept", user_id="alice")
        before = await rows_of(backend, "doomed")
        assert set(before) == {table.name for table in TABLES}
        kept = await rows_of(backend, "kept")
        removed = await store.delete_session("doomed")
        assert removed == Removed(
            sessions=1, items=before["agent_messages"], usage_rows=before["turn_usage"]
        )
        assert await rows_of(backend, "doomed") == {}
        assert await store.get_session_info("doomed") is None
        assert await rows_of(backend, "kept") == kept
        assert await store.delete_session("doomed") == Removed()
        assert await store.delete_session("never existed") == Removed()
        # The id can be used again, from scratch.
        again = store.session("doomed")
        await again.add_items(turn("hello again"))
        info = await store.get_session_info("doomed")
        assert info is not None
        assert (info.user_id, info.items, info.branches) == (None, 2, 1)


async def test_delete_session_takes_sessions_without_info_and_info_without_items(
    backend: Backend,
) -> None:
    async with store_on(backend) as store:
        await store.session("untracked").add_items(turn("hi"))
        async with backend.engine.begin() as conn:
            await conn.execute(T.info.delete().where(T.info.c.session_id == "untracked"))
        assert (await store.delete_session("untracked")).sessions == 1
        await store.session("titled").set_info(title="Nothing yet")
        assert (await store.delete_session("titled")).sessions == 1
        assert await rows_of(backend, "untracked") == {}
        assert await rows_of(backend, "titled") == {}


async def test_erase_user_removes_that_users_sessions_in_batches(backend: Backend) -> None:
    async with store_on(backend) as store:
        for n in range(7):
            await rich_session(store, f"alice-{n}", user_id="alice")
        for n in range(3):
            await rich_session(store, f"bob-{n}", user_id="bob")
        await rich_session(store, "anonymous")
        preview = await store.erase_user("alice", dry_run=True)
        assert preview.sessions == 7
        assert await store.count_sessions(user_id="alice") == 7
        reports: list[Removed] = []
        removed = await store.erase_user("alice", batch_size=3, progress=reports.append)
        assert removed == preview
        assert_batched([r.sessions for r in reports], most=3, total=7)
        assert reports[-1] == removed
        assert await store.count_sessions(user_id="alice") == 0
        for n in range(7):
            assert await rows_of(backend, f"alice-{n}") == {}
        assert await store.count_sessions() == 4
        assert await store.erase_user("alice") == Removed()


async def test_prune_removes_sessions_inactive_past_the_cut_off(backend: Backend) -> None:
    async with store_on(backend) as store:
        for n in range(9):
            await rich_session(store, f"s{n}", user_id="alice" if n % 2 else "bob")
        await age(backend, ["s0", "s1", "s2", "s3"], OLD)
        await age(backend, ["s4", "s5"], OLD + timedelta(days=400))
        nothing = await store.prune(before=OLD)
        assert nothing == Removed()
        dry = await store.prune(inactive_for=timedelta(days=30), dry_run=True)
        assert dry.sessions == 6
        assert await store.prune(inactive_for=timedelta.max, dry_run=True) == Removed()
        assert await store.count_sessions() == 9
        only_alice = await store.prune(before=OLD + timedelta(days=1), user_id="alice")
        assert only_alice.sessions == 2  # s1 and s3
        reports: list[Removed] = []

        async def record(totals: Removed) -> None:  # awaitable progress works too
            reports.append(totals)

        removed = await store.prune(inactive_for=timedelta(days=30), batch_size=3, progress=record)
        assert removed.sessions == 4
        assert_batched([r.sessions for r in reports], most=3, total=4)
        listed = {s.session_id async for s in store.iter_sessions()}
        assert listed == {"s6", "s7", "s8"}
        for n in range(6):
            assert await rows_of(backend, f"s{n}") == {}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "exactly one of inactive_for= or before="),
        ({"inactive_for": timedelta(days=1), "before": OLD}, "exactly one"),
        ({"inactive_for": timedelta(days=-1)}, "timedelta of zero or more"),
        ({"inactive_for": 30}, "timedelta of zero or more"),
        ({"before": "2020-01-01"}, "before must be a datetime"),
        ({"before": OLD, "batch_size": 0}, "batch_size must be between 1 and 10000"),
        ({"before": OLD, "batch_size": 10_001}, "batch_size must be between"),
        ({"before": OLD, "batch_size": True}, "batch_size must be an int"),
        ({"before": OLD, "user_id": ""}, "must not be empty"),
        ({"before": OLD, "progress": "print"}, "progress must be a callable"),
    ],
)
async def test_bad_prune_arguments_change_nothing(
    backend: Backend, arguments: dict[str, Any], message: str
) -> None:
    async with store_on(backend) as store:
        await rich_session(store, "s")
        await age(backend, ["s"])
        with pytest.raises(InvalidArgumentError, match=message):
            await store.prune(**arguments)
        assert await store.count_sessions() == 1


@pytest.mark.parametrize(
    ("user_id", "options", "message"),
    [
        (None, {}, "user_id must be a str"),
        (3, {}, "user_id must be a str"),
        ("alice", {"batch_size": -5}, "batch_size must be between"),
        ("alice", {"progress": 1}, "progress must be a callable"),
    ],
)
async def test_bad_erase_arguments_change_nothing(
    backend: Backend, user_id: Any, options: dict[str, Any], message: str
) -> None:
    async with store_on(backend) as store:
        await rich_session(store, "s", user_id="alice")
        with pytest.raises(InvalidArgumentError, match=message):
            await store.erase_user(user_id, **options)
        with pytest.raises(InvalidArgumentError, match="session_id must be a str"):
            await store.delete_session(7)  # type: ignore[arg-type]
        assert await store.count_sessions() == 1


async def whole_or_gone(backend: Backend, session_id: str) -> str | None:
    """Why the session is neither whole nor gone (``None`` if it is one of them)."""
    rows = await rows_of(backend, session_id)
    if not rows:
        return None
    if "agent_sessions" not in rows or "turnstore_session_info" not in rows:
        return f"{session_id}: rows left without their session or info row: {rows}"
    if rows.get("agent_messages") != rows.get("message_structure"):
        return f"{session_id}: items and structure disagree: {rows}"
    async with backend.engine.connect() as conn:
        texts = (
            await conn.execute(
                select(T.messages.c.message_data).where(T.messages.c.session_id == session_id)
            )
        ).scalars()
        numbers = sorted({int(n) for text in texts for n in MARKER.findall(text)})
    # Turns are written in order: a session kept whole holds 0..k, one that started afresh
    # after a removal holds j..k; a hole means part of a session went.
    if numbers and numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        return f"{session_id}: turns with a hole: {numbers}"
    return None


async def test_prune_and_erase_with_concurrent_writers(backend: Backend) -> None:
    async with store_on(backend) as store:
        old = [f"old-{n:02d}" for n in range(40)]
        for session_id in old:
            await store.session(session_id, user_id="gone").add_items(turn("[0] first"))
        recent = [f"recent-{n}" for n in range(5)]
        for session_id in recent:
            await store.session(session_id, user_id="stays").add_items(turn("[0] first"))
        await age(backend, old)
        busy = old[:12] + recent
        written: dict[str, int] = dict.fromkeys(busy, 1)
        stop = asyncio.Event()
        rng = random.Random(11)

        async def writer() -> None:
            sessions = {sid: store.session(sid) for sid in busy}
            while not stop.is_set():
                target = rng.choice(busy)
                number = written[target]
                written[target] += 1
                await sessions[target].add_items(turn(f"[{number}] again"))
                await asyncio.sleep(0)

        writers = [asyncio.create_task(writer()) for _ in range(3)]
        try:
            await asyncio.sleep(0.05)
            removed = await store.prune(before=OLD + timedelta(days=1), batch_size=4)
            erased = await store.erase_user("gone", batch_size=4)
        finally:
            stop.set()
            await asyncio.gather(*writers)
        assert removed.sessions + erased.sessions >= 28  # every old one nobody wrote
        problems = [await whole_or_gone(backend, sid) for sid in old + recent]
        assert [p for p in problems if p] == []
        for session_id in old[12:]:
            assert await rows_of(backend, session_id) == {}
        for session_id in recent:  # other users' sessions keep every turn
            items = await store.session(session_id).get_items()
            assert len(items) == 2 * written[session_id]
        async with backend.engine.connect() as conn:
            assert await integrity_problems(conn, "") == []


async def test_a_killed_prune_run_again_finishes_the_job(backend: Backend) -> None:
    async with store_on(backend) as store:
        old = [f"old-{n:03d}" for n in range(160)]
        for session_id in old:
            session = store.session(session_id)
            await session.add_items(turn("[0] first"))
            await session.add_items(turn("[1] second"))
        await store.session("fresh").add_items(turn("[0] keep me"))
        await age(backend, old)
    cutoff = OLD + timedelta(days=1)
    context = process_context()
    reader, writer_end = context.Pipe(duplex=False)
    process = context.Process(
        target=prune_until_killed,
        args=(backend.url, backend.engine_options, cutoff, 7, writer_end),
    )
    process.start()
    writer_end.close()
    try:
        for _ in range(2):
            assert reader.poll(120), "the prune process reported no batch"
            assert reader.recv()[0] == "batch"
        await asyncio.sleep(random.Random(3).uniform(0, 0.02))
    finally:
        os.kill(process.pid or 0, signal.SIGKILL)
        process.join()
    assert process.exitcode == -signal.SIGKILL, "the prune ended before it was killed"
    reader.close()

    async with store_on(backend) as store:
        left = await store.count_sessions(active_before=cutoff)
        assert 0 < left < len(old), left
        problems = [await whole_or_gone(backend, sid) for sid in old]
        assert [p for p in problems if p] == []
        removed = await store.prune(before=cutoff, batch_size=50)
        assert removed.sessions == left
        assert await store.count_sessions() == 1
        for session_id in old:
            assert await rows_of(backend, session_id) == {}
        async with backend.engine.connect() as conn:
            assert await integrity_problems(conn, "") == []


class _Clock:
    """A monotonic clock on which every reading is ``step`` seconds after the previous one."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def monotonic(self) -> float:
        self.now += self.step
        return self.now


@pytest.mark.parametrize("distributed", [False, True], ids=["one-server", "distributed"])
async def test_erasure_batches_pace_to_the_databases_target(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, distributed: bool
) -> None:
    # Every batch seems to take 100 ms: five times the 20 ms target of one server, where
    # batches halve down to one session; well within a distributed database's, where each
    # batch pays a two-phase commit anyway and batches keep their full size.
    import turnstore.store
    from turnstore.persistence.erasure import Eraser

    monkeypatch.setattr(turnstore.store, "time", _Clock(0.1))
    monkeypatch.setattr(Eraser, "distributed", property(lambda self: distributed))
    async with Store(
        url=f"sqlite+aiosqlite:///{tmp_path / 'paced.db'}", create_tables=True
    ) as store:
        for n in range(12):
            await store.session(f"s{n}", user_id="u").add_items(turn(f"q{n}"))
        reports: list[Removed] = []
        await store.erase_user("u", batch_size=4, progress=reports.append)
    steps = [b.sessions - a.sessions for a, b in zip([Removed(), *reports], reports, strict=False)]
    assert steps == ([4, 4, 4] if distributed else [4, 2, 1, 1, 1, 1, 1, 1])
