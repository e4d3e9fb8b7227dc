"""Agents SDK sessions with branching, usage analytics and structure queries on any database.

:class:`AdvancedSession` works on any supported SQLAlchemy async engine or URL;
:class:`AdvancedSQLiteSession` is the drop-in replacement for the SDK's class of the same name.
Both implement the SDK's ``Session`` protocol, so they go straight into
``Runner.run(agent, input, session=session)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar, cast

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from turnstore import cost
from turnstore.errors import (
    BranchNotFoundError,
    ConnectionLostError,
    ContentNotFoundError,
    InvalidArgumentError,
    ProtectedBranchError,
    SchemaLockTimeoutError,
    SessionClosedError,
    StorageError,
)
from turnstore.info import (
    UNSET,
    SessionSummary,
    check_metadata,
    check_title,
    check_user_id,
    summary_from_row,
)
from turnstore.lineage import BranchNode, build_tree
from turnstore.persistence import engines
from turnstore.persistence.failures import translated
from turnstore.persistence.models import DEFAULT_MESSAGES_TABLE, DEFAULT_SESSIONS_TABLE, tables_for
from turnstore.persistence.records import (
    MAIN_BRANCH,
    NO_INFO,
    BranchPointer,
    InfoDefaults,
    ModelShare,
    UserTurn,
)
from turnstore.persistence.repository import ConversationRepository
from turnstore.persistence.store_queries import StoreQueries
from turnstore.persistence.validation import check_identifier, check_int
from turnstore.redaction import identifier, log_failure
from turnstore.schema.distribution import distribute_store
from turnstore.schema.startup import at_head, bring_to_head_when_needed
from turnstore.sdk.items import (
    DEFAULT_MAX_ITEM_BYTES,
    TOOL_COUNT_RULE,
    content_preview,
    content_texts,
    decode,
    decode_all,
    search_pattern,
    stored_form,
    to_new_messages,
)
from turnstore.sdk.usage import share_record, usage_from_result
from turnstore.sdk.wrapper_hooks import WrapperHooks

_default_logger = logging.getLogger("turnstore")

# The public method the running task called first, for error messages.
_OPERATION: ContextVar[str | None] = ContextVar("turnstore_operation", default=None)


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
    # Turns count from 1; 0 and numbers past the stored ones are turns that do not exist.
    return check_int(turn_number, argument, minimum=0)


def _check_branch_id(branch_id: str | None) -> str | None:
    """A branch id argument of a read: ``None`` (the current branch) or a valid id."""
    return None if branch_id is None else check_identifier(branch_id, "branch_id")


_Method = TypeVar("_Method", bound=Callable[..., Coroutine[Any, Any, Any]])


def _operation(method: _Method) -> _Method:
    """Report database errors of a public method as :class:`StorageError` naming it."""
    name = method.__name__

    @functools.wraps(method)
    async def operation(self: AdvancedSession, *args: Any, **kwargs: Any) -> Any:
        with self._failures(name):
            return await method(self, *args, **kwargs)

    return cast(_Method, operation)


def _check_text(value: object, argument: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{argument} must be a str; got {type(value).__name__}")
    return value


def _check_branch_name(branch_name: object, argument: str = "branch_name") -> str:
    name = check_identifier(branch_name, argument)
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
            info=_info_defaults(user_id, title, metadata),
            session_for_context=session_for_context,
            max_item_bytes=max_item_bytes,
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
        max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES,
    ) -> None:
        if session_for_context is not None and not callable(session_for_context):
            raise InvalidArgumentError(
                "session_for_context must be a callable taking the run context; "
                f"got {type(session_for_context).__name__}"
            )
        self.session_id = check_identifier(session_id, "session_id")
        self.max_item_bytes = check_int(max_item_bytes, "max_item_bytes", minimum=1)
        self.dropped_usage_writes = 0
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

    @contextlib.contextmanager
    def _failures(self, operation: str) -> Iterator[None]:
        """Raise database errors inside the block as ``StorageError`` naming ``operation``.

        Inside another public method (``create_branch_from_content`` runs
        ``create_branch_from_turn``), the error names the method the caller called.
        """
        named = _OPERATION.get() or operation
        token = _OPERATION.set(named)
        binding = self._bindings.get(asyncio.get_running_loop())
        profile = None if binding is None else binding.handle.profile
        try:
            with translated(named, self.session_id, profile):
                yield
        finally:
            _OPERATION.reset(token)

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
        # A negative limit means "all items", as in the SDK's class (SQLite's LIMIT -1).
        return limit

    # -- the SDK Session protocol --------------------------------------------------------

    @_operation
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
        branch_id = _check_branch_id(branch_id)
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
        branch_id = _check_branch_id(branch_id)
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

    @_operation
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

    @_operation
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

    async def store_run_usage(
        self, result: Any, *, model: str | None = None, run_config: Any = None
    ) -> None:
        """Store a run's token usage, and the models that served it, against the latest turn.

        Call it after ``Runner.run``. Storing again for the same turn replaces the earlier
        figures. A write that loses a lock wait or a deadlock is retried, as appends are.
        Failures are never raised, so analytics cannot break a conversation: a write that
        finally fails is logged at WARNING and counted in :attr:`dropped_usage_writes`.

        The model is the one the SDK resolved for each model response of the run (a run that
        handed off between agents records each model with its share of requests and tokens):
        the run configuration's model, else the agent's model name (a ``Model`` object by its
        ``model`` attribute), else the SDK's default model. A ``Model`` object without a name
        is recorded as unknown.

        Args:
            result: The result ``Runner.run`` returned.
            model: The model that served the whole run, recorded instead of working it out.
            run_config: The ``RunConfig`` given to ``Runner.run``, when it sets ``model``
                (the result does not carry it).
        """
        try:
            context = getattr(result, "context_wrapper", None)
            target = self._routed(context)
            if target is not self:
                await target.store_run_usage(result, model=model, run_config=run_config)
                return
            usage = usage_from_result(result, model=model, run_config=run_config)
            if usage is None:
                return
            async with self._ordered():
                with self._failures("store_run_usage"):
                    store = await self._store()
                    turn = await store.record_usage(self.session_id, self._pointer, usage)
            if turn is None:
                self._logger.debug(
                    "No current turn on branch %r; usage not stored",
                    identifier(self._pointer.branch_id),
                )
        except (StorageError, ConnectionLostError, SchemaLockTimeoutError) as exc:
            # The database lost the write (after the retries): usage is analytics, so the
            # conversation goes on; the drop is counted where the caller can read it.
            self.dropped_usage_writes += 1
            log_failure(
                self._logger,
                f"Dropped the usage of a run (dropped so far: {self.dropped_usage_writes})",
                exc,
                level=logging.WARNING,
                context=self._log_context,
            )
        except Exception as exc:
            self.dropped_usage_writes += 1
            log_failure(
                self._logger, "Failed to store session usage", exc, context=self._log_context
            )

    @_operation
    async def get_session_usage(self, branch_id: str | None = None) -> dict[str, int] | None:
        """Usage summed over all branches (or one): requests, tokens and turns; ``None`` if none."""
        branch_id = _check_branch_id(branch_id)
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

    @_operation
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
        branch_id = _check_branch_id(branch_id)
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

    async def get_turn_models(
        self, branch_id: str | None = None
    ) -> dict[int, list[dict[str, Any]]]:
        """Which models served each turn of the current (or given) branch, with their shares.

        Returns:
            ``{turn: [{"model", "requests", "input_tokens", "cached_tokens", "output_tokens",
            "reasoning_tokens", "total_tokens"}, ...]}``, models in the order they served the
            turn; ``model`` is ``None`` where it is not known. Turns stored before turnstore
            recorded models (or by the SDK's class) are absent.
        """
        store = await self._store()
        branch = branch_id if branch_id is not None else await self._current_branch(store)
        turns: dict[int, list[dict[str, Any]]] = {}
        for row in await store.turn_models(self.session_id):
            if row.branch_id == branch:
                turns.setdefault(row.user_turn_number, []).append(share_record(row.share))
        return turns

    async def get_items_by_turn(self, branch_id: str | None = None) -> dict[int, list[Any]]:
        """The current (or given) branch's items grouped by user turn, oldest first.

        Items stored before the first user message (a turn number of 0) are under ``0``.
        """
        store = await self._store()
        branch = branch_id if branch_id is not None else await self._current_branch(store)
        turns: dict[int, list[Any]] = {}
        for turn, data in await store.turn_items(self.session_id, branch):
            item = decode(data)
            if item is not None:
                turns.setdefault(turn or 0, []).append(item)
        return turns

    async def get_turn_costs(self, branch_id: str | None = None) -> dict[int, dict[str, Any]]:
        """What each turn of the current (or given) branch cost, priced per model.

        Returns:
            ``{turn: {"models": [...], "cost_usd": Decimal | None, "cost_reason": str | None,
            "recorded_at": str | None}}`` for every turn with stored usage. ``models`` is
            :meth:`get_turn_models`' list for the turn (empty for turns stored without model
            records, whose cost is then ``None``). Prices are those in force when the usage
            was stored; see :mod:`turnstore.cost`.
        """
        store = await self._store()
        branch = branch_id if branch_id is not None else await self._current_branch(store)
        times = await store.usage_times(self.session_id, branch)
        shares: dict[int, list[ModelShare]] = {}
        for row in await store.turn_models(self.session_id):
            if row.branch_id == branch:
                shares.setdefault(row.user_turn_number, []).append(row.share)
        result: dict[int, dict[str, Any]] = {}
        for turn, recorded_at in sorted(times.items()):
            parts = shares.get(turn, [])
            at = None if recorded_at is None else datetime.fromisoformat(recorded_at)
            priced = (
                cost.Cost.total(cost.price(part.model, _counts(part), at) for part in parts)
                if parts
                else cost.Cost(None, cost.UNKNOWN_MODEL)
            )
            result[turn] = {
                "models": [share_record(part) for part in parts],
                "cost_usd": priced.usd,
                "cost_reason": priced.reason,
                "recorded_at": recorded_at,
            }
        return result

    async def branch_tree(self) -> list[BranchNode]:
        """The session's branches as a tree; the roots, ``main`` first.

        A branch's parent, fork turn and the fork turn's preview are recorded when turnstore
        creates it. For branches without a record (made by the SDK's class, or before
        turnstore recorded lineage) the parent is inferred from the items they share with
        other branches, and marked ``inferred``; where no single parent fits, the branch is a
        root marked ``unknown``, with the reason in ``note``.
        """
        store = await self._store()
        current = await self._current_branch(store)
        branches = await store.list_branches(self.session_id)
        recorded = await store.lineage(self.session_id)
        recorded_names = {entry.branch_id for entry in recorded}
        needs_inference = any(
            b.branch_id != MAIN_BRANCH and b.branch_id not in recorded_names for b in branches
        )
        messages = await store.branch_messages(self.session_id) if needs_inference else {}
        tokens = {}
        for branch in branches:
            totals = await store.session_usage(self.session_id, branch.branch_id)
            tokens[branch.branch_id] = totals[3] if totals is not None else 0
        previews: dict[tuple[str, int], str | None] = {}
        if needs_inference:
            for branch in branches:
                for turn in await store.user_turns(self.session_id, branch.branch_id):
                    previews[(branch.branch_id, turn.turn)] = _preview(turn.message_data)
        return build_tree(
            branches,
            recorded,
            messages,
            tokens,
            current,
            lambda branch, turn: previews.get((branch, turn)),
        )

    # -- branching -----------------------------------------------------------------------

    @_operation
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
            InvalidArgumentError: ``turn_number`` is not an int or negative, or the name is
                blank or not a valid id.
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
                preview=_preview,
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

    @_operation
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

    @_operation
    async def switch_to_branch(self, branch_id: str) -> None:
        """Make ``branch_id`` the current branch.

        Raises:
            BranchNotFoundError: The branch does not exist.
        """
        check_identifier(branch_id, "branch_id")
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

    @_operation
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

    @_operation
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

    @_operation
    async def get_conversation_turns(self, branch_id: str | None = None) -> list[dict[str, Any]]:
        """The user turns of a branch: ``turn``, ``content`` (first 100 characters),
        ``full_content``, ``timestamp``, ``can_branch``."""  # noqa: D205, D209
        branch_id = _check_branch_id(branch_id)
        store = await self._store()
        branch = branch_id if branch_id is not None else await self._current_branch(store)
        return _turn_records(await store.user_turns(self.session_id, branch), preview_length=100)

    @_operation
    async def find_turns_by_content(
        self, search_term: str, branch_id: str | None = None
    ) -> list[dict[str, Any]]:
        """User turns whose text contains ``search_term`` (literally; ASCII case ignored).

        Returns:
            Records shaped like ``get_conversation_turns``' with the whole content.
        """
        _check_text(search_term, "search_term")
        branch_id = _check_branch_id(branch_id)
        store = await self._store()
        branch = branch_id if branch_id is not None else await self._current_branch(store)
        candidates = await store.user_turns(self.session_id, branch, stored_form(search_term))
        pattern = search_pattern(search_term)
        return _turn_records(
            candidates,
            preview_length=None,
            keep=lambda content: any(pattern.search(text) for text in content_texts(content)),
        )

    @_operation
    async def get_conversation_by_turns(
        self, branch_id: str | None = None
    ) -> dict[int, list[dict[str, str | None]]]:
        """A branch's items grouped by user turn: ``{turn: [{"type", "tool_name"}, ...]}``."""
        branch_id = _check_branch_id(branch_id)
        store = await self._store()
        branch = branch_id if branch_id is not None else await self._current_branch(store)
        turns: dict[int, list[dict[str, str | None]]] = {}
        for turn, kind, tool in await store.structure(self.session_id, branch):
            turns.setdefault(turn, []).append({"type": kind, "tool_name": tool})  # type: ignore[arg-type]
        return turns

    @_operation
    async def get_tool_usage(self, branch_id: str | None = None) -> list[tuple[str, int, int]]:
        """``(tool_name, count, user_turn_number)`` for each tool used per turn of a branch."""
        branch_id = _check_branch_id(branch_id)
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
            info=_info_defaults(user_id, title, metadata),
            session_for_context=session_for_context,
            max_item_bytes=max_item_bytes,
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


FORK_PREVIEW_LENGTH = 100


def _preview(message_data: str) -> str | None:
    """The preview of a stored user message, as ``get_conversation_turns`` cuts it."""
    item = decode(message_data)
    if not isinstance(item, dict):
        return None
    return content_preview(item.get("content", ""), FORK_PREVIEW_LENGTH)


def _counts(share: ModelShare) -> cost.TokenCounts:
    return cost.TokenCounts(
        share.requests,
        share.input_tokens,
        share.cached_tokens,
        share.output_tokens,
        share.reasoning_tokens,
    )
