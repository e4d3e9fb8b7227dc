"""The per-turn counter lookups read as much at 600 stored items as at 40, on every backend.

Every append and usage write looks up the session's latest sequence number and the branch's
latest turn. Read from the newest index entry, that costs the same however long the history
is. On Postgres the tables are kept from being analyzed: without statistics its planner may
answer "the latest turn" by reading every row of the branch, which these lookups must not.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from tests.conftest import Backend
from tests.helpers import turn
from tests.read_counters import grow_to, keep_postgres_from_analyzing, reads_by
from turnstore.persistence.dialects import profile_for
from turnstore.persistence.models import DEFAULT_TABLES
from turnstore.persistence.statements import _statements

SMALL, LARGE = 20, 300  # turns of two items each


async def test_counter_lookups_read_the_same_at_any_history_length(backend: Backend) -> None:
    session = backend.session()
    await session.add_items(turn("first"))
    await keep_postgres_from_analyzing(backend)
    profile = profile_for(backend.engine.dialect.name)
    statements = _statements(DEFAULT_TABLES, profile)
    params = {"sid": session.session_id, "bid": "main"}

    async def counters(conn: AsyncConnection) -> None:
        # As a write transaction runs them (on Postgres, after begin_write's settings).
        await conn.run_sync(profile.begin_write)
        await conn.execute(statements.append_counters.statement, params)
        await conn.execute(statements.usage_counters.statement, params)

    await grow_to(session, SMALL)
    small = await reads_by(backend, counters)
    await grow_to(session, LARGE)
    assert await reads_by(backend, counters) == small
