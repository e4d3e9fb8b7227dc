"""``current_branch_id`` (every session class) and the SDK's ``_current_branch_id`` (drop-in)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from agents.extensions.memory import AdvancedSQLiteSession as SDKSession

from tests.conftest import Backend
from tests.helpers import turn
from turnstore import AdvancedSession, AdvancedSQLiteSession


async def walk_branches(session: Any, other: Any, read: Any) -> list[str]:
    """The current branch after each step of a branching script; ``read(s)`` gives it."""
    seen = [read(session)]
    await session.add_items(turn("one"))
    await session.add_items(turn("two"))
    await session.create_branch_from_turn(2, "alt")
    seen.append(read(session))
    await session.switch_to_branch("main")
    seen.append(read(session))
    await session.switch_to_branch("alt")
    await session.delete_branch("alt", force=True)
    seen.append(read(session))
    await session.create_branch_from_turn(2, "alt2")
    await session.add_items(turn("three"))
    seen.append(read(session))
    # Another instance clears the session: this one learns of it at its next read.
    await other.clear_session()
    seen.append(read(session))
    await session.get_items()
    seen.append(read(session))
    await session.add_items(turn("four"))
    await session.create_branch_from_turn(1, "alt3")
    await session.clear_session()
    seen.append(read(session))
    return seen


EXPECTED = ["main", "alt", "main", "main", "alt2", "alt2", "main", "main"]


async def test_current_branch_id_follows_the_session(backend: Backend) -> None:
    session = backend.session()
    other = backend.session(session.session_id)
    assert await walk_branches(session, other, lambda s: s.current_branch_id) == EXPECTED
    with pytest.raises(AttributeError):
        session.current_branch_id = "x"  # type: ignore[misc]


async def test_drop_in_has_the_sdk_name_too(sqlite_path: Path) -> None:
    session = AdvancedSQLiteSession(session_id="s", db_path=sqlite_path, create_tables=True)
    other = AdvancedSQLiteSession(session_id="s", db_path=sqlite_path)

    def both(s: AdvancedSQLiteSession) -> str:
        assert s._current_branch_id == s.current_branch_id
        return s._current_branch_id

    assert await walk_branches(session, other, both) == EXPECTED
    with pytest.raises(AttributeError):
        session._current_branch_id = "x"  # type: ignore[misc]
    await session.aclose()
    await other.aclose()


def test_the_sdk_class_walks_the_same_way(tmp_path: Path) -> None:
    """The script's expectations are the SDK class's own behaviour."""
    import asyncio

    path = tmp_path / "sdk.db"
    session = SDKSession(session_id="s", db_path=path, create_tables=True)
    other = SDKSession(session_id="s", db_path=path)
    try:
        seen = asyncio.run(walk_branches(session, other, lambda s: s._current_branch_id))
    finally:
        session.close()
        other.close()
    assert seen == EXPECTED


async def test_routing_sessions_report_their_own_branch(backend: Backend) -> None:
    tenant = backend.session()
    front = backend.session(session_for_context=lambda wrapper: tenant)
    await tenant.add_items(turn("one"))
    await tenant.create_branch_from_turn(1, "alt")
    assert tenant.current_branch_id == "alt"
    assert front.current_branch_id == "main"
    assert isinstance(front, AdvancedSession)
