"""Branch operations of a session: fork, switch, delete, list, and the branch tree."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from turnstore.errors import BranchNotFoundError, ContentNotFoundError, ProtectedBranchError
from turnstore.lineage import BranchNode, build_tree
from turnstore.persistence.records import MAIN_BRANCH, BranchPointer
from turnstore.persistence.validation import check_identifier
from turnstore.redaction import identifier
from turnstore.sdk.items import content_preview, decode
from turnstore.session_checks import check_branch_name, check_turn_number
from turnstore.session_core import SessionCore, operation


class SessionBranches(SessionCore):
    """Forks, switches, deletes and lists a session's branches, and draws their tree."""

    if TYPE_CHECKING:

        async def find_turns_by_content(
            self, search_term: str, branch_id: str | None = None
        ) -> list[dict[str, Any]]:
            """The search a fork from content starts with (:class:`.SessionStructure`'s)."""

    @operation
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
        check_turn_number(turn_number)
        if branch_name is not None:
            check_branch_name(branch_name)
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

    @operation
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

    @operation
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

    @operation
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
        check_branch_name(branch_id, "branch_id")
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

    @operation
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


FORK_PREVIEW_LENGTH = 100


def _preview(message_data: str) -> str | None:
    """The preview of a stored user message, as ``get_conversation_turns`` cuts it."""
    item = decode(message_data)
    if not isinstance(item, dict):
        return None
    return content_preview(item.get("content", ""), FORK_PREVIEW_LENGTH)
