"""Branch operations of the conversation repository.

Forking copies structure rows inside the database and shares message bodies; deleting
removes a branch's rows and the messages no other branch shares; names stay reserved.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import delete, exists, func, select
from sqlalchemy.engine import Connection

from turnstore.errors import BranchNameTakenError, BranchNotFoundError, TurnNotFoundError
from turnstore.persistence import rewrite
from turnstore.persistence.records import (
    MAIN_BRANCH,
    BranchPointer,
    BranchSummary,
    CreatedBranch,
    DeletedBranch,
    StoredLineage,
    escaped_for_like,
    format_timestamp,
)
from turnstore.persistence.repository_core import (
    RepositoryCore,
    all_rows,
    one_row,
)
from turnstore.persistence.statements import as_stored
from turnstore.persistence.validation import fits_integer_column


class BranchOperations(RepositoryCore):
    """Forks, deletes and lists a session's branches, and reads their recorded lineage."""

    async def branch_generation(self, session_id: str, branch_id: str) -> int | None:
        """The session's clear generation if ``branch_id`` has items, else ``None``."""
        s = self._t.structure
        has_items = exists().where(s.c.session_id == session_id, s.c.branch_id == branch_id)
        found, generation = await self._handle.read(
            one_row, select(has_items.label("found"), self._q.generation), {"sid": session_id}
        )
        return int(generation or 0) if found else None

    async def create_branch(
        self,
        session_id: str,
        source: BranchPointer,
        turn: int,
        branch_name: str | None,
        auto_name: str,
        preview: Callable[[str], str | None] = lambda _data: None,
    ) -> CreatedBranch:
        """Fork a branch holding every item of the source branch before user turn ``turn``.

        Structure rows are copied inside the database by one INSERT ... SELECT; message bodies
        are shared, never copied. The new name is reserved for good.

        Args:
            session_id: The session.
            source: The branch to fork and the clear generation it was seen with (after a clear
                by another instance, ``main`` is forked instead).
            turn: The branch turn number of the user message to fork at.
            branch_name: The new branch's name, or ``None`` for ``auto_name``.
            auto_name: Base for a generated name; ``_2``, ``_3``... are appended if taken.
            preview: Makes the fork turn's preview, recorded with the branch's lineage, from
                the stored text of the turn's user message.

        Raises:
            TurnNotFoundError: The source branch has no user message at ``turn``.
            BranchNameTakenError: ``branch_name`` was used before in this session.
            InvalidArgumentError: ``branch_name`` is longer than the database's id columns.
        """
        if branch_name is not None:
            self.check_identifier(branch_name, "Branch names")
        return await self._handle.write(
            self._create_branch, session_id, source, turn, branch_name, auto_name, preview
        )

    def _create_branch(
        self,
        conn: Connection,
        session_id: str,
        source: BranchPointer,
        turn: int,
        branch_name: str | None,
        auto_name: str,
        preview: Callable[[str], str | None],
    ) -> CreatedBranch:
        q = self._q
        q.lock_session.execute(conn, {"sid": session_id})
        generation = int(q.current_generation.scalar(conn, {"sid": session_id}) or 0)
        source_branch = source.branch_id
        if generation != source.generation and source_branch != MAIN_BRANCH:
            source_branch = MAIN_BRANCH
        source_params = {"sid": session_id, "bid": source_branch, "turn": turn}
        # A number beyond what the turn column holds names no turn; the driver would refuse it.
        fork_message = (
            q.fork_message.scalar(conn, source_params) if fits_integer_column(turn) else None
        )
        if fork_message is None:
            raise TurnNotFoundError(
                f"Turn {turn} does not contain a user message in branch '{source_branch}'"
            )
        new_branch = self._reserve_branch_name(conn, session_id, branch_name, auto_name)
        after = q.latest_sequence.scalar(conn, {"sid": session_id}) or 0
        copied = q.copy_branch.execute(
            conn, {**source_params, "new_branch": new_branch, "after": after}
        )
        fork_preview = _display_text(preview(fork_message))
        if self._has(self._t.lineage):
            q.record_lineage.execute(
                conn, {**source_params, "new_branch": new_branch, "preview": fork_preview}
            )
        self._touch_info(conn, session_id)
        return CreatedBranch(new_branch, source_branch, generation, copied, fork_preview)

    def _reserve_branch_name(
        self, conn: Connection, session_id: str, branch_name: str | None, auto_name: str
    ) -> str:
        """Reserve a branch name inside the caller's (session-locked) transaction."""
        q = self._q
        wanted = auto_name if branch_name is None else branch_name
        # A generated name may take a suffix: "<auto_name>_2"... are candidates too.
        pattern = None if branch_name is not None else escaped_for_like(auto_name) + "/_%"
        found = q.names_taken.scalars(conn, {"sid": session_id, "name": wanted, "pattern": pattern})
        taken = {str(name) for name in found}
        taken.add(MAIN_BRANCH)
        if wanted in taken:
            if branch_name is not None:
                raise BranchNameTakenError(
                    f"Branch ID '{branch_name}' has already been used. Choose a new branch ID."
                )
            suffix = 2
            while f"{auto_name}_{suffix}" in taken:
                suffix += 1
            wanted = f"{auto_name}_{suffix}"
        q.reserve_name.execute(conn, {"sid": session_id, "name": wanted})
        return wanted

    async def delete_branch(self, session_id: str, branch_id: str) -> DeletedBranch:
        """Delete a branch: its structure rows, its usage, and messages no other branch shares.

        The name stays reserved.

        Raises:
            BranchNotFoundError: The branch has no items.
        """
        return await self._handle.write(self._delete_branch, session_id, branch_id)

    def _delete_branch(self, conn: Connection, session_id: str, branch_id: str) -> DeletedBranch:
        t, profile = self._t, self._profile
        s, u = t.structure, t.usage
        in_branch = (s.c.session_id == session_id, s.c.branch_id == branch_id)
        self._q.lock_session.execute(conn, {"sid": session_id})
        structure_rows = conn.scalar(select(func.count()).where(*in_branch)) or 0
        if not structure_rows:
            raise BranchNotFoundError(f"Branch '{branch_id}' does not exist")
        conn.execute(
            profile.insert_if_absent(t.reservations, ["session_id", "branch_id"]).values(
                session_id=session_id, branch_id=branch_id
            )
        )
        usage_rows = conn.execute(
            delete(u).where(u.c.session_id == session_id, u.c.branch_id == branch_id)
        ).rowcount
        # The branch's own records go; branches forked from it keep naming it as their parent.
        for own in (t.turn_models, t.lineage):
            if not self._has(own):
                continue
            conn.execute(
                delete(own).where(own.c.session_id == session_id, own.c.branch_id == branch_id)
            )
        messages = rewrite.delete_branch_rows(conn, t, session_id, branch_id)
        self._touch_info(conn, session_id)
        return DeletedBranch(int(structure_rows), usage_rows, messages)

    async def list_branches(self, session_id: str) -> list[BranchSummary]:
        """Every branch of a session with its counts, in order of creation."""
        rows = await self._handle.read(self._q.branches.rows, {"sid": session_id})
        return [
            BranchSummary(branch, int(count), int(users or 0), format_timestamp(created_at))
            for branch, count, users, created_at in rows
        ]

    async def lineage(self, session_id: str) -> list[StoredLineage]:
        """The recorded origins of a session's branches."""
        lin = self._t.lineage
        if not self._has(lin):
            return []
        stmt = select(
            lin.c.branch_id,
            lin.c.parent_branch_id,
            lin.c.fork_turn,
            lin.c.fork_preview,
            as_stored(lin.c.created_at),
        ).where(lin.c.session_id == session_id)
        rows = await self._handle.read(all_rows, stmt)
        return [
            StoredLineage(branch, parent, int(turn), preview, format_timestamp(created))
            for branch, parent, turn, preview, created in rows
        ]

    async def branch_messages(self, session_id: str) -> dict[str, list[tuple[int, int | None]]]:
        """``{branch: [(message_id, branch_turn_number), ...]}`` in order, for lineage inference."""
        s = self._t.structure
        stmt = (
            select(s.c.branch_id, s.c.message_id, s.c.branch_turn_number)
            .where(s.c.session_id == session_id)
            .order_by(s.c.branch_id, s.c.sequence_number)
        )
        found: dict[str, list[tuple[int, int | None]]] = {}
        for branch, message, turn in await self._handle.read(all_rows, stmt):
            found.setdefault(branch, []).append((int(message), turn))
        return found


def _display_text(text: str | None) -> str | None:
    """``text`` as every database can store it in a text column: a preview, so lossy is fine.

    Items keep NULs and lone surrogates exactly (escaped inside their JSON), but a preview is
    plain text: Postgres refuses NUL there and no driver encodes a lone surrogate.
    """
    if text is None:
        return None
    cleaned = text.replace("\x00", "\ufffd")
    return cleaned.encode("utf-8", "replace").decode("utf-8")
