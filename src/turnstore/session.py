"""Agents SDK sessions with branching, usage analytics and structure queries on any database.

:class:`AdvancedSession` works on any supported SQLAlchemy async engine or URL;
:class:`AdvancedSQLiteSession` is the drop-in replacement for the SDK's class of the same name.
Both implement the SDK's ``Session`` protocol, so they go straight into
``Runner.run(agent, input, session=session)``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from turnstore.errors import InvalidArgumentError
from turnstore.info import (
    UNSET,
    SessionSummary,
    check_metadata,
    check_title,
    check_user_id,
    summary_from_row,
)
from turnstore.persistence import engines
from turnstore.persistence.models import DEFAULT_MESSAGES_TABLE, DEFAULT_SESSIONS_TABLE
from turnstore.persistence.records import MAIN_BRANCH, BranchPointer
from turnstore.persistence.store_queries import StoreQueries
from turnstore.persistence.validation import check_identifier
from turnstore.redaction import log_failure
from turnstore.sdk.items import DEFAULT_MAX_ITEM_BYTES, decode, decode_all, to_new_messages
from turnstore.sdk.wrapper_hooks import WrapperHooks
from turnstore.session_branches import SessionBranches
from turnstore.session_checks import check_branch_id, info_defaults
from turnstore.session_core import operation
from turnstore.session_structure import SessionStructure
from turnstore.session_usage import SessionUsage

#: Picks the session that serves a call the Runner made with its run context (see
#: ``session_for_context``).
ContextRouter = Callable[[Any], "AdvancedSession | None"]


# The class is assembled from parts, each in its own module: the state and plumbing every part
# stands on (session_core), branch operations (session_branches), usage and cost
# (session_usage) and structure queries (session_structure), besides the SDK wrappers' hooks;
# this module adds construction, the SDK Session protocol and the session's info.
class AdvancedSession(WrapperHooks, SessionBranches, SessionUsage, SessionStructure):
    """A conversation session with branches, per-turn usage and structure queries.

    Give it an engine you own (``engine=``) or a database URL (``url=``, or
    :meth:`from_url`); sessions on the same URL share one engine and connection pool per event
    loop (see :func:`turnstore.dispose_engines`). Every public mutation is atomic: one
    transaction, or on a SQLite database turnstore opens, one savepoint of a group commit.

    Args:
        session_id: Identifies the conversation.
        engine: An ``AsyncEngine`` you own; turnstore never disposes of it.
        url: A SQLAlchemy async URL (``sqlite+aiosqlite:///file.db``,
            ``postgresql+asyncpg://user@host/db``), used instead of ``engine``. For SQLite
            URLs turnstore runs SQLite's own driver on worker threads instead of aiosqlite.
        create_tables: Create missing tables and indexes on first use. Leave it off where
            migrations manage the schema.
        logger: Logger for diagnostics; defaults to the ``turnstore`` logger.
        session_settings: The SDK's ``SessionSettings`` (or a dict of it); ``limit`` is the
            default number of items ``get_items`` returns.
        sessions_table: Name of the sessions table.
        messages_table: Name of the messages table.
        user_id: The session's owner, stored when the session gets its info (its first
            write, unless ``set_info`` came first); an existing session's owner is not
            changed (use :meth:`set_info`).
        title: The session's title, stored likewise.
        metadata: A JSON dict stored likewise; the store's listings filter on its keys.
        session_for_context: Routes the Runner's calls by run context: called with the
            ``RunContextWrapper`` the Runner passes to ``get_items``, ``add_items``,
            ``pop_item`` and ``clear_session`` (``wrapper=``) and that ``store_run_usage``
            finds on its result, it returns the session that serves the call (for example
            the tenant's own, on the tenant's engine or schema), or ``None`` for this one.
            Without it the run context is ignored.
        max_item_bytes: The most bytes one item may take as JSON (64 MiB by default); larger
            items raise ``InvalidItemError``. On MySQL the server's ``max_allowed_packet``
            may allow less, and is checked too.

        engine_kwargs: With ``url``: keyword arguments for the engine turnstore creates (as
            for ``create_async_engine``; pool size, ``connect_args``...), over turnstore's own.
            Sessions share an engine only when they pass the same ones.

    Raises:
        InvalidArgumentError: Neither or both of ``engine`` and ``url`` were given,
            ``engine_kwargs`` came with ``engine``, a table name is not a plain identifier,
            ``session_id`` is not a valid id (see the README's "Ids, names and limits"), or
            ``user_id``, ``title`` or ``metadata`` is not acceptable (wrong type, too long,
            not JSON).

    Attributes:
        dropped_usage_writes: How many ``store_run_usage`` calls of this instance stored
            nothing because the write failed (each is logged at WARNING).
    """

    def __init__(
        self,
        *,
        session_id: str,
        engine: AsyncEngine | None = None,
        url: str | URL | None = None,
        create_tables: bool = False,
        logger: logging.Logger | None = None,
        session_settings: Any = None,
        sessions_table: str = DEFAULT_SESSIONS_TABLE,
        messages_table: str = DEFAULT_MESSAGES_TABLE,
        user_id: str | None = None,
        title: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        session_for_context: ContextRouter | None = None,
        engine_kwargs: Mapping[str, Any] | None = None,
        max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES,
    ) -> None:
        if (engine is None) == (url is None):
            raise InvalidArgumentError("Pass exactly one of engine= or url=")
        if engine_kwargs is not None and engine is not None:
            raise InvalidArgumentError(
                "engine_kwargs= applies to the engine turnstore creates for url=; configure "
                "your own engine= yourself"
            )
        acquire: Callable[[], engines.EngineHandle]
        if engine is not None:
            acquire = lambda: engines.acquire_for_engine(engine)  # noqa: E731
        else:
            target = url
            assert target is not None
            acquire = lambda: engines.acquire_for_url(target, engine_kwargs)  # noqa: E731
        self._setup(
            session_id=session_id,
            acquire=acquire,
            create_tables=create_tables,
            logger=logger,
            session_settings=session_settings,
            sessions_table=sessions_table,
            messages_table=messages_table,
            info=info_defaults(user_id, title, metadata),
            session_for_context=session_for_context,
            max_item_bytes=max_item_bytes,
        )

    @classmethod
    def _on_shared_engine(
        cls,
        *,
        session_id: str,
        acquire: Callable[[], engines.EngineHandle],
        create_tables: bool,
        logger: logging.Logger | None,
        session_settings: Any,
        sessions_table: str,
        messages_table: str,
        user_id: str | None,
        title: str | None,
        metadata: Mapping[str, Any] | None,
        session_for_context: ContextRouter | None = None,
    ) -> AdvancedSession:
        """A session on an engine handle someone else acquires (a store lending its engine)."""
        session = cls.__new__(cls)
        session._setup(
            session_id=session_id,
            acquire=acquire,
            create_tables=create_tables,
            logger=logger,
            session_settings=session_settings,
            sessions_table=sessions_table,
            messages_table=messages_table,
            info=info_defaults(user_id, title, metadata),
            session_for_context=session_for_context,
        )
        return session

    @classmethod
    def from_url(
        cls,
        *,
        session_id: str,
        url: str | URL,
        create_tables: bool = False,
        logger: logging.Logger | None = None,
        session_settings: Any = None,
        sessions_table: str = DEFAULT_SESSIONS_TABLE,
        messages_table: str = DEFAULT_MESSAGES_TABLE,
        user_id: str | None = None,
        title: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        session_for_context: ContextRouter | None = None,
        engine_kwargs: Mapping[str, Any] | None = None,
        max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES,
    ) -> AdvancedSession:
        """A session on the database at ``url``, sharing the URL's engine with other sessions.

        ``engine_kwargs`` are passed to the engine turnstore creates (as the SDK's
        ``SQLAlchemySession.from_url`` does); see the class's arguments.
        """
        return AdvancedSession(
            session_id=session_id,
            url=url,
            create_tables=create_tables,
            logger=logger,
            session_settings=session_settings,
            sessions_table=sessions_table,
            messages_table=messages_table,
            user_id=user_id,
            title=title,
            metadata=metadata,
            session_for_context=session_for_context,
            engine_kwargs=engine_kwargs,
            max_item_bytes=max_item_bytes,
        )

    # -- plumbing ------------------------------------------------------------------------

    def _routed(self, wrapper: Any) -> AdvancedSession:
        """The session that serves a call made with run context ``wrapper``."""
        if wrapper is None or self._session_for_context is None:
            return self
        target = self._session_for_context(wrapper)
        if target is None:
            return self
        if not isinstance(target, AdvancedSession):
            raise InvalidArgumentError(
                "session_for_context must return a turnstore session or None; "
                f"got {type(target).__name__}"
            )
        return target

    # -- the SDK Session protocol --------------------------------------------------------

    @operation
    async def get_items(
        self, limit: int | None = None, branch_id: str | None = None, *, wrapper: Any = None
    ) -> list[Any]:
        """Items of the current (or given) branch, oldest first.

        Args:
            limit: At most this many of the newest items; defaults to
                ``session_settings.limit`` (``None``, a negative number or a number beyond
                any stored count: all).
            branch_id: Read this branch instead of the current one.
            wrapper: The Runner's ``RunContextWrapper``; used only by ``session_for_context``.
        """
        target = self._routed(wrapper)
        if target is not self:
            return await target.get_items(limit, branch_id)
        limit = self._resolve_limit(limit)
        branch_id = check_branch_id(branch_id)
        store = await self._store()
        branch = branch_id if branch_id is not None else await self._current_branch(store)
        if limit is None or limit <= 0:
            return decode_all(await store.fetch_items(self.session_id, branch, limit))
        # Unreadable rows are skipped, so widen the window until `limit` items are found.
        window = limit
        while True:
            texts = await store.fetch_items(self.session_id, branch, window)
            items = decode_all(texts)
            if len(items) >= limit or len(texts) < window:
                return items[-limit:]
            window *= 2

    async def iter_items(
        self, branch_id: str | None = None, *, batch_size: int = 500
    ) -> AsyncIterator[Any]:
        """Stream the items of the current (or given) branch, oldest first, page by page.

        For exports and long histories: only one page of decoded items is in memory at a
        time. Items appended while iterating may be included (they come after the rest).

        Args:
            branch_id: Read this branch instead of the current one.
            batch_size: Items fetched per database round trip.

        Raises:
            InvalidArgumentError: ``batch_size`` is not a positive int.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be a positive int; got {batch_size!r}")
        branch_id = check_branch_id(branch_id)
        with self._failures("iter_items"):
            store = await self._store()
            branch = branch_id if branch_id is not None else await self._current_branch(store)
        after = 0
        while True:
            with self._failures("iter_items"):
                page = await store.fetch_page(self.session_id, branch, after, batch_size)
            for data, _sequence in page:
                item = decode(data)
                if item is not None:
                    yield item
            if len(page) < batch_size:
                return
            after = page[-1][1]

    async def add_items(
        self, items: list[Any], *, wrapper: Any = None, idempotency_key: str | None = None
    ) -> None:
        """Append items to the current branch, in one transaction.

        A batch with a user message opens a new user turn; later batches without one (the
        Runner's tool calls and replies) belong to the current turn.

        Args:
            items: Responses input items.
            wrapper: The Runner's ``RunContextWrapper``; used only by ``session_for_context``.
            idempotency_key: Makes the call safe to retry: if a batch with this key was
                stored in the session before (and the session was not cleared since), the
                call stores nothing. Use a fresh key per batch (say, a UUID) and the same key
                for its retries after a cancellation or a ``ConnectionLostError``.

        Raises:
            InvalidItemError: An item is not a dict, not JSON-serializable, nested too deep or
                too large (nothing of the batch is stored).
            InvalidArgumentError: ``idempotency_key`` is not a valid id.
        """
        target = self._routed(wrapper)
        if target is not self:
            await target.add_items(items)
            return
        binding = self._binding()
        messages = to_new_messages(items, max_item_bytes=self.max_item_bytes)
        if idempotency_key is not None:
            check_identifier(idempotency_key, "idempotency_key")
        if not messages:
            return
        async with binding.mutations:
            try:
                with self._failures("add_items"):
                    store = await self._store()
                    self._pointer = await store.append(
                        self.session_id, self._pointer, messages, idempotency_key
                    )
            except Exception as exc:
                log_failure(
                    self._logger,
                    "Failed to add session items",
                    exc,
                    kind="model_and_tool",
                    context=self._log_context,
                )
                raise

    @operation
    async def pop_item(self, *, wrapper: Any = None) -> Any | None:
        """Remove and return the newest item of the current branch (``None`` if empty).

        The message is deleted only if no other branch shares it; a turn's usage row goes with
        its last item.

        Args:
            wrapper: The Runner's ``RunContextWrapper``; used only by ``session_for_context``.
        """
        target = self._routed(wrapper)
        if target is not self:
            return await target.pop_item()
        return await self._pop_item_with_validation(None)

    @operation
    async def clear_session(self, *, wrapper: Any = None) -> None:
        """Delete the whole session (every branch and its usage); branch names stay reserved.

        Args:
            wrapper: The Runner's ``RunContextWrapper``; used only by ``session_for_context``.
        """
        target = self._routed(wrapper)
        if target is not self:
            await target.clear_session()
            return
        async with self._ordered():
            store = await self._store()
            generation = await store.clear(self.session_id)
            self._pointer = BranchPointer(MAIN_BRANCH, generation)

    # -- session info --------------------------------------------------------------------

    async def set_info(
        self,
        *,
        user_id: str | None = UNSET,
        title: str | None = UNSET,
        metadata: Mapping[str, Any] | None = UNSET,
    ) -> None:
        """Change the session's owner, title or metadata (``None`` clears one).

        Only the keywords given change; ``metadata`` replaces the whole dict. A session
        without info gets it (and so appears in the store's listings, with no items yet).
        The last activity does not change: renaming a conversation does not reorder a
        sidebar.

        Raises:
            InvalidArgumentError: A value has the wrong type, or ``metadata`` is not JSON
                (nothing is stored).
            SchemaMissingError: The database predates the session info table.
        """
        changes: dict[str, Any] = {}
        if user_id is not UNSET:
            changes["user_id"] = check_user_id(user_id)
        if title is not UNSET:
            changes["title"] = check_title(title)
        if metadata is not UNSET:
            changes["metadata"] = check_metadata(metadata)
        async with self._ordered():
            store = await self._store()
            await store.ensure_info_table()
            if changes.get("user_id") is not None:
                store.check_identifier(changes["user_id"], "User ids")
            binding = self._binding()
            await StoreQueries(binding.handle, self._tables).set_info(self.session_id, changes)

    async def get_info(self) -> SessionSummary | None:
        """The session's summary, as the store lists it; ``None`` if the store does not know it.

        Raises:
            SchemaMissingError: The database predates the session info table.
        """
        store = await self._store()
        await store.ensure_info_table()
        row = await StoreQueries(self._binding().handle, self._tables).summary(self.session_id)
        return None if row is None else summary_from_row(row)


class AdvancedSQLiteSession(AdvancedSession):
    """Drop-in replacement for the SDK's ``AdvancedSQLiteSession``, on SQLAlchemy.

    Same constructor, methods, return shapes and errors; the database file is compatible both
    ways. ``db_path=":memory:"`` (the default) gives each session its own private database.

    Args:
        session_id: Identifies the conversation.
        db_path: Path of the SQLite file, or ``":memory:"``.
        create_tables: Create missing tables and indexes on first use.
        logger: Logger for diagnostics; defaults to the ``turnstore`` logger.
        session_settings: The SDK's ``SessionSettings`` (or a dict of it).
        sessions_table: Name of the sessions table.
        messages_table: Name of the messages table.
        user_id: The session's owner (see :class:`AdvancedSession`).
        title: The session's title.
        metadata: The session's metadata, a JSON dict.
        session_for_context: Routes the Runner's calls by run context (see
            :class:`AdvancedSession`).
        max_item_bytes: The most bytes one item may take as JSON (64 MiB by default).
    """

    def __init__(
        self,
        *,
        session_id: str,
        db_path: str | Path = ":memory:",
        create_tables: bool = False,
        logger: logging.Logger | None = None,
        session_settings: Any = None,
        sessions_table: str = DEFAULT_SESSIONS_TABLE,
        messages_table: str = DEFAULT_MESSAGES_TABLE,
        user_id: str | None = None,
        title: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        session_for_context: ContextRouter | None = None,
        max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES,
    ) -> None:
        url = engines.sqlite_url(db_path)
        self.db_path = db_path
        self._setup(
            session_id=session_id,
            acquire=lambda: engines.acquire_for_url(url),
            create_tables=create_tables,
            logger=logger,
            session_settings=session_settings,
            sessions_table=sessions_table,
            messages_table=messages_table,
            info=info_defaults(user_id, title, metadata),
            session_for_context=session_for_context,
            max_item_bytes=max_item_bytes,
        )

    @property
    def _current_branch_id(self) -> str:
        """The current branch under the SDK class's name: the same as ``current_branch_id``."""
        return self._pointer.branch_id
