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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any, TypeVar

from sqlalchemy import (
    Integer,
    Table,
    Text,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    inspect,
    literal_column,
    or_,
    select,
    type_coerce,
    union_all,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import Executable, Select
from sqlalchemy.sql.elements import BindParameter, ColumnElement

from turnstore.errors import (
    BranchNameTakenError,
    BranchNotFoundError,
    InvalidArgumentError,
    InvalidItemError,
    SchemaMissingError,
    TableSetConflictError,
    TurnNotFoundError,
)
from turnstore.persistence import rewrite, server_routines
from turnstore.persistence.dialects import DialectProfile
from turnstore.persistence.driver_calls import AsyncpgCalls
from turnstore.persistence.engines import EngineHandle
from turnstore.persistence.jsoncodec import loads_or_none
from turnstore.persistence.models import StoreTables
from turnstore.persistence.prepared import PreparedStatement
from turnstore.persistence.server_routines import ServerRoutines
from turnstore.persistence.types import INTEGER_MAX
from turnstore.persistence.validation import check_identifier, fits_integer_column

logger = logging.getLogger(__name__)

MAIN_BRANCH = "main"

T = TypeVar("T")

# Waits before each retry of a write that lost a lock wait or a deadlock; then it fails.
_LOCK_RETRY_DELAYS = (0.05, 0.25, 1.0)
# Room in a statement for its SQL text and the other columns of an item's row.
_STATEMENT_OVERHEAD = 64 * 1024

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


@dataclass(frozen=True, slots=True)
class NewMessage:
    """One item to append, already serialized and classified by the caller."""

    data: str
    message_type: str
    tool_name: str | None
    is_user_message: bool


@dataclass(frozen=True, slots=True)
class InfoDefaults:
    """What a write stores as a session's info when the session has none yet.

    Attributes:
        user_id: The owner.
        title: The title.
        metadata: The metadata, a JSON-serializable dict (validated by the caller).
    """

    user_id: str | None = None
    title: str | None = None
    metadata: dict[str, Any] | None = None

    @property
    def given(self) -> bool:
        """Whether any value is set (such a session needs the info table)."""
        return self.user_id is not None or self.title is not None or self.metadata is not None


NO_INFO = InfoDefaults()


@dataclass(frozen=True, slots=True)
class BranchPointer:
    """The branch an operation acted on and the session's clear generation it saw."""

    branch_id: str
    generation: int


@dataclass(frozen=True, slots=True)
class ModelShare:
    """The part of a turn's usage one model served (``model`` ``None``: not known)."""

    model: str | None
    requests: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    total_tokens: int

    @classmethod
    def zero(cls, model: str | None) -> ModelShare:
        """No usage, for ``model``."""
        return cls(model, 0, 0, 0, 0, 0, 0)

    @property
    def counts(self) -> tuple[int, int, int, int, int, int]:
        """Requests, input, cached, output, reasoning and total tokens."""
        return (
            self.requests,
            self.input_tokens,
            self.cached_tokens,
            self.output_tokens,
            self.reasoning_tokens,
            self.total_tokens,
        )

    def __add__(self, other: ModelShare) -> ModelShare:
        return ModelShare(
            self.model, *(a + b for a, b in zip(self.counts, other.counts, strict=True))
        )

    def __sub__(self, other: ModelShare) -> ModelShare:
        """What ``self`` has beyond ``other``, never below zero; the model is not kept."""
        return ModelShare(
            None, *(max(a - b, 0) for a, b in zip(self.counts, other.counts, strict=True))
        )


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """Token usage of one run, to be stored against a user turn.

    ``models`` splits it by the model that served it; empty when not known at all.
    """

    requests: int
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, Any] | None
    output_tokens_details: dict[str, Any] | None
    models: tuple[ModelShare, ...] = ()


@dataclass(frozen=True, slots=True)
class StoredTurnModel:
    """A stored turn-models row."""

    branch_id: str
    user_turn_number: int
    share: ModelShare


@dataclass(frozen=True, slots=True)
class StoredLineage:
    """A recorded branch origin."""

    branch_id: str
    parent_branch_id: str
    fork_turn: int
    fork_preview: str | None
    created_at: str | None


@dataclass(frozen=True, slots=True)
class StoredTurnUsage:
    """A stored ``turn_usage`` row."""

    user_turn_number: int
    requests: int | None
    input_tokens: int | None
    output_tokens: int | None
    total_tokens: int | None
    input_tokens_details: Any
    output_tokens_details: Any


@dataclass(frozen=True, slots=True)
class UserTurn:
    """A user message that opens a turn on a branch."""

    turn: int
    message_data: str
    created_at: str | None


@dataclass(frozen=True, slots=True)
class BranchSummary:
    """One branch of a session, as ``list_branches`` reports it."""

    branch_id: str
    message_count: int
    user_turns: int
    created_at: str | None


@dataclass(frozen=True, slots=True)
class CreatedBranch:
    """Outcome of a branch creation."""

    branch_id: str
    source_branch_id: str
    generation: int
    copied_messages: int
    fork_preview: str | None = None


