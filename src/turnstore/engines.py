"""Engines shared by sessions: one per database URL and event loop, plus transaction scopes.

An ``AsyncEngine`` and its pooled driver connections belong to the event loop that opened them,
so the registry keys engines by (event loop, URL). Sessions on the same URL in the same loop
share one engine and pool; :func:`dispose_engines` releases them.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from turnstore.dialects import DialectProfile, profile_for
from turnstore.errors import ConnectionLostError, InvalidArgumentError


class _NoGate:
    """Stands in for a lock where no in-process serialization is needed."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc_info: object) -> None:
        return None


_NO_GATE = _NoGate()


@dataclass(eq=False)
class EngineHandle:
    """An engine with what turnstore keeps beside it: dialect profile, gates, schema state.

    Attributes:
        engine: The SQLAlchemy async engine.
        profile: How this engine's dialect differs.
        owned: Whether turnstore created the engine and may dispose of it.
        dispose_when_unused: Whether releasing the last session disposes the engine.
    """

    engine: AsyncEngine
    profile: DialectProfile
    owned: bool
    dispose_when_unused: bool = False
    private: bool = False
    users: int = 0
    ready_schemas: set[Hashable] = field(default_factory=set)
    schema_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _write_gate: asyncio.Lock | None = None
    _read_gate: asyncio.Lock | None = None

    def __post_init__(self) -> None:
        self.profile.prepare_engine(self.engine)
        if self.profile.serializes_writers_in_process:
            self._write_gate = asyncio.Lock()
        if isinstance(self.engine.pool, StaticPool):
            # One connection for everything: readers must queue behind writers too.
            self._write_gate = self._write_gate or asyncio.Lock()
            self._read_gate = self._write_gate
        self._read_engine = (
            self.engine.execution_options(**self.profile.read_execution_options)
            if self.profile.read_execution_options
            else self.engine
        )

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction: committed when the block exits, rolled back if it raises.

        Raises:
            ConnectionLostError: The connection broke during the transaction.
        """
        committing = False
        try:
            async with self._write_gate or _NO_GATE, self.engine.begin() as conn:
                await self.profile.begin_write(conn)
                yield conn
                committing = True
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            raise _connection_lost(committing) from exc

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncConnection]:
        """A connection for read-only statements.

        Raises:
            ConnectionLostError: The connection broke during the read.
        """
        try:
            async with self._read_gate or _NO_GATE, self._read_engine.connect() as conn:
                yield conn
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            raise _connection_lost(False) from exc


def _connection_lost(committing: bool) -> ConnectionLostError:
    """The error for a connection that broke; SQLAlchemy has already discarded it."""
    if committing:
        return ConnectionLostError(
            "The database connection was lost while committing; the server may or may not "
            "have applied the operation. Check the session's state before you retry."
        )
    return ConnectionLostError(
        "The database connection was lost during the operation, which was rolled back; "
        "retry it (the next call opens a fresh connection)."
    )


_registry: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Hashable, EngineHandle]] = (
    weakref.WeakKeyDictionary()
)


def _loop_handles() -> dict[Hashable, EngineHandle]:
    loop = asyncio.get_running_loop()
    handles = _registry.get(loop)
    if handles is None:
        handles = _registry[loop] = {}
    return handles


def sqlite_url(db_path: str | Path) -> URL:
    """The aiosqlite URL for a database path (``":memory:"`` for a private in-memory one).

    Raises:
        InvalidArgumentError: ``db_path`` is neither a string nor a path.
    """
    if not isinstance(db_path, str | Path):
        raise InvalidArgumentError(f"db_path must be a str or Path; got {type(db_path).__name__}")
    if str(db_path) == ":memory:":
        return URL.create("sqlite+aiosqlite", database=":memory:")
    return URL.create("sqlite+aiosqlite", database=str(Path(db_path).expanduser().resolve()))


def _url_key(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def acquire_for_url(url: str | URL) -> EngineHandle:
    """Return the shared handle for ``url`` in the running loop, creating its engine if needed.

    A URL whose profile asks for a private engine (SQLite's ``:memory:``) gets one of its own:
    every in-memory database is its own database, as with the SDK's class.

    Raises:
        InvalidArgumentError: The URL cannot be parsed.
    """
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise InvalidArgumentError(f"Not a database URL: {url!r} ({exc})") from exc
    profile = profile_for(parsed.get_backend_name())
    private = profile.private_engine(parsed)
    handles = _loop_handles()
    key: Hashable = object() if private else _url_key(parsed)
    handle = handles.get(key)
    if handle is None:
        engine = create_async_engine(parsed, **profile.engine_options(parsed))
        handle = EngineHandle(
            engine,
            profile,
            owned=True,
            # Thread-per-connection SQLite engines are cheap to reopen and hold file handles;
            # server pools are expensive to rebuild, so they live until dispose_engines().
            dispose_when_unused=private or profile.serializes_writers_in_process,
            private=private,
        )
        handles[key] = handle
    handle.users += 1
    return handle


def acquire_for_engine(engine: AsyncEngine) -> EngineHandle:
    """Return the handle wrapping a caller-owned engine (never disposed by turnstore)."""
    handles = _loop_handles()
    handle = handles.get(engine)
    if handle is None:
        handle = handles[engine] = EngineHandle(
            engine, profile_for(engine.dialect.name), owned=False
        )
    handle.users += 1
    return handle


async def release(handle: EngineHandle) -> None:
    """Drop one session's use of ``handle``; dispose the engine if it is no longer wanted."""
    handle.users = max(0, handle.users - 1)
    if handle.users or not (handle.owned and handle.dispose_when_unused):
        return
    handles = _loop_handles()
    for key in [key for key, candidate in handles.items() if candidate is handle]:
        del handles[key]
    await handle.engine.dispose()


def release_soon(handle: EngineHandle) -> asyncio.Task[None]:
    """Release ``handle`` in a background task of the running loop (for synchronous close).

    :func:`dispose_engines` waits for such tasks, so shutting down cleanly needs no more.
    """
    loop = asyncio.get_running_loop()
    task = loop.create_task(release(handle))
    pending = _pending_releases.setdefault(loop, set())
    pending.add(task)
    task.add_done_callback(pending.discard)
    return task


_pending_releases: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[asyncio.Task[None]]] = (
    weakref.WeakKeyDictionary()
)


async def dispose_engines(url: str | URL | None = None) -> None:
    """Close the pooled connections of the engines turnstore created in the running loop.

    Call it when an application shuts down (or between test cases). Sessions still open keep
    working: their next operation opens fresh connections. In-memory SQLite databases belong
    to their session and are left alone (closing the session disposes them).

    Args:
        url: Only the engine for this URL; all of them when ``None``.
    """
    pending = _pending_releases.get(asyncio.get_running_loop())
    if pending:
        await asyncio.gather(*pending)
    wanted = None if url is None else _url_key(make_url(url))
    for key, handle in list(_loop_handles().items()):
        if handle.owned and not handle.private and wanted in (None, key):
            await handle.engine.dispose()
