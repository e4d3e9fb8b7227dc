"""Stores to move conversations between, and conversations worth moving."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tests.conftest import Backend, _postgres_backend, fresh_mysql_backend
from tests.helpers import assistant, function_call, function_output, run_result, user
from turnstore import AdvancedSession
from turnstore.verification import session_answers


@asynccontextmanager
async def empty_store(
    name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Backend]:
    """Another empty database of backend ``name`` (a file, a schema or a database)."""
    if name == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / f'other-{uuid.uuid4().hex[:8]}.db'}"
        engine = create_async_engine(url)
        try:
            yield Backend(name, url, engine, {})
        finally:
            await engine.dispose()
    elif name == "postgres":
        async for ready in _postgres_backend(request.getfixturevalue("postgres_url")):
            yield ready
    else:
        async for ready in fresh_mysql_backend(request.getfixturevalue("mysql_url")):
            yield ready


def _session(engine: AsyncEngine, session_id: str, **info: Any) -> AdvancedSession:
    return AdvancedSession(session_id=session_id, engine=engine, create_tables=True, **info)


async def populate(engine: AsyncEngine, prefix: str = "") -> list[str]:
    """Write conversations that exercise everything a move must keep; their ids.

    Branches (one deleted, so its name is only reserved), tool calls, usage with token
    details on several turns, a session cleared and written again, one cleared and left
    empty, awkward text, and ids that differ only in case and spaces.
    """
    branchy = _session(
        engine,
        f"{prefix}branchy",
        user_id="user-1",
        title="Weather \u2603",
        metadata={"plan": "pro", "tags": ["a", "b"], "score": 1.5},
    )
    for number in range(1, 5):
        await branchy.add_items([user(f"question {number} about the weather")])
        await branchy.add_items(
            [
                function_call("lookup", f"call-{number}"),
                function_output(f"call-{number}", f"sunny {number}"),
                assistant(f"answer {number}"),
            ]
        )
        await branchy.store_run_usage(
            run_result(input_tokens=10 * number, cached_tokens=number, reasoning_tokens=2)
        )
    await branchy.create_branch_from_turn(3, "what-if")
    await branchy.add_items([user("what if it rains?"), assistant("then umbrellas")])
    await branchy.store_run_usage(run_result(input_tokens=7))
    await branchy.switch_to_branch("main")
    await branchy.create_branch_from_turn(2, "doomed")
    await branchy.add_items([user("soon gone")])
    await branchy.switch_to_branch("main")
    await branchy.delete_branch("doomed")
    await branchy.create_branch_from_turn(2)  # a generated name

    cleared = _session(engine, f"{prefix}cleared and rewritten")
    await cleared.add_items([user("first life"), assistant("gone soon")])
    await cleared.create_branch_from_turn(1, "old-branch")
    await cleared.clear_session()
    await cleared.add_items([user("second life"), assistant("still here")])

    emptied = _session(engine, f"{prefix}Cleared Only")
    await emptied.add_items([user("nothing will remain")])
    await emptied.clear_session()

    awkward = _session(engine, f"{prefix}AWKWARD ")
    await awkward.add_items(
        [
            user('quotes " and \\ backslashes, a\nnewline, \u2028 and emoji \U0001f600'),
            assistant("tabs\tand % and _ wildcards"),
            {"type": "reasoning", "id": "rs_1", "summary": []},
        ]
    )
    await awkward.store_run_usage(run_result(input_tokens=3, output_tokens=4))
    awkward_lower = _session(engine, f"{prefix}awkward", user_id="user-1")
    await awkward_lower.add_items([user("the lower-case twin")])
    info_only = _session(engine, f"{prefix}info only", user_id="user-2", title="not yet")
    await info_only.set_info(metadata={"draft": True})

    for session in (branchy, cleared, emptied, awkward, awkward_lower, info_only):
        await session.aclose()
    return [
        f"{prefix}branchy",
        f"{prefix}cleared and rewritten",
        f"{prefix}Cleared Only",
        f"{prefix}AWKWARD ",
        f"{prefix}awkward",
        f"{prefix}info only",
    ]


async def answers(engine: AsyncEngine, session_id: str) -> dict[str, Any]:
    """Every read method's answers for a session, plus its clear generation."""
    session = AdvancedSession(session_id=session_id, engine=engine)
    try:
        found = await session_answers(session)
        store = await session._store()
        found["generation"] = await store.current_generation(session_id)
        return found
    finally:
        await session.aclose()


async def all_answers(engine: AsyncEngine, session_ids: list[str]) -> dict[str, Any]:
    """:func:`answers` for each session."""
    return {session_id: await answers(engine, session_id) for session_id in session_ids}


async def stored_rows(engine: AsyncEngine, session_id: str) -> dict[str, Any]:
    """A session's rows in every table, message ids replaced by the message text they
    point at (ids differ between databases), timestamps to the second."""
    from sqlalchemy import and_, select

    from turnstore.persistence.models import DEFAULT_TABLES as T
    from turnstore.persistence.records import format_timestamp

    s, m, u = T.structure, T.messages, T.usage
    async with engine.connect() as conn:

        async def rows(statement: Any) -> list[tuple[Any, ...]]:
            return [
                tuple(format_timestamp(v) if hasattr(v, "tzinfo") else v for v in row)
                for row in (await conn.execute(statement)).all()
            ]

        return {
            "session": await rows(
                select(T.sessions.c.created_at, T.sessions.c.updated_at).where(
                    T.sessions.c.session_id == session_id
                )
            ),
            "messages": await rows(
                select(m.c.message_data, m.c.created_at)
                .where(m.c.session_id == session_id)
                .order_by(m.c.id)
            ),
            "structure": await rows(
                select(
                    m.c.message_data,
                    s.c.branch_id,
                    s.c.message_type,
                    s.c.sequence_number,
                    s.c.user_turn_number,
                    s.c.branch_turn_number,
                    s.c.tool_name,
                    s.c.created_at,
                )
                .join(m, and_(m.c.id == s.c.message_id, m.c.session_id == s.c.session_id))
                .where(s.c.session_id == session_id)
                .order_by(s.c.id)
            ),
            "usage": await rows(
                select(
                    u.c.branch_id,
                    u.c.user_turn_number,
                    u.c.requests,
                    u.c.input_tokens,
                    u.c.output_tokens,
                    u.c.total_tokens,
                    u.c.input_tokens_details,
                    u.c.output_tokens_details,
                    u.c.created_at,
                )
                .where(u.c.session_id == session_id)
                .order_by(u.c.id)
            ),
            "reservations": await rows(
                select(T.reservations.c.branch_id)
                .where(T.reservations.c.session_id == session_id)
                .order_by(T.reservations.c.branch_id)
            ),
            "generation": await rows(
                select(T.generations.c.generation).where(T.generations.c.session_id == session_id)
            ),
            **{
                table.name: await rows(
                    select(*[c for c in table.columns if c.name != "session_id"])
                    .where(table.c.session_id == session_id)
                    .order_by(*table.primary_key.columns)
                )
                for table in (T.turn_models, T.lineage, T.append_keys)
            },
            "info": await rows(
                select(
                    T.info.c.user_id,
                    T.info.c.title,
                    T.info.c["metadata"],
                    T.info.c.created_at_us,
                    T.info.c.last_activity_us,
                ).where(T.info.c.session_id == session_id)
            ),
        }
