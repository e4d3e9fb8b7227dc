"""Declarative models of the conversation store.

The four documented tables of the SDK's ``AdvancedSQLiteSession`` (``agent_sessions``,
``agent_messages``, ``message_structure``, ``turn_usage``) with their documented columns, defaults,
foreign keys, unique constraint and index names, so a database written by the SDK opens and
continues; plus the two bookkeeping tables newer SDK versions add (``branch_reservations``,
``session_clear_generations``), one index of turnstore's own (``idx_structure_message_session``)
that keeps branch and message deletion from scanning a whole session, and one table of
turnstore's own, ``turnstore_session_info``: each session's owner, title, metadata and last
activity, which the store lists and expires sessions by (see :mod:`turnstore.store`).

Like the SDK, the two base tables may be renamed per session (``sessions_table`` /
``messages_table``); :func:`tables_for` builds the table set for such a pair. The declarative
classes map the default names, which is what the migrations manage.

Every table exists in two key layouts. The SDK's (SQLite) keys ``agent_messages``,
``message_structure`` and ``turn_usage`` by ``id`` alone, as the SDK's own class reads and writes
those files. The server layout (Postgres, MariaDB/MySQL; migration 0008) puts ``session_id`` in
every primary key, unique constraint and foreign key, which is what distributing the tables by
session on Citus requires, and drops the indexes that the new keys make duplicates. Queries are
the same on both; only the DDL differs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped

from turnstore.errors import InvalidArgumentError
from turnstore.persistence.types import (
    DOCUMENT,
    IDENTIFIER,
    ROW_ID,
    ROW_ID_NEEDS_OWN_INDEX,
    TABLE_OPTIONS,
    TIMESTAMP_UTC,
    JSONDocument,
)

DEFAULT_SESSIONS_TABLE = "agent_sessions"
DEFAULT_MESSAGES_TABLE = "agent_messages"
STRUCTURE_TABLE = "message_structure"
USAGE_TABLE = "turn_usage"
RESERVATIONS_TABLE = "branch_reservations"
GENERATIONS_TABLE = "session_clear_generations"
TURN_MODELS_TABLE = "turnstore_turn_models"
LINEAGE_TABLE = "turnstore_branch_lineage"
APPEND_KEYS_TABLE = "turnstore_append_keys"
SESSION_INFO_TABLE = "turnstore_session_info"

# Explicit names make constraints addressable by migrations on every dialect; the documented
# index names are given explicitly below and are not affected.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

_PLAIN_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_FIXED_TABLES = frozenset(
    {
        STRUCTURE_TABLE,
        USAGE_TABLE,
        RESERVATIONS_TABLE,
        GENERATIONS_TABLE,
        SESSION_INFO_TABLE,
        APPEND_KEYS_TABLE,
        TURN_MODELS_TABLE,
        LINEAGE_TABLE,
    }
)
#: Longest ``title`` a session may carry, in characters (MySQL's TEXT holds 64 KiB of bytes).
MAX_TITLE_LENGTH = 1000
_NOW = text("CURRENT_TIMESTAMP")


@dataclass(frozen=True)
class StoreTables:
    """The tables of one store: the two (renamable) base tables and the fixed ones."""

    sessions: Table
    messages: Table
    structure: Table
    usage: Table
    reservations: Table
    generations: Table
    info: Table
    append_keys: Table
    turn_models: Table
    lineage: Table

    @property
    def session_scoped_keys(self) -> bool:
        """Whether these tables have the server layout (``session_id`` in every key)."""
        return len(self.messages.primary_key.columns) > 1

    def with_keys(self, session_scoped_keys: bool) -> StoreTables:
        """The same tables (same names) in the given key layout."""
        if session_scoped_keys == self.session_scoped_keys:
            return self
        return tables_for(
            self.sessions.name, self.messages.name, session_scoped_keys=session_scoped_keys
        )

    @property
    def metadata(self) -> MetaData:
        """The metadata holding these tables."""
        return self.sessions.metadata

    @property
    def is_default(self) -> bool:
        """Whether these are the default tables, the set the migrations manage."""
        return (self.sessions.name, self.messages.name) == (
            DEFAULT_SESSIONS_TABLE,
            DEFAULT_MESSAGES_TABLE,
        )

    @property
    def optional(self) -> frozenset[str]:
        """Tables a database may lack while the store still works without what they add.

        Databases written by the SDK's class, or migrated by an older turnstore and opened
        without ``create_tables``, lack them until the migrations run.
        """
        return frozenset(
            {self.info.name, self.append_keys.name, self.turn_models.name, self.lineage.name}
        )

    @property
    def routine_tables(self) -> dict[str, str]:
        """Table names as :func:`turnstore.persistence.server_routines.routine_ddl` takes them."""
        return {
            "sessions_table": self.sessions.name,
            "messages_table": self.messages.name,
            "structure_table": self.structure.name,
            "usage_table": self.usage.name,
            "generations_table": self.generations.name,
            "info_table": self.info.name,
            "turn_models_table": self.turn_models.name,
        }

    @property
    def names(self) -> tuple[str, ...]:
        """Table names, parents first."""
        return tuple(table.name for table in self.metadata.sorted_tables)

    @property
    def index_names(self) -> tuple[str, ...]:
        """Every index name the store creates, as it is used (not shortened).

        Constraint names come from the naming convention, which SQLAlchemy shortens itself
        where a database needs it, and table names are at most 63 characters.
        """
        return tuple(
            str(index.name) for table in self.metadata.sorted_tables for index in table.indexes
        )


def define_tables(
    metadata: MetaData,
    sessions_table: str = DEFAULT_SESSIONS_TABLE,
    messages_table: str = DEFAULT_MESSAGES_TABLE,
    *,
    session_scoped_keys: bool = False,
) -> StoreTables:
    """Define the store's tables on ``metadata``, with the given base-table names.

    Args:
        metadata: Where the tables go.
        sessions_table: The sessions table's name.
        messages_table: The messages table's name.
        session_scoped_keys: The server layout: ``session_id`` leads every primary key and
            foreign key (distributable by session); otherwise the SDK's layout.
    """
    scoped = session_scoped_keys

    def row_keys(table: str) -> list[Any]:
        """Primary key of a table with an ``id`` column, and the key InnoDB needs beside it.

        InnoDB wants an AUTO_INCREMENT column to lead an index and checks that in CREATE
        TABLE, so that key must be a constraint (rendered inside CREATE TABLE), not an index.
        """
        if not scoped:
            return []
        return [
            PrimaryKeyConstraint("session_id", "id"),
            # SQLAlchemy takes a tuple of dialect names here; its annotation says str only.
            UniqueConstraint("id").ddl_if(dialect=ROW_ID_NEEDS_OWN_INDEX),  # type: ignore[arg-type]
        ]

    def row_id() -> Column[int]:
        return Column("id", ROW_ID, primary_key=not scoped, autoincrement=True)

    sessions = Table(
        sessions_table,
        metadata,
        Column("session_id", IDENTIFIER, primary_key=True),
        Column("created_at", TIMESTAMP_UTC, server_default=_NOW),
        Column("updated_at", TIMESTAMP_UTC, server_default=_NOW),
        **TABLE_OPTIONS,
    )
    session_reference = ForeignKey(sessions.c.session_id, ondelete="CASCADE")
    messages = Table(
        messages_table,
        metadata,
        row_id(),
        Column("session_id", IDENTIFIER, session_reference, nullable=False),
        Column("message_data", DOCUMENT, nullable=False),
        Column("created_at", TIMESTAMP_UTC, server_default=_NOW),
        # With the server layout the primary key is this index.
        *([] if scoped else [Index(f"idx_{messages_table}_session_id", "session_id", "id")]),
        *row_keys(messages_table),
        sqlite_autoincrement=True,
        **TABLE_OPTIONS,
    )
    if scoped:
        message_reference: list[Any] = [
            ForeignKeyConstraint(
                ["session_id", "message_id"],
                [messages.c.session_id, messages.c.id],
                ondelete="CASCADE",
            ),
        ]
        message_id = Column("message_id", ROW_ID, nullable=False)
        # Leads with the foreign key's columns, as InnoDB wants for the reference.
        message_index = Index("idx_structure_message_session", "session_id", "message_id")
    else:
        message_reference = []
        message_id = Column(
            "message_id", ROW_ID, ForeignKey(messages.c.id, ondelete="CASCADE"), nullable=False
        )
        # Not in the SDK: lets ON DELETE CASCADE (by message alone) and "is this message
        # still on another branch?" (by message and session) find structure rows without
        # scanning the session.
        message_index = Index("idx_structure_message_session", "message_id", "session_id")
    structure = Table(
        STRUCTURE_TABLE,
        metadata,
        row_id(),
        Column(
            "session_id",
            IDENTIFIER,
            ForeignKey(sessions.c.session_id, ondelete="CASCADE"),
            nullable=False,
        ),
        message_id,
        Column("branch_id", IDENTIFIER, nullable=False, server_default="main"),
        Column("message_type", Text, nullable=False),
        Column("sequence_number", Integer, nullable=False),
        Column("user_turn_number", Integer),
        Column("branch_turn_number", Integer),
        Column("tool_name", Text),
        Column("created_at", TIMESTAMP_UTC, server_default=_NOW),
        Index("idx_structure_session_seq", "session_id", "sequence_number"),
        # A prefix of the two below; servers do without it.
        *([] if scoped else [Index("idx_structure_branch", "session_id", "branch_id")]),
        Index("idx_structure_turn", "session_id", "branch_id", "user_turn_number"),
        Index("idx_structure_branch_seq", "session_id", "branch_id", "sequence_number"),
        message_index,
        *message_reference,
        *row_keys(STRUCTURE_TABLE),
        sqlite_autoincrement=True,
        **TABLE_OPTIONS,
    )
    usage = Table(
        USAGE_TABLE,
        metadata,
        row_id(),
        Column(
            "session_id",
            IDENTIFIER,
            ForeignKey(sessions.c.session_id, ondelete="CASCADE"),
            nullable=False,
        ),
        Column("branch_id", IDENTIFIER, nullable=False, server_default="main"),
        Column("user_turn_number", Integer, nullable=False),
        Column("requests", Integer, server_default=text("0")),
        Column("input_tokens", Integer, server_default=text("0")),
        Column("output_tokens", Integer, server_default=text("0")),
        Column("total_tokens", Integer, server_default=text("0")),
        Column("input_tokens_details", JSONDocument()),
        Column("output_tokens_details", JSONDocument()),
        Column("created_at", TIMESTAMP_UTC, server_default=_NOW),
        UniqueConstraint("session_id", "branch_id", "user_turn_number"),
        # The SDK's; the unique constraint's own index already serves it, so servers drop it.
        *(
            []
            if scoped
            else [
                Index("idx_turn_usage_session_turn", "session_id", "branch_id", "user_turn_number")
            ]
        ),
        # Not in the SDK (migration 0007): store-wide usage rollups read a time range of
        # turns through it instead of scanning the table.
        Index("idx_turn_usage_created_at", "created_at"),
        *row_keys(USAGE_TABLE),
        sqlite_autoincrement=True,
        **TABLE_OPTIONS,
    )
    reservations = Table(
        RESERVATIONS_TABLE,
        metadata,
        Column("session_id", IDENTIFIER, primary_key=True),
        Column("branch_id", IDENTIFIER, primary_key=True),
        **TABLE_OPTIONS,
    )
    generations = Table(
        GENERATIONS_TABLE,
        metadata,
        Column("session_id", IDENTIFIER, primary_key=True),
        Column("generation", Integer, nullable=False, server_default=text("0")),
        **TABLE_OPTIONS,
    )
    # turnstore's own (migration 0007): which models served a turn, and where branches forked.
    # Keyed by session first, so the store can be distributed by session.
    turn_models = Table(
        TURN_MODELS_TABLE,
        metadata,
        Column(
            "session_id",
            IDENTIFIER,
            ForeignKey(sessions.c.session_id, ondelete="CASCADE"),
            primary_key=True,
        ),
        Column("branch_id", IDENTIFIER, primary_key=True),
        Column("user_turn_number", Integer, primary_key=True, autoincrement=False),
        # Models of one turn, in the order they first served it.
        Column("position", Integer, primary_key=True, autoincrement=False),
        # NULL: the model is not known (a Model object without a name, say).
        Column("model", IDENTIFIER),
        Column("requests", Integer, nullable=False, server_default=text("0")),
        Column("input_tokens", Integer, nullable=False, server_default=text("0")),
        Column("cached_tokens", Integer, nullable=False, server_default=text("0")),
        Column("output_tokens", Integer, nullable=False, server_default=text("0")),
        Column("reasoning_tokens", Integer, nullable=False, server_default=text("0")),
        Column("total_tokens", Integer, nullable=False, server_default=text("0")),
        **TABLE_OPTIONS,
    )
    lineage = Table(
        LINEAGE_TABLE,
        metadata,
        Column(
            "session_id",
            IDENTIFIER,
            ForeignKey(sessions.c.session_id, ondelete="CASCADE"),
            primary_key=True,
        ),
        Column("branch_id", IDENTIFIER, primary_key=True),
        Column("parent_branch_id", IDENTIFIER, nullable=False),
        # The parent's user turn the branch forked before: it holds the parent's items of
        # the turns before this one.
        Column("fork_turn", Integer, nullable=False),
        Column("fork_preview", Text),
        Column("created_at", TIMESTAMP_UTC, server_default=_NOW),
        **TABLE_OPTIONS,
    )
    # Not keyed to the sessions table: a session keeps its info across clear_session (which
    # deletes the sessions row), and info may be set before the first item is written.
    # Times are microseconds since the Unix epoch (UTC), stamped by the database's clock:
    # exact in listing cursors and comparable the same way on every database.
    info = Table(
        SESSION_INFO_TABLE,
        metadata,
        Column("session_id", IDENTIFIER, primary_key=True),
        Column("user_id", IDENTIFIER),
        Column("title", Text),
        Column("metadata", JSONDocument()),
        Column("created_at_us", BigInteger, nullable=False),
        Column("last_activity_us", BigInteger, nullable=False),
        # Newest first is a backward scan of either index; session_id breaks ties.
        Index("idx_session_info_activity", "last_activity_us", "session_id"),
        Index("idx_session_info_user_activity", "user_id", "last_activity_us", "session_id"),
        **TABLE_OPTIONS,
    )
    # turnstore's own: the keys of appends made with an idempotency key, so a retried batch
    # is stored once (see ConversationRepository.append). Cleared with the session.
    append_keys = Table(
        APPEND_KEYS_TABLE,
        metadata,
        Column("session_id", IDENTIFIER, primary_key=True),
        Column("append_key", IDENTIFIER, primary_key=True),
        Column("created_at", TIMESTAMP_UTC, server_default=_NOW),
        **TABLE_OPTIONS,
    )
    return StoreTables(
        sessions,
        messages,
        structure,
        usage,
        reservations,
        generations,
        info,
        append_keys,
        turn_models,
        lineage,
    )


def created_on(item: object, dialect_name: str) -> bool:
    """Whether the DDL for a constraint or index of the models is emitted on a dialect.

    For tools that compare the models with a database (Alembic's autogenerate), which do not
    read ``ddl_if`` themselves.
    """
    condition = getattr(item, "_ddl_if", None)
    wanted = None if condition is None else condition.dialect
    if wanted is None:
        return True
    return dialect_name in ((wanted,) if isinstance(wanted, str) else tuple(wanted))


def validate_table_name(name: object, argument: str) -> str:
    """Return ``name`` if it is a plain SQL identifier that turnstore may use as a table name.

    Raises:
        InvalidArgumentError: ``name`` is not a plain identifier, or names a fixed table.
    """
    if not isinstance(name, str) or _PLAIN_IDENTIFIER.fullmatch(name) is None:
        raise InvalidArgumentError(
            f"{argument} must be a plain identifier (letters, digits and underscores, not "
            f"starting with a digit, at most 63 characters); got {name!r}"
        )
    # SQLite (and MySQL on some systems) compare table names case-insensitively.
    if name.lower() in _FIXED_TABLES:
        raise InvalidArgumentError(f"{argument} may not be {name!r}: turnstore uses that table")
    return name


class Base(DeclarativeBase):
    """Declarative base whose metadata carries turnstore's naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


DEFAULT_TABLES = define_tables(Base.metadata)
#: The default tables in the server layout (``session_id`` in every key).
DEFAULT_SERVER_TABLES = define_tables(
    MetaData(naming_convention=NAMING_CONVENTION), session_scoped_keys=True
)


class AgentSession(Base):
    """One conversation (``agent_sessions``)."""

    __table__ = DEFAULT_TABLES.sessions

    session_id: Mapped[str]
    created_at: Mapped[datetime | None]
    updated_at: Mapped[datetime | None]


class AgentMessage(Base):
    """One stored conversation item, as JSON text (``agent_messages``)."""

    __table__ = DEFAULT_TABLES.messages

    id: Mapped[int]
    session_id: Mapped[str]
    message_data: Mapped[str]
    created_at: Mapped[datetime | None]


class MessageStructure(Base):
    """Where a message sits in one branch: order, turn, type and tool (``message_structure``)."""

    __table__ = DEFAULT_TABLES.structure

    id: Mapped[int]
    session_id: Mapped[str]
    message_id: Mapped[int]
    branch_id: Mapped[str]
    message_type: Mapped[str]
    sequence_number: Mapped[int]
    user_turn_number: Mapped[int | None]
    branch_turn_number: Mapped[int | None]
    tool_name: Mapped[str | None]
    created_at: Mapped[datetime | None]


class TurnUsage(Base):
    """Token usage of one user turn on one branch (``turn_usage``)."""

    __table__ = DEFAULT_TABLES.usage

    id: Mapped[int]
    session_id: Mapped[str]
    branch_id: Mapped[str]
    user_turn_number: Mapped[int]
    requests: Mapped[int | None]
    input_tokens: Mapped[int | None]
    output_tokens: Mapped[int | None]
    total_tokens: Mapped[int | None]
    input_tokens_details: Mapped[dict[str, Any] | None]
    output_tokens_details: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime | None]


