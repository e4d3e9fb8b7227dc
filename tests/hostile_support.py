"""What the hostile-input tests share: a session with history, and proof that nothing changed.

A refused call must leave the database exactly as it was: :func:`unchanged` compares every
table's row count and every read method's answer before and after the block. Tests assert one
expected outcome for all backends (never a per-backend expectation), so a behaviour that
differs between backends fails.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import func, inspect, select, table

from tests.conftest import Backend
from tests.helpers import function_call, function_output, run_result, turn, user
from turnstore import AdvancedSession


async def with_history(backend: Backend, session_id: str | None = None) -> AdvancedSession:
    """A session with two turns (one with a tool call), usage and a second branch."""
    session = backend.session(session_id)
    await session.add_items(turn("first question"))
    await session.store_run_usage(run_result(input_tokens=7, output_tokens=3))
    await session.add_items([user("second question"), function_call("lookup")])
    await session.add_items([function_output(), *turn("x", "answer")[1:]])
    await session.create_branch_from_turn(2, "alt")
    await session.add_items(turn("alternative"))
    await session.store_run_usage(run_result(input_tokens=1, output_tokens=1))
    await session.switch_to_branch("main")
    return session


async def snapshot(session: AdvancedSession) -> dict[str, Any]:
    """What every read method answers, for every branch; timestamps left out."""
    branches = await session.list_branches()
    state: dict[str, Any] = {
        "branches": [{k: v for k, v in b.items() if k != "created_at"} for b in branches],
        "usage": await session.get_session_usage(),
        "current": await session.get_items(),
        "latest": await session.get_items(limit=2),
    }
    for branch in branches:
        name = branch["branch_id"]
        state[f"branch {name}"] = {
            "items": await session.get_items(branch_id=name),
            "streamed": [item async for item in session.iter_items(name, batch_size=2)],
            "turn_usage": await session.get_turn_usage(branch_id=name),
            "first_turn_usage": await session.get_turn_usage(1, branch_id=name),
            "branch_usage": await session.get_session_usage(name),
            "by_turns": await session.get_conversation_by_turns(name),
            "tools": await session.get_tool_usage(name),
            "turns": [
                {k: v for k, v in t.items() if k != "timestamp"}
                for t in await session.get_conversation_turns(name)
            ],
            "found": [t["turn"] for t in await session.find_turns_by_content("question", name)],
        }
    return state


async def row_counts(backend: Backend) -> dict[str, int]:
    """Rows in every table of the backend's database."""
    async with backend.engine.connect() as conn:
        names = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
        return {
            name: int(await conn.scalar(select(func.count()).select_from(table(name))) or 0)
            for name in sorted(names)
        }


@asynccontextmanager
async def unchanged(backend: Backend, *sessions: AdvancedSession) -> AsyncIterator[None]:
    """Assert that the block changes no row count and no read of ``sessions``."""
    counts = await row_counts(backend)
    reads = [await snapshot(session) for session in sessions]
    yield
    assert await row_counts(backend) == counts
    assert [await snapshot(session) for session in sessions] == reads
