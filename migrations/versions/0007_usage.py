"""Which models served each turn, where each branch forked, and a time index for rollups.

Two tables of turnstore's own, keyed by ``session_id`` first (the SDK's tables stay as the SDK
reads and writes them):

* ``turnstore_turn_models``: one row per model that served a turn, with that model's share of
  the turn's requests and tokens (cached input and reasoning tokens included). Turns stored
  before this revision, or by the SDK's class, have no rows: their model reads back unknown.
* ``turnstore_branch_lineage``: the parent branch, fork turn and the fork turn's preview of
  every branch created from now on.

``idx_turn_usage_created_at`` lets store-wide usage rollups read a time range of turns
instead of the whole table; an extra index leaves the SDK's reads and writes unchanged.

On PostgreSQL, version 4 of the append and usage functions: version 3's, with a usage function
that also replaces the turn's model rows, so the usage write stays one call. Version 3 stays for
processes of the previous release.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.sql.type_api import TypeEngine

from turnstore.persistence import server_routines
from turnstore.persistence.types import identifier_column_type

revision = "0007"
down_revision: str | None = "0006"
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None

# Frozen copies of the timestamp type and table options of this revision (see 0001 for why);
# identifier columns take the exact type 0006 gave every identifier column of the database.
_MYSQL_NAMES = ("mysql", "mariadb")
_MYSQL_CHARSET = "utf8mb4"
_MYSQL_COLLATION = "utf8mb4_bin"

TIMESTAMP_UTC: TypeEngine[Any] = (
    sa.TIMESTAMP()
    .with_variant(postgresql.TIMESTAMP(timezone=True), "postgresql")
    .with_variant(mysql.DATETIME(), *_MYSQL_NAMES)
)
TABLE_OPTIONS: Mapping[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": _MYSQL_CHARSET,
    "mysql_collate": _MYSQL_COLLATION,
}

# Version 4 of the functions for the default tables; never edited once released.
_ROUTINES = server_routines.routines_for(
    "agent_sessions", "agent_messages", default=True, version=4
)
_TABLES = {
    "sessions_table": "agent_sessions",
    "messages_table": "agent_messages",
    "structure_table": "message_structure",
    "usage_table": "turn_usage",
    "generations_table": "session_clear_generations",
    "info_table": "turnstore_session_info",
    "turn_models_table": "turnstore_turn_models",
}


def _on_postgres() -> bool:
    return op.get_context().dialect.name == "postgresql"


def _count(name: str) -> sa.Column[int]:
    return sa.Column(name, sa.Integer(), nullable=False, server_default=sa.text("0"))


def upgrade() -> None:
    """Create the two tables, the time index and (PostgreSQL) version 4 of the functions."""
    identifier = identifier_column_type(op.get_bind().dialect)
    op.create_table(
        "turnstore_turn_models",
        sa.Column("session_id", identifier, nullable=False),
        sa.Column("branch_id", identifier, nullable=False),
        sa.Column("user_turn_number", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("position", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("model", identifier),
        _count("requests"),
        _count("input_tokens"),
        _count("cached_tokens"),
        _count("output_tokens"),
        _count("reasoning_tokens"),
        _count("total_tokens"),
        sa.PrimaryKeyConstraint(
            "session_id",
            "branch_id",
            "user_turn_number",
            "position",
            name="pk_turnstore_turn_models",
        ),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["agent_sessions.session_id"],
            name="fk_turnstore_turn_models_session_id_agent_sessions",
            ondelete="CASCADE",
        ),
        **TABLE_OPTIONS,
    )
    op.create_table(
        "turnstore_branch_lineage",
        sa.Column("session_id", identifier, nullable=False),
        sa.Column("branch_id", identifier, nullable=False),
        sa.Column("parent_branch_id", identifier, nullable=False),
        sa.Column("fork_turn", sa.Integer(), nullable=False),
        sa.Column("fork_preview", sa.Text()),
        sa.Column("created_at", TIMESTAMP_UTC, server_default=sa.text("CURRENT_TIMESTAMP")),
        sa.PrimaryKeyConstraint("session_id", "branch_id", name="pk_turnstore_branch_lineage"),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["agent_sessions.session_id"],
            name="fk_turnstore_branch_lineage_session_id_agent_sessions",
            ondelete="CASCADE",
        ),
        **TABLE_OPTIONS,
    )
    op.create_index("idx_turn_usage_created_at", "turn_usage", ["created_at"])
    if _on_postgres():
        for statement in server_routines.routine_ddl(_ROUTINES, **_TABLES):
            op.execute(statement)


def downgrade() -> None:
    """Drop version 4 of the functions, the index and the two tables (and their rows)."""
    if _on_postgres():
        for statement in server_routines.drop_ddl(_ROUTINES):
            op.execute(statement)
    op.drop_index("idx_turn_usage_created_at", table_name="turn_usage")
    op.drop_table("turnstore_branch_lineage")
    op.drop_table("turnstore_turn_models")
