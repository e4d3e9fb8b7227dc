"""Add version 2 of the PostgreSQL append and usage functions.

Version 1 reads the session's latest sequence and turn numbers with ``max()``. On a table the
planner has no statistics for yet (a new database, or one autovacuum has not analyzed), Postgres
may aggregate every row of the branch for it, so each append and usage write cost more as the
history grew: 6 ms at 12,000 items on the development machine. Version 2 reads the newest
index entry instead, one entry whatever the statistics (see
``turnstore.persistence.server_routines``).

Version 1 stays, so processes of the previous release keep working during a rolling upgrade;
turnstore calls the newest version it finds. Other databases are unchanged.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

from turnstore.persistence import server_routines

revision = "0004"
down_revision: str | None = "0003"
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None

# Version 2 of the functions for the default tables; like version 1, never edited once released.
_ROUTINES = server_routines.routines_for(
    "agent_sessions", "agent_messages", default=True, version=2
)
_TABLES = {
    "sessions_table": "agent_sessions",
    "messages_table": "agent_messages",
    "structure_table": "message_structure",
    "usage_table": "turn_usage",
    "generations_table": "session_clear_generations",
}


def _on_postgres() -> bool:
    return op.get_context().dialect.name == "postgresql"


def upgrade() -> None:
    """Create version 2 of the functions (PostgreSQL only)."""
    if _on_postgres():
        for statement in server_routines.routine_ddl(_ROUTINES, **_TABLES):
            op.execute(statement)


def downgrade() -> None:
    """Drop version 2 of the functions (PostgreSQL only); version 1 stays."""
    if _on_postgres():
        for statement in server_routines.drop_ddl(_ROUTINES):
            op.execute(statement)