@dataclass(frozen=True, slots=True)
class DeletedBranch:
    """What a branch deletion removed."""

    structure_rows: int
    usage_rows: int
    messages: int


@dataclass(frozen=True, slots=True)
class PoppedItem:
    """The structure row a pop removed; ``message_data`` is ``None`` if its message was gone."""

    message_data: str | None


@dataclass(frozen=True, slots=True)
class ToolCountRule:
    """Which message types count as tool invocations, given by the caller that knows them.

    Attributes:
        call_types: Message types that are tool invocations.
        named_by_type: Invocation types whose rows carry no tool name and are counted under
            their message type instead.
        unpaired_outputs: ``(output_type, call_type)``: an output row of ``output_type`` counts
            as an invocation of its tool when its turn has no ``call_type`` row for that tool.
    """

    call_types: frozenset[str]
    named_by_type: frozenset[str]
    unpaired_outputs: tuple[str, str] | None


def format_timestamp(value: object) -> str | None:
    """Render a stored timestamp as SQLite's ``CURRENT_TIMESTAMP`` text, in UTC."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return None if value is None else str(value)


# A literal LIMIT, not a bound one: Postgres plans a prepared statement's bound LIMIT without
# knowing it is 1.
_ONE = literal_column("1", Integer)


class _Statements:
    """Statements built once per table set and dialect.

    The per-turn path, branch creation and the session's listings: building a statement
    costs as much as running most of them.
    """

    def __init__(self, tables: StoreTables, profile: DialectProfile) -> None:
        s, m, g = tables.structure, tables.messages, tables.generations
        direct = profile.runs_prepared_statements_directly

        def prepared(statement: Executable, **options: Any) -> PreparedStatement:
            return PreparedStatement(statement, direct=direct, **options)

        sid: BindParameter[str] = bindparam("sid", type_=s.c.session_id.type)
        bid: BindParameter[str] = bindparam("bid", type_=s.c.branch_id.type)
        history = (
            select(m.c.message_data)
            .join_from(s, m, and_(s.c.message_id == m.c.id, m.c.session_id == s.c.session_id))
            .where(s.c.session_id == sid, s.c.branch_id == bid)
        )
        self.history = prepared(history.order_by(s.c.sequence_number))
        self.latest = prepared(
            history.order_by(s.c.sequence_number.desc()).limit(bindparam("limit", type_=Integer))
        )
        self.page = prepared(
            history.add_columns(s.c.sequence_number)
            .where(s.c.sequence_number > bindparam("after", type_=Integer))
            .order_by(s.c.sequence_number)
            .limit(bindparam("limit", type_=Integer))
        )
        # Upserts set only the new row's own values (here the column default), never a
        # function: Citus refuses non-immutable functions in DO UPDATE SET.
        touch_session = profile.upsert(
            tables.sessions, {"session_id": sid}, ["session_id"], take_new_values=["updated_at"]
        )
        self.touch_session = prepared(touch_session)
        # The session's info: created by a write when missing (with the writer's defaults),
        # its last activity moved forward, never back, by every write.
        i = tables.info
        now = profile.now_micros()
        self.touch_info = prepared(
            profile.upsert(
                i,
                {
                    "session_id": sid,
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
        self.bump_info = prepared(
            update(i)
            .where(i.c.session_id == sid)
            .values(last_activity_us=profile.later_of(now, i.c.last_activity_us))
        )
        self.lock_session = prepared(
            select(tables.sessions.c.session_id)
            .where(tables.sessions.c.session_id == sid)
            .with_for_update()
        )
        # "The newest index entry" rather than max(): the same single entry where the planner
        # knows the table, but Postgres may plan max() over a table it has no statistics for
        # yet as an aggregate over the whole branch, whose cost grows with the history.
        self.max_turn = (
            select(s.c.user_turn_number)
            .where(s.c.session_id == sid, s.c.branch_id == bid, s.c.user_turn_number.is_not(None))
            .order_by(s.c.user_turn_number.desc())
            .limit(_ONE)
            .scalar_subquery()
        )
        self.max_sequence = (
            select(s.c.sequence_number)
            .where(s.c.session_id == sid)
            .order_by(s.c.sequence_number.desc())
            .limit(_ONE)
            .scalar_subquery()
        )
        self.generation = select(g.c.generation).where(g.c.session_id == sid).scalar_subquery()
        self.append_counters = prepared(
            select(
                self.max_sequence.label("max_sequence"),
                self.max_turn.label("max_turn"),
                self.generation.label("generation"),
            )
        )
        self.branch_max_turn = prepared(select(self.max_turn))
        self.insert_structure = prepared(insert(s), column_keys=STRUCTURE_COLUMNS)
        self.insert_messages = profile.returning_insert(tables.messages)
        self.usage_counters = prepared(select(self.max_turn, self.generation))
        # Where the write lock is database-wide, lock and read in one statement each.
        self.touch_returning_counters = (
            prepared(
                touch_session.returning(
                    self.max_sequence.label("max_sequence"),
                    self.max_turn.label("max_turn"),
                    self.generation.label("generation"),
                )
            )
            if profile.lock_statement_may_read
            else None
        )
        self.lock_returning_usage_counters = (
            prepared(
                select(tables.sessions.c.session_id, self.max_turn, self.generation).where(
                    tables.sessions.c.session_id == sid
                )
            )
            if profile.lock_statement_may_read
            else None
        )
        self.current_generation = prepared(select(self.generation))
        # Branch creation: short sessions fork in about a millisecond, about what building
        # these statements afresh would cost.
        turn: BindParameter[int] = bindparam("turn", type_=Integer)
        self.fork_message = prepared(
            select(m.c.message_data)
            .join_from(s, m, and_(m.c.id == s.c.message_id, m.c.session_id == s.c.session_id))
            .where(
                s.c.session_id == sid,
                s.c.branch_id == bid,
                s.c.branch_turn_number == turn,
                s.c.message_type == "user",
            )
            .order_by(s.c.sequence_number)
            .limit(_ONE)
        )
        lineage = tables.lineage
        self.record_lineage = prepared(
            insert(lineage).values(
                session_id=sid,
                branch_id=bindparam("new_branch", type_=lineage.c.branch_id.type),
                parent_branch_id=bid,
                fork_turn=turn,
                fork_preview=bindparam("preview", type_=Text),
            )
        )
        self.latest_sequence = prepared(select(self.max_sequence))
        r = tables.reservations
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
        self.names_taken = prepared(
            names_in_use.where(
                or_(in_use == name, in_use.like(bindparam("pattern", type_=Text), escape="/"))
            )
        )
        self.reserve_name = prepared(insert(r).values(session_id=sid, branch_id=name))
        k = tables.append_keys
        append_key = bindparam("key", type_=k.c.append_key.type)
        self.append_key_stored = prepared(
            select(k.c.session_id).where(k.c.session_id == sid, k.c.append_key == append_key)
        )
        self.store_append_key = prepared(insert(k).values(session_id=sid, append_key=append_key))
        self.copy_branch = prepared(
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
                ).where(s.c.session_id == sid, s.c.branch_id == bid, s.c.branch_turn_number < turn),
            )
        )
        u = tables.usage
        # Token details read as the stored JSON text (every driver returns it as text under
        # a Text type) and are decoded by the repository, so the statement can run directly.
        turn_usage = (
            select(
                u.c.user_turn_number,
                u.c.requests,
                u.c.input_tokens,
                u.c.output_tokens,
                u.c.total_tokens,
                type_coerce(u.c.input_tokens_details, Text),
                type_coerce(u.c.output_tokens_details, Text),
            )
            .where(u.c.session_id == sid, u.c.branch_id == bid)
            .order_by(u.c.user_turn_number)
        )
        self.turn_usage = prepared(turn_usage)
        self.one_turn_usage = prepared(
            turn_usage.where(u.c.user_turn_number == bindparam("turn", type_=Integer))
        )
        usage_columns = [
            c.name
            for c in u.columns
            if c.name not in ("id", "session_id", "branch_id", "created_at")
        ]
        self.upsert_usage = prepared(
            profile.upsert(
                u,
                {
                    "session_id": sid,
                    "branch_id": bid,
                    **{name: bindparam(name, type_=u.c[name].type) for name in usage_columns},
                },
                ["session_id", "branch_id", "user_turn_number"],
                take_new_values=[*usage_columns, "created_at"],
            )
        )

        tm = tables.turn_models
        self.delete_turn_models = prepared(
            delete(tm).where(
                tm.c.session_id == sid,
                tm.c.branch_id == bid,
                tm.c.user_turn_number == bindparam("turn", type_=Integer),
            )
        )
        self.insert_turn_models = prepared(insert(tm), column_keys=TURN_MODEL_COLUMNS)
        self.turn_models = prepared(
            select(*(tm.c[name] for name in TURN_MODEL_COLUMNS[1:]))
            .where(tm.c.session_id == sid)
            .order_by(tm.c.branch_id, tm.c.user_turn_number, tm.c.position)
        )

        # Analytics: whole-session and per-branch listings.
        usage_totals = select(
            func.sum(u.c.requests),
            func.sum(u.c.input_tokens),
            func.sum(u.c.output_tokens),
            func.sum(u.c.total_tokens),
            func.count(),
        ).where(u.c.session_id == sid)
        self.session_usage = prepared(usage_totals)
        self.branch_usage = prepared(usage_totals.where(u.c.branch_id == bid))
        created = func.min(_as_stored(s.c.created_at))
        self.branches = prepared(
            select(
                s.c.branch_id,
                func.count(),
                func.sum(case((s.c.message_type == "user", 1), else_=0)),
                created,
            )
            .where(s.c.session_id == sid)
            .group_by(s.c.branch_id)
            # Ties (one timestamp) go by the first sequence number: a fork numbers its rows
            # after every row the session had, and ids need not grow (on Citus they come
            # from per-node ranges).
            .order_by(created, func.min(s.c.sequence_number))
        )
        self.branch_structure = prepared(
            select(s.c.user_turn_number, s.c.message_type, s.c.tool_name)
            .where(s.c.session_id == sid, s.c.branch_id == bid)
            .order_by(s.c.sequence_number)
        )
        user_turns = (
            select(s.c.branch_turn_number, m.c.message_data, _as_stored(s.c.created_at))
            .join_from(s, m, and_(m.c.id == s.c.message_id, m.c.session_id == s.c.session_id))
            .where(s.c.session_id == sid, s.c.branch_id == bid, s.c.message_type == "user")
            .order_by(s.c.branch_turn_number, s.c.sequence_number)
        )
        self.user_turns = prepared(user_turns)
        # As icontains(autoescape=True) matches: both sides lowered by the database.
        self.user_turns_containing = prepared(
            user_turns.where(
                func.lower(m.c.message_data).like(
                    func.lower(bindparam("pattern", type_=Text)), escape="/"
                )
            )
        )


@cache
def _statements(tables: StoreTables, profile: DialectProfile) -> _Statements:
    return _Statements(tables, profile)


class ConversationRepository:
    """Reads and writes conversations in one store (an engine and a table set)."""

    def __init__(
        self, handle: EngineHandle, tables: StoreTables, info: InfoDefaults = NO_INFO
    ) -> None:
        self._handle = handle
        self._profile = handle.profile
        # Callers name the tables; the database's dialect decides their key layout.
        self._t = tables.with_keys(handle.profile.session_scoped_keys)
        self._q = _statements(self._t, handle.profile)
        self._info = info
        self._info_params = {
            "owner": info.user_id,
            "title": info.title,
            "metadata": info.metadata,
        }
        self._info_arguments = (
            info.user_id,
            info.title,
            server_routines.json_argument(info.metadata),
        )

    @property
    def has_info_table(self) -> bool:
        """Whether the database has the session info table (known once the schema is ready)."""
        return self._t.metadata not in self._handle.without_info

    @property
    def records_models(self) -> bool:
        """Whether the database has the turn-models table (migration 0007; known once ready)."""
        return self._has(self._t.turn_models)

    def require_info_table(self) -> None:
        """Refuse a store feature on a database that predates the session info table.

        Raises:
            SchemaMissingError: The table is missing.
        """
        if not self.has_info_table:
            raise SchemaMissingError(
                f"The database lacks turnstore's {self._t.info.name} table, which session "
                "owners, titles, metadata and the store's listings need. Upgrade the schema "
                "(turnstore db upgrade, or migration 0005), or open the session with "
                "create_tables=True."
            )

    async def ensure_info_table(self) -> None:
        """Refuse unless the info table exists, looking again if it was missing before.

        Raises:
            SchemaMissingError: The table is still missing.
        """
        await self.look_for_info_table()
        self.require_info_table()

    async def look_for_info_table(self) -> None:
        """Look again for an info table that was missing: a migration may have added it."""
        key, name = self._t.metadata, self._t.info.name
        if key in self._handle.without_info:
            present = await self._handle.read(lambda conn: inspect(conn).has_table(name))
            if present:
                self._handle.without_info.discard(key)
                await self._find_routines()

    def _touch_info(self, conn: Connection, session_id: str) -> None:
        """Inside a write: create the session's info if missing, move its activity forward."""
        if self.has_info_table:
            self._q.touch_info.execute(conn, {"sid": session_id, **self._info_params})
        elif self._info.given:
            self.require_info_table()

    def _bump_info(self, conn: Connection, session_id: str) -> None:
        """Inside a write: move an existing info row's activity forward (creating none)."""
        if self.has_info_table:
            self._q.bump_info.execute(conn, {"sid": session_id})

    # -- schema --------------------------------------------------------------------------

    async def prepare_schema(
        self,
        *,
        create: bool,
        migrate_default: Callable[[Connection], object] | None = None,
        default_is_current: Callable[[Connection], bool] | None = None,
        distribute: Callable[[Connection, StoreTables], object] | None = None,
    ) -> None:
        """Create missing tables and indexes, or check that they exist (once per engine).

        What exists is read first, without a write transaction, so a complete store on a
        read-only database opens for reading even with ``create``.

        Args:
            create: Create what is missing instead of refusing.
            migrate_default: Brings the default table set to the newest migration inside the
                given transaction. The caller supplies it so that queries do not depend on
                schema management; without it the default set is created like any other.
            default_is_current: A cheap read-only check that the default table set is at the
                newest migration; when it says so, nothing is locked or created. It keeps the
                first call of a short-lived process fast.
            distribute: Distributes a table set that was created without the migrations, in
                the same transaction, where the database is distributed (Citus); supplied by
                the caller like ``migrate_default``.

        Raises:
            SchemaMissingError: ``create`` is false and tables are missing.
            TableSetConflictError: The database holds another table set's structure tables.
        """
        handle, key = self._handle, self._t.metadata
        if key in handle.ready_schemas:
            return
        async with handle.schema_lock:
            if key in handle.ready_schemas:
                return
            if create:
                self._check_schema_names()
            current = (
                self._t.is_default
                and default_is_current is not None
                and await handle.read(default_is_current)
            )
            # At the newest migration, the default set is complete: nothing to inspect.
            missing = [] if current else await handle.read(self._missing_parts, default_is_current)
            if missing and create:
                await handle.write(
                    lambda conn: self._create_missing(conn, migrate_default, distribute)
                )
                missing = []
            required = [n for n in missing if n in self._t.names and n not in self._t.optional]
            if required:
                raise SchemaMissingError(
                    f"The database lacks turnstore's tables ({', '.join(required)}). "
                    "Pass create_tables=True to create them, or run the migrations first."
                )
            absent = handle.absent_tables[key] = frozenset(missing) & self._t.optional
            # A schema from before migration 0005 serves sessions; only the features that
            # need the info table refuse (require_info_table).
            if self._t.info.name in absent:
                handle.without_info.add(key)
            else:
                handle.without_info.discard(key)
            await handle.read_limits()
            own = absent & {self._t.turn_models.name, self._t.lineage.name}
            if own:
                # From before migration 0007: conversations work; the models of each turn and
                # branch lineage are not recorded.
                logger.warning(
                    "The database lacks turnstore's tables %s: the models of each turn and "
                    "branch lineage are not recorded. Run the migrations (turnstore db "
                    "upgrade) to add them.",
                    ", ".join(sorted(own)),
                )
            await self._find_routines()
            handle.ready_schemas.add(key)

    async def _find_routines(self) -> None:
        """Use the newest server functions the database has for appends and usage, if any."""
        released = self._profile.server_routines(self._t)
        versions = released
        if not self.has_info_table:
            # Functions that keep the info table cannot run without it.
            versions = tuple(routines for routines in versions if not routines.maintains_info)
        if not self._has(self._t.turn_models):
            # Nor can functions that record a turn's models without their table.
            versions = tuple(routines for routines in versions if not routines.records_models)
        if not versions or self._handle.driver_calls is None:
            return
        presence = ", ".join(f"({routines.presence_query})" for routines in versions)
        present = await self._handle.read(
            lambda conn: conn.exec_driver_sql(f"SELECT {presence}").one()
        )
        found = [routines for routines, here in zip(versions, present, strict=True) if here]
        if found:
            self._handle.routines[self._t.metadata] = found[0]
            if found[0] is not released[0]:
                logger.info(
                    "Using version %s of turnstore's server functions; upgrading the database "
                    "(turnstore db upgrade) adds version %s.",
                    found[0].version,
                    released[0].version,
                )
        else:
            newest = versions[0]
            logger.warning(
                "The database lacks turnstore's server functions (%s, %s); appends and usage "
                "writes take several round trips each. Run the migrations (turnstore db "
                "upgrade) to add them.",
                newest.append_name,
                newest.usage_name,
            )

    def _check_schema_names(self) -> None:
        """Refuse, before any DDL, index names the database cannot hold.

        The messages table's index is named after the table, so a long ``messages_table``
        gives a long index name: MySQL would fail halfway through creating the tables (its DDL
        is not transactional), and Postgres would silently cut the name short.

        Raises:
            InvalidArgumentError: An index name is too long for this database.
        """
        limit = self._handle.max_index_name_length
        too_long = [name for name in self._t.index_names if len(name) > limit]
        if too_long:
            raise InvalidArgumentError(
                f"Index names on {self._profile.name} are at most {limit} characters, and "
                f"{', '.join(too_long)} is longer. Choose a shorter sessions_table or "
                "messages_table."
            )

    def _missing_parts(
        self, conn: Connection, default_is_current: Callable[[Connection], bool] | None
    ) -> list[str]:
        """What ``create_tables`` would add: tables, indexes, a migration, server functions.

        Raises:
            TableSetConflictError: The database holds another table set's structure tables.
        """
        inspector = inspect(conn)
        present = set(inspector.get_table_names())
        self._refuse_other_table_set(inspector, present)
        missing = [name for name in self._t.names if name not in present]
        if missing:
            return missing
        if self._t.is_default and default_is_current is not None:
            return [] if default_is_current(conn) else ["the newest migration"]
        for table in self._t.metadata.sorted_tables:
            indexes = {index["name"] for index in inspector.get_indexes(table.name)}
            missing += [str(index.name) for index in table.indexes if index.name not in indexes]
        versions = self._profile.server_routines(self._t)
        if versions and not conn.exec_driver_sql(versions[0].presence_query).scalar():
            missing.append(versions[0].append_name)
        return missing

    def _refuse_other_table_set(self, inspector: Any, present: set[str]) -> None:
        """Refuse a database whose structure tables belong to other base tables.

        ``message_structure`` and ``turn_usage`` have fixed names, and their foreign keys
        record which sessions and messages tables own them (as the SDK's class records it).

        Raises:
            TableSetConflictError: They refer to another sessions or messages table.
        """
        t, same = self._t, self._profile.table_names_equal
        owners = (
            (t.structure.name, "message_id", t.messages.name),
            (t.structure.name, "session_id", t.sessions.name),
            (t.usage.name, "session_id", t.sessions.name),
        )
        for table, column, owner in owners:
            name = next((found for found in present if same(found, table)), None)
            if name is None:
                continue
            for key in inspector.get_foreign_keys(name):
                referred = str(key["referred_table"])
                if key["constrained_columns"] == [column] and not same(referred, owner):
                    raise TableSetConflictError(
                        f"This database's {table}.{column} refers to table {referred!r}, not "
                        f"to the configured {owner!r}: it already holds another "
                        "sessions_table/messages_table pair. The structure and usage tables "
                        "have fixed names (as in the SDK's AdvancedSQLiteSession), so one "
                        "database file or schema holds one pair; give this pair its own file, "
                        "schema or database."
                    )

    def _create_missing(
        self,
        conn: Connection,
        migrate_default: Callable[[Connection], object] | None,
        distribute: Callable[[Connection, StoreTables], object] | None,
    ) -> None:
        self._profile.prepare_ddl(conn)
        self._profile.lock_schema(conn)
        inspector = inspect(conn)
        self._refuse_other_table_set(inspector, set(inspector.get_table_names()))
        if self._t.is_default and migrate_default is not None:
            # The migrations own the default table set: create through them (and stamp), so a
            # database made here can be upgraded later like any other.
            migrate_default(conn)
            return
        metadata = self._t.metadata
        metadata.create_all(conn, checkfirst=True)
        self._profile.create_server_routines(conn, self._t)
        # create_all skips tables that exist (say, written by the SDK) and so their indexes;
        # add any index such a table is missing.
        inspector = inspect(conn)
        for table in metadata.sorted_tables:
            present = {index["name"] for index in inspector.get_indexes(table.name)}
            for index in table.indexes:
                if index.name not in present:
                    index.create(conn, checkfirst=True)
        if distribute is not None:
            distribute(conn, self._t)

    def check_identifier(self, value: object, what: str) -> str:
        """Refuse an id no backend can store exactly (see :mod:`.validation`), before any SQL.

        Raises:
            InvalidArgumentError: ``value`` is not a valid id; ``what`` names it in the message.
        """
        return check_identifier(value, what)

    # -- history -------------------------------------------------------------------------

    async def fetch_items(self, session_id: str, branch_id: str, limit: int | None) -> list[str]:
        """Stored item texts of a branch, oldest first.

        Args:
            session_id: The session.
            branch_id: The branch.
            limit: ``None`` or a negative number for all items, otherwise the newest
                ``limit`` items (``0`` gives none).
        """
        if limit == 0:
            return []
        params: dict[str, Any] = {"sid": session_id, "bid": branch_id}
        # No branch holds more items than an INTEGER column counts: a larger limit is "all".
        if limit is None or limit < 0 or not fits_integer_column(limit):
            return await self._scalars(self._q.history, params)
        params["limit"] = limit
        newest_first = await self._scalars(self._q.latest, params)
        newest_first.reverse()
        return newest_first

    def _has(self, table: Table) -> bool:
        """Whether an optional table of this store exists (see ``StoreTables.optional``)."""
        return table.name not in self._handle.absent_tables.get(self._t.metadata, frozenset())

    def _one_call_writes(self) -> tuple[AsyncpgCalls, ServerRoutines] | None:
        """How to run appends and usage writes as one server-function call, if possible."""
        calls = self._handle.driver_calls
        routines = self._handle.routines.get(self._t.metadata)
        return None if calls is None or routines is None else (calls, routines)

    async def _scalars(self, statement: PreparedStatement, params: Mapping[str, Any]) -> list[Any]:
        """The first column of a read's rows, on the driver itself where the handle can."""
        calls = self._handle.driver_calls
        plan = None if calls is None else statement.driver_plan(self._handle.dialect)
        if calls is None or plan is None:
            return await self._handle.read(statement.scalars, params)
        rows = await calls.fetch(plan.sql, plan.positional(params), writes=False)
        return [row[0] for row in rows]

    async def fetch_page(
        self, session_id: str, branch_id: str, after_sequence: int, limit: int
    ) -> list[tuple[str, int]]:
        """Up to ``limit`` ``(item text, sequence number)`` of a branch after a sequence number.

        Pages follow one another by sequence number (keyset pagination), so each costs the
        same however deep into the history it starts.
        """
        limit = min(limit, INTEGER_MAX)
        params = {"sid": session_id, "bid": branch_id, "after": after_sequence, "limit": limit}
        rows = await self._handle.read(self._q.page.rows, params)
        return [(data, int(sequence)) for data, sequence in rows]

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
        sequence, turn = max_sequence or 0, turn or 0
        rows = []
        for message, message_id in zip(messages, message_ids, strict=True):
            sequence += 1
            if message.is_user_message:
                turn += 1
            rows.append(
                {
                    "session_id": session_id,
                    "message_id": message_id,
                    "branch_id": branch_id,
                    "message_type": message.message_type,
                    "sequence_number": sequence,
                    "user_turn_number": turn,
                    "branch_turn_number": turn,
                    "tool_name": message.tool_name,
                }
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

    async def session_usage(
        self, session_id: str, branch_id: str | None
    ) -> tuple[int, int, int, int, int] | None:
        """Summed (requests, input, output, total tokens, turns); ``None`` without usage rows."""
        if branch_id is None:
            statement, params = self._q.session_usage, {"sid": session_id}
        else:
            statement, params = self._q.branch_usage, {"sid": session_id, "bid": branch_id}
        row = (await self._handle.read(statement.rows, params))[0]
        if row[0] is None:
            return None
        requests, input_tokens, output_tokens, total_tokens, turns = (int(v or 0) for v in row)
        return requests, input_tokens, output_tokens, total_tokens, turns

    async def turn_usage(
        self, session_id: str, branch_id: str, user_turn_number: int | None
    ) -> list[StoredTurnUsage]:
        """Stored usage rows of a branch (of one turn, if given), by turn."""
        params: dict[str, Any] = {"sid": session_id, "bid": branch_id}
        if user_turn_number is None:
            rows = await self._handle.read(self._q.turn_usage.rows, params)
        elif not fits_integer_column(user_turn_number):
            return []  # beyond what the turn column holds: a turn that does not exist
        else:
            params["turn"] = user_turn_number
            rows = await self._handle.read(self._q.one_turn_usage.rows, params)
        return [
            StoredTurnUsage(
                turn,
                requests,
                input_tokens,
                output_tokens,
                total_tokens,
                loads_or_none(input_details, "token-details"),
                loads_or_none(output_details, "token-details"),
            )
            for (
                turn,
                requests,
                input_tokens,
                output_tokens,
                total_tokens,
                input_details,
                output_details,
            ) in rows
        ]

    # -- branches ------------------------------------------------------------------------

    async def branch_generation(self, session_id: str, branch_id: str) -> int | None:
        """The session's clear generation if ``branch_id`` has items, else ``None``."""
        s = self._t.structure
        has_items = exists().where(s.c.session_id == session_id, s.c.branch_id == branch_id)
        found, generation = await self._handle.read(
            _one_row, select(has_items.label("found"), self._q.generation), {"sid": session_id}
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
        pattern = None if branch_name is not None else _escaped_for_like(auto_name) + "/_%"
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
        s, m, u = t.structure, t.messages, t.usage
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
        # Messages every structure row of which is on this branch: one pass over the
        # session's rows, grouped. A correlated "no other branch has it" check per message
        # is faster with good statistics, but Postgres plans it as a session scan per message
        # while a newly filled table has none (12 s for a 2,000-turn branch). The grouped
        # pass is a derived table so that MariaDB materializes it once; as a plain IN
        # subquery it re-ran the pass for every message of the session (minutes at 10,000).
        only_here = (
            select(s.c.message_id)
            .where(s.c.session_id == session_id)
            .group_by(s.c.message_id)
            .having(func.count() == func.count(case((s.c.branch_id == branch_id, 1))))
            .subquery("only_here")
        )
        messages = conn.execute(
            delete(m).where(
                m.c.session_id == session_id, m.c.id.in_(select(only_here.c.message_id))
            )
        ).rowcount
        conn.execute(delete(s).where(*in_branch))
        self._touch_info(conn, session_id)
        return DeletedBranch(int(structure_rows), usage_rows, messages)

    async def list_branches(self, session_id: str) -> list[BranchSummary]:
        """Every branch of a session with its counts, in order of creation."""
        rows = await self._handle.read(self._q.branches.rows, {"sid": session_id})
        return [
            BranchSummary(branch, int(count), int(users or 0), format_timestamp(created_at))
            for branch, count, users, created_at in rows
        ]

    async def turn_models(self, session_id: str) -> list[StoredTurnModel]:
        """Every turn-models row of a session, by branch, turn and position."""
        if not self._has(self._t.turn_models):
            return []
        rows = await self._handle.read(self._q.turn_models.rows, {"sid": session_id})
        return [
            StoredTurnModel(branch, int(turn), ModelShare(model, *(int(v or 0) for v in counts)))
            for branch, turn, _position, model, *counts in rows
        ]

    async def turn_items(self, session_id: str, branch_id: str) -> list[tuple[int | None, str]]:
        """``(user_turn_number, item text)`` of a branch's items, in order."""
        s, m = self._t.structure, self._t.messages
        stmt = (
            select(s.c.user_turn_number, m.c.message_data)
            .join_from(s, m, and_(m.c.id == s.c.message_id, m.c.session_id == s.c.session_id))
            .where(s.c.session_id == session_id, s.c.branch_id == branch_id)
            .order_by(s.c.sequence_number)
        )
        return [(turn, data) for turn, data in await self._handle.read(_all_rows, stmt)]

    async def usage_times(self, session_id: str, branch_id: str) -> dict[int, str | None]:
        """When each turn's usage of a branch was stored (UTC text), by turn."""
        u = self._t.usage
        stmt = select(u.c.user_turn_number, _as_stored(u.c.created_at)).where(
            u.c.session_id == session_id, u.c.branch_id == branch_id
        )
        rows = await self._handle.read(_all_rows, stmt)
        return {int(turn): format_timestamp(created) for turn, created in rows}

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
            _as_stored(lin.c.created_at),
        ).where(lin.c.session_id == session_id)
        rows = await self._handle.read(_all_rows, stmt)
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
        for branch, message, turn in await self._handle.read(_all_rows, stmt):
            found.setdefault(branch, []).append((int(message), turn))
        return found

    # -- structure queries ---------------------------------------------------------------

    async def user_turns(
        self, session_id: str, branch_id: str, containing: str | None = None
    ) -> list[UserTurn]:
        """The user messages of a branch by turn, optionally only texts containing a string.

        ``containing`` is matched case-insensitively as a literal (``%`` and ``_`` included)
        against the stored text; callers refine the match on the decoded content.
        """
        params = {"sid": session_id, "bid": branch_id}
        if containing is None:
            rows = await self._handle.read(self._q.user_turns.rows, params)
        else:
            pattern = f"%{_escaped_for_like(containing)}%"
            rows = await self._handle.read(
                self._q.user_turns_containing.rows, {**params, "pattern": pattern}
            )
        return [UserTurn(turn, data, format_timestamp(created)) for turn, data, created in rows]

    async def structure(
        self, session_id: str, branch_id: str
    ) -> list[tuple[int | None, str, str | None]]:
        """``(user_turn_number, message_type, tool_name)`` of a branch's items, in order."""
        params = {"sid": session_id, "bid": branch_id}
        return [
            tuple(row) for row in await self._handle.read(self._q.branch_structure.rows, params)
        ]

    async def tool_usage(
        self, session_id: str, branch_id: str, rule: ToolCountRule
    ) -> list[tuple[str, int, int]]:
        """``(tool_name, invocations, user_turn_number)`` of a branch, by turn then tool."""
        s = self._t.structure
        on_branch = (s.c.session_id == session_id, s.c.branch_id == branch_id)
        label = func.coalesce(
            s.c.tool_name,
            case((s.c.message_type.in_(sorted(rule.named_by_type)), s.c.message_type)),
        )
        parts: list[Select[Any]] = [
            select(label.label("tool_name"), s.c.user_turn_number.label("turn")).where(
                *on_branch, s.c.message_type.in_(sorted(rule.call_types))
            )
        ]
        if rule.unpaired_outputs is not None:
            output_type, call_type = rule.unpaired_outputs
            calls = s.alias("calls")
            parts.append(
                select(s.c.tool_name, s.c.user_turn_number).where(
                    *on_branch,
                    s.c.message_type == output_type,
                    ~exists().where(
                        calls.c.session_id == s.c.session_id,
                        calls.c.branch_id == s.c.branch_id,
                        calls.c.user_turn_number == s.c.user_turn_number,
                        calls.c.tool_name == s.c.tool_name,
                        calls.c.message_type == call_type,
                    ),
                )
            )
        invocations = union_all(*parts).subquery()
        stmt = (
            select(invocations.c.tool_name, func.count(), invocations.c.turn)
            .group_by(invocations.c.tool_name, invocations.c.turn)
            .order_by(invocations.c.turn, invocations.c.tool_name)
        )
        rows = await self._handle.read(_all_rows, stmt)
        return [(name, int(count), turn) for name, count, turn in rows]


def _escaped_for_like(text: str) -> str:
    """``text`` as a literal inside a LIKE pattern whose escape character is ``/``."""
    return text.replace("/", "//").replace("%", "/%").replace("_", "/_")


def _as_stored(timestamp: ColumnElement[Any]) -> ColumnElement[Any]:
    """A timestamp column read as the driver returns it, for :func:`format_timestamp`.

    SQLite stores the text turnstore returns; letting SQLAlchemy parse it into a datetime
    only for format_timestamp to print it again cost more than the rest of a 2,000-turn
    listing. Server drivers hand back datetimes either way.
    """
    return type_coerce(timestamp, Text)


# Units of work shared by the read paths: run one statement, shape its result.


def _all_rows(
    conn: Connection, stmt: Executable, params: Mapping[str, Any] | None = None
) -> list[Any]:
    return list(conn.execute(stmt, params).all())


def _one_row(conn: Connection, stmt: Executable, params: Mapping[str, Any] | None = None) -> Any:
    return conn.execute(stmt, params).one()


def _display_text(text: str | None) -> str | None:
    """``text`` as every database can store it in a text column: a preview, so lossy is fine.

    Items keep NULs and lone surrogates exactly (escaped inside their JSON), but a preview is
    plain text: Postgres refuses NUL there and no driver encodes a lone surrogate.
    """
    if text is None:
        return None
    cleaned = text.replace("\x00", "\ufffd")
    return cleaned.encode("utf-8", "replace").decode("utf-8")
