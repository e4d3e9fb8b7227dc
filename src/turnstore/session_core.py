"""What every part of a session stands on: its state, its engine per event loop, and closing.

:class:`SessionCore` holds a session's ids, settings and current branch, binds it to an engine
(and a repository and a mutation lock) in each event loop it runs in, prepares the schema on
first use, reports database errors as turnstore errors naming the public method, and releases
its engines on close. The parts of :class:`turnstore.AdvancedSession` build on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast

from turnstore.errors import InvalidArgumentError, SessionClosedError
from turnstore.persistence import engines
from turnstore.persistence.failures import translated
from turnstore.persistence.models import tables_for
from turnstore.persistence.records import MAIN_BRANCH, NO_INFO, BranchPointer, InfoDefaults
from turnstore.persistence.repository import ConversationRepository
from turnstore.persistence.validation import check_identifier, check_int
from turnstore.schema.distribution import distribute_store
from turnstore.schema.startup import at_head, bring_to_head_when_needed
from turnstore.sdk.items import DEFAULT_MAX_ITEM_BYTES
from turnstore.session_settings import coerce_settings, sdk_loaded

if TYPE_CHECKING:
    from turnstore.session import ContextRouter

_default_logger = logging.getLogger("turnstore")

# The public method the running task called first, for error messages.
_OPERATION: ContextVar[str | None] = ContextVar("turnstore_operation", default=None)


_Method = TypeVar("_Method", bound=Callable[..., Coroutine[Any, Any, Any]])


def operation(method: _Method) -> _Method:
    """Report database errors of a public method as :class:`StorageError` naming it."""
    name = method.__name__

    @functools.wraps(method)
    async def reported(self: SessionCore, *args: Any, **kwargs: Any) -> Any:
        with self._failures(name):
            return await method(self, *args, **kwargs)

    return cast(_Method, reported)


@dataclass(eq=False)
class _Binding:
    """What a session uses in one event loop."""

    handle: engines.EngineHandle
    store: ConversationRepository
    mutations: asyncio.Lock


class SessionCore:
    """A session's state and plumbing, for :class:`turnstore.AdvancedSession` and its parts."""

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
        self._session_settings = coerce_settings(session_settings)
        self._settings_from_sdk = sdk_loaded()
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

    @property
    def session_settings(self) -> Any:
        """The session's settings: the SDK's ``SessionSettings`` once the SDK is imported."""
        if not self._settings_from_sdk and sdk_loaded():
            self._session_settings = coerce_settings(self._session_settings)
            self._settings_from_sdk = True
        return self._session_settings

    @session_settings.setter
    def session_settings(self, value: Any) -> None:
        self._session_settings = coerce_settings(value)
        self._settings_from_sdk = sdk_loaded()

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
