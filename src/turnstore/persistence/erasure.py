"""Removing whole sessions: one at a time, or in bounded batches (erase a user, expire).

Each removal is one transaction that takes the same locks, in the same order, as every write
of a session: the sessions row first (``SELECT ... FOR UPDATE``, by session id, so two
erasures never wait on each other in a circle), then the info row, whose conditions (owner,
last activity) are checked again under the lock. A session written after a batch picked it,
but before the batch locked it, is therefore kept whole, its new turn included; one written
after the batch committed starts afresh under the same id. Either way no session is ever half
removed. A batch removes at most ``limit`` sessions, so a long erasure is a series of short
transactions that writers of other sessions interleave with, and one stopped midway (even
killed) is finished by running it again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, delete, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import BindParameter, ColumnElement

from turnstore.persistence.engines import EngineHandle
from turnstore.persistence.models import StoreTables


@dataclass(frozen=True, slots=True)
class Removed:
    """What a removal took away (or, for a dry run, would take away).

    Attributes:
        sessions: Sessions removed whole.
        items: Stored items (message rows) among them.
        usage_rows: Per-turn usage records among them.
    """

    sessions: int = 0
    items: int = 0
    usage_rows: int = 0

    def __add__(self, other: Removed) -> Removed:
        return Removed(
            self.sessions + other.sessions,
            self.items + other.items,
            self.usage_rows + other.usage_rows,
        )


@dataclass(frozen=True, slots=True)
class Criteria:
    """Which sessions a batched removal takes: every condition given must hold.

    Attributes:
        user_id: Owned by this user.
        inactive_before_us: Last activity strictly before this time (µs since the epoch).
    """

    user_id: str | None = None
    inactive_before_us: int | None = None


class Eraser:
    """Removes sessions of one store (an engine and a table set)."""

    def __init__(self, handle: EngineHandle, tables: StoreTables) -> None:
        self._handle = handle
        self._t = tables

    def _conditions(self, criteria: Criteria) -> list[ColumnElement[bool]]:
        i = self._t.info
        found: list[ColumnElement[bool]] = []
        if criteria.user_id is not None:
            found.append(i.c.user_id == criteria.user_id)
        if criteria.inactive_before_us is not None:
            found.append(i.c.last_activity_us < criteria.inactive_before_us)
        if not found:
            raise ValueError("a batched removal needs an owner or a cut-off")
        return found

    async def delete_session(self, session_id: str) -> Removed:
        """Remove everything of one session in one transaction."""
        return await self._handle.write(self._delete_one, session_id)

    def _delete_one(self, conn: Connection, session_id: str) -> Removed:
        t = self._t
        locked = conn.execute(
            select(t.sessions.c.session_id)
            .where(t.sessions.c.session_id == session_id)
            .with_for_update()
        ).first()
        info = conn.execute(
            select(t.info.c.session_id).where(t.info.c.session_id == session_id).with_for_update()
        ).first()
        removed = self._delete(conn, [session_id])
        exists = locked is not None or info is not None
        return Removed(int(exists), removed.items, removed.usage_rows)

    async def remove_batch(self, criteria: Criteria, limit: int) -> tuple[Removed, int]:
        """Remove up to ``limit`` matching sessions, oldest activity first, in one transaction.

        Returns:
            What was removed, and how many sessions the batch picked (a picked session
            written meanwhile is kept, so fewer may be removed; none picked means done).
        """
        return await self._handle.write(self._remove_batch, criteria, limit)

    def _remove_batch(
        self, conn: Connection, criteria: Criteria, limit: int
    ) -> tuple[Removed, int]:
        t, i = self._t, self._t.info
        conditions = self._conditions(criteria)
        picked = list(
            conn.execute(
                select(i.c.session_id)
                .where(*conditions)
                .order_by(i.c.last_activity_us, i.c.session_id)
                .limit(limit)
            ).scalars()
        )
        if not picked:
            return Removed(), 0
        if self._handle.distributed:
            # Citus locks rows of one shard per statement only: one session at a time, in
            # the same order as below.
            confirmed = [
                session_id
                for session_id in sorted(picked)
                if self._lock_one(conn, session_id, conditions)
            ]
        else:
            conn.execute(
                select(t.sessions.c.session_id)
                .where(t.sessions.c.session_id.in_(picked))
                .order_by(t.sessions.c.session_id)
                .with_for_update()
            ).all()
            # Under the locks: a session written since it was picked no longer matches.
            confirmed = list(
                conn.execute(
                    select(i.c.session_id)
                    .where(i.c.session_id.in_(picked), *conditions)
                    .order_by(i.c.session_id)
                    .with_for_update()
                ).scalars()
            )
        removed = self._delete(conn, confirmed) if confirmed else Removed()
        return Removed(len(confirmed), removed.items, removed.usage_rows), len(picked)

    def _lock_one(
        self, conn: Connection, session_id: str, conditions: Sequence[ColumnElement[bool]]
    ) -> bool:
        """Lock one picked session's rows; whether it still matches under the lock."""
        t, i = self._t, self._t.info
        conn.execute(
            select(t.sessions.c.session_id)
            .where(t.sessions.c.session_id == session_id)
            .with_for_update()
        ).all()
        still = conn.execute(
            select(i.c.session_id)
            .where(i.c.session_id == session_id, *conditions)
            .with_for_update()
        ).first()
        return still is not None

    def _delete(self, conn: Connection, session_ids: Sequence[str]) -> Removed:
        """Delete every row of the sessions, children first (no cascade is relied on)."""
        t = self._t
        ids: BindParameter[Any] = bindparam("ids", list(session_ids), expanding=True)
        usage = conn.execute(delete(t.usage).where(t.usage.c.session_id.in_(ids))).rowcount
        conn.execute(delete(t.structure).where(t.structure.c.session_id.in_(ids)))
        items = conn.execute(delete(t.messages).where(t.messages.c.session_id.in_(ids))).rowcount
        for table in (t.reservations, t.generations, t.info, t.sessions):
            conn.execute(delete(table).where(table.c.session_id.in_(ids)))
        return Removed(len(session_ids), max(items, 0), max(usage, 0))

    async def would_remove(self, criteria: Criteria) -> Removed:
        """What removing every matching session now would take away, counted by the database."""
        return await self._handle.read(self._count, criteria)

    def _count(self, conn: Connection, criteria: Criteria) -> Removed:
        t, i = self._t, self._t.info
        matching = select(i.c.session_id).where(*self._conditions(criteria))
        sessions = conn.scalar(select(func.count()).select_from(matching.subquery()))
        items = conn.scalar(select(func.count()).where(t.messages.c.session_id.in_(matching)))
        usage = conn.scalar(select(func.count()).where(t.usage.c.session_id.in_(matching)))
        return Removed(int(sessions or 0), int(items or 0), int(usage or 0))