class BranchReservation(Base):
    """A branch name once used in a session; names are never handed out twice."""

    __table__ = DEFAULT_TABLES.reservations

    session_id: Mapped[str]
    branch_id: Mapped[str]


class AppendKey(Base):
    """The idempotency key of an append that was stored, so a retry is not stored twice."""

    __table__ = DEFAULT_TABLES.append_keys

    session_id: Mapped[str]
    append_key: Mapped[str]
    created_at: Mapped[datetime | None]


class SessionClearGeneration(Base):
    """How many times a session was cleared; lets other instances notice a clear."""

    __table__ = DEFAULT_TABLES.generations

    session_id: Mapped[str]
    generation: Mapped[int]


class TurnModel(Base):
    """How much of one turn's usage one model served (``turnstore_turn_models``)."""

    __table__ = DEFAULT_TABLES.turn_models

    session_id: Mapped[str]
    branch_id: Mapped[str]
    user_turn_number: Mapped[int]
    position: Mapped[int]
    model: Mapped[str | None]
    requests: Mapped[int]
    input_tokens: Mapped[int]
    cached_tokens: Mapped[int]
    output_tokens: Mapped[int]
    reasoning_tokens: Mapped[int]
    total_tokens: Mapped[int]


class BranchLineage(Base):
    """Where a branch forked from, recorded when it was created (``turnstore_branch_lineage``)."""

    __table__ = DEFAULT_TABLES.lineage

    session_id: Mapped[str]
    branch_id: Mapped[str]
    parent_branch_id: Mapped[str]
    fork_turn: Mapped[int]
    fork_preview: Mapped[str | None]
    created_at: Mapped[datetime | None]


