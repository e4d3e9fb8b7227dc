"""Store-wide queries: session summaries, listings by last activity, counts, session info.

Every listing reads ``turnstore_session_info`` along one of its two indexes, newest first:
``(last_activity_us, session_id)`` for the whole store and ``(user_id, last_activity_us,
session_id)`` for one owner. A page continues from the previous page's last position (keyset
pagination), so it costs the same at the first page as at the ten-thousandth, whatever the size
of the store. The per-session figures of a summary (items and user turns on main, branches,
tokens, the first user message) are correlated subqueries, run only for the rows of the page,
each on an index of that session.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    Select,
    Text,
    and_,
    bindparam,
    distinct,
    func,
    literal,
    literal_column,
    select,
    type_coerce,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from turnstore.persistence.dialects import DialectProfile, JSONScalar
from turnstore.persistence.engines import EngineHandle
from turnstore.persistence.models import StoreTables
from turnstore.persistence.prepared import PreparedStatement

MAIN_BRANCH = "main"


@dataclass(frozen=True, slots=True)
class SessionRow:
    """One session's info and figures, as stored (the face shapes it for callers).

    Attributes:
        first_user_message: The stored item text of the first user message on main.
    """

    session_id: str
    user_id: str | None
    title: str | None
    metadata: Any
    created_at_us: int
    last_activity_us: int
    items: int
    user_turns: int
    branches: int
    total_tokens: int
    first_user_message: str | None


@dataclass(frozen=True, slots=True)
class Selection:
    """Which sessions a listing, count or erasure is about (every condition must hold).

    Attributes:
        user_id: Owned by this user (``None``: any owner, or none).
        metadata: Top-level metadata keys equal to these JSON scalars.
        active_after_us: Last activity at or after this time (µs since the epoch).
        active_before_us: Last activity strictly before this time.
    """

    user_id: str | None = None
    metadata: Mapping[str, JSONScalar] | None = None
    active_after_us: int | None = None
    active_before_us: int | None = None


#: A keyset position: (last activity in µs, session id) of the last row of a page.
Position = tuple[int, str]


class _Statements:
    """The listing statements, built once per table set and dialect (and page shape)."""

    def __init__(self, tables: StoreTables, profile: DialectProfile) -> None:
        self._t, self._profile = tables, profile
        self._direct = profile.runs_prepared_statements_directly
        i = tables.info
        self.summaries = _summaries(tables)
        self.summary = self._prepared(
            self.summaries.where(i.c.session_id == bindparam("sid", type_=i.c.session_id.type))
        )
        self._pages: dict[tuple[bool, bool, bool, bool, int], PreparedStatement] = {}

    def _prepared(self, statement: Any) -> PreparedStatement:
        return PreparedStatement(statement, direct=self._direct)

    def page(self, selection: Selection, after: bool, limit: int) -> PreparedStatement:
        """The page statement for a selection's shape (which filters it uses) and a limit.

        The limit is literal SQL: a prepared statement's bound LIMIT is planned without its
        value, and Postgres may then prefer sorting the whole selection to reading an index
        in order. Metadata filters vary in their keys and are built per call instead.
        """
        shape = (
            selection.user_id is not None,
            selection.active_after_us is not None,
            selection.active_before_us is not None,
            after,
            limit,
        )
        found = self._pages.get(shape)
        if found is None:
            found = self._pages[shape] = self._prepared(
                self.page_statement(selection, after, limit, bound=True)
            )
        return found

    def page_statement(
        self, selection: Selection, after: bool, limit: int, *, bound: bool
    ) -> Select[Any]:
        """A page's statement; with ``bound``, filter values are named bind parameters."""
        i = self._t.info
        conditions = self.conditions(selection, bound=bound)
        if after:
            conditions.append(
                self._profile.keyset_before(
                    [i.c.last_activity_us, i.c.session_id],
                    [
                        bindparam("after_us", type_=BigInteger()),
                        bindparam("after_sid", type_=i.c.session_id.type),
                    ],
                )
            )
        return (
            self.summaries.where(*conditions)
            .order_by(i.c.last_activity_us.desc(), i.c.session_id.desc())
            .limit(literal_column(str(int(limit))))
        )

    def conditions(self, selection: Selection, *, bound: bool) -> list[ColumnElement[bool]]:
        """The selection's conditions, with named parameters or (``bound=False``) values."""
        i = self._t.info

        def value(name: str, given: Any, type_: Any) -> Any:
            return bindparam(name, type_=type_) if bound else literal(given, type_)

        found: list[ColumnElement[bool]] = []
        if selection.user_id is not None:
            found.append(i.c.user_id == value("user_id", selection.user_id, i.c.user_id.type))
        if selection.active_after_us is not None:
            found.append(
                i.c.last_activity_us >= value("from_us", selection.active_after_us, BigInteger())
            )
        if selection.active_before_us is not None:
            found.append(
                i.c.last_activity_us < value("until_us", selection.active_before_us, BigInteger())
            )
        if selection.metadata:
            found.append(self._profile.metadata_matches(i.c["metadata"], selection.metadata))
        return found


