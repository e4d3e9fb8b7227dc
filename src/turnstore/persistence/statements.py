"""The statements of the conversation queries, built once per table set and dialect.

:class:`_Statements` holds the statements the per-turn path, branch creation and a session's
listings run again and again (see :mod:`turnstore.persistence.prepared`); the repository asks
:func:`_statements` for the set of its tables.
"""

from __future__ import annotations

from functools import cache, cached_property
from typing import Any

from sqlalchemy import (
    Integer,
    Text,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    type_coerce,
    union_all,
    update,
)
from sqlalchemy.sql import Executable, Select
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.elements import BindParameter, ColumnElement
from sqlalchemy.sql.selectable import ScalarSelect

from turnstore.persistence.dialects.base import DialectProfile
from turnstore.persistence.models import StoreTables
from turnstore.persistence.prepared import PreparedStatement

#: The structure columns an append or a branch copy writes (the rest have defaults).
STRUCTURE_COLUMNS = (
    "session_id",
    "message_id",
    "branch_id",
    "message_type",
    "sequence_number",
    "user_turn_number",
    "branch_turn_number",
    "tool_name",
)


#: The columns of a turn-models row, in the order the statements use them.
TURN_MODEL_COLUMNS = (
    "session_id",
    "branch_id",
    "user_turn_number",
    "position",
    "model",
    "requests",
    "input_tokens",
    "cached_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
)


def as_stored(timestamp: ColumnElement[Any]) -> ColumnElement[Any]:
    """A timestamp column read as the driver returns it, for :func:`.records.format_timestamp`.

    SQLite stores the text turnstore returns; letting SQLAlchemy parse it into a datetime
    only for format_timestamp to print it again cost more than the rest of a 2,000-turn
    listing. Server drivers hand back datetimes either way.
    """
    return type_coerce(timestamp, Text)


# A literal LIMIT, not a bound one: Postgres plans a prepared statement's bound LIMIT without
# knowing it is 1.
_ONE = literal_column("1", Integer)


