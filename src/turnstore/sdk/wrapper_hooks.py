"""The private hooks the Agents SDK's session wrappers look for on the session they wrap.

``OpenAIResponsesCompactionSession`` and ``EncryptedSession`` (openai-agents 0.24) rewrite a
wrapped session's history through methods that are not part of the public ``Session`` protocol:

``_get_compaction_snapshot(limit, *, prune_prefix=None)``
    A bounded snapshot of the newest items, and an atomic ``replace_suffix(start, items)`` that
    returns ``False`` (changing nothing) when another writer changed them since. Used by
    automatic compaction after a run; without it the wrapper falls back to whole-history
    replacement.
``_atomic_replace_items(items)``
    Whole-history replacement in one transaction, used by manual ``run_compaction()``.
    Without it the wrapper calls ``clear_session()`` and ``add_items()``, which on turnstore
    would delete every branch and all stored usage.
``_pop_item_with_validation(validate)``
    A pop that runs ``validate`` on the newest item before committing its removal; used by
    :class:`turnstore.sdk.encrypted.EncryptedSession` to pop only items that authenticate.

:class:`WrapperHooks` implements them over the current branch, for the session classes to
inherit. This module and :mod:`turnstore.sdk.encrypted` are the only places that know these
names and the SDK's private ``_CompactionSnapshot``; both were checked against the versions in
:data:`SDK_VERSIONS_CHECKED` by ``tests/test_sdk_wrappers.py``. The SDK is imported only when
a wrapper calls in, so turnstore works without it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from turnstore.sdk.items import decode, to_new_messages

if TYPE_CHECKING:
    from turnstore.persistence.records import BranchPointer
    from turnstore.persistence.repository import ConversationRepository

#: openai-agents versions whose wrappers were run against these hooks.
SDK_VERSIONS_CHECKED = ("0.24.0",)

ReplaceSuffix = Callable[[int, list[Any]], Awaitable[bool]]


def compaction_snapshot(items: list[Any], complete: bool, replace_suffix: ReplaceSuffix) -> Any:
    """The SDK's ``_CompactionSnapshot`` holding ``items`` and the replacement."""
    from agents.memory.session import _CompactionSnapshot

    return _CompactionSnapshot(items, complete, replace_suffix)


class WrapperHooks:
    """The SDK wrappers' hooks, over the session's current branch.

    Mixed into :class:`turnstore.AdvancedSession`, whose plumbing it uses: every mutation
    holds the session's mutation lock and is one repository transaction.
    """

    if TYPE_CHECKING:
        session_id: str
        _pointer: BranchPointer

        async def _store(self) -> ConversationRepository: ...
        async def _current_branch(self, store: ConversationRepository) -> str: ...
        def _ordered(self) -> asyncio.Lock: ...

    async def _get_compaction_snapshot(
        self, limit: int, *, prune_prefix: Callable[[Any], bool] | None = None
    ) -> Any:
        """The newest ``limit`` items of the current branch and an atomic suffix replacement.

        ``replace_suffix(start, items)`` swaps the snapshot's items from ``start`` on for
        ``items`` in one transaction, numbered as an append after the kept items; it returns
        ``False`` and changes nothing when the session was cleared or the branch no longer
        ends with exactly the snapshot's items. Other branches and stored usage are never
        touched. With ``prune_prefix``, the branch's oldest items are deleted as well while it
        accepts them (the encrypted wrapper's expired items).

        Returns:
            The SDK's ``_CompactionSnapshot``; ``None`` (the wrapper then falls back to
            whole-history replacement) for a bad ``limit`` or an unreadable stored item.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            return None
        store = await self._store()
        branch = await self._current_branch(store)
        tail = await store.branch_tail(self.session_id, branch, limit)
        items = []
        for row in tail.rows:
            item = None if row.message_data is None else decode(row.message_data)
            if item is None:
                return None
            items.append(item)

        prunable: Callable[[str | None], bool] | None = None
        if prune_prefix is not None:
            accept = prune_prefix

            def prunable(data: str | None) -> bool:
                item = None if data is None else decode(data)
                return item is not None and bool(accept(item))

        async def replace_suffix(start: int, output: list[Any]) -> bool:
            if isinstance(start, bool) or not isinstance(start, int) or start < 0:
                return False
            messages = to_new_messages(output)
            async with self._ordered():
                return await store.replace_tail(self.session_id, tail, start, messages, prunable)

        return compaction_snapshot(items, tail.complete, replace_suffix)

    async def _atomic_replace_items(self, items: list[Any]) -> bool:
        """Replace every item of the current branch with ``items``, in one transaction.

        Other branches and stored usage are kept; turns are numbered afresh from the items.
        """
        messages = to_new_messages(items)
        async with self._ordered():
            store = await self._store()
            await self._current_branch(store)
            self._pointer = await store.replace_branch(self.session_id, self._pointer, messages)
        return True

    async def _pop_item_with_validation(
        self, validate: Callable[[Any], None] | None = None
    ) -> Any | None:
        """Pop the newest readable item of the current branch, if ``validate`` accepts it.

        ``validate`` runs inside the pop's transaction; whatever it raises rolls the pop back
        (the item keeps its place) and propagates. Unreadable rows are dropped and skipped, as
        :meth:`pop_item` does.
        """
        async with self._ordered():
            store = await self._store()
            branch = await self._current_branch(store)
            seen: list[Any] = []

            def check(data: str | None) -> None:
                item = None if data is None else decode(data)
                seen.append(item)
                if item is not None and validate is not None:
                    validate(item)

            while True:
                seen.clear()
                popped = await store.pop_latest(self.session_id, branch, check)
                if popped is None:
                    return None
                if seen and seen[-1] is not None:
                    return seen[-1]
