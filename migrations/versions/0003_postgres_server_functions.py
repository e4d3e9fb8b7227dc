"""Add PostgreSQL functions that append messages and store usage in one round trip.

On PostgreSQL an append took six round trips (BEGIN, the session upsert, the counters, two
inserts, COMMIT) and a usage write five; each now is one call of a PL/pgSQL function, which
keeps the lock-then-read order exact (see ``turnstore.persistence.server_routines``). Other
databases are
unchanged. turnstore falls back to the separate statements on a database without the
functions, so this revision can be applied at any time.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

from turnstore.persistence import server_routines

revision = "0003"
down_revision: str | None = "0002"
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None

# Version 1 of the functions for the default tables. routine_ddl's version 1 is never edited
# (a change is a new version and a new revision), so this revision stays what it was.
_ROUTINES = server_routines.routines_for(
    "agent_sessions", "agent_messages", default=True, version=1
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
    """Create the functions (PostgreSQL only)."""
    if _on_postgres():
        for statement in server_routines.routine_ddl(_ROUTINES, **_TABLES):
            op.execute(statement)


def downgrade() -> None:
    """Drop the functions (PostgreSQL only)."""
    if _on_postgres():
        for statement in server_routines.drop_ddl(_ROUTINES):
            op.execute(statement)
