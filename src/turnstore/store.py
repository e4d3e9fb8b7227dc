"""The store: every conversation of a database, listed, counted, inspected, erased and expired.

:class:`Store` is the second face of turnstore beside :class:`~turnstore.AdvancedSession`.
It opens the same engines sessions open (one per URL and event loop, or an engine you own) and
hands out sessions on its engine with :meth:`Store.session`.

Listings are ordered by last activity, newest first, ties broken by session id (greater
first), and paged by an opaque cursor (keyset pagination: the next page starts after the last
row of the previous one, so a page costs the same wherever it starts). While writers write,
paging through never shows a session twice, and every session not written during the paging
is seen exactly once. A session written meanwhile moves to the top: it is seen once, or, if
it moved ahead of the cursor before its page was read, not on this pass but on the next first
page. A cursor belongs to the filter it was made with; using it with another filter raises
:class:`~turnstore.InvalidArgumentError`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from types import TracebackType
from typing import Any, Self

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from turnstore import search as search_module
from turnstore import usage_report
from turnstore.errors import InvalidArgumentError, SessionClosedError
from turnstore.info import (
    SessionSummary,
    check_metadata_filter,
    check_user_id,
    summary_from_row,
    to_micros,
)
from turnstore.lineage import BranchNode
from turnstore.persistence import engines
from turnstore.persistence.erasure import Criteria, Eraser, Removed
from turnstore.persistence.models import (
    DEFAULT_MESSAGES_TABLE,
    DEFAULT_SESSIONS_TABLE,
    StoreTables,
    tables_for,
)
from turnstore.persistence.repository import ConversationRepository
from turnstore.persistence.rollups import Owners
from turnstore.persistence.store_queries import Selection, StoreQueries, track_untracked
from turnstore.schema.distribution import distribute_store
from turnstore.schema.startup import at_head, bring_to_head_when_needed
from turnstore.search import SearchPage
from turnstore.session import AdvancedSession, ContextRouter
from turnstore.store_cursors import CursorCodec
from turnstore.store_moving import StoreMoving
from turnstore.usage_report import UsageRow

_default_logger = logging.getLogger("turnstore")

#: Most sessions one listing page may hold.
MAX_PAGE_SIZE = 1000
#: Most sessions one erasure batch (one transaction) may remove.
MAX_BATCH_SIZE = 10_000
#: Sessions an erasure batch removes by default, at most: a short transaction everywhere.
DEFAULT_BATCH_SIZE = 100
#: How long an erasure batch should take; batches shrink (to one session) when they take
#: much longer, and grow back (to the batch size) when they take much less.
BATCH_SECONDS = 0.02
#: The same on a distributed database (Citus), where every batch pays a two-phase commit over
#: the shards its sessions live on (tens of milliseconds by itself) and locks only those
#: sessions' rows on their workers: no writer of another session waits for it, and a 20 ms
#: target would pin batches at one to three sessions (18 sessions/s measured).
DISTRIBUTED_BATCH_SECONDS = 0.25

#: Called after each batch of an erasure with the totals so far (may return an awaitable).
Progress = Callable[[Removed], object]


@dataclass(frozen=True, slots=True)
class SessionPage:
    """One page of a listing.

    Attributes:
        sessions: The sessions, newest activity first.
        next_cursor: Pass it as ``cursor=`` (with the same filter) for the next page;
            ``None`` on the last page.
    """

    sessions: list[SessionSummary]
    next_cursor: str | None


class Store(StoreMoving):
    """Every conversation of one database: list, count, inspect, delete, erase, expire.

    Give it a database URL (``url=``) or an ``AsyncEngine`` you own (``engine=``); it shares
    engines with sessions exactly as sessions share them with each other, and
    :meth:`session` opens sessions on its engine. Use it as an async context manager, or call
    :meth:`aclose` when done.

    Args:
        url: A SQLAlchemy async URL, as for :class:`~turnstore.AdvancedSession`.
        engine: An ``AsyncEngine`` you own; turnstore never disposes of it.
        create_tables: Create missing tables (and bring turnstore's schema up to date) on
            first use; sessions from :meth:`session` inherit it.
        sessions_table: Name of the sessions table, as for sessions.
        messages_table: Name of the messages table.
        cursor_key: Secret that signs listing cursors. Cursors are always checked for
            tampering; with a key of your own, nobody without it can make one that passes.
            Processes that hand each other cursors need the same key.
        logger: Logger for diagnostics; defaults to the ``turnstore`` logger.

    Raises:
        InvalidArgumentError: Neither or both of ``engine`` and ``url``, or a bad table name.
    """

    def __init__(
        self,
        *,
        url: str | URL | None = None,
        engine: AsyncEngine | None = None,
        create_tables: bool = False,
        sessions_table: str = DEFAULT_SESSIONS_TABLE,
        messages_table: str = DEFAULT_MESSAGES_TABLE,
        cursor_key: bytes | str | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if (engine is None) == (url is None):
            raise InvalidArgumentError("Pass exactly one of engine= or url=")
        self._url = url
        self._engine = engine
        self._create_tables = bool(create_tables)
        self._tables: StoreTables = tables_for(sessions_table, messages_table)
        self.sessions_table = sessions_table
        self.messages_table = messages_table
        self._cursors = CursorCodec(cursor_key)
        self._logger = logger if logger is not None else _default_logger
        self._handles: dict[asyncio.AbstractEventLoop, engines.EngineHandle] = {}
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"Store({state})"

    # -- plumbing ------------------------------------------------------------------------

    def _handle(self) -> engines.EngineHandle:
        if self._closed:
            raise SessionClosedError("Store is closed")
        loop = asyncio.get_running_loop()
        handle = self._handles.get(loop)
        if handle is None:
            if self._engine is not None:
                handle = engines.acquire_for_engine(self._engine)
            else:
                assert self._url is not None
                handle = engines.acquire_for_url(self._url)
            self._handles[loop] = handle
        return handle

    async def _queries(self) -> StoreQueries:
        handle = self._handle()
        repository = ConversationRepository(handle, self._tables)
        await repository.prepare_schema(
            create=self._create_tables,
            migrate_default=bring_to_head_when_needed,
            default_is_current=at_head,
            distribute=distribute_store,
        )
        await repository.ensure_info_table()
        return StoreQueries(handle, self._tables)

    def _check_id(self, value: str, what: str) -> None:
        ConversationRepository(self._handle(), self._tables).check_identifier(value, what)

    # -- sessions ------------------------------------------------------------------------

    def session(
        self,
        session_id: str,
        *,
        user_id: str | None = None,
        title: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        create_tables: bool | None = None,
        logger: logging.Logger | None = None,
        session_settings: Any = None,
        session_for_context: ContextRouter | None = None,
    ) -> AdvancedSession:
        """A session on this store's engine and tables.

        Takes :class:`~turnstore.AdvancedSession`'s keywords, except the engine and table
        names, which are the store's; ``create_tables`` defaults to the store's.

        Raises:
            SessionClosedError: The store is closed.
            InvalidArgumentError: As :class:`~turnstore.AdvancedSession` raises it.
        """
        if self._closed:
            raise SessionClosedError("Store is closed")
        return AdvancedSession._on_shared_engine(
            session_id=session_id,
            acquire=lambda: engines.share(self._handle()),
            create_tables=self._create_tables if create_tables is None else create_tables,
            logger=logger,
            session_settings=session_settings,
            sessions_table=self.sessions_table,
            messages_table=self.messages_table,
            user_id=user_id,
            title=title,
            metadata=metadata,
            session_for_context=session_for_context,
        )

    # -- inspection ----------------------------------------------------------------------

    async def get_session_info(self, session_id: str) -> SessionSummary | None:
        """The summary of one session (as listings give it), or ``None`` if unknown.

        Raises:
            InvalidArgumentError: ``session_id`` is not a str.
            SchemaMissingError: The database predates the session info table.
        """
        if not isinstance(session_id, str):
            raise InvalidArgumentError(f"session_id must be a str; got {type(session_id).__name__}")
        queries = await self._queries()
        self._check_id(session_id, "Session ids")
        row = await queries.summary(session_id)
        return None if row is None else summary_from_row(row)

    async def list_sessions(
        self,
        *,
        user_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        active_after: datetime | None = None,
        active_before: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> SessionPage:
        """A page of sessions, newest activity first (ties: greater session id first).

        Args:
            user_id: Only this user's sessions (``None``: every session).
            metadata: Only sessions whose metadata has these top-level keys with equal JSON
                scalar values (strings exactly, numbers by value, ``True`` is not ``1``).
                Checked row by row along the activity index: combine it with ``user_id``
                on large stores.
            active_after: Only sessions last active at or after this time (naive: UTC).
            active_before: Only sessions last active before this time.
            limit: Most sessions on the page, 1 to ``MAX_PAGE_SIZE``.
            cursor: The previous page's ``next_cursor``, with the same filter.

        Raises:
            InvalidArgumentError: A bad filter or limit, or a cursor that is not a cursor of
                this listing (altered, made up, or from a listing with another filter).
            SchemaMissingError: The database predates the session info table.
        """
        limit = _check_count(limit, "limit", MAX_PAGE_SIZE)
        selection = _selection(user_id, metadata, active_after, active_before)
        after = None if cursor is None else self._cursors.decode(cursor, selection)
        queries = await self._queries()
        if selection.user_id is not None:
            self._check_id(selection.user_id, "User ids")
        rows = await queries.page(selection, after, limit + 1)
        next_cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            last = rows[-1]
            next_cursor = self._cursors.encode((last.last_activity_us, last.session_id), selection)
        return SessionPage([summary_from_row(row) for row in rows], next_cursor)

    async def iter_sessions(
        self,
        *,
        user_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        active_after: datetime | None = None,
        active_before: datetime | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[SessionSummary]:
        """Every matching session, page by page (see :meth:`list_sessions` for filters).

        Raises:
            InvalidArgumentError: A bad filter or page size.
        """
        cursor: str | None = None
        while True:
            page = await self.list_sessions(
                user_id=user_id,
                metadata=metadata,
                active_after=active_after,
                active_before=active_before,
                limit=page_size,
                cursor=cursor,
            )
            for summary in page.sessions:
                yield summary
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def count_sessions(
        self,
        *,
        user_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        active_after: datetime | None = None,
        active_before: datetime | None = None,
    ) -> int:
        """How many sessions match the filters of :meth:`list_sessions` (counted by the database).

        Raises:
            InvalidArgumentError: A bad filter.
        """
        selection = _selection(user_id, metadata, active_after, active_before)
        queries = await self._queries()
        if selection.user_id is not None:
            self._check_id(selection.user_id, "User ids")
        return await queries.count(selection)

    async def track_sessions(self, *, batch_size: int = 1000) -> int:
        """Give sessions written without turnstore their info, and catch up their activity.

        The SDK's own class (or a turnstore release before the info table) writes sessions
        without the info the store lists and expires them by. Migration 0005 and
        ``turnstore db adopt`` record every session they find, and turnstore's own writes
        record theirs; run this where other writers keep writing the database, before a
        listing or a prune that must see their sessions. It also moves forward the last
        activity of sessions those writers touched. Batched, restartable.

        Returns:
            How many sessions got info or had their activity moved forward.

        Raises:
            InvalidArgumentError: A bad ``batch_size``.
        """
        batch_size = _check_count(batch_size, "batch_size", MAX_BATCH_SIZE)
        await self._queries()
        handle = self._handle()
        total, after = 0, None
        while True:
            changed, after = await handle.write(
                track_untracked, self._tables, handle.profile, after, batch_size
            )
            total += changed
            if after is None:
                return total

    # -- erasing -------------------------------------------------------------------------

    async def delete_session(self, session_id: str) -> Removed:
        """Remove everything of one session in one transaction.

        Items, structure, usage, branch reservations, clear generations and info all go.
        Session objects still open on it keep working: their next write starts a new
        conversation under the same id.

        Returns:
            What was removed (``sessions`` is 0 if the session did not exist).

        Raises:
            InvalidArgumentError: ``session_id`` is not a str.
        """
        if not isinstance(session_id, str):
            raise InvalidArgumentError(f"session_id must be a str; got {type(session_id).__name__}")
        await self._queries()
        self._check_id(session_id, "Session ids")
        return await Eraser(self._handle(), self._tables).delete_session(session_id)

    async def erase_user(
        self,
        user_id: str,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> Removed:
        """Remove every session of a user, in batches of short transactions.

        Sessions the user creates while this runs may be left; run it once the user can no
        longer write (or run it again). Stopped midway, it leaves no session half removed,
        and running it again finishes the job.

        Args:
            user_id: The owner whose sessions go.
            batch_size: Most sessions per transaction, 1 to ``MAX_BATCH_SIZE``; batches
                shrink while they take longer than about ``BATCH_SECONDS`` (20 ms;
                ``DISTRIBUTED_BATCH_SECONDS`` on Citus).
            dry_run: Only count what would be removed.
            progress: Called after each batch with the totals so far.

        Returns:
            What was removed (or would be).

        Raises:
            InvalidArgumentError: A bad argument.
        """
        owner = check_user_id(user_id)
        if owner is None:
            raise InvalidArgumentError("user_id must be a str; to remove by age use prune()")
        return await self._remove(
            Criteria(user_id=owner), batch_size, dry_run, _check_progress(progress)
        )

    async def prune(
        self,
        *,
        inactive_for: timedelta | None = None,
        before: datetime | None = None,
        user_id: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> Removed:
        """Remove sessions whose last activity is older than a cut-off, oldest first.

        The cut-off is fixed when the call starts, by the database's clock. Each batch is
        its own short transaction, so writers of other sessions keep working; each session
        goes whole or not at all (one written while a batch picks it is kept, its new turn
        included); stopped midway and run again, it finishes the job.

        Args:
            inactive_for: Remove sessions untouched for this long (give this or ``before``).
            before: Remove sessions last active before this time (naive: UTC).
            user_id: Only this user's sessions.
            batch_size: Most sessions per transaction, 1 to ``MAX_BATCH_SIZE``; batches
                shrink while they take longer than about ``BATCH_SECONDS`` (20 ms;
                ``DISTRIBUTED_BATCH_SECONDS`` on Citus).
            dry_run: Only count what would be removed.
            progress: Called after each batch with the totals so far.

        Returns:
            What was removed (or would be).

        Raises:
            InvalidArgumentError: Neither or both of ``inactive_for`` and ``before``, or a bad
                argument.
        """
        if (inactive_for is None) == (before is None):
            raise InvalidArgumentError("Pass exactly one of inactive_for= or before=")
        if inactive_for is not None and (
            not isinstance(inactive_for, timedelta) or inactive_for < timedelta(0)
        ):
            raise InvalidArgumentError(
                f"inactive_for must be a timedelta of zero or more; got {inactive_for!r}"
            )
        cutoff = None if before is None else to_micros(before, "before")
        owner = check_user_id(user_id)
        batch_size = _check_count(batch_size, "batch_size", MAX_BATCH_SIZE)
        checked_progress = _check_progress(progress)
        if inactive_for is not None:
            queries = await self._queries()
            # A span longer than the clock's past selects everything: clamp to what BIGINT holds.
            idle = inactive_for // timedelta(microseconds=1)
            cutoff = max(await queries.now_micros() - idle, -(2**62))
        return await self._remove(
            Criteria(user_id=owner, inactive_before_us=cutoff),
            batch_size,
            dry_run,
            checked_progress,
        )

    async def _remove(
        self, criteria: Criteria, batch_size: int, dry_run: bool, progress: Progress | None
    ) -> Removed:
        batch_size = _check_count(batch_size, "batch_size", MAX_BATCH_SIZE)
        await self._queries()
        if criteria.user_id is not None:
            self._check_id(criteria.user_id, "User ids")
        eraser = Eraser(self._handle(), self._tables)
        if dry_run:
            total = await eraser.would_remove(criteria)
            await _report(progress, total)
            return total
        total = Removed()
        size = batch_size
        while True:
            started = time.monotonic()
            removed, picked = await eraser.remove_batch(criteria, size)
            elapsed = time.monotonic() - started
            if not picked:
                return total
            total += removed
            await _report(progress, total)
            # Keep each transaction short whatever the sessions weigh and the machine's load:
            # writers of other sessions wait for at most one batch.
            target = DISTRIBUTED_BATCH_SECONDS if eraser.distributed else BATCH_SECONDS
            if elapsed > 2 * target and size > 1:
                size = max(1, size // 2)
            elif elapsed < target / 2 and size < batch_size:
                size = min(batch_size, size * 2)

    # -- usage, branch lineage and search (issue 17) -------------------------------------
    # Kept apart from the listing and erasing code above: these read the usage, model and
    # lineage tables of migration 0007, and the info table only for owners.

    async def _ready(self) -> ConversationRepository:
        repository = ConversationRepository(self._handle(), self._tables)
        await repository.prepare_schema(
            create=self._create_tables,
            default_is_current=at_head,
            migrate_default=bring_to_head_when_needed,
        )
        return repository

    def _owners(self, repository: ConversationRepository) -> Owners | None:
        return Owners(self._tables.info, "user_id") if repository.has_info_table else None

    async def usage(
        self,
        *,
        group_by: str | Sequence[str] = ("day",),
        since: datetime | date | timedelta | None = None,
        until: datetime | date | timedelta | None = None,
        user_id: str | None = None,
        session_id: str | None = None,
        tz: str | tzinfo | None = None,
    ) -> list[UsageRow]:
        """Turns, requests, tokens and cost summed by the database, by any grouping.

        The database reads the turns of the time range through an index and groups them
        (``GROUP BY``); no turn is loaded into Python. Costs are computed per model and UTC day
        from the summed tokens (see :mod:`turnstore.cost`); a row's cost is ``None``, with the
        reason, when any of its turns cannot be priced.

        Args:
            group_by: Any of ``"day"``, ``"week"`` (from Monday), ``"month"`` (at most one of
                these), ``"model"``, ``"user"``, ``"session"``, ``"branch"``, as a sequence
                or a comma-separated string; ``()`` for one totals row. A turn served by
                several models counts in each model's row.
            since: First instant counted: a ``datetime`` (without a zone: in ``tz``), a
                ``date`` (its midnight in ``tz``) or a ``timedelta`` (that long ago).
            until: First instant no longer counted, in the same forms.
            user_id: Only sessions of this owner.
            session_id: Only this session.
            tz: Time zone of the day, week and month buckets (an IANA name or a ``tzinfo``);
                UTC when ``None``.

        Returns:
            :class:`~turnstore.UsageRow` per group, ordered by the grouping keys; ``[]``
            when nothing matches.

        Raises:
            InvalidArgumentError: A bad argument (nothing is read); ``user`` grouping or
                ``user_id`` on a database without the session info table (before 0005).
        """
        repository = await self._ready()
        return await usage_report.usage(
            self._handle(),
            self._tables,
            group_by=group_by,
            since=since,
            until=until,
            user_id=user_id,
            session_id=session_id,
            tz=tz,
            owners=self._owners(repository),
            models_recorded=repository.records_models,
        )

    async def branch_tree(self, session_id: str) -> list[BranchNode]:
        """A session's branch tree, as :meth:`AdvancedSession.branch_tree` gives it.

        Returns:
            The roots, ``main`` first; ``[]`` for a session with nothing stored.
        """
        session = self.session(session_id)
        try:
            return await session.branch_tree()
        finally:
            await session.aclose()

    async def search(
        self,
        term: str,
        *,
        user_id: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> SearchPage:
        """Items containing ``term`` across every session, newest first, a page at a time.

        ``term`` matches literally, ASCII case ignored, in message text, tool arguments and
        tool output. Pages follow by message id (keyset): a page may hold fewer hits than
        ``limit`` while more follow, so go on while ``next_cursor`` is not ``None``. A term
        that matches nothing scans the messages table once (no index serves a substring).

        Raises:
            InvalidArgumentError: A blank term, a limit outside 1..1000, or a cursor another
                search returned (or none did).
        """
        repository = await self._ready()
        return await search_module.search(
            self._handle(),
            self._tables,
            term,
            user_id=user_id,
            limit=limit,
            cursor=cursor,
            owners=self._owners(repository),
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Release the store's engines (sessions it opened keep theirs until they close)."""
        if self._closed:
            return
        self._closed = True
        handles, self._handles = self._handles, {}
        running = asyncio.get_running_loop()
        for loop, handle in handles.items():
            if loop is running:
                await engines.release(handle)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


async def _report(progress: Progress | None, totals: Removed) -> None:
    if progress is None:
        return
    outcome = progress(totals)
    if isinstance(outcome, Awaitable):
        await outcome


def _selection(
    user_id: object,
    metadata: object,
    active_after: object,
    active_before: object,
) -> Selection:
    return Selection(
        user_id=check_user_id(user_id),
        metadata=check_metadata_filter(metadata),
        active_after_us=None if active_after is None else to_micros(active_after, "active_after"),
        active_before_us=(
            None if active_before is None else to_micros(active_before, "active_before")
        ),
    )


def _check_count(value: object, argument: str, most: int) -> int:
    # bool is an int subclass; True as a page size is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{argument} must be an int; got {type(value).__name__}")
    if not 1 <= value <= most:
        raise InvalidArgumentError(f"{argument} must be between 1 and {most}; got {value}")
    return value


def _check_progress(progress: object) -> Progress | None:
    if progress is not None and not callable(progress):
        raise InvalidArgumentError(
            f"progress must be a callable or None; got {type(progress).__name__}"
        )
    return progress


__all__ = ["MAX_BATCH_SIZE", "MAX_PAGE_SIZE", "Removed", "SessionPage", "SessionSummary", "Store"]
