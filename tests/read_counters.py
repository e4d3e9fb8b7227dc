"""What a statement reads, as the database itself counts it: for flat-cost tests, no timing.

Postgres reports index entries and heap rows read per transaction, MySQL its handlers' reads
per connection, and SQLite calls a progress handler once per virtual-machine step.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from tests.conftest import Backend
from tests.helpers import turn
from turnstore import AdvancedSession
from turnstore.persistence.models import DEFAULT_TABLES

#: Statements run on a connection inside a transaction that is rolled back afterwards.
Lookup = Callable[[AsyncConnection], Awaitable[Any]]


async def grow_to(session: AdvancedSession, turns: int) -> None:
    """Add two-item turns until the session's main branch holds ``turns`` of them."""
    stored = len(await session.get_conversation_turns())
    for number in range(stored + 1, turns + 1, 10):
        await session.add_items(
            [item for n in range(number, min(number + 10, turns + 1)) for item in turn(f"q{n}")]
        )


async def keep_postgres_from_analyzing(backend: Backend) -> None:
    """Keep autovacuum from giving the planner statistics the test means it not to have."""
    if backend.family == "postgres":
        async with backend.engine.begin() as conn:
            for table in DEFAULT_TABLES.names:
                await conn.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))


async def _postgres_reads(conn: AsyncConnection) -> int:
    """Index entries and heap rows this transaction has read from the structure table."""
    found = await conn.scalar(
        text(
            "SELECT pg_stat_get_xact_tuples_returned(c.oid) + coalesce(("
            "SELECT sum(pg_stat_get_xact_tuples_returned(i.indexrelid)) "
            "FROM pg_index AS i WHERE i.indrelid = c.oid), 0) "
            "FROM pg_class AS c WHERE c.oid = to_regclass('message_structure')"
        )
    )
    return int(found or 0)


async def _mysql_reads(conn: AsyncConnection) -> int:
    """Rows and index entries this connection's handlers have read so far."""
    rows = await conn.execute(text("SHOW SESSION STATUS LIKE 'Handler_read%'"))
    return sum(int(value) for _, value in rows)


async def _sqlite_steps(conn: AsyncConnection, lookup: Lookup) -> int:
    steps = 0

    def count_step() -> int:
        nonlocal steps
        steps += 1
        return 0  # carry on

    driver = (await conn.get_raw_connection()).driver_connection
    assert driver is not None
    await driver.set_progress_handler(count_step, 1)
    try:
        await lookup(conn)
    finally:
        await driver.set_progress_handler(None, 1)
    return steps


async def reads_by(backend: Backend, lookup: Lookup) -> int:
    """What ``lookup`` reads, inside a transaction that is rolled back afterwards."""
    async with backend.engine.connect() as conn:
        try:
            if backend.name == "sqlite":
                return await _sqlite_steps(conn, lookup)
            probe = _postgres_reads if backend.family == "postgres" else _mysql_reads
            before = await probe(conn)
            await lookup(conn)
            return await probe(conn) - before
        finally:
            await conn.rollback()
