"""Many writers on one session: every item stored once, in one order, with whole turns."""

from __future__ import annotations

import asyncio
from concurrent.futures import ProcessPoolExecutor

from scripts.stress import process_context
from sqlalchemy import select

from tests.concurrency_worker import append_turns
from tests.conftest import Backend
from tests.helpers import turn
from turnstore import AdvancedSession
from turnstore.persistence.models import DEFAULT_TABLES


async def assert_consistent(backend: Backend, session_id: str, expected_texts: set[str]) -> None:
    """Each turn whole and numbered once; sequence numbers unique and in insertion order."""
    s = DEFAULT_TABLES.structure
    async with backend.engine.connect() as conn:
        rows = (
            await conn.execute(
                select(s.c.sequence_number, s.c.user_turn_number, s.c.message_id)
                .where(s.c.session_id == session_id)
                .order_by(s.c.sequence_number)
            )
        ).all()
    sequences = [row.sequence_number for row in rows]
    assert sequences == list(range(1, len(expected_texts) * 2 + 1))
    # Message ids grow with sequence numbers: no writer interleaved inside another's batch.
    message_ids = [row.message_id for row in rows]
    assert message_ids == sorted(message_ids)

    reader = backend.session(session_id)
    items = await reader.get_items()
    users = [item["content"] for item in items if item.get("role") == "user"]
    assert sorted(users) == sorted(expected_texts)  # each stored exactly once
    by_turn = await reader.get_conversation_by_turns()
    assert sorted(by_turn) == list(range(1, len(expected_texts) + 1))
    assert all([i["type"] for i in items_] == ["user", "assistant"] for items_ in by_turn.values())


async def test_many_instances_write_one_session_at_once(backend: Backend) -> None:
    writers, turns_each = 12, 8
    session_id = "shared-by-instances"
    # Separate engines: on SQLite each contends for the file lock like another process would.
    engines = [backend.new_engine() for _ in range(writers)]
    try:
        sessions = [
            AdvancedSession(session_id=session_id, engine=engine, create_tables=True)
            for engine in engines
        ]
        await sessions[0].get_items()  # create the schema once, before the race

        async def write(index: int, session: AdvancedSession) -> None:
            for t in range(turns_each):
                await session.add_items(turn(f"i{index}-t{t}"))

        await asyncio.gather(*(write(i, s) for i, s in enumerate(sessions)))
        expected = {f"i{i}-t{t}" for i in range(writers) for t in range(turns_each)}
        await assert_consistent(backend, session_id, expected)
    finally:
        for engine in engines:
            await engine.dispose()


async def test_many_processes_write_one_session_at_once(backend: Backend) -> None:
    processes, turns_each = 4, 15
    session_id = "shared-by-processes"
    await backend.session(session_id).get_items()  # create the schema
    loop = asyncio.get_running_loop()
    # The stress script's fork server: workers start without importing the SDK again.
    with ProcessPoolExecutor(processes, mp_context=process_context()) as pool:
        await asyncio.gather(
            *(
                loop.run_in_executor(
                    pool,
                    append_turns,
                    backend.url,
                    backend.engine_options,
                    session_id,
                    worker,
                    turns_each,
                )
                for worker in range(processes)
            )
        )
    expected = {f"w{w}-t{t}" for w in range(processes) for t in range(turns_each)}
    await assert_consistent(backend, session_id, expected)


async def test_concurrent_branch_creation_reserves_distinct_names(backend: Backend) -> None:
    session_id = "branch-race"
    seed = backend.session(session_id)
    await seed.add_items(turn("one"))
    await seed.add_items(turn("two"))
    engines = [backend.new_engine() for _ in range(6)]
    try:
        racers = [AdvancedSession(session_id=session_id, engine=e) for e in engines]
        names = await asyncio.gather(*(r.create_branch_from_turn(2) for r in racers))
        assert len(set(names)) == len(names)
        listed = {b["branch_id"] for b in await seed.list_branches()}
        assert listed == {"main", *names}
    finally:
        for engine in engines:
            await engine.dispose()