def tables_for(
    sessions_table: str, messages_table: str, *, session_scoped_keys: bool = False
) -> StoreTables:
    """Return the table set for a pair of base-table names (the default set for the defaults).

    Args:
        sessions_table: The sessions table's name.
        messages_table: The messages table's name.
        session_scoped_keys: The server layout instead of the SDK's (see the module docstring).

    Raises:
        InvalidArgumentError: A name is not a plain identifier, or the two names are equal.
    """
    validate_table_name(sessions_table, "sessions_table")
    validate_table_name(messages_table, "messages_table")
    if sessions_table.lower() == messages_table.lower():
        raise InvalidArgumentError("sessions_table and messages_table must differ")
    return _tables_for(sessions_table, messages_table, session_scoped_keys)


@cache
def _tables_for(sessions_table: str, messages_table: str, session_scoped_keys: bool) -> StoreTables:
    if (sessions_table, messages_table) == (DEFAULT_SESSIONS_TABLE, DEFAULT_MESSAGES_TABLE):
        return DEFAULT_SERVER_TABLES if session_scoped_keys else DEFAULT_TABLES
    return define_tables(
        MetaData(naming_convention=NAMING_CONVENTION),
        sessions_table,
        messages_table,
        session_scoped_keys=session_scoped_keys,
    )
