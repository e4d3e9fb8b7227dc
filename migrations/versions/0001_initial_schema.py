"""Initial schema: the SDK's four tables, its two bookkeeping tables, turnstore's extra index.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.sql.type_api import TypeEngine

revision = "0001"
down_revision: str | None = None
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None

# Frozen copies of the column types and table options turnstore.persistence.dialects defined when
# this
# revision shipped: a shipped migration must keep creating the same schema however the live
# definitions change later (such changes reach databases through new revisions). They live in
# this file because Alembic takes every other .py file in versions/ for a revision.

_MYSQL_NAMES = ("mysql", "mariadb")
_MYSQL_CHARSET = "utf8mb4"
_MYSQL_COLLATION = "utf8mb4_bin"

ROW_ID: TypeEngine[int] = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

IDENTIFIER: TypeEngine[str] = sa.Text().with_variant(
    mysql.VARCHAR(255, charset=_MYSQL_CHARSET, collation=_MYSQL_COLLATION), *_MYSQL_NAMES
)

DOCUMENT: TypeEngine[str] = sa.Text().with_variant(
    mysql.LONGTEXT(charset=_MYSQL_CHARSET, collation=_MYSQL_COLLATION), *_MYSQL_NAMES
)

TIMESTAMP_UTC: TypeEngine[Any] = (
    sa.TIMESTAMP()
    .with_variant(postgresql.TIMESTAMP(timezone=True), "postgresql")
    .with_variant(mysql.DATETIME(), *_MYSQL_NAMES)
)

# The storage types turnstore.persistence.dialects.JSONDocument picked per dialect. A migration
# moves no
# data, so only the declared type matters, not the decorator's bind and result handling;
# SQLite's JSON type declares the column "JSON" as the SDK's schema does.
JSON_DOCUMENT: TypeEngine[Any] = (
    sa.Text()
    .with_variant(sqlite.JSON(), "sqlite")
    .with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
    .with_variant(mysql.JSON(none_as_null=True), *_MYSQL_NAMES)
)

TABLE_OPTIONS: Mapping[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": _MYSQL_CHARSET,
    "mysql_collate": _MYSQL_COLLATION,
}

_NOW = sa.text("CURRENT_TIMESTAMP")


def _created_at() -> sa.Column[object]:
    return sa.Column("created_at", TIMESTAMP_UTC, server_default=_NOW)


def upgrade() -> None:
    """Create every table and index of the store."""
    op.create_table(
        "agent_sessions",
        sa.Column("session_id", IDENTIFIER, nullable=False),
        _created_at(),
        sa.Column("updated_at", TIMESTAMP_UTC, server_default=_NOW),
        sa.PrimaryKeyConstraint("session_id", name="pk_agent_sessions"),
        **TABLE_OPTIONS,
    )
    op.create_table(
        "agent_messages",
        sa.Column("id", ROW_ID, autoincrement=True, nullable=False),
        sa.Column("session_id", IDENTIFIER, nullable=False),
        sa.Column("message_data", DOCUMENT, nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_agent_messages"),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["agent_sessions.session_id"],
            name="fk_agent_messages_session_id_agent_sessions",
            ondelete="CASCADE",
        ),
        sqlite_autoincrement=True,
        **TABLE_OPTIONS,
    )
    op.create_index("idx_agent_messages_session_id", "agent_messages", ["session_id", "id"])
    op.create_table(
        "message_structure",
        sa.Column("id", ROW_ID, autoincrement=True, nullable=False),
        sa.Column("session_id", IDENTIFIER, nullable=False),
        sa.Column("message_id", ROW_ID, nullable=False),
        sa.Column("branch_id", IDENTIFIER, nullable=False, server_default="main"),
        sa.Column("message_type", sa.Text(), nullable=False),
        sa.Column("sequence_number", sa.Integer(), nullable=False),
        sa.Column("user_turn_number", sa.Integer()),
        sa.Column("branch_turn_number", sa.Integer()),
        sa.Column("tool_name", sa.Text()),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_message_structure"),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["agent_sessions.session_id"],
            name="fk_message_structure_session_id_agent_sessions",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["agent_messages.id"],
            name="fk_message_structure_message_id_agent_messages",
            ondelete="CASCADE",
        ),
        sqlite_autoincrement=True,
        **TABLE_OPTIONS,
    )
    op.create_index(
        "idx_structure_session_seq", "message_structure", ["session_id", "sequence_number"]
    )
    op.create_index("idx_structure_branch", "message_structure", ["session_id", "branch_id"])
    op.create_index(
        "idx_structure_turn", "message_structure", ["session_id", "branch_id", "user_turn_number"]
    )
    op.create_index(
        "idx_structure_branch_seq",
        "message_structure",
        ["session_id", "branch_id", "sequence_number"],
    )
    op.create_index("idx_structure_message", "message_structure", ["message_id"])
    op.create_table(
        "turn_usage",
        sa.Column("id", ROW_ID, autoincrement=True, nullable=False),
        sa.Column("session_id", IDENTIFIER, nullable=False),
        sa.Column("branch_id", IDENTIFIER, nullable=False, server_default="main"),
        sa.Column("user_turn_number", sa.Integer(), nullable=False),
        sa.Column("requests", sa.Integer(), server_default=sa.text("0")),
        sa.Column("input_tokens", sa.Integer(), server_default=sa.text("0")),
        sa.Column("output_tokens", sa.Integer(), server_default=sa.text("0")),
        sa.Column("total_tokens", sa.Integer(), server_default=sa.text("0")),
        sa.Column("input_tokens_details", JSON_DOCUMENT),
        sa.Column("output_tokens_details", JSON_DOCUMENT),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_turn_usage"),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["agent_sessions.session_id"],
            name="fk_turn_usage_session_id_agent_sessions",
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint(
            "session_id",
            "branch_id",
            "user_turn_number",
            name="uq_turn_usage_session_id_branch_id_user_turn_number",
        ),
        sqlite_autoincrement=True,
        **TABLE_OPTIONS,
    )
    op.create_index(
        "idx_turn_usage_session_turn", "turn_usage", ["session_id", "branch_id", "user_turn_number"]
    )
    op.create_table(
        "branch_reservations",
        sa.Column("session_id", IDENTIFIER, nullable=False),
        sa.Column("branch_id", IDENTIFIER, nullable=False),
        sa.PrimaryKeyConstraint("session_id", "branch_id", name="pk_branch_reservations"),
        **TABLE_OPTIONS,
    )
    op.create_table(
        "session_clear_generations",
        sa.Column("session_id", IDENTIFIER, nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.PrimaryKeyConstraint("session_id", name="pk_session_clear_generations"),
        **TABLE_OPTIONS,
    )


def downgrade() -> None:
    """Drop the store's tables, children first (their indexes go with them)."""
    for table in (
        "session_clear_generations",
        "branch_reservations",
        "turn_usage",
        "message_structure",
        "agent_messages",
        "agent_sessions",
    ):
        op.drop_table(table)
