"""The statements of :mod:`turnstore.persistence.moving`, built once per table set and dialect."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from sqlalchemy import (
    Integer,
    Text,
    and_,
    bindparam,
    delete,
    func,
    insert,
    inspect,
    select,
    type_coerce,
    union,
)
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import BindParameter

from turnstore.persistence.dialects.base import DialectProfile
from turnstore.persistence.engines import EngineHandle
from turnstore.persistence.models import StoreTables
from turnstore.persistence.prepared import PreparedStatement
from turnstore.persistence.types import ExchangedJSON, ExchangedTimestamp


class MovingQueries:
    """Statements built once per table set and dialect."""

    def __init__(self, tables: StoreTables, profile: DialectProfile) -> None:
        t = tables
        sessions, m, s, u = t.sessions, t.messages, t.structure, t.usage
        g, r, i = t.generations, t.reservations, t.info
        direct = profile.runs_prepared_statements_directly
        sid: BindParameter[str] = bindparam("sid", type_=sessions.c.session_id.type)
        after: BindParameter[int] = bindparam("after", type_=Integer)
        limit: BindParameter[int] = bindparam("limit", type_=Integer)

        def prepared(statement: Any) -> PreparedStatement:
            return PreparedStatement(statement, direct=direct)

        # -- reading
        self.session_row = prepared(
            select(
                type_coerce(sessions.c.created_at, Text), type_coerce(sessions.c.updated_at, Text)
            ).where(sessions.c.session_id == sid)
        )
        self.generation = prepared(select(g.c.generation).where(g.c.session_id == sid))
        info_columns = (
            i.c.session_id,
            i.c.user_id,
            i.c.title,
            i.c["metadata"],
            i.c.created_at_us,
            i.c.last_activity_us,
        )
        # Through SQLAlchemy (not the driver directly): metadata is decoded by its type.
        self.group_info = select(*info_columns).where(
            i.c.session_id.in_(bindparam("ids", expanding=True))
        )
        self.insert_info = insert(i)
        self.reserved = prepared(
            select(r.c.branch_id).where(r.c.session_id == sid).order_by(r.c.branch_id)
        )
        self.messages = prepared(
            select(m.c.id, type_coerce(m.c.created_at, Text), m.c.message_data)
            .where(m.c.session_id == sid, m.c.id > after)
            .order_by(m.c.id)
            .limit(limit)
        )
        self.structure = prepared(
            select(
                s.c.id,
                s.c.message_id,
                s.c.branch_id,
                s.c.message_type,
                s.c.sequence_number,
                s.c.user_turn_number,
                s.c.branch_turn_number,
                s.c.tool_name,
                type_coerce(s.c.created_at, Text),
            )
            # Rows whose message is not this session's are invisible to every read; they
            # are not part of the conversation and are left behind.
            .join_from(s, m, and_(m.c.id == s.c.message_id, m.c.session_id == s.c.session_id))
            .where(s.c.session_id == sid, s.c.id > after)
            .order_by(s.c.id)
            .limit(limit)
        )
        self.usage = prepared(
            select(
                u.c.id,
                u.c.branch_id,
                u.c.user_turn_number,
                u.c.requests,
                u.c.input_tokens,
                u.c.output_tokens,
                u.c.total_tokens,
                type_coerce(u.c.input_tokens_details, Text),
                type_coerce(u.c.output_tokens_details, Text),
                type_coerce(u.c.created_at, Text),
            )
            .where(u.c.session_id == sid, u.c.id > after)
            .order_by(u.c.id)
            .limit(limit)
        )
        # Tables whose rows make a session known, besides the sessions table.
        self.knowing = (g, i)
        self.bookkeeping = (r.name, g.name, i.name)
        self.optional = (
            r.name,
            g.name,
            i.name,
            t.turn_models.name,
            t.lineage.name,
            t.append_keys.name,
        )

        # -- groups of whole sessions (IN lists; small sessions read and written together)
        ids: BindParameter[list[str]] = bindparam("ids", expanding=True)
        self.group_sizes = [
            select(table.c.session_id, func.count())
            .where(table.c.session_id.in_(ids))
            .group_by(table.c.session_id)
            for table in (m, s, u)
        ]
        self.group_session_rows = select(
            sessions.c.session_id,
            type_coerce(sessions.c.created_at, Text),
            type_coerce(sessions.c.updated_at, Text),
        ).where(sessions.c.session_id.in_(ids))
        self.group_generations = select(g.c.session_id, g.c.generation).where(
            g.c.session_id.in_(ids)
        )
        self.group_reserved = (
            select(r.c.session_id, r.c.branch_id)
            .where(r.c.session_id.in_(ids))
            .order_by(r.c.session_id, r.c.branch_id)
        )
        self.group_messages = (
            select(m.c.session_id, m.c.id, type_coerce(m.c.created_at, Text), m.c.message_data)
            .where(m.c.session_id.in_(ids))
            .order_by(m.c.session_id, m.c.id)
        )
        self.group_structure = (
            select(
                s.c.session_id,
                s.c.message_id,
                s.c.branch_id,
                s.c.message_type,
                s.c.sequence_number,
                s.c.user_turn_number,
                s.c.branch_turn_number,
                s.c.tool_name,
                type_coerce(s.c.created_at, Text),
            )
            .join_from(s, m, and_(m.c.id == s.c.message_id, m.c.session_id == s.c.session_id))
            .where(s.c.session_id.in_(ids))
            .order_by(s.c.session_id, s.c.id)
        )
        self.group_usage = (
            select(
                u.c.session_id,
                u.c.branch_id,
                u.c.user_turn_number,
                u.c.requests,
                u.c.input_tokens,
                u.c.output_tokens,
                u.c.total_tokens,
                type_coerce(u.c.input_tokens_details, Text),
                type_coerce(u.c.output_tokens_details, Text),
                type_coerce(u.c.created_at, Text),
            )
            .where(u.c.session_id.in_(ids))
            .order_by(u.c.session_id, u.c.id)
        )
        known = [
            select(sessions.c.session_id.label("session_id")).where(sessions.c.session_id.in_(ids)),
            select(g.c.session_id).where(g.c.session_id.in_(ids)),
        ]
        self.group_existing = union(*known, select(i.c.session_id).where(i.c.session_id.in_(ids)))
        # Where the store has no info table (a database before revision 0005, an SDK file).
        self.group_existing_without_info = union(*known)
        self.group_lock = (
            select(sessions.c.session_id).where(sessions.c.session_id.in_(ids)).with_for_update()
        )
        self.group_erase = [
            (table.name, delete(table).where(table.c.session_id.in_(ids)))
            for table in (t.turn_models, t.lineage, t.append_keys, s, u, m, r, g, sessions, i)
        ]
        self.tables = t

        # turnstore's own per-session tables, carried row by row (no message ids in them).
        self.extra_tables = {
            str(table.name): table for table in (t.turn_models, t.lineage, t.append_keys)
        }
        self.extra_reads = {}
        self.extra_group_reads = {}
        self.extra_inserts = {}
        for name, table in self.extra_tables.items():
            columns = [c for c in table.columns if c.name != "session_id"]
            shown = [
                type_coerce(c, Text).label(c.name) if c.name == "created_at" else c for c in columns
            ]
            keys = [c for c in table.primary_key.columns if c.name != "session_id"]
            self.extra_reads[name] = select(*shown).where(table.c.session_id == sid).order_by(*keys)
            self.extra_group_reads[name] = (
                select(table.c.session_id, *shown)
                .where(table.c.session_id.in_(bindparam("ids", expanding=True)))
                .order_by(table.c.session_id, *keys)
            )
            self.extra_inserts[name] = insert(table).values(
                session_id=bindparam("sid", type_=table.c.session_id.type),
                **{
                    c.name: bindparam(
                        c.name, type_=ExchangedTimestamp() if c.name == "created_at" else c.type
                    )
                    for c in columns
                },
            )

        # -- writing
        def stamped(name: str = "created_at") -> BindParameter[Any]:
            return bindparam(name, type_=ExchangedTimestamp())

        self.lock_session = prepared(
            select(sessions.c.session_id).where(sessions.c.session_id == sid).with_for_update()
        )
        self.insert_session = prepared(
            insert(sessions).values(
                session_id=sid, created_at=stamped(), updated_at=stamped("updated_at")
            )
        )
        self.insert_generation = prepared(
            insert(g).values(session_id=sid, generation=bindparam("generation", type_=Integer))
        )
        self.insert_reservation = prepared(
            insert(r).values(session_id=sid, branch_id=bindparam("branch_id"))
        )
        self.insert_messages = (
            insert(m)
            .values(
                session_id=bindparam("session_id", type_=m.c.session_id.type),
                message_data=bindparam("message_data", type_=m.c.message_data.type),
                created_at=stamped(),
            )
            .returning(m.c.id, sort_by_parameter_order=True)
        )
        self.insert_structure = prepared(
            insert(s).values(
                session_id=sid,
                message_id=bindparam("message_id", type_=s.c.message_id.type),
                branch_id=bindparam("branch_id", type_=s.c.branch_id.type),
                message_type=bindparam("message_type", type_=Text),
                sequence_number=bindparam("sequence_number", type_=Integer),
                user_turn_number=bindparam("user_turn_number", type_=Integer),
                branch_turn_number=bindparam("branch_turn_number", type_=Integer),
                tool_name=bindparam("tool_name", type_=Text),
                created_at=stamped(),
            )
        )
        self.insert_usage = prepared(
            insert(u).values(
                session_id=sid,
                branch_id=bindparam("branch_id", type_=u.c.branch_id.type),
                user_turn_number=bindparam("user_turn_number", type_=Integer),
                requests=bindparam("requests", type_=Integer),
                input_tokens=bindparam("input_tokens", type_=Integer),
                output_tokens=bindparam("output_tokens", type_=Integer),
                total_tokens=bindparam("total_tokens", type_=Integer),
                input_tokens_details=bindparam("input_tokens_details", type_=ExchangedJSON()),
                output_tokens_details=bindparam("output_tokens_details", type_=ExchangedJSON()),
                created_at=stamped(),
            )
        )
        # Children before parents; the sessions row last.


@cache
def moving_queries(tables: StoreTables, profile: DialectProfile) -> MovingQueries:
    """The statements for a table set and dialect (built once)."""
    return MovingQueries(tables, profile)


async def probe_missing(handle: EngineHandle, wanted: Sequence[str]) -> frozenset[str]:
    """Which of the ``wanted`` tables the database lacks."""

    def probe(conn: Connection) -> frozenset[str]:
        inspector = inspect(conn)
        return frozenset(name for name in wanted if not inspector.has_table(name))

    return await handle.read(probe)