class _Statements:
    """Statements built once per table set and dialect, each on its first use.

    The per-turn path, branch creation and the session's listings: building a statement
    costs as much as running most of them, so each is kept. Each is built when first asked
    for, not all up front: a short-lived process (a CLI, a serverless handler) uses a few of
    them, and building all forty or so cost its first call 4-5 ms of CPU. Once built, one is
    a plain instance attribute (``cached_property`` stores it in the instance), as fast to
    reach as one set in ``__init__``; two threads asking at once at worst build it twice,
    equally.
    """

    def __init__(self, tables: StoreTables, profile: DialectProfile) -> None:
        self._tables = tables
        self._profile = profile
        self._direct = profile.runs_prepared_statements_directly
        s = tables.structure
        self._sid: BindParameter[str] = bindparam("sid", type_=s.c.session_id.type)
        self._bid: BindParameter[str] = bindparam("bid", type_=s.c.branch_id.type)
        self._turn: BindParameter[int] = bindparam("turn", type_=Integer)

    def _prepared(self, statement: Executable, **options: Any) -> PreparedStatement:
        return PreparedStatement(statement, direct=self._direct, **options)

    # -- history reads -------------------------------------------------------------------

    @cached_property
    def _history(self) -> Select[Any]:
        s, m = self._tables.structure, self._tables.messages
        return (
            select(m.c.message_data)
            .join_from(s, m, and_(s.c.message_id == m.c.id, m.c.session_id == s.c.session_id))
            .where(s.c.session_id == self._sid, s.c.branch_id == self._bid)
        )

    @cached_property
    def history(self) -> PreparedStatement:
        return self._prepared(self._history.order_by(self._tables.structure.c.sequence_number))

    @cached_property
    def latest(self) -> PreparedStatement:
        s = self._tables.structure
        return self._prepared(
            self._history.order_by(s.c.sequence_number.desc()).limit(
                bindparam("limit", type_=Integer)
            )
        )

    @cached_property
    def page(self) -> PreparedStatement:
        s = self._tables.structure
        return self._prepared(
            self._history.add_columns(s.c.sequence_number)
            .where(s.c.sequence_number > bindparam("after", type_=Integer))
            .order_by(s.c.sequence_number)
            .limit(bindparam("limit", type_=Integer))
        )

    # -- the session row and its info ----------------------------------------------------

    @cached_property
    def _touch_session(self) -> Insert:
        # Upserts set only the new row's own values (here the column default), never a
        # function: Citus refuses non-immutable functions in DO UPDATE SET.
        return self._profile.upsert(
            self._tables.sessions,
            {"session_id": self._sid},
            ["session_id"],
            take_new_values=["updated_at"],
        )

    @cached_property
    def touch_session(self) -> PreparedStatement:
        return self._prepared(self._touch_session)

    @cached_property
    def touch_info(self) -> PreparedStatement:
        # The session's info: created by a write when missing (with the writer's defaults),
        # its last activity moved forward, never back, by every write.
        i, profile = self._tables.info, self._profile
        now = profile.now_micros()
        return self._prepared(
            profile.upsert(
                i,
                {
                    "session_id": self._sid,
                    "user_id": bindparam("owner", type_=i.c.user_id.type),
                    "title": bindparam("title", type_=i.c.title.type),
                    "metadata": bindparam("metadata", type_=i.c["metadata"].type),
                    "created_at_us": now,
                    "last_activity_us": now,
                },
                ["session_id"],
                keep_greater=["last_activity_us"],
            )
        )

    @cached_property
    def bump_info(self) -> PreparedStatement:
        i, profile = self._tables.info, self._profile
        return self._prepared(
            update(i)
            .where(i.c.session_id == self._sid)
            .values(last_activity_us=profile.later_of(profile.now_micros(), i.c.last_activity_us))
        )

    @cached_property
    def lock_session(self) -> PreparedStatement:
        sessions = self._tables.sessions
        return self._prepared(
            select(sessions.c.session_id)
            .where(sessions.c.session_id == self._sid)
            .with_for_update()
        )

    # -- counters ------------------------------------------------------------------------

    @cached_property
    def max_turn(self) -> ScalarSelect[Any]:
        # "The newest index entry" rather than max(): the same single entry where the planner
        # knows the table, but Postgres may plan max() over a table it has no statistics for
        # yet as an aggregate over the whole branch, whose cost grows with the history.
        s = self._tables.structure
        return (
            select(s.c.user_turn_number)
            .where(
                s.c.session_id == self._sid,
                s.c.branch_id == self._bid,
                s.c.user_turn_number.is_not(None),
            )
            .order_by(s.c.user_turn_number.desc())
            .limit(_ONE)
            .scalar_subquery()
        )

    @cached_property
    def max_sequence(self) -> ScalarSelect[Any]:
        s = self._tables.structure
        return (
            select(s.c.sequence_number)
            .where(s.c.session_id == self._sid)
            .order_by(s.c.sequence_number.desc())
            .limit(_ONE)
            .scalar_subquery()
        )

    @cached_property
    def generation(self) -> ScalarSelect[Any]:
        g = self._tables.generations
        return select(g.c.generation).where(g.c.session_id == self._sid).scalar_subquery()

    @cached_property
    def append_counters(self) -> PreparedStatement:
        return self._prepared(
            select(
                self.max_sequence.label("max_sequence"),
                self.max_turn.label("max_turn"),
                self.generation.label("generation"),
            )
        )

    @cached_property
    def branch_max_turn(self) -> PreparedStatement:
        return self._prepared(select(self.max_turn))

    @cached_property
    def insert_structure(self) -> PreparedStatement:
        return self._prepared(insert(self._tables.structure), column_keys=STRUCTURE_COLUMNS)

    @cached_property
    def insert_messages(self) -> Insert:
        return self._profile.returning_insert(self._tables.messages)

    @cached_property
    def usage_counters(self) -> PreparedStatement:
        return self._prepared(select(self.max_turn, self.generation))

    @cached_property
    def touch_returning_counters(self) -> PreparedStatement | None:
        # Where the write lock is database-wide, lock and read in one statement each.
        if not self._profile.lock_statement_may_read:
            return None
        return self._prepared(
            self._touch_session.returning(
                self.max_sequence.label("max_sequence"),
                self.max_turn.label("max_turn"),
                self.generation.label("generation"),
            )
        )

    @cached_property
    def lock_returning_usage_counters(self) -> PreparedStatement | None:
        if not self._profile.lock_statement_may_read:
            return None
        sessions = self._tables.sessions
        return self._prepared(
            select(sessions.c.session_id, self.max_turn, self.generation).where(
                sessions.c.session_id == self._sid
            )
        )

    @cached_property
    def current_generation(self) -> PreparedStatement:
        return self._prepared(select(self.generation))

    @cached_property
    def latest_sequence(self) -> PreparedStatement:
        return self._prepared(select(self.max_sequence))

    # -- branch creation -----------------------------------------------------------------
    # Short sessions fork in about a millisecond, about what building these statements
    # afresh would cost.

    @cached_property
    def fork_message(self) -> PreparedStatement:
        s, m = self._tables.structure, self._tables.messages
        return self._prepared(
            select(m.c.message_data)
            .join_from(s, m, and_(m.c.id == s.c.message_id, m.c.session_id == s.c.session_id))
            .where(
                s.c.session_id == self._sid,
                s.c.branch_id == self._bid,
                s.c.branch_turn_number == self._turn,
                s.c.message_type == "user",
            )
            .order_by(s.c.sequence_number)
            .limit(_ONE)
        )

    @cached_property
    def record_lineage(self) -> PreparedStatement:
        lineage = self._tables.lineage
        return self._prepared(
            insert(lineage).values(
                session_id=self._sid,
                branch_id=bindparam("new_branch", type_=lineage.c.branch_id.type),
                parent_branch_id=self._bid,
                fork_turn=self._turn,
                fork_preview=bindparam("preview", type_=Text),
            )
        )

    @cached_property
    def names_taken(self) -> PreparedStatement:
        r, s, sid = self._tables.reservations, self._tables.structure, self._sid
        name = bindparam("name", type_=r.c.branch_id.type)
        # Names in use: reserved ones, plus branches written before reservations existed.
        names_in_use = (
            union_all(
                select(r.c.branch_id).where(r.c.session_id == sid),
                select(s.c.branch_id).where(s.c.session_id == sid).distinct(),
            )
            .subquery()
            .select()
        )
        in_use = names_in_use.selected_columns[0]
        # ``pattern`` (LIKE, escaped with "/") also finds generated names; NULL matches none.
        return self._prepared(
            names_in_use.where(
                or_(in_use == name, in_use.like(bindparam("pattern", type_=Text), escape="/"))
            )
        )

    @cached_property
    def reserve_name(self) -> PreparedStatement:
        r = self._tables.reservations
        name = bindparam("name", type_=r.c.branch_id.type)
        return self._prepared(insert(r).values(session_id=self._sid, branch_id=name))

    @cached_property
    def _append_key(self) -> BindParameter[str]:
        return bindparam("key", type_=self._tables.append_keys.c.append_key.type)

    @cached_property
    def append_key_stored(self) -> PreparedStatement:
        k = self._tables.append_keys
        return self._prepared(
            select(k.c.session_id).where(
                k.c.session_id == self._sid, k.c.append_key == self._append_key
            )
        )

    @cached_property
    def store_append_key(self) -> PreparedStatement:
        k = self._tables.append_keys
        return self._prepared(insert(k).values(session_id=self._sid, append_key=self._append_key))

    @cached_property
    def copy_branch(self) -> PreparedStatement:
        s = self._tables.structure
        return self._prepared(
            insert(s).from_select(
                STRUCTURE_COLUMNS,
                select(
                    s.c.session_id,
                    s.c.message_id,
                    bindparam("new_branch", type_=s.c.branch_id.type),
                    s.c.message_type,
                    bindparam("after", type_=Integer)
                    + func.row_number().over(order_by=s.c.sequence_number),
                    s.c.user_turn_number,
                    s.c.branch_turn_number,
                    s.c.tool_name,
                ).where(
                    s.c.session_id == self._sid,
                    s.c.branch_id == self._bid,
                    s.c.branch_turn_number < self._turn,
                ),
            )
        )

    # -- usage and the models of each turn -----------------------------------------------

    @cached_property
    def _turn_usage(self) -> Select[Any]:
        u = self._tables.usage
        # Token details read as the stored JSON text (every driver returns it as text under
        # a Text type) and are decoded by the repository, so the statement can run directly.
        return (
            select(
                u.c.user_turn_number,
                u.c.requests,
                u.c.input_tokens,
                u.c.output_tokens,
                u.c.total_tokens,
                type_coerce(u.c.input_tokens_details, Text),
                type_coerce(u.c.output_tokens_details, Text),
            )
            .where(u.c.session_id == self._sid, u.c.branch_id == self._bid)
            .order_by(u.c.user_turn_number)
        )

    @cached_property
    def turn_usage(self) -> PreparedStatement:
        return self._prepared(self._turn_usage)

    @cached_property
    def one_turn_usage(self) -> PreparedStatement:
        u = self._tables.usage
        return self._prepared(
            self._turn_usage.where(u.c.user_turn_number == bindparam("turn", type_=Integer))
        )

    @cached_property
    def upsert_usage(self) -> PreparedStatement:
        u = self._tables.usage
        usage_columns = [
            c.name
            for c in u.columns
            if c.name not in ("id", "session_id", "branch_id", "created_at")
        ]
        return self._prepared(
            self._profile.upsert(
                u,
                {
                    "session_id": self._sid,
                    "branch_id": self._bid,
                    **{name: bindparam(name, type_=u.c[name].type) for name in usage_columns},
                },
                ["session_id", "branch_id", "user_turn_number"],
                take_new_values=[*usage_columns, "created_at"],
            )
        )

    @cached_property
    def delete_turn_models(self) -> PreparedStatement:
        tm = self._tables.turn_models
        return self._prepared(
            delete(tm).where(
                tm.c.session_id == self._sid,
                tm.c.branch_id == self._bid,
                tm.c.user_turn_number == bindparam("turn", type_=Integer),
            )
        )

    @cached_property
    def insert_turn_models(self) -> PreparedStatement:
        return self._prepared(insert(self._tables.turn_models), column_keys=TURN_MODEL_COLUMNS)

    @cached_property
    def turn_models(self) -> PreparedStatement:
        tm = self._tables.turn_models
        return self._prepared(
            select(*(tm.c[name] for name in TURN_MODEL_COLUMNS[1:]))
            .where(tm.c.session_id == self._sid)
            .order_by(tm.c.branch_id, tm.c.user_turn_number, tm.c.position)
        )

    # -- analytics: whole-session and per-branch listings --------------------------------

    @cached_property
    def _usage_totals(self) -> Select[Any, Any, Any, Any, int]:
        u = self._tables.usage
        return select(
            func.sum(u.c.requests),
            func.sum(u.c.input_tokens),
            func.sum(u.c.output_tokens),
            func.sum(u.c.total_tokens),
            func.count(),
        ).where(u.c.session_id == self._sid)

    @cached_property
    def session_usage(self) -> PreparedStatement:
        return self._prepared(self._usage_totals)

    @cached_property
    def branch_usage(self) -> PreparedStatement:
        return self._prepared(self._usage_totals.where(self._tables.usage.c.branch_id == self._bid))

    @cached_property
    def branches(self) -> PreparedStatement:
        s = self._tables.structure
        created = func.min(as_stored(s.c.created_at))
        return self._prepared(
            select(
                s.c.branch_id,
                func.count(),
                func.sum(case((s.c.message_type == "user", 1), else_=0)),
                created,
            )
            .where(s.c.session_id == self._sid)
            .group_by(s.c.branch_id)
            # Ties (one timestamp) go by the first sequence number: a fork numbers its rows
            # after every row the session had, and ids need not grow (on Citus they come
            # from per-node ranges).
            .order_by(created, func.min(s.c.sequence_number))
        )

    @cached_property
    def branch_structure(self) -> PreparedStatement:
        s = self._tables.structure
        return self._prepared(
            select(s.c.user_turn_number, s.c.message_type, s.c.tool_name)
            .where(s.c.session_id == self._sid, s.c.branch_id == self._bid)
            .order_by(s.c.sequence_number)
        )

    @cached_property
    def _user_turns(self) -> Select[Any]:
        s, m = self._tables.structure, self._tables.messages
        return (
            select(s.c.branch_turn_number, m.c.message_data, as_stored(s.c.created_at))
            .join_from(s, m, and_(m.c.id == s.c.message_id, m.c.session_id == s.c.session_id))
            .where(
                s.c.session_id == self._sid, s.c.branch_id == self._bid, s.c.message_type == "user"
            )
            .order_by(s.c.branch_turn_number, s.c.sequence_number)
        )

    @cached_property
    def user_turns(self) -> PreparedStatement:
        return self._prepared(self._user_turns)

    @cached_property
    def user_turns_containing(self) -> PreparedStatement:
        m = self._tables.messages
        # As icontains(autoescape=True) matches: both sides lowered by the database.
        return self._prepared(
            self._user_turns.where(
                func.lower(m.c.message_data).like(
                    func.lower(bindparam("pattern", type_=Text)), escape="/"
                )
            )
        )


@cache
def _statements(tables: StoreTables, profile: DialectProfile) -> _Statements:
    return _Statements(tables, profile)
