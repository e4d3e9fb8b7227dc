"""Dialect-neutral queries for history, branching, structure and usage.

The repository knows tables and SQL, not the Agents SDK: callers hand it items already
serialized and classified, and get back stored text and plain records. Every statement is
scoped by ``session_id`` (so the store can be sharded by session), and every public mutation is
one transaction that begins by locking the session: the session row on servers, the database
write lock on SQLite.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import and_, delete, exists, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from turnstore.errors import InvalidItemError, SchemaMissingError
from turnstore.persistence import rewrite, server_routines
from turnstore.persistence.driver_calls import AsyncpgCalls
from turnstore.persistence.records import (
    MAIN_BRANCH,
    BranchPointer,
    NewMessage,
    PoppedItem,
    UsageRecord,
)
from turnstore.persistence.repository_branches import BranchOperations
from turnstore.persistence.repository_reads import ConversationReads
from turnstore.persistence.repository_schema import SchemaPreparation
from turnstore.persistence.server_routines import ServerRoutines
from turnstore.persistence.statements import TURN_MODEL_COLUMNS

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Waits before each retry of a write that lost a lock wait or a deadlock; then it fails.
_LOCK_RETRY_DELAYS = (0.05, 0.25, 1.0)
# Room in a statement for its SQL text and the other columns of an item's row.
_STATEMENT_OVERHEAD = 64 * 1024


class ConversationRepository(SchemaPreparation, BranchOperations, ConversationReads):
    """Reads and writes conversations in one store (an engine and a table set).

    Its parts live in their own modules: the shared state in :mod:`.repository_core`,
    schema preparation in :mod:`.repository_schema`, branch operations in
    :mod:`.repository_branches` and the reads in :mod:`.repository_reads`; this class adds
    the writes: appends, pops, compaction, clearing and usage.
    """

    def _one_call_writes(self) -> tuple[AsyncpgCalls, ServerRoutines] | None:
        """How to run appends and usage writes as one server-function call, if possible."""
        calls = self._handle.driver_calls
        routines = self._handle.routines.get(self._t.metadata)
        return None if calls is None or routines is None else (calls, routines)

    async def append(
        self,
        session_id: str,
        pointer: BranchPointer,
        messages: Sequence[NewMessage],
        key: str | None = None,
    ) -> BranchPointer:
        """Append messages to a branch, numbering sequence and user turns, in one transaction.

        Later batches without a user message continue the branch's current turn. If the session
        was cleared since ``pointer.generation`` was seen, a non-main branch no longer exists
        and the messages go to ``main``. A write that lost a lock wait is run again.

        Args:
            session_id: The session.
            pointer: The branch to write to and the clear generation it was seen with.
            messages: The batch.
            key: An idempotency key: if an append with this key was stored in the session
                before (and the session not cleared since), nothing is stored again.

        Returns:
            The branch written to and the session's current clear generation.

        Raises:
            InvalidItemError: An item is longer than one statement may be on this server.
        """
        self._check_statement_sizes(messages)
        one_call = None if key is not None else self._one_call_writes()
        if one_call is None:
            return await self._retrying_lock_conflicts(
                lambda: self._handle.write(self._append, session_id, pointer, messages, key)
            )
        calls, routines = one_call
        arguments = server_routines.append_arguments(
            session_id,
            pointer.branch_id,
            pointer.generation,
            [(m.data, m.message_type, m.is_user_message, m.tool_name) for m in messages],
        )
        if routines.maintains_info:
            arguments += self._info_arguments
        elif self._info.given:
            self.require_info_table()
        rows = await self._retrying_lock_conflicts(
            lambda: calls.fetch(routines.append_call, arguments, writes=True)
        )
        branch_id, generation = rows[0]
        return BranchPointer(branch_id, generation)

    def _require_table(self, table: Any, feature: str) -> None:
        """Refuse a feature whose optional table the database lacks.

        Raises:
            SchemaMissingError: The table is missing.
        """
        if table.name in self._handle.absent_tables.get(self._t.metadata, frozenset()):
            raise SchemaMissingError(
                f"{feature} need the {table.name} table, which this database lacks; run the "
                "migrations (turnstore db upgrade) or open it with create_tables=True"
            )

    def _check_statement_sizes(self, messages: Sequence[NewMessage]) -> None:
        """Refuse, naming it, an item one statement cannot carry to this server.

        Raises:
            InvalidItemError: An item's statement would exceed the server's limit.
        """
        limit = self._handle.statement_size_limit
        if limit is None:
            return
        room = limit - _STATEMENT_OVERHEAD
        for index, message in enumerate(messages):
            size = self._profile.sent_size(message.data)
            if size > room:
                raise InvalidItemError(
                    f"Item {index} takes {size:,} bytes in a statement, and this server "
                    f"accepts statements of at most {limit:,} bytes (max_allowed_packet), so "
                    f"an item can be at most about {room:,}; raise the server's "
                    "max_allowed_packet or store smaller items"
                )

    async def _retrying_lock_conflicts(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run a write, again after a short wait if it lost a lock wait or a deadlock.

        Such a write was rolled back whole, so running it again cannot store anything twice.
        """
        for delay in _LOCK_RETRY_DELAYS:
            try:
                return await attempt()
            except DBAPIError as exc:
                if exc.orig is None or not self._profile.is_lock_conflict(exc.orig):
                    raise
                logger.debug("A write lost a lock wait; retrying in %.2fs", delay)
            await asyncio.sleep(delay)
        return await attempt()

    def _append(
        self,
        conn: Connection,
        session_id: str,
        pointer: BranchPointer,
        messages: Sequence[NewMessage],
        key: str | None = None,
    ) -> BranchPointer:
        q = self._q
        branch_id = pointer.branch_id
        params = {"sid": session_id, "bid": branch_id}
        if q.touch_returning_counters is not None:
            counters = q.touch_returning_counters.rows(conn, params)
        else:
            q.touch_session.execute(conn, params)
            counters = q.append_counters.rows(conn, params)
        max_sequence, turn, generation = counters[0]
        generation = generation or 0
        if generation != pointer.generation and branch_id != MAIN_BRANCH:
            branch_id = MAIN_BRANCH
            turn = q.branch_max_turn.scalar(conn, {"sid": session_id, "bid": branch_id})
        if key is not None:
            self._require_table(self._t.append_keys, "idempotency keys")
            # Under the session's lock: no other writer can record this key meanwhile.
            keyed = {"sid": session_id, "key": key}
            if q.append_key_stored.scalar(conn, keyed) is not None:
                return BranchPointer(branch_id, generation)
            q.store_append_key.execute(conn, keyed)
        message_ids = self._profile.insert_returning_ids(
            conn,
            q.insert_messages,
            [{"session_id": session_id, "message_data": m.data} for m in messages],
            {"session_id": session_id},
            max_statement_bytes=self._handle.statement_size_limit,
        )
        rows = rewrite.structure_rows(
            session_id, branch_id, messages, message_ids, max_sequence or 0, turn or 0
        )
        q.insert_structure.execute_many(conn, rows)
        self._touch_info(conn, session_id)
        return BranchPointer(branch_id, generation)

    async def pop_latest(
        self,
        session_id: str,
        branch_id: str,
        check: Callable[[str | None], None] | None = None,
    ) -> PoppedItem | None:
        """Remove the newest item of a branch; ``None`` when the branch is empty.

        The message row itself is deleted only when no other branch shares it, and the turn's
        usage row goes when its last item does.

        Args:
            session_id: The session.
            branch_id: The branch.
            check: Called with the newest item's stored text (``None`` if its message is
                gone) inside the transaction, before anything is deleted; whatever it raises
                rolls the transaction back and propagates, leaving the item where it was.
        """
        return await self._handle.write(self._pop_latest, session_id, branch_id, check)

    def _pop_latest(
        self,
        conn: Connection,
        session_id: str,
        branch_id: str,
        check: Callable[[str | None], None] | None = None,
    ) -> PoppedItem | None:
        s, m, u = self._t.structure, self._t.messages, self._t.usage
        if self._q.lock_session.scalar(conn, {"sid": session_id}) is None:
            return None
        row = conn.execute(
            select(s.c.id, s.c.message_id, s.c.user_turn_number, m.c.message_data)
            .outerjoin(m, and_(m.c.id == s.c.message_id, m.c.session_id == s.c.session_id))
            .where(s.c.session_id == session_id, s.c.branch_id == branch_id)
            .order_by(s.c.sequence_number.desc())
            .limit(1)
        ).first()
        if row is None:
            return None
        if check is not None:
            check(row.message_data)
        conn.execute(delete(s).where(s.c.session_id == session_id, s.c.id == row.id))
        conn.execute(
            delete(m).where(
                m.c.session_id == session_id,
                m.c.id == row.message_id,
                ~exists().where(s.c.session_id == session_id, s.c.message_id == row.message_id),
            )
        )
        if row.user_turn_number is not None:
            in_turn = (
                s.c.session_id == session_id,
                s.c.branch_id == branch_id,
                s.c.user_turn_number == row.user_turn_number,
            )
            conn.execute(
                delete(u).where(
                    u.c.session_id == session_id,
                    u.c.branch_id == branch_id,
                    u.c.user_turn_number == row.user_turn_number,
                    ~exists().where(*in_turn),
                )
            )
            tm = self._t.turn_models
            if self._has(tm):
                conn.execute(
                    delete(tm).where(
                        tm.c.session_id == session_id,
                        tm.c.branch_id == branch_id,
                        tm.c.user_turn_number == row.user_turn_number,
                        ~exists().where(*in_turn),
                    )
                )
        self._touch_info(conn, session_id)
        return PoppedItem(row.message_data)

    # -- compaction ----------------------------------------------------------------------

    async def branch_tail(self, session_id: str, branch_id: str, limit: int) -> rewrite.BranchTail:
        """The newest ``limit`` items of a branch, for a later :meth:`replace_tail`."""
        return await self._handle.read(rewrite.read_tail, self._t, session_id, branch_id, limit)

    async def replace_tail(
        self,
        session_id: str,
        tail: rewrite.BranchTail,
        start: int,
        messages: Sequence[NewMessage],
        prunable: Callable[[str | None], bool] | None = None,
    ) -> bool:
        """Replace ``tail.rows[start:]`` with ``messages``, if the branch still ends with them.

        One transaction: it refuses (returns ``False``, changing nothing) when the session was
        cleared since the read or the branch no longer ends with exactly those rows (another
        writer appended, popped or rewrote them). Other branches and all usage rows are left
        alone; the new items are numbered as an append after the kept rows would be.

        Args:
            session_id: The session.
            tail: What :meth:`branch_tail` read.
            start: Index into ``tail.rows`` of the first row to replace.
            messages: The replacement items.
            prunable: Given a kept row's stored text, whether it may be deleted too: the
                branch's oldest rows are deleted while it says yes (in batches of the tail's
                size), as the SDK's encrypted sessions reclaim expired items.
        """
        if not tail.rows[start:]:
            return False
        return await self._handle.write(
            self._replace_tail, session_id, tail, start, messages, prunable
        )

    def _replace_tail(
        self,
        conn: Connection,
        session_id: str,
        tail: rewrite.BranchTail,
        start: int,
        messages: Sequence[NewMessage],
        prunable: Callable[[str | None], bool] | None,
    ) -> bool:
        q, t = self._q, self._t
        if q.lock_session.scalar(conn, {"sid": session_id}) is None:
            return False
        generation = int(q.current_generation.scalar(conn, {"sid": session_id}) or 0)
        expected = tail.rows[start:]
        if generation != tail.generation or not rewrite.tail_unchanged(
            conn, t, session_id, tail.branch_id, expected
        ):
            return False
        if prunable is not None:
            rewrite.prune_prefix(
                conn,
                t,
                session_id,
                tail.branch_id,
                expected[0].sequence_number,
                prunable,
                max(len(tail.rows), 1),
            )
        rewrite.delete_rows(conn, t, session_id, expected)
        rewrite.append_numbered(conn, t, self._profile, session_id, tail.branch_id, messages)
        self._touch_info(conn, session_id)
        return True

    async def replace_branch(
        self, session_id: str, pointer: BranchPointer, messages: Sequence[NewMessage]
    ) -> BranchPointer:
        """Replace every item of a branch with ``messages``, in one transaction.

        Other branches and all usage rows are left alone. If the session was cleared since
        ``pointer.generation``, the branch is gone and ``main`` is written, as appends do.

        Returns:
            The branch written and the session's clear generation.
        """
        return await self._handle.write(self._replace_branch, session_id, pointer, messages)

    def _replace_branch(
        self,
        conn: Connection,
        session_id: str,
        pointer: BranchPointer,
        messages: Sequence[NewMessage],
    ) -> BranchPointer:
        q = self._q
        q.touch_session.execute(conn, {"sid": session_id})
        generation = int(q.current_generation.scalar(conn, {"sid": session_id}) or 0)
        branch_id = pointer.branch_id
        if generation != pointer.generation and branch_id != MAIN_BRANCH:
            branch_id = MAIN_BRANCH
        rewrite.delete_branch_rows(conn, self._t, session_id, branch_id)
        rewrite.append_numbered(conn, self._t, self._profile, session_id, branch_id, messages)
        self._touch_info(conn, session_id)
        return BranchPointer(branch_id, generation)

    async def clear(self, session_id: str) -> int:
        """Delete every row of a session, keep its branch names reserved, bump its generation.

        Returns:
            The session's new clear generation.
        """
        return await self._handle.write(self._clear, session_id)

    def _clear(self, conn: Connection, session_id: str) -> int:
        t, profile = self._t, self._profile
        s = t.structure
        self._q.lock_session.execute(conn, {"sid": session_id})
        conn.execute(
            profile.insert_if_absent(t.reservations, ["session_id", "branch_id"]).from_select(
                ["session_id", "branch_id"],
                select(s.c.session_id, s.c.branch_id)
                .where(s.c.session_id == session_id)
                .distinct(),
            )
        )
        absent = self._handle.absent_tables.get(t.metadata, frozenset())
        for table in (
            t.turn_models,
            t.lineage,
            t.structure,
            t.usage,
            t.messages,
            t.append_keys,
            t.sessions,
        ):
            if table.name in absent:
                continue
            conn.execute(delete(table).where(table.c.session_id == session_id))
        conn.execute(
            profile.upsert(
                t.generations,
                {"session_id": session_id, "generation": 1},
                ["session_id"],
                {"generation": t.generations.c.generation + 1},
            )
        )
        # The info (owner, title, metadata) is not history: it stays, and so does the
        # session in the store's listings, empty and moved to the top.
        self._bump_info(conn, session_id)
        return int(conn.scalar(select(self._q.generation), {"sid": session_id}) or 0)

    async def current_generation(self, session_id: str) -> int:
        """The session's clear generation (0 if it was never cleared)."""
        generation = await self._handle.read(self._q.current_generation.scalar, {"sid": session_id})
        return int(generation or 0)

    # -- usage ---------------------------------------------------------------------------

    async def record_usage(
        self, session_id: str, pointer: BranchPointer, usage: UsageRecord
    ) -> int | None:
        """Store ``usage`` against the branch's latest user turn, replacing earlier values.

        Nothing is stored when the branch has no items, or when the session was cleared since
        ``pointer.generation`` (the usage belongs to history that is gone).

        Returns:
            The turn number written, or ``None`` if nothing was stored.
        """
        one_call = self._one_call_writes()
        records_models = self._has(self._t.turn_models)
        if one_call is None or (records_models and not one_call[1].records_models):
            # Without functions, or with ones that predate model rows: the statements, which
            # write them.
            return await self._retrying_lock_conflicts(
                lambda: self._handle.write(self._record_usage, session_id, pointer, usage)
            )
        calls, routines = one_call
        arguments: tuple[Any, ...] = (
            session_id,
            pointer.branch_id,
            pointer.generation,
            usage.requests,
            usage.input_tokens,
            usage.output_tokens,
            usage.total_tokens,
            server_routines.json_argument(usage.input_tokens_details),
            server_routines.json_argument(usage.output_tokens_details),
        )
        if routines.maintains_info:
            arguments += self._info_arguments
        if routines.records_models:
            shares = usage.models
            arguments += (
                [share.model for share in shares],
                *(server_routines.count_array([s.counts[i] for s in shares]) for i in range(6)),
            )
        rows = await self._retrying_lock_conflicts(
            lambda: calls.fetch(routines.usage_call, arguments, writes=True)
        )
        turn = rows[0][0]
        return None if turn is None else int(turn)

    def _record_usage(
        self, conn: Connection, session_id: str, pointer: BranchPointer, usage: UsageRecord
    ) -> int | None:
        q = self._q
        params = {"sid": session_id, "bid": pointer.branch_id}
        if q.lock_returning_usage_counters is not None:
            locked = q.lock_returning_usage_counters.first(conn, params)
            if locked is None:
                return None
            _, turn, generation = locked
        else:
            if q.lock_session.scalar(conn, params) is None:
                return None
            turn, generation = q.usage_counters.rows(conn, params)[0]
        if turn is None or (generation or 0) != pointer.generation:
            return None
        q.upsert_usage.execute(
            conn,
            {
                **params,
                "user_turn_number": turn,
                "requests": usage.requests,
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "total_tokens": usage.total_tokens,
                "input_tokens_details": usage.input_tokens_details,
                "output_tokens_details": usage.output_tokens_details,
            },
        )
        self._touch_info(conn, session_id)
        if not self._has(self._t.turn_models):
            return int(turn)
        q.delete_turn_models.execute(conn, {**params, "turn": turn})
        if usage.models:
            q.insert_turn_models.execute_many(
                conn,
                [
                    dict(
                        zip(
                            TURN_MODEL_COLUMNS,
                            (
                                session_id,
                                pointer.branch_id,
                                turn,
                                position,
                                share.model,
                                *share.counts,
                            ),
                            strict=True,
                        )
                    )
                    for position, share in enumerate(usage.models)
                ],
            )
        return int(turn)
