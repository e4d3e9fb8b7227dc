"""Hostile items, database failures, lost lock waits, cancellations and killed connections.

Every case runs on SQLite, Postgres and MariaDB/MySQL and expects one outcome on all of them:
the exact exception class, and nothing changed in the database (row counts and every read).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import traceback
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tests.conftest import Backend, role_with_settings
from tests.helpers import assistant, function_call, run_result, turn, user
from tests.hostile_support import row_counts, snapshot, unchanged, with_history
from turnstore import (
    AdvancedSession,
    ConnectionLostError,
    InvalidItemError,
    StorageError,
)
from turnstore.persistence import repository
from turnstore.persistence.dialects.base import DialectProfile
from turnstore.persistence.dialects.mysql import MySQLProfile
from turnstore.persistence.dialects.sqlite import SQLiteProfile

# Searched for in error text and logs; the name SECRET itself shows in tracebacks' source lines.
SECRET = "the launch code is " + "zq" * 3 + "-7734"
SECRET_MARK = "zqzqzq-7734"


def nested(levels: int) -> dict[str, Any]:
    """A user message nesting ``levels`` dicts in all (the item itself is level 1)."""
    item: dict[str, Any] = {"role": "user", "content": "deep"}
    current = item
    for _ in range(levels - 1):
        current["n"] = {}
        current = current["n"]
    return item


# -- items that cannot be stored ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (nested(501), "nests deeper than 500 levels"),
        (nested(10_000), "nests deeper than 500 levels"),
        ({"role": "user", "content": "x", "list": [[[[[]]]]] * 2 + [nested(500)]}, "nests deeper"),
        (function_call("look\ud800up"), "tool name contains an unpaired surrogate"),
        (function_call("look\x00up"), "tool name contains a NUL"),
        ({"type": "custom\x00type", "name": "t"}, "type contains a NUL"),
        ({"type": "\udc00"}, "type contains an unpaired surrogate"),
        ({"role": "user", "content": "x", "big": 10**5000}, "not JSON serializable"),
        ({"role": "user", "content": "x" * 20_000}, "over the session's max_item_bytes"),
    ],
    ids=[
        "501 levels",
        "10000 levels",
        "deep in a list",
        "surrogate tool name",
        "NUL tool name",
        "NUL type",
        "surrogate type",
        "5000-digit int",
        "over max_item_bytes",
    ],
)
async def test_items_that_cannot_be_stored_refuse_the_whole_batch(
    backend: Backend, bad: dict[str, Any], fragment: str
) -> None:
    session = await with_history(backend)
    limited = backend.session(session.session_id, max_item_bytes=10_000)
    async with unchanged(backend, session):
        with pytest.raises(InvalidItemError, match=f"Item 1.* {fragment}") as raised:
            await limited.add_items([user("fine"), bad, assistant("after")])
    assert SECRET_MARK not in str(raised.value)


async def test_items_at_the_limits_round_trip(backend: Backend) -> None:
    session = backend.session(max_item_bytes=10_000)
    deepest = nested(500)
    exact = {"role": "user", "content": ""}
    exact["content"] = "x" * (10_000 - len('{"role": "user", "content": ""}'))
    huge_ints = {"role": "user", "content": "n", "v": [2**64, -(2**200), 10**4000]}
    batch = [deepest, exact, huge_ints, function_call("tool\u00e9\U0001f642")]
    await session.add_items(batch)
    assert await session.get_items() == batch
    assert await session.get_tool_usage() == [("tool\u00e9\U0001f642", 1, 3)]


async def test_an_item_longer_than_a_statement_may_be_is_refused(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every backend pretends to have MariaDB's limit on statements, at 1 MB.
    for profile in (DialectProfile, MySQLProfile):
        monkeypatch.setattr(profile, "statement_size_limit", lambda self, conn: 1_000_000)
    session = backend.session(backend_session_id := f"s-{uuid.uuid4().hex[:8]}")
    await session.add_items(turn("before"))
    assert session._binding().handle.statement_size_limit == 1_000_000
    async with unchanged(backend, session):
        with pytest.raises(InvalidItemError, match=r"Item 1 takes .* max_allowed_packet"):
            await session.add_items([user("fine"), user('"' * 600_000)])
    # Items that fit one by one, but not together, are split over statements.
    batch = [user(f"{n} " + "y" * 400_000) for n in range(4)]
    await session.add_items(batch)
    assert (await backend.session(backend_session_id).get_items())[2:] == batch


async def test_two_ten_megabyte_items_in_one_batch(backend: Backend) -> None:
    # Together over MariaDB's default max_allowed_packet (16 MiB): split over statements.
    batch = [user(f"{n} " + "w" * 10_000_000) for n in range(2)]
    session = backend.session()
    await session.add_items(batch)
    assert await session.get_items() == batch


# -- database failures carry no content --------------------------------------------------------


async def break_messages_table(backend: Backend) -> None:
    """Rename the messages table away, so the next append fails inside the database."""
    async with backend.engine.begin() as conn:
        await conn.exec_driver_sql("ALTER TABLE agent_messages RENAME TO moved_away")


async def test_database_failures_name_the_operation_not_the_content(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    session = await with_history(backend)
    await break_messages_table(backend)
    counts = await row_counts(backend)
    with (
        caplog.at_level(logging.DEBUG, logger="turnstore"),
        pytest.raises(StorageError) as raised,
    ):
        await session.add_items([user(SECRET)])
    error = raised.value
    assert type(error) is StorageError
    assert error.operation == "add_items"
    assert error.session_id == session.session_id
    message = str(error)
    assert message.startswith(f"add_items failed for session {session.session_id!r}")
    assert error.error_class in message
    everything = "".join(traceback.format_exception(error)) + caplog.text + repr(error)
    assert SECRET_MARK not in everything
    assert error.__cause__ is None
    assert await row_counts(backend) == counts
    # The read paths report the same way.
    with pytest.raises(StorageError, match="get_items failed for session"):
        await session.get_items()


async def test_opting_in_to_model_data_adds_the_database_message(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agents._debug.DONT_LOG_MODEL_DATA", False)
    session = await with_history(backend)
    await break_messages_table(backend)
    with pytest.raises(StorageError) as raised:
        await session.add_items([user(SECRET)])
    assert "agent_messages" in str(raised.value)
    assert raised.value.__cause__ is raised.value.original


async def test_engines_turnstore_creates_hide_statement_parameters(backend: Backend) -> None:
    session = AdvancedSession(session_id="hidden", url=backend.url)
    try:
        engine: Any = session._binding().handle.engine
        sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        assert sync_engine.hide_parameters is True
    finally:
        await session.aclose()


# -- usage writes that lose a lock wait ---------------------------------------------------------


@asynccontextmanager
async def short_lock_waits(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[AsyncEngine]:
    """A new engine on the backend whose writes give up on a lock after well under a second."""
    if backend.name == "sqlite":
        monkeypatch.setattr(SQLiteProfile, "busy_timeout_seconds", 0.3)
        engine = backend.new_engine()
    elif backend.name == "postgres":
        options = dict(backend.engine_options)
        settings = {**options["connect_args"]["server_settings"], "lock_timeout": "300ms"}
        engine = create_async_engine(backend.url, connect_args={"server_settings": settings})
    elif backend.name == "citus":
        # The lock a write waits for is on a worker, where the write runs in a connection
        # the coordinator opens (a delegated server-function call, or a routed statement):
        # session settings of the client's connection stay on the coordinator. A role's
        # settings apply on every node, so that is how a deployment limits lock waits there.
        settings = {
            **backend.engine_options["connect_args"]["server_settings"],
            "lock_timeout": "300ms",
        }
        async with role_with_settings(backend.url, settings) as url:
            engine = create_async_engine(url, **backend.engine_options)
            try:
                yield engine
            finally:
                await engine.dispose()
        return
    else:
        engine = backend.new_engine()

        @event.listens_for(engine.sync_engine, "connect")
        def _short_waits(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("SET SESSION innodb_lock_wait_timeout = 1")
            cursor.close()

    try:
        yield engine
    finally:
        await engine.dispose()


@asynccontextmanager
async def session_locked(backend: Backend, session_id: str) -> AsyncIterator[None]:
    """Hold the lock a writer of ``session_id`` needs, from another connection."""
    if backend.name == "sqlite":
        assert backend.engine.url.database is not None
        holder = sqlite3.connect(backend.engine.url.database, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        return
    engine = backend.new_engine()
    try:
        async with engine.connect() as conn, conn.begin():
            await conn.execute(
                text("SELECT session_id FROM agent_sessions WHERE session_id = :s FOR UPDATE"),
                {"s": session_id},
            )
            yield
    finally:
        await engine.dispose()


async def test_a_usage_write_that_keeps_losing_the_lock_is_counted_and_logged(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(repository, "_LOCK_RETRY_DELAYS", (0.01, 0.01))
    writer = await with_history(backend)
    async with short_lock_waits(backend, monkeypatch) as engine:
        session = AdvancedSession(session_id=writer.session_id, engine=engine)
        try:
            before = await snapshot(writer)
            async with session_locked(backend, session.session_id):
                with caplog.at_level(logging.WARNING, logger="turnstore"):
                    await session.store_run_usage(run_result(input_tokens=999))
            assert session.dropped_usage_writes == 1
            [record] = [r for r in caplog.records if "Dropped the usage" in r.getMessage()]
            assert record.levelno == logging.WARNING
            assert "dropped so far: 1" in record.getMessage()
            assert await snapshot(writer) == before
            # Once the lock is free again, usage is stored as usual.
            await session.store_run_usage(run_result(input_tokens=999))
            assert session.dropped_usage_writes == 1
            assert (await writer.get_session_usage() or {})["input_tokens"] == 8 + 999
        finally:
            await session.aclose()


async def test_a_usage_write_waits_for_a_lock_held_briefly(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = await with_history(backend)
    async with short_lock_waits(backend, monkeypatch) as engine:
        session = AdvancedSession(session_id=writer.session_id, engine=engine)
        try:
            async with session_locked(backend, session.session_id):
                storing = asyncio.create_task(session.store_run_usage(run_result(input_tokens=50)))
                await asyncio.sleep(1.5)  # several lost waits, then the lock is released
            await storing
            assert session.dropped_usage_writes == 0
            assert (await writer.get_session_usage() or {})["input_tokens"] == 8 + 50
        finally:
            await session.aclose()


# -- retrying appends: idempotency keys, cancellations, killed connections ----------------------


async def test_a_batch_retried_with_its_key_is_stored_once(backend: Backend) -> None:
    session = await with_history(backend)
    main_before = await session.get_items()
    await session.add_items(turn("keyed"), idempotency_key="batch-1")
    async with unchanged(backend, session):
        await session.add_items(turn("keyed"), idempotency_key="batch-1")
        # Another instance (another process) retrying the same batch.
        await backend.session(session.session_id).add_items(
            turn("keyed"), idempotency_key="batch-1"
        )
    assert await session.get_items() == [*main_before, *turn("keyed")]
    # Keys are per session and exact: a look-alike key is another batch.
    await session.add_items(turn("keyed"), idempotency_key="batch-1 ")
    other = backend.session()
    await other.add_items(turn("keyed"), idempotency_key="batch-1")
    assert await other.get_items() == turn("keyed")
    assert await session.get_items() == [*main_before, *turn("keyed"), *turn("keyed")]
    # A clear forgets the keys with everything else.
    await session.clear_session()
    await session.add_items(turn("keyed"), idempotency_key="batch-1")
    assert await session.get_items() == turn("keyed")


async def test_cancelled_appends_retried_with_their_keys_land_exactly_once(
    backend: Backend,
) -> None:
    session = backend.session()
    expected: list[Any] = []
    delays = [0, 0, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.05]
    outcomes = {"cancelled": 0, "finished": 0}
    for number, delay in enumerate(delays * 2):
        batch, key = turn(f"question {number}"), f"key-{number}"
        attempt = asyncio.create_task(session.add_items(batch, idempotency_key=key))
        await asyncio.sleep(delay)
        attempt.cancel()
        try:
            await attempt
            outcomes["finished"] += 1
        except asyncio.CancelledError:
            outcomes["cancelled"] += 1
        await session.add_items(batch, idempotency_key=key)  # the retry
        expected += batch
    assert outcomes["cancelled"] > 0
    assert await session.get_items() == expected
    assert await backend.session(session.session_id).get_items() == expected
    turns = [t["turn"] for t in await session.get_conversation_turns()]
    assert turns == list(range(1, len(delays) * 2 + 1))


async def test_an_append_whose_connection_is_killed_is_retried_exactly_once(
    backend: Backend,
) -> None:
    if backend.name == "sqlite":
        pytest.skip("SQLite has no server connection to kill")
    victims: list[int] = []
    engine = backend.new_engine()
    if backend.family == "postgres":
        app = f"hostile-victim-{uuid.uuid4().hex[:8]}"
        settings = {**backend.engine_options["connect_args"]["server_settings"]}
        engine = create_async_engine(
            backend.url, connect_args={"server_settings": {**settings, "application_name": app}}
        )

    @event.listens_for(engine.sync_engine, "connect")
    def _remember(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(
            "SELECT pg_backend_pid()" if backend.family == "postgres" else "SELECT CONNECTION_ID()"
        )
        victims.append(int(cursor.fetchone()[0]))
        cursor.close()

    session = AdvancedSession(session_id="killed", engine=engine, create_tables=True)
    admin = backend.new_engine()
    try:
        await session.add_items(turn("before"))
        async with session_locked(backend, "killed"):
            attempt = asyncio.create_task(
                session.add_items(turn("during"), idempotency_key="kill-1")
            )
            await asyncio.sleep(0.5)  # the append now waits for the session's lock
            assert not attempt.done()
            async with admin.connect() as conn:
                for victim in victims:
                    kill = (
                        # Typed: Citus adds a pg_terminate_backend(bigint, ...) overload.
                        "SELECT pg_terminate_backend(CAST(:p AS integer))"
                        if backend.family == "postgres"
                        else f"KILL {victim}"
                    )
                    await conn.execute(text(kill), {"p": victim})
            with pytest.raises((ConnectionLostError, StorageError)):
                await attempt
        await session.add_items(turn("during"), idempotency_key="kill-1")
        await session.add_items(turn("during"), idempotency_key="kill-1")
        assert await session.get_items() == [*turn("before"), *turn("during")]
    finally:
        await session.aclose()
        await engine.dispose()
        await admin.dispose()