def _summaries(tables: StoreTables) -> Select[Any]:
    i, s, m, u = tables.info, tables.structure, tables.messages, tables.usage
    main = literal_column(f"'{MAIN_BRANCH}'", s.c.branch_id.type)
    on_main = and_(s.c.session_id == i.c.session_id, s.c.branch_id == main)
    items = select(func.count()).where(on_main).scalar_subquery()
    # The newest entry of the turn index: turns are numbered 1, 2... per user message.
    turns = (
        select(s.c.user_turn_number)
        .where(on_main, s.c.user_turn_number.is_not(None))
        .order_by(s.c.user_turn_number.desc())
        .limit(literal_column("1"))
        .scalar_subquery()
    )
    branches = (
        select(func.count(distinct(s.c.branch_id)))
        .where(s.c.session_id == i.c.session_id)
        .scalar_subquery()
    )
    tokens = (
        select(func.sum(u.c.total_tokens)).where(u.c.session_id == i.c.session_id).scalar_subquery()
    )
    first_user = (
        select(m.c.message_data)
        .join_from(s, m, and_(m.c.id == s.c.message_id, m.c.session_id == s.c.session_id))
        .where(
            on_main,
            s.c.user_turn_number >= literal_column("1"),
            s.c.message_type == literal_column("'user'"),
        )
        .order_by(s.c.user_turn_number, s.c.sequence_number)
        .limit(literal_column("1"))
        .scalar_subquery()
    )
    return select(
        i.c.session_id,
        i.c.user_id,
        i.c.title,
        # As text, decoded by the caller: lets the statement run on the driver directly.
        type_coerce(i.c["metadata"], Text),
        i.c.created_at_us,
        i.c.last_activity_us,
        items,
        turns,
        branches,
        tokens,
        first_user,
    )


@cache
def _statements(tables: StoreTables, profile: DialectProfile) -> _Statements:
    return _Statements(tables, profile)


class StoreQueries:
    """Reads and info updates across the sessions of one store (an engine and a table set)."""

    def __init__(self, handle: EngineHandle, tables: StoreTables) -> None:
        self._handle = handle
        self._profile = handle.profile
        self._t = tables
        self._q = _statements(tables, handle.profile)

    async def _rows(self, statement: PreparedStatement, params: Mapping[str, Any]) -> list[Any]:
        """A read's rows, on the driver itself where the handle can (asyncpg)."""
        calls = self._handle.driver_calls
        plan = None if calls is None else statement.driver_plan(self._handle.dialect)
        if calls is None or plan is None:
            return await self._handle.read(statement.rows, params)
        return list(await calls.fetch(plan.sql, plan.positional(params), writes=False))

    # -- reading -------------------------------------------------------------------------

    async def summary(self, session_id: str) -> SessionRow | None:
        """One session's row, or ``None`` if the store does not know the session."""
        rows = await self._rows(self._q.summary, {"sid": session_id})
        return _session_row(rows[0]) if rows else None

    async def page(
        self, selection: Selection, after: Position | None, limit: int
    ) -> list[SessionRow]:
        """Up to ``limit`` rows, newest activity first (ties: greater session id first).

        Args:
            selection: Which sessions.
            after: Continue after this position (the last row of the previous page).
            limit: Most rows to return.
        """
        position = {} if after is None else {"after_us": after[0], "after_sid": after[1]}
        if selection.metadata:
            stmt = self._q.page_statement(selection, after is not None, limit, bound=False)
            rows = await self._handle.read(_rows, stmt, position)
        else:
            params: dict[str, Any] = {
                "user_id": selection.user_id,
                "from_us": selection.active_after_us,
                "until_us": selection.active_before_us,
                **position,
            }
            statement = self._q.page(selection, after is not None, limit)
            rows = await self._rows(statement, {k: v for k, v in params.items() if v is not None})
        return [_session_row(row) for row in rows]

    async def positions(
        self, selection: Selection, after: Position | None, limit: int
    ) -> list[Position]:
        """Like :meth:`page`, but only each session's position: (last activity, session id).

        For walking every session a selection matches (an export, a copy) without computing
        summaries; the same index ranges as a listing.
        """
        i = self._t.info
        conditions = self._q.conditions(selection, bound=False)
        if after is not None:
            conditions.append(
                self._profile.keyset_before([i.c.last_activity_us, i.c.session_id], after)
            )
        stmt = (
            select(i.c.last_activity_us, i.c.session_id)
            .where(*conditions)
            .order_by(i.c.last_activity_us.desc(), i.c.session_id.desc())
            .limit(limit)
        )
        rows = await self._handle.read(_rows, stmt, {})
        return [(int(activity), sid) for activity, sid in rows]

    async def count(self, selection: Selection) -> int:
        """How many sessions match, counted by the database along the activity indexes."""
        conditions = self._q.conditions(selection, bound=False)
        stmt = select(func.count()).select_from(self._t.info).where(*conditions)
        return int(await self._handle.read(_scalar, stmt) or 0)

    async def now_micros(self) -> int:
        """The database clock, in microseconds since the epoch (what activity is stamped with)."""
        return int(await self._handle.read(_scalar, select(self._profile.now_micros())))

    # -- writing -------------------------------------------------------------------------

    async def set_info(self, session_id: str, changes: Mapping[str, Any]) -> None:
        """Set some of ``user_id``, ``title``, ``metadata``; create the info row if missing.

        A new row's activity is now; an existing row's activity is left as it is (info is
        not conversation activity, so renaming a conversation does not reorder a sidebar).
        """
        if not changes:
            return
        i = self._t.info
        now = self._profile.now_micros()
        stmt = self._profile.upsert(
            i,
            {"session_id": session_id, **changes, "created_at_us": now, "last_activity_us": now},
            ["session_id"],
            take_new_values=list(changes),
        )
        await self._handle.write(_execute, stmt)


