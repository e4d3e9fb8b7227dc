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
from functools import cache
from typing import Any

from sqlalchemy import BigInteger, Integer, bindparam, delete, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from turnstore.persistence.dialects.base import DialectProfile
from turnstore.persistence.engines import EngineHandle
from turnstore.persistence.models import StoreTables
from turnstore.persistence.prepared import PreparedStatement


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


class _Statements:
    """The statements of removals, built once per table set and dialect.

    Session ids go in as one list parameter (see ``DialectProfile.in_ids``), so a batch's
    statements compile once and run as prepared statements.
    """

    def __init__(self, tables: StoreTables, profile: DialectProfile) -> None:
        self._t, self._profile = tables, profile
        self._direct = profile.runs_prepared_statements_directly
        s, i = tables.sessions, tables.info
        self.lock_sessions = self._prepared(
            select(s.c.session_id)
            .where(profile.in_ids(s.c.session_id, "ids"))
            .order_by(s.c.session_id)
            .with_for_update()
        )
        # One session's locks by equality: on Citus a plain ``session_id = $1`` is planned on
        # the fast path (under a millisecond), ``= ANY($1)`` of one id about 20 times slower.
        sid = bindparam("sid", type_=s.c.session_id.type)
        self.lock_session = self._prepared(
            select(s.c.session_id).where(s.c.session_id == sid).with_for_update()
        )
        self.lock_info = self._prepared(
            select(i.c.session_id).where(i.c.session_id == sid).with_for_update()
        )
        # Children first: no cascade is relied on, and the counts come from the deletes.
        order = (
            tables.turn_models,
            tables.lineage,
            tables.usage,
            tables.structure,
            tables.messages,
            tables.reservations,
            tables.generations,
            tables.append_keys,
            tables.info,
            tables.sessions,
        )
        self.deletes = {
            table.name: self._prepared(
                delete(table).where(profile.in_ids(table.c.session_id, "ids"))
            )
            for table in order
        }
        self._picks: dict[tuple[bool, bool], PreparedStatement] = {}
        self._confirms: dict[tuple[bool, bool, bool], PreparedStatement] = {}

    def _prepared(self, statement: Any) -> PreparedStatement:
        return PreparedStatement(statement, direct=self._direct)

    def _conditions(self, shape: tuple[bool, bool]) -> list[ColumnElement[bool]]:
        i = self._t.info
        by_user, by_age = shape
        found: list[ColumnElement[bool]] = []
        if by_user:
            found.append(i.c.user_id == bindparam("user_id", type_=i.c.user_id.type))
        if by_age:
            found.append(i.c.last_activity_us < bindparam("cutoff", type_=BigInteger()))
        return found

    def pick(self, shape: tuple[bool, bool]) -> PreparedStatement:
        """Up to ``:limit`` matching session ids, oldest activity first."""
        found = self._picks.get(shape)
        if found is None:
            i = self._t.info
            found = self._picks[shape] = self._prepared(
                select(i.c.session_id)
                .where(*self._conditions(shape))
                .order_by(i.c.last_activity_us, i.c.session_id)
                .limit(bindparam("limit", type_=Integer()))
            )
        return found

    def confirm(self, shape: tuple[bool, bool], *, one: bool = False) -> PreparedStatement:
        """The ids among ``:ids`` (with ``one``, ``:sid``) that still match, info rows locked."""
        found = self._confirms.get((*shape, one))
        if found is None:
            i = self._t.info
            chosen = (
                i.c.session_id == bindparam("sid", type_=i.c.session_id.type)
                if one
                else self._profile.in_ids(i.c.session_id, "ids")
            )
            found = self._confirms[(*shape, one)] = self._prepared(
                select(i.c.session_id)
                .where(chosen, *self._conditions(shape))
                .order_by(i.c.session_id)
                .with_for_update()
            )
        return found


@cache
def _statements(tables: StoreTables, profile: DialectProfile) -> _Statements:
    return _Statements(tables, profile)


