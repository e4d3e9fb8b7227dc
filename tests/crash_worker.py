"""A writer process for test_crash_safety: appends whole turns until it is killed.

It reports through a pipe: ``("ready",)`` once it holds a connection, then one message per
acknowledged change, sent only after the call returned (so the change was committed).
"""

from __future__ import annotations

import asyncio
import random
from multiprocessing.connection import Connection
from typing import Any

from sqlalchemy.ext.asyncio import create_async_engine

from tests.helpers import assistant, function_call, function_output, run_result, user
from turnstore import AdvancedSession, BranchNotFoundError, TurnNotFoundError

ITEMS_PER_TURN = 4


def turn_items(marker: str) -> list[dict[str, Any]]:
    """One turn of four items, each carrying ``[marker]`` in its stored JSON."""
    call_id = f"call-[{marker}]"
    return [
        user(f"[{marker}] question"),
        function_call("lookup", call_id),
        function_output(call_id, f"[{marker}] tool output"),
        assistant(f"[{marker}] answer"),
    ]


async def _write_until_killed(
    url: str, engine_options: dict[str, Any], session_id: str, seed: int, progress: Connection
) -> None:
    rng = random.Random(seed)
    engine = create_async_engine(url, **engine_options)
    session = AdvancedSession(session_id=session_id, engine=engine)
    await session.get_items()
    progress.send(("ready",))
    branch = "main"
    for number in range(1_000_000):
        marker = f"s{seed}-{number}"
        await session.add_items(turn_items(marker))
        progress.send(("turn", marker, branch))
        await session.store_run_usage(run_result(input_tokens=number))
        choice = rng.random()
        try:
            if choice < 0.15:
                turns = await session.get_conversation_turns()
                branch = await session.create_branch_from_turn(rng.choice(turns)["turn"])
            elif choice < 0.25:
                branches = await session.list_branches()
                wanted = rng.choice(branches)["branch_id"]
                await session.switch_to_branch(wanted)
                branch = wanted
            elif choice < 0.3:
                branches = await session.list_branches()
                others = [
                    b["branch_id"] for b in branches if b["branch_id"] not in ("main", branch)
                ]
                if others:
                    doomed = rng.choice(others)
                    await session.delete_branch(doomed)
                    progress.send(("deleted", doomed))
        except (BranchNotFoundError, TurnNotFoundError):
            # Only another process could cause these; the test runs one writer at a time.
            progress.send(("unexpected", "branch or turn vanished"))


def write_until_killed(
    url: str, engine_options: dict[str, Any], session_id: str, seed: int, progress: Connection
) -> None:
    """Process entry point: write turns, usage and branches to ``session_id`` forever."""
    asyncio.run(_write_until_killed(url, engine_options, session_id, seed, progress))