def track_untracked(
    conn: Connection, tables: StoreTables, profile: DialectProfile, after: str | None, limit: int
) -> tuple[int, str | None]:
    """Give sessions written without turnstore their info; move stale activity forward.

    The SDK's own class (and turnstore before the info table) writes ``agent_sessions`` but
    not ``turnstore_session_info``. For up to ``limit`` sessions in session id order after
    ``after``, this creates the missing info rows (times from ``created_at``/``updated_at``)
    and moves forward the activity of rows older than ``updated_at``. Runs inside the
    caller's write transaction.

    Returns:
        How many info rows were created or moved, and the last session id looked at
        (``None`` when there were no more sessions).
    """
    t, i = tables.sessions, tables.info
    scope = select(t.c.session_id).order_by(t.c.session_id).limit(limit)
    if after is not None:
        scope = scope.where(t.c.session_id > after)
    ids = list(conn.execute(scope).scalars())
    if not ids:
        return 0, None
    now = profile.now_micros()
    created = func.coalesce(profile.epoch_micros(t.c.created_at), now)
    updated = func.coalesce(profile.epoch_micros(t.c.updated_at), created)
    missing = (
        select(t.c.session_id, created, updated)
        .where(t.c.session_id.in_(ids))
        .where(~select(i.c.session_id).where(i.c.session_id == t.c.session_id).exists())
    )
    # A turnstore write may create the row meanwhile: skip rows that exist by then.
    added = conn.execute(
        profile.insert_if_absent(i, ["session_id"]).from_select(
            ["session_id", "created_at_us", "last_activity_us"], missing
        )
    ).rowcount
    newer = select(updated).where(t.c.session_id == i.c.session_id).scalar_subquery()
    moved = conn.execute(
        update(i)
        .where(i.c.session_id.in_(ids), i.c.last_activity_us < newer)
        .values(last_activity_us=newer)
    ).rowcount
    return max(added, 0) + max(moved, 0), ids[-1]


def _session_row(row: Sequence[Any]) -> SessionRow:
    (
        session_id,
        user_id,
        title,
        metadata,
        created,
        activity,
        items,
        turns,
        branches,
        tokens,
        first_user,
    ) = row
    return SessionRow(
        session_id,
        user_id,
        title,
        metadata,
        int(created),
        int(activity),
        int(items or 0),
        int(turns or 0),
        int(branches or 0),
        int(tokens or 0),
        first_user,
    )


def _rows(conn: Connection, stmt: Select[Any], params: Mapping[str, Any]) -> list[Any]:
    return list(conn.execute(stmt, params).all())


def _scalar(conn: Connection, stmt: Select[Any]) -> Any:
    return conn.execute(stmt).scalar()


def _execute(conn: Connection, stmt: Any) -> None:
    conn.execute(stmt)
