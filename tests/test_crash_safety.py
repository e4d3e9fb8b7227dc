"""A writer killed with SIGKILL at random moments: whole turns or nothing, and a usable store.

The writer (tests/crash_worker.py) appends four-item turns, stores usage and creates, switches
and deletes branches in a loop; the test kills it at a random moment after it reports being
connected, many times over, on each backend. After every kill the store must pass the
database's integrity checks, hold each turn with all four items or none, hold every turn the
writer was told was stored, and let a new session instance continue the conversation.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

from scripts.stress import integrity_problems, process_context
from sqlalchemy import and_, select

from tests.conftest import Backend
from tests.crash_worker import ITEMS_PER_TURN, turn_items, write_until_killed
from turnstore import AdvancedSession
from turnstore.persistence.models import DEFAULT_TABLES

KILLS = 30
# TURNSTORE_CRASH_SEED replays a failing run's delays and choices (it is in the messages).
SEED = int(os.environ.get("TURNSTORE_CRASH_SEED", "1121"))
# Long enough to land inside the writer's loop at all sorts of points (a turn takes a few
# milliseconds), short enough to keep 30 kills quick.
MAX_DELAY_SECONDS = 0.12
READY_TIMEOUT_SECONDS = 60.0
MARKER = re.compile(r"\[((?:s|p)\d+-\d+)\]")


def drain(reader: Connection) -> list[tuple[Any, ...]]:
    """Every message the killed writer managed to send."""
    received = []
    while True:
        try:
            received.append(reader.recv())
        except EOFError:
            return received


async def stored_turns(backend: Backend, session_id: str) -> tuple[Counter[str], Counter[Any]]:
    """Message rows per marker, and structure rows per (branch, marker)."""
    s, m = DEFAULT_TABLES.structure, DEFAULT_TABLES.messages
    async with backend.engine.connect() as conn:
        messages = (
            await conn.execute(select(m.c.message_data).where(m.c.session_id == session_id))
        ).scalars()
        per_message = Counter(marker for data in messages for marker in set(MARKER.findall(data)))
        rows = await conn.execute(
            select(s.c.branch_id, m.c.message_data)
            .join(m, and_(m.c.id == s.c.message_id, m.c.session_id == s.c.session_id))
            .where(s.c.session_id == session_id)
        )
        per_branch = Counter(
            (branch, marker) for branch, data in rows for marker in set(MARKER.findall(data))
        )
    return per_message, per_branch


async def test_killed_writer_leaves_whole_turns_and_a_usable_store(backend: Backend) -> None:
    session_id = "crash-target"
    await backend.session(session_id).get_items()  # the schema, before any writer starts
    rng = random.Random(SEED)
    context = process_context()
    acknowledged: dict[str, str] = {}  # marker -> branch

    for kill in range(KILLS):
        seed = SEED * 1_000 + kill
        where = f"seed {SEED}, kill {kill} (writer seed {seed}) on {backend.name}"
        reader, writer_end = context.Pipe(duplex=False)
        early: list[tuple[Any, ...]] = []
        writer = context.Process(
            target=write_until_killed,
            args=(backend.url, backend.engine_options, session_id, seed, writer_end),
        )
        writer.start()
        writer_end.close()
        try:
            assert reader.poll(READY_TIMEOUT_SECONDS), f"{where}: writer never became ready"
            assert reader.recv() == ("ready",), where
            # Let the writer get some turns in first (however loaded the machine is), then
            # kill it at a random moment of whatever it is doing.
            for _ in range(rng.randint(0, 3)):
                assert reader.poll(READY_TIMEOUT_SECONDS), f"{where}: writer stalled"
                early.append(reader.recv())
            await asyncio.sleep(rng.uniform(0, MAX_DELAY_SECONDS))
        finally:
            os.kill(writer.pid or 0, signal.SIGKILL)
            writer.join()
        assert writer.exitcode == -signal.SIGKILL, f"{where}: writer ended on its own"
        sent = early + drain(reader)
        reader.close()
        assert not [m for m in sent if m[0] == "unexpected"], f"{where}: {sent}"
        acknowledged.update({m[1]: m[2] for m in sent if m[0] == "turn"})

        async with backend.engine.connect() as conn:
            problems = await integrity_problems(conn, session_id)
        assert problems == [], f"{where}: {problems}"

        per_message, per_branch = await stored_turns(backend, session_id)
        partial = {k: n for k, n in per_message.items() if n != ITEMS_PER_TURN}
        assert partial == {}, f"{where}: turns stored in part (messages): {partial}"
        partial = {k: n for k, n in per_branch.items() if n != ITEMS_PER_TURN}
        assert partial == {}, f"{where}: turns stored in part (branch items): {partial}"
        branches = {branch for branch, _ in per_branch}
        lost = {
            marker: branch
            for marker, branch in acknowledged.items()
            # A branch that is gone altogether was deleted (perhaps by the unacknowledged call
            # the writer was making when it died); branches never lose single turns.
            if branch in branches and per_branch[branch, marker] != ITEMS_PER_TURN
        }
        assert lost == {}, f"{where}: acknowledged turns missing: {lost}"
        assert "main" in branches or kill == 0, f"{where}: main vanished"

        # A new instance continues the conversation on main where it stands.
        survivor = AdvancedSession(session_id=session_id, engine=backend.engine)
        turns = await survivor.get_conversation_turns()
        marker = f"p{SEED}-{kill}"
        await survivor.add_items(turn_items(marker))
        after = await survivor.get_conversation_turns()
        assert [t["turn"] for t in after] == [*(t["turn"] for t in turns), len(turns) + 1], where
        assert after[-1]["content"] == f"[{marker}] question", where
        assert len(await survivor.get_items()) == ITEMS_PER_TURN * len(after), where
        acknowledged[marker] = "main"
