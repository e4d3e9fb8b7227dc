"""Structure queries of a session: its user turns, their items and the tools each turn used."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from turnstore.persistence.records import UserTurn
from turnstore.sdk.items import (
    TOOL_COUNT_RULE,
    content_preview,
    content_texts,
    decode,
    search_pattern,
    stored_form,
)
from turnstore.session_checks import check_branch_id, check_text
from turnstore.session_core import SessionCore, operation


class SessionStructure(SessionCore):
    """Reads a branch by user turn: the turns, their items, searches and tool use."""

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

    @operation
    async def get_conversation_turns(self, branch_id: str | None = None) -> list[dict[str, Any]]:
        """The user turns of a branch: ``turn``, ``content`` (first 100 characters),
        ``full_content``, ``timestamp``, ``can_branch``."""  # noqa: D205, D209
        branch_id = check_branch_id(branch_id)
        store = await self._store()
        branch = branch_id if branch_id is not None else await self._current_branch(store)
        return _turn_records(await store.user_turns(self.session_id, branch), preview_length=100)

    @operation
    async def find_turns_by_content(
        self, search_term: str, branch_id: str | None = None
    ) -> list[dict[str, Any]]:
        """User turns whose text contains ``search_term`` (literally; ASCII case ignored).

        Returns:
            Records shaped like ``get_conversation_turns``' with the whole content.
        """
        check_text(search_term, "search_term")
        branch_id = check_branch_id(branch_id)
        store = await self._store()
        branch = branch_id if branch_id is not None else await self._current_branch(store)
        candidates = await store.user_turns(self.session_id, branch, stored_form(search_term))
        pattern = search_pattern(search_term)
        return _turn_records(
            candidates,
            preview_length=None,
            keep=lambda content: any(pattern.search(text) for text in content_texts(content)),
        )

    @operation
    async def get_conversation_by_turns(
        self, branch_id: str | None = None
    ) -> dict[int, list[dict[str, str | None]]]:
        """A branch's items grouped by user turn: ``{turn: [{"type", "tool_name"}, ...]}``."""
        branch_id = check_branch_id(branch_id)
        store = await self._store()
        branch = branch_id if branch_id is not None else await self._current_branch(store)
        turns: dict[int, list[dict[str, str | None]]] = {}
        for turn, kind, tool in await store.structure(self.session_id, branch):
            turns.setdefault(turn, []).append({"type": kind, "tool_name": tool})  # type: ignore[arg-type]
        return turns

    @operation
    async def get_tool_usage(self, branch_id: str | None = None) -> list[tuple[str, int, int]]:
        """``(tool_name, count, user_turn_number)`` for each tool used per turn of a branch."""
        branch_id = check_branch_id(branch_id)
        store = await self._store()
        branch = branch_id if branch_id is not None else await self._current_branch(store)
        return await store.tool_usage(self.session_id, branch, TOOL_COUNT_RULE)


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
