"""Add turnstore_session_info: each session's owner, title, metadata and last activity.

The store lists a user's conversations newest first, pages through all of them, and expires
those nobody touched for a while; this table, keyed by ``session_id`` and indexed by last
activity (globally, and per owner), is what those queries read. The SDK's tables are not
touched, so the SDK's own class keeps opening the database.

Every session that exists gets a row, its times taken from ``agent_sessions`` (created at,
last updated), without an owner, title or metadata. On Postgres, version 3 of the append and
usage functions also keeps the row (version 2 stays for processes of the previous release).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.sql.type_api import TypeEngine

from turnstore.persistence import server_routines

revision = "0005"
down_revision: str | None = "0004"
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None

# Frozen copies of the definitions this revision shipped with (see 0001 for why).
_MYSQL_NAMES = ("mysql", "mariadb")
_MYSQL_CHARSET = "utf8mb4"
_MYSQL_COLLATION = "utf8mb4_bin"

IDENTIFIER: TypeEngine[str] = sa.Text().with_variant(
    mysql.VARCHAR(255, charset=_MYSQL_CHARSET, collation=_MYSQL_COLLATION), *_MYSQL_NAMES
)
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

TABLE = "turnstore_session_info"

# A stored agent_sessions timestamp in microseconds since the Unix epoch, per dialect, and
# the current time the same way (for rows whose timestamps are NULL).
_EPOCH_MICROS = {
    "sqlite": (
        "CAST(strftime('%s', {0}) AS INTEGER) * 1000000"
        " + CAST(substr(strftime('%f', {0}), 4) AS INTEGER) * 1000"
    ),
    "postgresql": "CAST(EXTRACT(EPOCH FROM {0}) * 1000000 AS BIGINT)",
    "mysql": "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', {0})",
}
_NOW = {"sqlite": "'now'", "postgresql": "clock_timestamp()", "mysql": "UTC_TIMESTAMP(6)"}

_ROUTINES = server_routines.routines_for(
    "agent_sessions", "agent_messages", default=True, version=3
)
_TABLES = {
    "sessions_table": "agent_sessions",
    "messages_table": "agent_messages",
    "structure_table": "message_structure",
    "usage_table": "turn_usage",
    "generations_table": "session_clear_generations",
    "info_table": TABLE,
}


def _dialect() -> str:
    name = op.get_context().dialect.name
    return "mysql" if name in _MYSQL_NAMES else name


def upgrade() -> None:
    """Create the table and its indexes, fill it from agent_sessions, add the functions."""
    op.create_table(
        TABLE,
        sa.Column("session_id", IDENTIFIER, nullable=False),
        sa.Column("user_id", IDENTIFIER, nullable=True),
        sa.Column("title", sa.Text(), nullable=True),
        sa.Column("metadata", JSON_DOCUMENT, nullable=True),
        sa.Column("created_at_us", sa.BigInteger(), nullable=False),
        sa.Column("last_activity_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("session_id", name=f"pk_{TABLE}"),
        **TABLE_OPTIONS,
    )
    op.create_index("idx_session_info_activity", TABLE, ["last_activity_us", "session_id"])
    op.create_index(
        "idx_session_info_user_activity", TABLE, ["user_id", "last_activity_us", "session_id"]
    )
    dialect = _dialect()
    epoch, now = _EPOCH_MICROS[dialect], _NOW[dialect]
    op.execute(
        f"INSERT INTO {TABLE} (session_id, created_at_us, last_activity_us) "
        f"SELECT session_id, {epoch.format(f'COALESCE(created_at, {now})')}, "
        f"{epoch.format(f'COALESCE(updated_at, created_at, {now})')} FROM agent_sessions"
    )
    if dialect == "postgresql":
        for statement in server_routines.routine_ddl(_ROUTINES, **_TABLES):
            op.execute(statement)


def downgrade() -> None:
    """Drop the functions' version 3 and the table (owners, titles and metadata go with it)."""
    if _dialect() == "postgresql":
        for statement in server_routines.drop_ddl(_ROUTINES):
            op.execute(statement)
    op.drop_index("idx_session_info_user_activity", table_name=TABLE)
    op.drop_index("idx_session_info_activity", table_name=TABLE)
    op.drop_table(TABLE)
