"""Postgres connections that die under a session: killed between calls, mid-call, by a restart.

Each test gets a database of its own, so the session's server connections are exactly the
backends of that database not opened by the test itself; the test ends them with
``pg_terminate_backend`` from a separate admin connection. Sessions are built from a URL, so
the engine and pool are the ones turnstore configures for Postgres.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

import turnstore
from tests.helpers import turn, user
from turnstore import AdvancedSession, ConnectionLostError, TurnstoreError

# Connections the test opens itself carry this name and are never terminated.
TEST_APPLICATION = "turnstore-fault-injector"
DISRUPTIVE_VARIABLE = "TURNSTORE_DISRUPTIVE_TESTS"
RESTART_COMMAND_VARIABLE = "TURNSTORE_PG_RESTART_COMMAND"
CITUS_RESTART_COMMAND_VARIABLE = "TURNSTORE_CITUS_RESTART_COMMAND"
DEFAULT_RESTART_COMMAND = "pg_ctlcluster --skip-systemctl-redirect 15 main restart"
# Upper bound for waiting on the server; generous because the machine is shared and noisy.
WAIT_SECONDS = 30.0


@dataclass
class PostgresDatabase:
    """A fresh database, its URL, and an admin engine (on the server's base database).

    On Citus (``kind="citus"``) the database is the coordinator's and the test's own part of
    it is a schema with a role whose ``search_path`` points there: the session's connections
    are the coordinator backends of that role. A call Citus delegates to a worker waits there
    (for a lock, say) while its coordinator backend is active, waiting for the worker.
    """

    name: str
    url: str
    admin: AsyncEngine
    kind: str = "postgres"

    def session(self, session_id: str = "conversation") -> AdvancedSession:
        return AdvancedSession.from_url(session_id=session_id, url=self.url, create_tables=True)

    def side_engine(self) -> AsyncEngine:
        """An engine on the test database whose connections are never terminated."""
        return create_async_engine(
            self.url,
            poolclass=NullPool,
            connect_args={"server_settings": {"application_name": TEST_APPLICATION}},
        )

    async def session_backends(self, waiting_on_lock: bool = False) -> list[int]:
        """Server process ids of the connections turnstore opened to the test database."""
        if self.kind == "citus":
            # Citus's own connections (application_name citus_internal...) are not the
            # session's.
            query = (
                "SELECT pid FROM pg_stat_activity WHERE usename = :db "
                "AND pid <> pg_backend_pid() AND application_name <> :mine "
                "AND application_name NOT LIKE 'citus%'"
            )
            if waiting_on_lock:
                query += " AND state = 'active'"
        else:
            query = (
                "SELECT pid FROM pg_stat_activity WHERE datname = :db "
                "AND pid <> pg_backend_pid() AND application_name <> :mine"
            )
            if waiting_on_lock:
                query += " AND wait_event_type = 'Lock'"
        async with self.admin.connect() as conn:
            rows = await conn.execute(text(query), {"db": self.name, "mine": TEST_APPLICATION})
            return [int(pid) for pid in rows.scalars()]

    async def terminate(self, pids: list[int]) -> None:
        """End the given server processes and wait until they are gone."""
        assert pids, "expected turnstore to hold at least one connection"
        async with self.admin.connect() as conn:
            for pid in pids:
                # Typed: Citus adds a pg_terminate_backend(bigint, ...) overload.
                await conn.execute(
                    text("SELECT pg_terminate_backend(CAST(:pid AS integer))"), {"pid": pid}
                )
        await wait_until(lambda: self._gone(pids), "terminated backends to exit")

    async def _gone(self, pids: list[int]) -> bool:
        return not set(pids) & set(await self.session_backends())


async def wait_until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll an async predicate until it holds; fail (not hang) after WAIT_SECONDS."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture(params=["postgres", "citus"])
async def pg(request: pytest.FixtureRequest) -> AsyncIterator[PostgresDatabase]:
    """A database of its own on the Postgres server, or a schema and role on Citus."""
    if request.param == "citus":
        async for ready in _citus_database(request.getfixturevalue("citus_url")):
            yield ready
        return
    postgres_url: str = request.getfixturevalue("postgres_url")
    name = f"faults_{uuid.uuid4().hex[:12]}"
    # NullPool: every admin statement gets a fresh connection, so the admin survives a restart.
    admin = create_async_engine(postgres_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    async with admin.connect() as conn:
        await conn.exec_driver_sql(f"CREATE DATABASE {name}")
    url = make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield PostgresDatabase(name, url, admin)
    finally:
        await turnstore.dispose_engines()
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.dispose()


async def _citus_database(citus_url: str) -> AsyncIterator[PostgresDatabase]:
    name = f"faults_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(citus_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    async with admin.connect() as conn:
        await conn.exec_driver_sql(f"CREATE SCHEMA {name}")
        await conn.exec_driver_sql(f"CREATE ROLE {name} LOGIN SUPERUSER")
        await conn.exec_driver_sql(f"ALTER ROLE {name} SET search_path = {name}")
        await conn.exec_driver_sql(f"ALTER ROLE {name} SET citus.shard_count = 4")
    url = make_url(citus_url).set(username=name).render_as_string(hide_password=False)
    try:
        yield PostgresDatabase(name, url, admin, kind="citus")
    finally:
        await turnstore.dispose_engines()
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f"DROP SCHEMA {name} CASCADE")
            await conn.exec_driver_sql(f"DROP OWNED BY {name} CASCADE")
            await conn.exec_driver_sql(f"DROP ROLE {name}")
        await admin.dispose()


async def stored_messages(conn: AsyncConnection, session_id: str) -> int:
    count = await conn.scalar(
        text("SELECT count(*) FROM agent_messages WHERE session_id = :sid"), {"sid": session_id}
    )
    return int(count or 0)


async def test_connection_killed_between_calls_is_replaced(pg: PostgresDatabase) -> None:
    session = pg.session()
    await session.add_items(turn("first"))
    before = await session.get_items()

    await pg.terminate(await pg.session_backends())
    # A read on a pooled connection the server has closed runs on a fresh one instead.
    assert await session.get_items() == before

    await pg.terminate(await pg.session_backends())
    await session.add_items(turn("second"))  # so does a write
    turns = await session.get_conversation_turns()
    assert [(t["turn"], t["content"]) for t in turns] == [(1, "first"), (2, "second")]


async def test_connection_killed_during_a_write_rolls_the_batch_back(
    pg: PostgresDatabase,
) -> None:
    # On Postgres an append is one self-committing call of a server function: the client
    # cannot tell a break before the commit from one after it, so the error says the outcome
    # is unknown, while the server did roll the half-done call back.
    session = pg.session()
    await session.add_items(turn("before"))
    batch = [user("lost batch"), *[user(f"part {i}") for i in range(49)]]

    side = pg.side_engine()
    try:
        async with side.connect() as blocker:
            # Writers need ROW EXCLUSIVE on the structure table, which EXCLUSIVE denies while
            # still letting them read it: the batch blocks inside its transaction, after
            # whatever it wrote before touching that table.
            await blocker.exec_driver_sql("LOCK TABLE message_structure IN EXCLUSIVE MODE")
            write = asyncio.create_task(session.add_items(batch))

            async def blocked() -> bool:
                return bool(await pg.session_backends(waiting_on_lock=True))

            await wait_until(blocked, "the write to block on the table lock")
            await pg.terminate(await pg.session_backends(waiting_on_lock=True))
            with pytest.raises(ConnectionLostError) as raised:
                await write
            await blocker.rollback()

        error = raised.value
        assert isinstance(error, ConnectionError)
        assert isinstance(error, TurnstoreError)
        message = str(error).lower()
        assert "connection" in message
        assert "may or may not have been applied" in message
        assert "retry" in message

        async with side.connect() as conn:
            stored = await stored_messages(conn, session.session_id)
    finally:
        await side.dispose()
    if pg.kind == "citus":
        # The call waited on a worker, which runs it to its end once the lock is gone: the
        # whole batch or none of it, as the error says.
        assert stored in (2, 2 + len(batch))
    else:
        assert stored == 2  # the first turn only
    applied = stored > 2

    # The next call runs on a fresh connection and the conversation continues where it was.
    await session.add_items(turn("after"))
    items = await session.get_items()
    lost = ["lost batch", *(f"part {i}" for i in range(49))] if applied else []
    assert [item["content"] for item in items if item.get("role") == "user"] == [
        "before",
        *lost,
        "after",
    ]
    turns = len(lost) + 2
    assert [t["turn"] for t in await session.get_conversation_turns()] == list(range(1, turns + 1))


async def test_connection_killed_during_a_read_raises_and_the_next_read_works(
    pg: PostgresDatabase,
) -> None:
    session = pg.session()
    await session.add_items(turn("kept"))

    side = pg.side_engine()
    try:
        async with side.connect() as blocker:
            # ACCESS EXCLUSIVE blocks even plain reads of the table.
            await blocker.exec_driver_sql("LOCK TABLE agent_messages IN ACCESS EXCLUSIVE MODE")
            read = asyncio.create_task(session.get_items())

            async def blocked() -> bool:
                return bool(await pg.session_backends(waiting_on_lock=True))

            await wait_until(blocked, "the read to block on the table lock")
            await pg.terminate(await pg.session_backends(waiting_on_lock=True))
            with pytest.raises(ConnectionLostError, match="retr"):
                await read
            await blocker.rollback()
    finally:
        await side.dispose()

    assert [item["content"] for item in await session.get_items()][:1] == ["kept"]


@pytest.mark.disruptive
async def test_session_survives_a_server_restart(pg: PostgresDatabase) -> None:
    if pg.kind == "citus":
        # The cluster belongs to the run that names a command restarting its coordinator.
        if CITUS_RESTART_COMMAND_VARIABLE not in os.environ:
            pytest.skip(f"restarts the Citus coordinator; set {CITUS_RESTART_COMMAND_VARIABLE}")
        restart = os.environ[CITUS_RESTART_COMMAND_VARIABLE]
    elif os.environ.get(DISRUPTIVE_VARIABLE) != "1":
        pytest.skip(f"restarts the Postgres server; set {DISRUPTIVE_VARIABLE}=1 to run it")
    else:
        restart = os.environ.get(RESTART_COMMAND_VARIABLE, DEFAULT_RESTART_COMMAND)
    session = pg.session()
    await session.add_items(turn("before restart"))
    assert await pg.session_backends()

    command = shlex.split(restart)
    process = await asyncio.create_subprocess_exec(*command)
    assert await process.wait() == 0, f"{command} failed"

    async def accepting() -> bool:
        try:
            async with pg.admin.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except (OSError, DBAPIError):
            return False
        return True

    await wait_until(accepting, "the server to accept connections again")
    # Every pooled connection died with the old server; the session needs none of them.
    await session.add_items(turn("after restart"))
    items = await session.get_items()
    assert [item["content"] for item in items if item.get("role") == "user"] == [
        "before restart",
        "after restart",
    ]
