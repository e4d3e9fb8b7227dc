"""Engine sharing and lifecycle: one engine per URL, disposal, caller-owned engines."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.conftest import Backend
from tests.helpers import turn
from turnstore import AdvancedSession, AdvancedSQLiteSession, InvalidArgumentError, dispose_engines
from turnstore.persistence.engines import acquire_for_url


def unique() -> str:
    return f"engines-{uuid.uuid4().hex}"


def engine_of(session: AdvancedSession) -> object:
    return session._binding().handle.engine


async def test_sessions_on_one_url_share_one_engine(backend: Backend) -> None:
    # from_url sessions use the database's default schema, shared between runs: fresh ids.
    first = AdvancedSession.from_url(session_id=unique(), url=backend.url, create_tables=True)
    second = AdvancedSession.from_url(session_id=unique(), url=backend.url, create_tables=True)
    assert engine_of(first) is engine_of(second)
    await first.add_items(turn("hello"))
    assert await second.get_items() == []
    await first.aclose()
    # The other session still works after one closes.
    await second.add_items(turn("still here"))
    assert await second.get_items() == turn("still here")
    await second.aclose()
    await dispose_engines()


async def test_dispose_engines_then_sessions_keep_working(backend: Backend) -> None:
    session = AdvancedSession.from_url(session_id=unique(), url=backend.url, create_tables=True)
    await session.add_items(turn("before"))
    await dispose_engines(backend.url)
    await session.add_items(turn("after"))
    assert len(await session.get_items()) == 4
    await session.aclose()
    await dispose_engines()


async def test_caller_owned_engine_is_not_disposed(backend: Backend) -> None:
    async with backend.session() as session:
        await session.add_items(turn("x"))
    await dispose_engines()
    async with backend.engine.connect() as conn:
        assert (await conn.execute(text("SELECT 1"))).scalar() == 1


def test_exactly_one_of_engine_or_url(backend: Backend) -> None:
    with pytest.raises(InvalidArgumentError, match="exactly one of engine= or url="):
        AdvancedSession(session_id="x")
    with pytest.raises(InvalidArgumentError, match="exactly one of engine= or url="):
        AdvancedSession(session_id="x", engine=backend.engine, url=backend.url)


async def test_unparseable_url_is_a_clear_error() -> None:
    session = AdvancedSession.from_url(session_id="x", url="not a url")
    with pytest.raises(InvalidArgumentError, match="Not a database URL"):
        await session.get_items()


async def test_unsupported_dialect_is_refused() -> None:
    with pytest.raises(NotImplementedError, match="does not support the 'oracle' dialect"):
        acquire_for_url("oracle+oracledb://user@host/db")


async def test_sqlite_engine_is_released_with_its_last_session(sqlite_path: Path) -> None:
    session = AdvancedSQLiteSession(session_id="s", db_path=sqlite_path, create_tables=True)
    await session.add_items(turn("x"))
    engine = engine_of(session)
    await session.aclose()
    again = AdvancedSQLiteSession(session_id="s", db_path=sqlite_path)
    assert engine_of(again) is not engine  # a fresh engine: the old one was disposed
    assert await again.get_items() == turn("x")
    await again.aclose()


def test_session_survives_successive_event_loops(sqlite_path: Path) -> None:
    session = AdvancedSQLiteSession(session_id="loops", db_path=sqlite_path, create_tables=True)

    async def add(text_: str) -> None:
        await session.add_items(turn(text_))

    asyncio.run(add("first loop"))
    asyncio.run(add("second loop"))

    async def read_and_close() -> int:
        count = len(await session.get_items())
        await session.aclose()
        return count

    assert asyncio.run(read_and_close()) == 4
    session.close()  # releases what the earlier loops held
