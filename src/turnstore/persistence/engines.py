"""Engines shared by sessions, and how a unit of work reaches the database.

The repository writes every operation as a synchronous function of a SQLAlchemy
``Connection`` (a *unit of work*); an :class:`EngineHandle` runs it as one transaction:

* on asyncio drivers (asyncpg, asyncmy, a caller's own ``AsyncEngine``), inside
  ``AsyncConnection.run_sync``, so the function's statements are awaited one by one;
* on SQLite files and in-memory databases that turnstore opens itself, as one call on a worker
  thread with SQLite's own driver. A whole transaction then costs one thread hop, where an
  asyncio SQLite driver pays several hops per statement. One writer thread per database
  serializes this process's writers without polling SQLite's busy handler; reads run on a
  reader thread of their own, which WAL lets run beside the writer. Both threads run what
  queued while they were busy as one group (see :mod:`turnstore.persistence.batching`).

Handles are kept per (event loop, URL): an ``AsyncEngine``'s pooled connections belong to the
loop that opened them. Sessions on one URL in one loop share a handle;
:func:`dispose_engines` releases their connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import weakref
from collections.abc import AsyncIterator, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import create_engine
from sqlalchemy.engine import URL, Connection, Dialect, Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from turnstore.errors import InvalidArgumentError, MissingExtraError, connection_lost
from turnstore.persistence.batching import GroupRunner, Job, Outcome
from turnstore.persistence.dialects import profile_for
from turnstore.persistence.dialects.base import DialectProfile
from turnstore.persistence.driver_calls import AsyncpgCalls
from turnstore.persistence.server_routines import ServerRoutines

P = ParamSpec("P")
T = TypeVar("T")

#: A unit of work: a synchronous function of a connection, run inside one transaction.
Work = Callable[Concatenate[Connection, P], T]


class _NoGate:
    """Stands in for a lock where no in-process serialization is needed."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc_info: object) -> None:
        return None


_NO_GATE = _NoGate()


