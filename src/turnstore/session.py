"""Agents SDK sessions with branching, usage analytics and structure queries on any database.

:class:`AdvancedSession` works on any supported SQLAlchemy async engine or URL;
:class:`AdvancedSQLiteSession` is the drop-in replacement for the SDK's class of the same name.
Both implement the SDK's ``Session`` protocol, so they go straight into
``Runner.run(agent, input, session=session)``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from turnstore.errors import (
    BranchNotFoundError,
    ContentNotFoundError,
    InvalidArgumentError,
    ProtectedBranchError,
    SessionClosedError,
)
from turnstore.info import (
    UNSET,
    SessionSummary,
    check_metadata,
    check_title,
    check_user_id,
    summary_from_row,
)
from turnstore.persistence import engines
from turnstore.persistence.models import DEFAULT_MESSAGES_TABLE, DEFAULT_SESSIONS_TABLE, tables_for
from turnstore.persistence.repository import (
    MAIN_BRANCH,
    NO_INFO,
    BranchPointer,
    ConversationRepository,
    InfoDefaults,
    UserTurn,
)
from turnstore.persistence.store_queries import StoreQueries
from turnstore.redaction import identifier, log_failure
from turnstore.schema.check import at_head, bring_to_head_when_needed
from turnstore.schema.distribution import distribute_store
from turnstore.sdk.items import (
    TOOL_COUNT_RULE,
    content_preview,
    content_texts,
    decode,
    decode_all,
    search_pattern,
    stored_form,
    to_new_messages,
)
from turnstore.sdk.usage import usage_from_result
from turnstore.sdk.wrapper_hooks import WrapperHooks

_default_logger = logging.getLogger("turnstore")


@dataclass
class SessionSettings:
    """Session settings used when the Agents SDK is not installed (it has its own class).

    Attributes:
        limit: Default maximum number of items ``get_items`` returns (``None`` for all).
    """

    limit: int | None = None


def _sdk_loaded() -> bool:
    """Whether the Agents SDK was imported by the application (turnstore never imports it)."""
    return "agents" in sys.modules


def _coerce_settings(value: Any) -> Any:
    """The SDK's ``SessionSettings`` once the SDK is in use (the Runner calls its methods).

    Importing the SDK takes seconds; a program that never imports it gets turnstore's own
    :class:`SessionSettings` instead.
    """
    if not _sdk_loaded():
        if value is None:
            return SessionSettings()
        if isinstance(value, Mapping):
            return SessionSettings(**value)
        return value
    try:
        from agents.memory.session_settings import (
            SessionSettings as SDKSessionSettings,
        )
        from agents.memory.session_settings import (
            coerce_session_settings,
        )
    except ImportError:
        if value is None:
            return SessionSettings()
        if isinstance(value, Mapping):
            return SessionSettings(**value)
        return value
    if value is None:
        return SDKSessionSettings()
    if isinstance(value, SessionSettings):
        return SDKSessionSettings(limit=value.limit)
    return coerce_session_settings(value)


def _check_turn_number(turn_number: object, argument: str = "turn_number") -> int:
    # bool is an int subclass; True as a turn number is always a mistake.
    if isinstance(turn_number, bool) or not isinstance(turn_number, int):
        raise InvalidArgumentError(
            f"{argument} must be an int; got {type(turn_number).__name__} {turn_number!r}"
        )
    return turn_number


def _check_text(value: object, argument: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{argument} must be a str; got {type(value).__name__}")
    return value


def _check_branch_name(branch_name: object, argument: str = "branch_name") -> str:
    name = _check_text(branch_name, argument)
    if not name.strip():
        raise InvalidArgumentError(
            "Branch name cannot be empty"
            if argument == "branch_name"
            else "Branch ID cannot be empty"
        )
    return name


#: Picks the session that serves a call the Runner made with its run context (see
#: ``session_for_context``).
ContextRouter = Callable[[Any], "AdvancedSession | None"]


class AdvancedSession(WrapperHooks):
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

        engine_kwargs: With ``url``: keyword arguments for the engine turnstore creates (as
            for ``create_async_engine``; pool size, ``connect_args``...), over turnstore's own.
            Sessions share an engine only when they pass the same ones.

    Raises:
        InvalidArgumentError: Neither or both of ``engine`` and ``url`` were given,
            ``engine_kwargs`` came with ``engine``, a table name is not a plain identifier,
            or ``user_id``, ``title`` or ``metadata`` is not acceptable (wrong type, too long,
            not JSON).
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
            info=_info_defaults(user_id, title, metadata),
            session_for_context=session_for_context,
        )

    def _setup(
        self,
        *,
        session_id: str,
        acquire: Callable[[], engines.EngineHandle],
        create_tables: bool,
        logger: logging.Logger | None,
        session_settings: Any,
        sessions_table: str,
        messages_table: str,
        info: InfoDefaults = NO_INFO,
        session_for_context: ContextRouter | None,
    ) -> None:
        if session_for_context is not None and not callable(session_for_context):
            raise InvalidArgumentError(
                "session_for_context must be a callable taking the run context; "
                f"got {type(session_for_context).__name__}"
            )
        self.session_id = _check_text(session_id, "session_id")
        self._info_defaults = info
        self._session_for_context = session_for_context
        self._session_settings = _coerce_settings(session_settings)
        self._settings_from_sdk = _sdk_loaded()
        self.sessions_table = sessions_table
        self.messages_table = messages_table
        self._tables = tables_for(sessions_table, messages_table)
        self._create_tables = bool(create_tables)
        self._logger = logger if logger is not None else _default_logger
        self._acquire = acquire
        self._pointer = BranchPointer(MAIN_BRANCH, 0)
        self._bindings: dict[asyncio.AbstractEventLoop, _Binding] = {}
        self._closed = False
        self._pending_releases: set[asyncio.Task[None]] = set()

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
            info=_info_defaults(user_id, title, metadata),
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
        )

    @property
    def session_settings(self) -> Any:
        """The session's settings: the SDK's ``SessionSettings`` once the SDK is imported."""
        if not self._settings_from_sdk and _sdk_loaded():
            self._session_settings = _coerce_settings(self._session_settings)
            self._settings_from_sdk = True
        return self._session_settings

    @session_settings.setter
    def session_settings(self, value: Any) -> None:
        self._session_settings = _coerce_settings(value)
        self._settings_from_sdk = _sdk_loaded()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"branch={self._pointer.branch_id!r}"
        return f"{type(self).__name__}(session_id={self.session_id!r}, {state})"

    @property
    def current_branch_id(self) -> str:
        """The branch that reads and writes without a ``branch_id`` use (read-only).

        Changed by ``create_branch_*``, ``switch_to_branch``, ``delete_branch(force=True)``
        and ``clear_session``. After another instance clears the session, it still names the
        old branch until this session's next read or write finds the clear, and ``main``
        from then on, as the SDK's class behaves.
        """
        return self._pointer.branch_id

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

    def _log_context(self) -> dict[str, object]:
        return {"session_id": self.session_id, "branch_id": self._pointer.branch_id}

    def _binding(self) -> _Binding:
        if self._closed:
            raise SessionClosedError(f"{type(self).__name__} is closed")
        loop = asyncio.get_running_loop()
        binding = self._bindings.get(loop)
        if binding is None:
            handle = self._acquire()
            binding = self._bindings[loop] = _Binding(
                handle,
                ConversationRepository(handle, self._tables, self._info_defaults),
                asyncio.Lock(),
            )
        return binding

    async def _store(self) -> ConversationRepository:
        store = self._binding().store
        store.check_identifier(self.session_id, "Session ids")
        if self._info_defaults.user_id is not None:
            store.check_identifier(self._info_defaults.user_id, "User ids")
        await store.prepare_schema(
            create=self._create_tables,
            migrate_default=bring_to_head_when_needed,
            default_is_current=at_head,
            distribute=distribute_store,
        )
        if self._info_defaults.given and not store.has_info_table:
            # Writes of this session need the table; reads do not.
            await store.look_for_info_table()
        return store

    def _ordered(self) -> asyncio.Lock:
        """Mutations of one instance run one at a time, in the order they were called."""
        return self._binding().mutations

    async def _current_branch(self, store: ConversationRepository) -> str:
        """The current branch, falling back to main if another instance cleared the session."""
        pointer = self._pointer
        if pointer.branch_id != MAIN_BRANCH:
            generation = await store.current_generation(self.session_id)
            if generation != pointer.generation:
                self._pointer = BranchPointer(MAIN_BRANCH, generation)
        return self._pointer.branch_id

    def _resolve_limit(self, limit: int | None) -> int | None:
        if limit is None:
            limit = getattr(self.session_settings, "limit", None)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise InvalidArgumentError(f"limit must be an int or None; got {limit!r}")
        return limit

    # -- the SDK Session protocol --------------------------------------------------------

    async def get_items(
        self, limit: int | None = None, branch_id: str | None = None, *, wrapper: Any = None
    ) -> list[Any]:
        """Items of the current (or given) branch, oldest first.

        Args:
            limit: At most this many of the newest items; defaults to
                ``session_settings.limit`` (``None``: all).
            branch_id: Read this branch instead of the current one.
            wrapper: The Runner's ``RunContextWrapper``; used only by ``session_for_context``.
        """
        target = self._routed(wrapper)
        if target is not self:
            return await target.get_items(limit, branch_id)
        limit = self._resolve_limit(limit)
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
        store = await self._store()
        branch = branch_id if branch_id is not None else await self._current_branch(store)
        after = 0
        while True:
            page = await store.fetch_page(self.session_id, branch, after, batch_size)
            for data, _sequence in page:
                item = decode(data)
                if item is not None:
                    yield item
            if len(page) < batch_size:
                return
            after = page[-1][1]

    async def add_items(self, items: list[Any], *, wrapper: Any = None) -> None:
        """Append items to the current branch, in one transaction.

        A batch with a user message opens a new user turn; later batches without one (the
        Runner's tool calls and replies) belong to the current turn.

        Args:
            items: Responses input items.
            wrapper: The Runner's ``RunContextWrapper``; used only by ``session_for_context``.

        Raises:
            InvalidItemError: An item is not a dict or not JSON-serializable (nothing of the
                batch is stored).
        """
        target = self._routed(wrapper)
        if target is not self:
            await target.add_items(items)
            return
        binding = self._binding()
        messages = to_new_messages(items)
        if not messages:
            return
        async with binding.mutations:
            try:
                store = await self._store()
                self._pointer = await store.append(self.session_id, self._pointer, messages)
            except Exception as exc:
                log_failure(
                    self._logger,
                    "Failed to add session items",
                    exc,
                    kind="model_and_tool",
                    context=self._log_context,
                )
                raise

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

    # -- usage ---------------------------------------------------------------------------

    async def store_run_usage(self, result: Any) -> None:
        """Store a run's token usage against the current branch's latest user turn.

        Call it after ``Runner.run``. Storing again for the same turn replaces the earlier
        figures. Failures are logged, never raised, so analytics cannot break a conversation.
        """
        try:
            context = getattr(result, "context_wrapper", None)
            target = self._routed(context)
            if target is not self:
                await target.store_run_usage(result)
                return
            usage = usage_from_result(result)
            if usage is None:
                return
            async with self._ordered():
                store = await self._store()
                turn = await store.record_usage(self.session_id, self._pointer, usage)
            if turn is None:
                self._logger.debug(
                    "No current turn on branch %r; usage not stored",
                    identifier(self._pointer.branch_id),
                )
        except Exception as exc:
            log_failure(
                self._logger, "Failed to store session usage", exc, context=self._log_context
            )

    async def get_session_usage(self, branch_id: str | None = None) -> dict[str, int] | None:
        """Usage summed over all branches (or one): requests, tokens and turns; ``None`` if none."""
        store = await self._store()
        totals = await store.session_usage(self.session_id, branch_id or None)
        if totals is None:
            return None
        requests, input_tokens, output_tokens, total_tokens, turns = totals
        return {
            "requests": requests,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": total_tokens,
            "total_turns": turns,
        }

    async def get_turn_usage(
        self, user_turn_number: int | None = None, branch_id: str | None = None
    ) -> list[dict[str, Any]] | dict[str, Any]:
        """Per-turn usage of the current (or given) branch, token details parsed.

        Returns:
            A list of dicts (each with ``user_turn_number``) ordered by turn; or, when
            ``user_turn_number`` is given, that turn's dict (``{}`` if it has no usage).
        """
        if user_turn_number is not None:
            _check_turn_number(user_turn_number, "user_turn_number")
        store = await self._store()
        branch = branch_id if branch_id is not None else await self._current_branch(store)
        rows = await store.turn_usage(self.session_id, branch, user_turn_number)
        records = [
            {
                "user_turn_number": row.user_turn_number,
                "requests": row.requests,
                "input_tokens": row.input_tokens,
                "output_tokens": row.output_tokens,
                "total_tokens": row.total_tokens,
                "input_tokens_details": row.input_tokens_details or None,
                "output_tokens_details": row.output_tokens_details or None,
            }
            for row in rows
        ]
        if user_turn_number is None:
            return records
        if not records:
            return {}
        single = records[0]
        del single["user_turn_number"]
        return single

    # -- branching -----------------------------------------------------------------------

    async def create_branch_from_turn(
        self, turn_number: int, branch_name: str | None = None
    ) -> str:
        """Fork the current branch just before user turn ``turn_number`` and switch to the fork.

        The new branch holds every item before that turn's user message.

        Args:
            turn_number: Branch turn number of a user message (see ``get_conversation_turns``).
            branch_name: Name of the new branch; generated (unique) if ``None``. Names are never
                reused within a session, even after the branch is deleted.

        Returns:
            The new branch's id.

        Raises:
            TurnNotFoundError: The current branch has no user message at that turn.
            BranchNameTakenError: The name was used before in this session.
            InvalidArgumentError: ``turn_number`` is not an int, or the name is blank.
        """
        _check_turn_number(turn_number)
        if branch_name is not None:
            _check_branch_name(branch_name)
        async with self._ordered():
            store = await self._store()
            await self._current_branch(store)
            created = await store.create_branch(
                self.session_id,
                self._pointer,
                turn_number,
                branch_name,
                auto_name=f"branch_from_turn_{turn_number}_{int(time.time())}",
            )
            self._pointer = BranchPointer(created.branch_id, created.generation)
        self._logger.debug(
            "Created branch %r from turn %s of %r (%s items)",
            identifier(created.branch_id),
            turn_number,
            identifier(created.source_branch_id),
            created.copied_messages,
        )
        return created.branch_id

    async def create_branch_from_content(
        self, search_term: str, branch_name: str | None = None
    ) -> str:
        """Fork at the earliest user turn of the current branch whose text contains a term.

        Raises:
            ContentNotFoundError: No user turn contains ``search_term``.
        """
        matches = await self.find_turns_by_content(search_term)
        if not matches:
            raise ContentNotFoundError(f"No user turns found containing '{search_term}'")
        return await self.create_branch_from_turn(matches[0]["turn"], branch_name)

    async def switch_to_branch(self, branch_id: str) -> None:
        """Make ``branch_id`` the current branch.

        Raises:
            BranchNotFoundError: The branch does not exist.
        """
        _check_text(branch_id, "branch_id")
        async with self._ordered():
            store = await self._store()
            generation = await store.branch_generation(self.session_id, branch_id)
            if generation is None:
                raise BranchNotFoundError(f"Branch '{branch_id}' does not exist")
            previous = self._pointer.branch_id
            self._pointer = BranchPointer(branch_id, generation)
        self._logger.info(
            "Switched from branch %r to %r", identifier(previous), identifier(branch_id)
        )

    async def delete_branch(self, branch_id: str, force: bool = False) -> None:
        """Delete a branch and its usage; messages another branch shares are kept.

        Args:
            branch_id: The branch to delete; its name stays reserved.
            force: Allow deleting the current branch (the session then switches to main).

        Raises:
            ProtectedBranchError: ``branch_id`` is ``main``, or the current branch without
                ``force``.
            BranchNotFoundError: The branch does not exist.
        """
        _check_branch_name(branch_id, "branch_id")
        if branch_id == MAIN_BRANCH:
            raise ProtectedBranchError("Cannot delete the 'main' branch")
        async with self._ordered():
            store = await self._store()
            is_current = branch_id == await self._current_branch(store)
            if is_current and not force:
                raise ProtectedBranchError(
                    f"Cannot delete current branch '{branch_id}'. "
                    "Use force=True or switch branches first"
                )
            deleted = await store.delete_branch(self.session_id, branch_id)
            if is_current:
                self._pointer = BranchPointer(MAIN_BRANCH, self._pointer.generation)
        self._logger.info(
            "Deleted branch %r: %s message entries, %s usage entries, %s messages",
            identifier(branch_id),
            deleted.structure_rows,
            deleted.usage_rows,
            deleted.messages,
        )

    async def list_branches(self) -> list[dict[str, Any]]:
        """Every branch: ``branch_id``, ``message_count``, ``user_turns``, ``is_current``,
        ``created_at``, in order of creation."""  # noqa: D205, D209
        store = await self._store()
        current = await self._current_branch(store)
        return [
            {
                "branch_id": branch.branch_id,
                "message_count": branch.message_count,
                "user_turns": branch.user_turns,
                "is_current": branch.branch_id == current,
                "created_at": branch.created_at,
            }
            for branch in await store.list_branches(self.session_id)
        ]

    # -- structure queries ---------------------------------------------------------------

    async def get_conversation_turns(self, branch_id: str | None = None) -> list[dict[str, Any]]:
        """The user turns of a branch: ``turn``, ``content`` (first 100 characters),
        ``full_content``, ``timestamp``, ``can_branch``."""  # noqa: D205, D209
        store = await self._store()
        branch = branch_id if branch_id is not None else await self._current_branch(store)
        return _turn_records(await store.user_turns(self.session_id, branch), preview_length=100)

    async def find_turns_by_content(
        self, search_term: str, branch_id: str | None = None
    ) -> list[dict[str, Any]]:
        """User turns whose text contains ``search_term`` (literally; ASCII case ignored).

        Returns:
            Records shaped like ``get_conversation_turns``' with the whole content.
        """
        _check_text(search_term, "search_term")
        store = await self._store()
        branch = branch_id if branch_id is not None else await self._current_branch(store)
        candidates = await store.user_turns(self.session_id, branch, stored_form(search_term))
        pattern = search_pattern(search_term)
        return _turn_records(
            candidates,
            preview_length=None,
            keep=lambda content: any(pattern.search(text) for text in content_texts(content)),
        )

    async def get_conversation_by_turns(
        self, branch_id: str | None = None
    ) -> dict[int, list[dict[str, str | None]]]:
        """A branch's items grouped by user turn: ``{turn: [{"type", "tool_name"}, ...]}``."""
        store = await self._store()
        branch = branch_id if branch_id is not None else await self._current_branch(store)
        turns: dict[int, list[dict[str, str | None]]] = {}
        for turn, kind, tool in await store.structure(self.session_id, branch):
            turns.setdefault(turn, []).append({"type": kind, "tool_name": tool})  # type: ignore[arg-type]
        return turns

    async def get_tool_usage(self, branch_id: str | None = None) -> list[tuple[str, int, int]]:
        """``(tool_name, count, user_turn_number)`` for each tool used per turn of a branch."""
        store = await self._store()
        branch = branch_id if branch_id is not None else await self._current_branch(store)
        return await store.tool_usage(self.session_id, branch, TOOL_COUNT_RULE)

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the session; later calls raise ``SessionClosedError`` (a ``RuntimeError``).

        Engines this session no longer needs are disposed in the background when called inside
        a running event loop; prefer ``await aclose()`` or ``async with``, which wait for it.
        """
        if self._closed:
            return
        self._closed = True
        bindings, self._bindings = self._bindings, {}
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop, binding in bindings.items():
            if loop is running:
                task = engines.release_soon(binding.handle)
                self._pending_releases.add(task)
                task.add_done_callback(self._pending_releases.discard)
            elif not loop.is_closed() and not loop.is_running():
                loop.run_until_complete(engines.release(binding.handle))

    async def aclose(self) -> None:
        """Close the session and wait until the engines it no longer needs are disposed."""
        self.close()
        if self._pending_releases:
            await asyncio.gather(*self._pending_releases)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


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
            info=_info_defaults(user_id, title, metadata),
            session_for_context=session_for_context,
        )

    @property
    def _current_branch_id(self) -> str:
        """The current branch under the SDK class's name: the same as ``current_branch_id``."""
        return self._pointer.branch_id


def _info_defaults(user_id: object, title: object, metadata: object) -> InfoDefaults:
    """Checked constructor keywords: what a session's first write stores as its info."""
    return InfoDefaults(check_user_id(user_id), check_title(title), check_metadata(metadata))


@dataclass(eq=False)
class _Binding:
    """What a session uses in one event loop."""

    handle: engines.EngineHandle
    store: ConversationRepository
    mutations: asyncio.Lock


def _turn_records(
    turns: list[UserTurn],
    *,
    preview_length: int | None,
    keep: Callable[[Any], bool] | None = None,
) -> list[dict[str, Any]]:
    records = []
    for turn in turns:
        item = decode(turn.message_data)
        if not isinstance(item, dict):
            continue
        content = item.get("content", "")
        if keep is not None and not keep(content):
            continue
        records.append(
            {
                "turn": turn.turn,
                "content": content_preview(content, preview_length),
                "full_content": content,
                "timestamp": turn.created_at,
                "can_branch": True,
            }
        )
    return records
