"""Exact identifiers: binary NO PAD collation on MySQL/MariaDB; the append-keys table.

Identifier columns on MySQL and MariaDB were ``utf8mb4_bin``, a binary but PAD SPACE
collation: ``"user-42 "`` compared equal to ``"user-42"``, so a session id with a trailing
space read, appended to and cleared another session. This revision converts every identifier
column the database holds at this point (found by inspection, so tables added by other
revisions and custom table sets are covered) to the server's binary NO PAD collation
(``utf8mb4_nopad_bin`` on MariaDB, ``utf8mb4_0900_bin`` on MySQL 8). Before it changes
anything it refuses, listing them, ids stored in several byte forms that the old collation
took for one (they would split apart). Other databases compare text exactly already.

It also adds ``turnstore_append_keys``, where ``add_items(..., idempotency_key=...)`` records
the batches it stored, so that retrying a batch after a cancellation or a lost connection
never stores it twice.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.sql.type_api import TypeEngine

from turnstore.persistence.dialects import profile_for
from turnstore.persistence.types import identifier_column_type

revision = "0006"
down_revision: str | None = "0005"
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None

# Frozen copy of the timestamp type as 0001 defines it.
_TIMESTAMP_UTC: TypeEngine[Any] = (
    sa.TIMESTAMP()
    .with_variant(postgresql.TIMESTAMP(timezone=True), "postgresql")
    .with_variant(mysql.DATETIME(), "mysql", "mariadb")
)


def upgrade() -> None:
    """Make identifier columns exact, then add the append-keys table."""
    bind = op.get_bind()
    profile_for(bind.dialect.name).convert_identifier_collation(bind, exact=True)
    identifier = identifier_column_type(bind.dialect)
    op.create_table(
        "turnstore_append_keys",
        sa.Column("session_id", identifier, nullable=False),
        sa.Column("append_key", identifier, nullable=False),
        sa.Column("created_at", _TIMESTAMP_UTC, server_default=sa.text("CURRENT_TIMESTAMP")),
        sa.PrimaryKeyConstraint("session_id", "append_key", name="pk_turnstore_append_keys"),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
    )


def downgrade() -> None:
    """Identifier columns go back to the padded collation; drop the append-keys table."""
    bind = op.get_bind()
    # First, so that a refusal leaves everything as it was.
    profile_for(bind.dialect.name).convert_identifier_collation(bind, exact=False)
    op.drop_table("turnstore_append_keys")