@dataclass(eq=False)
class EngineHandle:
    """An engine with what turnstore keeps beside it: dialect profile, schema state, users.

    Attributes:
        profile: How this engine's dialect differs.
        owned: Whether turnstore created the engine and may dispose of it.
        dispose_when_unused: Whether releasing the last session disposes the engine.
        private: Whether the engine serves one session only (an in-memory database).
        users: Sessions currently holding the handle.
        ready_schemas: Table sets known to exist on this database.
        routines: Server functions known to exist, by table set (see
            :mod:`turnstore.persistence.server_routines`).
        distributed: Whether the database distributes its tables over several nodes (a
            Citus coordinator): statements that lock rows of several sessions at once must
            then lock one session at a time. ``None`` until the first statement that
            cares asks (:meth:`is_distributed`), so a process that never runs one never
            pays the lookup.
        without_info: Table sets whose database predates the session info table (migration
            0005): sessions work, the store's features refuse.
        driver_calls: Runs single statements on the driver itself, where the engine's
            driver allows it (``None`` elsewhere).
        schema_lock: Serializes schema preparation within the loop.
        statement_size_limit: The most bytes one statement may have on this server (``None``:
            no limit, or not read yet); read once per engine by :meth:`read_limits`.
        absent_tables: Optional tables (see ``StoreTables.optional``) a ready table set
            lacks, by table set.
    """

    profile: DialectProfile
    owned: bool
    dispose_when_unused: bool = False
    private: bool = False
    users: int = 0
    ready_schemas: set[Hashable] = field(default_factory=set)
    routines: dict[Hashable, ServerRoutines] = field(default_factory=dict)
    without_info: set[Hashable] = field(default_factory=set)
    distributed: bool | None = None
    driver_calls: AsyncpgCalls | None = None
    schema_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    statement_size_limit: int | None = None
    absent_tables: dict[Hashable, frozenset[str]] = field(default_factory=dict)
    _limits_read: bool = False

    def is_distributed(self, conn: Connection) -> bool:
        """Whether the database spreads sessions over several nodes (a Citus coordinator).

        There a row lock must name one session per statement (Citus refuses ``SELECT ...
        FOR UPDATE`` over rows of several shards), and erasure batches may take longer (see
        ``turnstore.store.DISTRIBUTED_BATCH_SECONDS``). Asked of the server once per engine.
        """
        if self.distributed is None:
            self.distributed = self.profile.cluster_node(conn) is not None
        return self.distributed

    async def read_limits(self) -> None:
        """Read the server's limits once per engine (``max_allowed_packet`` on MySQL)."""
        if not self._limits_read:
            await self.read(self.read_limits_on)

    def read_limits_on(self, conn: Connection) -> None:
        """:meth:`read_limits` on a connection the caller holds (inside one of its reads)."""
        if not self._limits_read:
            self.statement_size_limit = self.profile.statement_size_limit(conn)
            self._limits_read = True

    @property
    def engine(self) -> object:
        """The underlying SQLAlchemy engine (identity only; callers must not use it)."""
        raise NotImplementedError

    @property
    def dialect(self) -> Dialect:
        """The engine's dialect."""
        engine = self.engine
        assert isinstance(engine, Engine | AsyncEngine)
        return engine.dialect

    @property
    def max_index_name_length(self) -> int:
        """The longest index name the database accepts as it is."""
        dialect = self.dialect
        return int(dialect.max_index_name_length or dialect.max_identifier_length)

    async def write(self, work: Work[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``work`` in a write transaction: committed if it returns, rolled back if not."""
        raise NotImplementedError

    async def read(self, work: Work[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run read-only ``work`` on a connection that sees the latest committed state."""
        raise NotImplementedError

    async def dispose(self, *, final: bool = False) -> None:
        """Close pooled connections; with ``final``, also stop whatever the handle runs."""
        raise NotImplementedError

    def steps(self, *, write: bool) -> contextlib.AbstractAsyncContextManager[Steps]:
        """One transaction whose units of work are handed over one at a time, with awaits between.

        For work that streams: a session imported batch by batch is written in one write
        transaction (committed when the block ends, rolled back if it raises), and a session
        exported batch by batch is read from one snapshot (``write=False``), so a writer
        between two batches cannot make the export inconsistent.
        """
        raise NotImplementedError


class Steps:
    """Runs units of work, one after the other, inside one open transaction."""

    async def run(self, work: Work[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``work`` on the transaction's connection."""
        raise NotImplementedError


class _AsyncSteps(Steps):
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def run(self, work: Work[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._conn.run_sync(lambda sync_conn: work(sync_conn, *args, **kwargs))


class _AbandonedError(Exception):
    """Ends a threaded step job that its owner abandoned; rolls its transaction back."""


_COMMIT = object()
_ABORT = object()


class _ThreadSteps(Steps):
    """Steps served by one job on a worker thread, which holds the connection throughout.

    The job (run by the handle's writer or reader thread) takes units of work from a queue
    until told to finish; the thread does nothing else meanwhile, which is what a single
    SQLite writer needs anyway.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, snapshot: Callable[[Connection], None]):
        self._loop = loop
        self._snapshot = snapshot
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()

    async def run(self, work: Work[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        answer: asyncio.Future[T] = self._loop.create_future()
        self._queue.put((lambda conn: work(conn, *args, **kwargs), answer))
        return await answer

    def finish(self, *, commit: bool) -> None:
        self._queue.put(_COMMIT if commit else _ABORT)

    def serve(self, conn: Connection) -> None:
        self._snapshot(conn)
        while True:
            item = self._queue.get()
            if item is _COMMIT:
                return
            if item is _ABORT:
                raise _AbandonedError
            job, answer = item
            try:
                value = job(conn)
            except BaseException as exc:
                self._loop.call_soon_threadsafe(_settle, answer, None, exc)
                raise
            self._loop.call_soon_threadsafe(_settle, answer, value, None)


def _settle(answer: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if answer.done():
        return
    if error is not None:
        answer.set_exception(error)
    else:
        answer.set_result(value)


class AsyncEngineHandle(EngineHandle):
    """Runs units of work on an ``AsyncEngine`` through ``run_sync``.

    A unit whose server connection breaks raises :class:`ConnectionLostError`; SQLAlchemy
    discards the broken connection, so the next call gets a fresh one.
    """

    def __init__(self, engine: AsyncEngine, profile: DialectProfile, **options: Any) -> None:
        super().__init__(profile, **options)
        self._engine = engine
        profile.prepare_engine(engine.sync_engine)
        self._write_gate: asyncio.Lock | None = None
        self._read_gate: asyncio.Lock | None = None
        if profile.serializes_writers_in_process:
            # In-process writers queue on a cheap lock instead of SQLite's busy handler.
            self._write_gate = asyncio.Lock()
        if isinstance(engine.pool, StaticPool):
            # One connection for everything: readers must queue behind writers too.
            self._write_gate = self._write_gate or asyncio.Lock()
            self._read_gate = self._write_gate
        if self._write_gate is None:
            # Direct calls skip the gates: only where nothing needs to queue in process.
            self.driver_calls = profile.driver_calls(engine)
        self._read_engine = (
            engine.execution_options(**profile.read_execution_options)
            if profile.read_execution_options
            else engine
        )

    @property
    def engine(self) -> AsyncEngine:
        """The wrapped ``AsyncEngine``."""
        return self._engine

    async def write(self, work: Work[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``work`` in a write transaction: committed if it returns, rolled back if not."""
        profile = self.profile

        def transaction(conn: Connection) -> T:
            profile.begin_write(conn)
            return work(conn, *args, **kwargs)

        with _ConnectionLossGuard() as guard:
            async with self._write_gate or _NO_GATE, self._engine.begin() as conn:
                result = await conn.run_sync(transaction)
                # Past this point the unit of work is done; only COMMIT can still fail.
                guard.committing = True
        return result

    async def read(self, work: Work[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run read-only ``work`` on a connection that sees the latest committed state."""
        with _ConnectionLossGuard():
            async with self._read_gate or _NO_GATE, self._read_engine.connect() as conn:
                return await conn.run_sync(lambda sync_conn: work(sync_conn, *args, **kwargs))

    async def dispose(self, *, final: bool = False) -> None:
        """Close the pool's connections (the engine stays usable)."""
        await self._engine.dispose()

    @contextlib.asynccontextmanager
    async def steps(self, *, write: bool) -> AsyncIterator[Steps]:
        """One transaction on a pooled connection; see :meth:`EngineHandle.steps`."""
        profile = self.profile
        with _ConnectionLossGuard() as guard:
            if write:
                async with self._write_gate or _NO_GATE, self._engine.begin() as conn:
                    await conn.run_sync(profile.begin_write)
                    yield _AsyncSteps(conn)
                    guard.committing = True
            else:
                async with (
                    self._read_gate or _NO_GATE,
                    self._engine.connect() as conn,
                    conn.begin(),
                ):
                    await conn.run_sync(profile.begin_snapshot)
                    yield _AsyncSteps(conn)


class _ConnectionLossGuard:
    """Raises :class:`ConnectionLostError` for a connection that broke inside the block.

    Only a ``DBAPIError`` whose connection SQLAlchemy invalidated is translated (chained with
    ``from``); every other exception passes through unchanged.

    Attributes:
        committing: Set by the caller once the unit of work has returned, so that a break
            from then on is reported as one during COMMIT, whose outcome is unknown.
    """

    __slots__ = ("committing",)

    def __init__(self) -> None:
        self.committing = False

    def __enter__(self) -> _ConnectionLossGuard:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            raise connection_lost(outcome_unknown=self.committing) from exc


class ThreadedEngineHandle(EngineHandle):
    """Runs units of work on worker threads with a synchronous driver, in groups.

    Writes go to one writer thread. The writes that queued while it was busy run next as one
    group: one transaction, each unit inside its own savepoint, so a unit that fails is rolled
    back alone and the rest commit together (group commit). A caller hears back only after the
    group's COMMIT; if the COMMIT itself fails, every unit of the group fails. Reads go to a
    reader thread the same way, each on the connection outside any transaction, so each sees
    the latest commit. Under load this turns many thread hops and small transactions into few,
    and no caller ever sees another's uncommitted or partial write.

    Args:
        engine: A synchronous engine whose connections may move between threads.
        profile: The dialect profile.
        separate_reader: Whether reads get a thread of their own. A database held in one
            connection (``:memory:``) has nothing to read concurrently: its reads queue on the
            writer thread on their own.
    """

    def __init__(
        self, engine: Engine, profile: DialectProfile, *, separate_reader: bool, **options: Any
    ) -> None:
        super().__init__(profile, **options)
        self._engine = engine
        profile.prepare_engine(engine)
        self._writer = GroupRunner(self._write_group, "turnstore-writer")
        self._reader = (
            GroupRunner(self._read_group, "turnstore-reader") if separate_reader else None
        )

    @property
    def engine(self) -> Engine:
        """The wrapped synchronous engine."""
        return self._engine

    async def write(self, work: Work[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``work`` atomically on the writer thread; return once it is committed."""
        return await self._writer.run(lambda conn: work(conn, *args, **kwargs))

    async def read(self, work: Work[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run read-only ``work`` on the reader thread."""

        def job(conn: Connection) -> T:
            return work(conn, *args, **kwargs)

        if self._reader is None:
            outcome = await self._writer.call(lambda: self._read_group([job])[0])
            result: T = outcome.unwrap()
            return result
        return await self._reader.run(job)

    @contextlib.asynccontextmanager
    async def steps(self, *, write: bool) -> AsyncIterator[Steps]:
        """One job on the writer (or reader) thread serves every step; see
        :meth:`EngineHandle.steps`."""  # noqa: D205, D209
        loop = asyncio.get_running_loop()
        snapshot = _no_snapshot if write else self.profile.begin_snapshot
        steps = _ThreadSteps(loop, snapshot=snapshot)
        if write:
            served = loop.create_task(self._writer.run(steps.serve))
        elif self._reader is None:
            served = loop.create_task(
                self._writer.call(lambda: self._read_group([steps.serve])[0].unwrap())
            )
        else:
            served = loop.create_task(self._reader.run(steps.serve))
        try:
            yield steps
        except BaseException:
            steps.finish(commit=False)
            with contextlib.suppress(Exception):
                await asyncio.shield(served)
            raise
        steps.finish(commit=True)
        await asyncio.shield(served)

    def _write_group(self, jobs: list[Job]) -> list[Outcome]:
        with self._engine.begin() as conn:
            self.profile.begin_write(conn)
            if len(jobs) == 1:
                # Alone in its transaction: an error rolls the transaction back, no savepoint.
                return [Outcome(value=jobs[0](conn))]
            # Savepoints go straight to the driver: SQLAlchemy's begin_nested() compiles each
            # SAVEPOINT statement afresh, which costs more than a typical unit of work.
            driver = conn.connection.driver_connection
            assert driver is not None
            outcomes = []
            for job in jobs:
                driver.execute("SAVEPOINT turnstore_unit")
                outcome = Outcome.of(job, conn)
                if outcome.error is not None:
                    driver.execute("ROLLBACK TO SAVEPOINT turnstore_unit")
                driver.execute("RELEASE SAVEPOINT turnstore_unit")
                outcomes.append(outcome)
            return outcomes

    def _read_group(self, jobs: list[Job]) -> list[Outcome]:
        with self._engine.connect() as conn:
            return [Outcome.of(job, conn) for job in jobs]

    async def dispose(self, *, final: bool = False) -> None:
        """Close the pool's connections; with ``final``, stop the worker threads too."""
        # On the writer thread, so no transaction is mid-flight on a connection being closed.
        await self._writer.call(self._engine.dispose)
        if final:
            self._writer.shutdown()
            if self._reader is not None:
                self._reader.shutdown()


def _no_snapshot(conn: Connection) -> None:
    """A write transaction needs no snapshot of its own: it holds the write lock."""


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


def _new_handle(
    url: URL, profile: DialectProfile, *, private: bool, engine_kwargs: Mapping[str, Any]
) -> EngineHandle:
    # Thread-run engines are cheap to reopen and hold file handles; server pools are
    # expensive to rebuild, so they live until dispose_engines().
    threaded = profile.threaded_engine(url)
    options: dict[str, Any] = {
        "owned": True,
        "private": private,
        "dispose_when_unused": private or threaded is not None,
    }
    try:
        if threaded is not None:
            return ThreadedEngineHandle(
                create_engine(
                    threaded.url,
                    **{"hide_parameters": True, **threaded.engine_options, **engine_kwargs},
                ),
                profile,
                separate_reader=threaded.separate_reader,
                **options,
            )
        # Statement parameters are the user's messages: keep them out of error text and logs.
        options_for_url = {"hide_parameters": True, **profile.engine_options(url), **engine_kwargs}
        engine = create_async_engine(url, **options_for_url)
    except ImportError as exc:
        where = url.render_as_string(hide_password=True)
        raise MissingExtraError(f"Cannot use {where!r}: {profile.driver_hint(url)}") from exc
    return AsyncEngineHandle(engine, profile, **options)


def acquire_for_url(url: str | URL, engine_kwargs: Mapping[str, Any] | None = None) -> EngineHandle:
    """Return the shared handle for ``url`` in the running loop, creating its engine if needed.

    A URL whose profile asks for a private engine (SQLite's ``:memory:``) gets one of its own:
    every in-memory database is its own database, as with the SDK's class.

    Args:
        url: The database URL.
        engine_kwargs: Keyword arguments for the engine, over turnstore's own; sessions share
            an engine only when they pass the same ones.

    Raises:
        InvalidArgumentError: The URL cannot be parsed.
        MissingExtraError: The URL's driver is not installed.
    """
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise InvalidArgumentError(f"Not a database URL: {url!r} ({exc})") from exc
    profile = profile_for(parsed.get_backend_name())
    private = profile.private_engine(parsed)
    handles = _loop_handles()
    kwargs = dict(engine_kwargs or {})
    key: Hashable = object() if private else _url_key(parsed)
    if kwargs and not private:
        key = (key, repr(sorted(kwargs.items())))
    handle = handles.get(key)
    if handle is None:
        handle = handles[key] = _new_handle(parsed, profile, private=private, engine_kwargs=kwargs)
    handle.users += 1
    return handle


def acquire_for_engine(engine: AsyncEngine) -> EngineHandle:
    """Return the handle wrapping a caller-owned engine (never disposed by turnstore)."""
    handles = _loop_handles()
    handle = handles.get(engine)
    if handle is None:
        handle = handles[engine] = AsyncEngineHandle(
            engine, profile_for(engine.dialect.name), owned=False
        )
    handle.users += 1
    return handle


def share(handle: EngineHandle) -> EngineHandle:
    """Count one more user of a handle already held (a store lending its engine to a session)."""
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
    await handle.dispose(final=True)


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
        # Engines made with engine_kwargs are keyed (url, kwargs).
        url_key = key[0] if isinstance(key, tuple) else key
        if handle.owned and not handle.private and wanted in (None, url_key):
            await handle.dispose()
