"""Read-only SQLite databases: every read works, every write raises ReadOnlyDatabaseError.

SQLite only: a server's read-only mode is the server's business. The tests run as any user:
a read-only directory is made with ``chattr +i`` where the file system allows it, because
permissions do not stop root.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import turnstore
from tests.helpers import function_call, function_output, run_result, turn, user
from tests.hostile_support import snapshot
from turnstore import AdvancedSession, AdvancedSQLiteSession, ReadOnlyDatabaseError

WRITES: dict[str, Callable[[AdvancedSession], Awaitable[Any]]] = {
    "add_items": lambda s: s.add_items(turn("never")),
    "keyed add_items": lambda s: s.add_items(turn("never"), idempotency_key="k"),
    "pop_item": lambda s: s.pop_item(),
    "clear_session": lambda s: s.clear_session(),
    "create_branch_from_turn": lambda s: s.create_branch_from_turn(1, "never"),
    "create_branch_from_content": lambda s: s.create_branch_from_content("first", "never"),
    "delete_branch": lambda s: s.delete_branch("alt", force=True),
}


async def written(path: Path) -> dict[str, Any]:
    """A database with history, closed cleanly; what every read answers on it."""
    session = AdvancedSQLiteSession(session_id="ro", db_path=path, create_tables=True)
    await session.add_items(turn("first question"))
    await session.store_run_usage(run_result())
    await session.add_items([user("second question"), function_call("lookup")])
    await session.add_items([function_output()])
    await session.create_branch_from_turn(2, "alt")
    await session.add_items(turn("alternative"))
    await session.switch_to_branch("main")
    state = await snapshot(session)
    await session.aclose()
    await turnstore.dispose_engines()
    return state


def digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


async def check_read_only(session: AdvancedSession, expected: dict[str, Any]) -> None:
    assert await snapshot(session) == expected
    for name, write in WRITES.items():
        with pytest.raises(ReadOnlyDatabaseError, match="read-only") as raised:
            await write(session)
        assert raised.value.operation == name.split()[-1], name
    # store_run_usage never raises: the drop is counted.
    await session.store_run_usage(run_result(input_tokens=500))
    assert session.dropped_usage_writes == 1
    assert await snapshot(session) == expected


@pytest.mark.parametrize("create_tables", [False, True])
async def test_a_database_opened_with_mode_ro(tmp_path: Path, create_tables: bool) -> None:
    path = tmp_path / "store.db"
    expected = await written(path)
    before = digest(tmp_path)
    session = AdvancedSession(
        session_id="ro",
        url=f"sqlite+aiosqlite:///file:{path}?mode=ro&uri=true",
        create_tables=create_tables,
    )
    store = turnstore.Store(
        url=f"sqlite+aiosqlite:///file:{path}?mode=ro&uri=true", create_tables=create_tables
    )
    try:
        await check_read_only(session, expected)
        info = await store.get_session_info("ro")
        assert info is not None
        assert info.session_id == "ro"
    finally:
        await session.aclose()
        await store.aclose()
        await turnstore.dispose_engines()
    assert digest(tmp_path)["store.db"] == before["store.db"]


@contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """Make ``paths`` unchangeable even for root, for the duration of the block."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not available")
    done = subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"this file system has no immutable flag: {done.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=True)


async def test_a_database_in_a_read_only_directory(tmp_path: Path) -> None:
    directory = tmp_path / "shipped"
    directory.mkdir()
    path = directory / "store.db"
    expected = await written(path)
    # A writer that closed cleanly left neither -wal nor -shm: the reader cannot create them.
    assert sorted(p.name for p in directory.iterdir()) == ["store.db"]
    before = digest(directory)
    with immutable(path, directory):
        for create_tables in (False, True):
            session = AdvancedSQLiteSession(
                session_id="ro", db_path=path, create_tables=create_tables
            )
            try:
                await check_read_only(session, expected)
            finally:
                await session.aclose()
                await turnstore.dispose_engines()
    assert digest(directory) == before
