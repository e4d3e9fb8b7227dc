"""Index structure rows by (message_id, session_id) instead of message_id alone.

The "is this message still on another branch?" checks of branch deletion and pop filter on
both columns. With only ``message_id`` indexed, Postgres without fresh statistics (any newly
filled table) combined that index with a session-wide one for every message: deleting a
2,000-turn branch took 12 s instead of 50 ms. ``message_id`` stays the leading column so
``ON DELETE CASCADE`` from ``agent_messages`` still finds its rows by message alone.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None


def upgrade() -> None:
    """Replace the single-column index with the two-column one."""
    op.create_index(
        "idx_structure_message_session", "message_structure", ["message_id", "session_id"]
    )
    op.drop_index("idx_structure_message", table_name="message_structure")


def downgrade() -> None:
    """Bring back the single-column index."""
    op.create_index("idx_structure_message", "message_structure", ["message_id"])
    op.drop_index("idx_structure_message_session", table_name="message_structure")
