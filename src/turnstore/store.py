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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from turnstore.errors import InvalidArgumentError, SessionClosedError
from turnstore.info import (
    SessionSummary,
    check_metadata_filter,
    check_user_id,
    summary_from_row,
    to_micros,
)
from turnstore.persistence import engines
from turnstore.persistence.models import (
    DEFAULT_MESSAGES_TABLE,
    DEFAULT_SESSIONS_TABLE,
    StoreTables,
    tables_for,
)
from turnstore.persistence.repository import ConversationRepository
from turnstore.persistence.store_queries import Selection, StoreQueries
from turnstore.schema.distribution import distribute_store
from turnstore.schema.migrate import bring_to_head
from turnstore.session import AdvancedSession, ContextRouter
from turnstore.store_cursors import CursorCodec

_default_logger = logging.getLogger("turnstore")

#: Most sessions one listing page may hold.
MAX_PAGE_SIZE = 1000


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


class Store:
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
            create=self._create_tables, migrate_default=bring_to_head, distribute=distribute_store
        )
        repository.require_info_table()
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


__all__ = ["MAX_PAGE_SIZE", "SessionPage", "SessionSummary", "Store"]

# Silence "imported but unused" until the listing and erasure methods use them.
_ = (AsyncIterator, Awaitable, Callable, datetime, timedelta)