class Eraser:
    """Removes sessions of one store (an engine and a table set)."""

    def __init__(self, handle: EngineHandle, tables: StoreTables) -> None:
        self._handle = handle
        self._profile = handle.profile
        self._t = tables
        self._q = _statements(tables, handle.profile)

    def _ids(self, session_ids: Sequence[str]) -> dict[str, Any]:
        return {"ids": self._profile.ids_value(session_ids)}

    @staticmethod
    def _shape(criteria: Criteria) -> tuple[bool, bool]:
        shape = (criteria.user_id is not None, criteria.inactive_before_us is not None)
        if shape == (False, False):
            raise ValueError("a batched removal needs an owner or a cut-off")
        return shape

    @staticmethod
    def _criteria_params(criteria: Criteria) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if criteria.user_id is not None:
            params["user_id"] = criteria.user_id
        if criteria.inactive_before_us is not None:
            params["cutoff"] = criteria.inactive_before_us
        return params

    async def delete_session(self, session_id: str) -> Removed:
        """Remove everything of one session in one transaction."""
        return await self._handle.write(self._delete_one, session_id)

    def _delete_one(self, conn: Connection, session_id: str) -> Removed:
        one = {"sid": session_id}
        locked = self._q.lock_session.rows(conn, one)
        info = self._q.lock_info.rows(conn, one)
        removed = self._delete(conn, [session_id])
        exists = bool(locked) or bool(info)
        return Removed(int(exists), removed.items, removed.usage_rows)

    @property
    def distributed(self) -> bool:
        """Whether the batches run on a distributed database (known after the first one)."""
        return bool(self._handle.distributed)

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
        shape, params = self._shape(criteria), self._criteria_params(criteria)
        picked = self._q.pick(shape).scalars(conn, {**params, "limit": limit})
        if not picked:
            return Removed(), 0
        if self._handle.is_distributed(conn):
            # Citus locks rows of one shard per statement only: one session at a time, in
            # the order the other databases lock them in.
            confirmed = []
            for session_id in sorted(picked):
                one = {"sid": session_id}
                self._q.lock_session.rows(conn, one)
                confirmed += self._q.confirm(shape, one=True).scalars(conn, {**params, **one})
        else:
            ids = self._ids(picked)
            self._q.lock_sessions.rows(conn, ids)
            # Under the locks: a session written since it was picked no longer matches.
            confirmed = self._q.confirm(shape).scalars(conn, {**params, **ids})
        removed = self._delete(conn, confirmed) if confirmed else Removed()
        return removed, len(picked)

    def _delete(self, conn: Connection, session_ids: Sequence[str]) -> Removed:
        """Delete every row of the sessions, children first."""
        ids = self._ids(session_ids)
        # Optional tables the database lacks (the models and lineage before 0007) are skipped.
        absent = self._handle.absent_tables.get(self._t.metadata, frozenset())
        counts = {
            name: stmt.execute(conn, ids)
            for name, stmt in self._q.deletes.items()
            if name not in absent
        }
        return Removed(
            len(session_ids),
            max(counts[self._t.messages.name], 0),
            max(counts[self._t.usage.name], 0),
        )

    async def would_remove(self, criteria: Criteria) -> Removed:
        """What removing every matching session now would take away, counted by the database."""
        return await self._handle.read(self._count, criteria)

    def _count(self, conn: Connection, criteria: Criteria) -> Removed:
        t, i = self._t, self._t.info
        conditions = []
        if criteria.user_id is not None:
            conditions.append(i.c.user_id == criteria.user_id)
        if criteria.inactive_before_us is not None:
            conditions.append(i.c.last_activity_us < criteria.inactive_before_us)
        self._shape(criteria)
        matching = select(i.c.session_id).where(*conditions)
        sessions = conn.scalar(select(func.count()).select_from(matching.subquery()))
        items = conn.scalar(select(func.count()).where(t.messages.c.session_id.in_(matching)))
        usage = conn.scalar(select(func.count()).where(t.usage.c.session_id.in_(matching)))
        return Removed(int(sessions or 0), int(items or 0), int(usage or 0))
