"""A separate OS process that appends turns to a shared session (used by test_concurrency)."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy.ext.asyncio import create_async_engine

from tests.helpers import turn
from turnstore import AdvancedSession


async def _append_turns(
    url: str, engine_options: dict[str, Any], session_id: str, worker: int, turns: int
) -> None:
    engine = create_async_engine(url, **engine_options)
    try:
        session = AdvancedSession(session_id=session_id, engine=engine, create_tables=True)
        for index in range(turns):
            await session.add_items(turn(f"w{worker}-t{index}"))
        await session.aclose()
    finally:
        await engine.dispose()


def append_turns(
    url: str, engine_options: dict[str, Any], session_id: str, worker: int, turns: int
) -> None:
    """Process entry point: append ``turns`` user/assistant pairs to ``session_id``."""
    asyncio.run(_append_turns(url, engine_options, session_id, worker, turns))
