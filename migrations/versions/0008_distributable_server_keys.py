"""Servers: session_id in every key (distributable by session), duplicate indexes gone.

On Postgres and MariaDB/MySQL the primary keys of ``agent_messages``, ``message_structure`` and
``turn_usage`` become ``(session_id, id)`` and the structure -> message foreign key becomes
``(session_id, message_id) -> agent_messages (session_id, id)``: Citus distributes a table by a
column only when every key includes it. ``idx_structure_message_session`` is rebuilt to lead
with the foreign key's columns (InnoDB wants that for the reference). Indexes the new keys make
duplicates go: ``idx_agent_messages_session_id`` (the new primary key), ``idx_structure_branch``
(a prefix of two others) and ``idx_turn_usage_session_turn`` (the unique constraint's index).
InnoDB needs its AUTO_INCREMENT column to lead a key, so there each ``id`` gets a unique key.

Postgres gets version 5 of the server functions (version 4 with upserts that set ``EXCLUDED``
values rather than ``CURRENT_TIMESTAMP``: Citus refuses functions in ``DO UPDATE SET``);
earlier versions stay for processes of earlier releases.

SQLite keeps the Agents SDK's documented schema: the SDK's own class reads those files.

Building a primary key reads the whole table under an exclusive lock; on a large store, run
this revision in a maintenance window. On a Citus coordinator the downgrade first moves the
tables back onto the coordinator (``undistribute_table``): their old keys cannot be distributed.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

from turnstore.persistence import server_routines

revision = "0008"
down_revision: str | None = "0007"
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None

_ROW_TABLES = ("agent_messages", "message_structure", "turn_usage")
_OLD_MESSAGE_KEY = "fk_message_structure_message_id_agent_messages"
_NEW_MESSAGE_KEY = "fk_message_structure_session_id_agent_messages"
_DUPLICATES = (
    ("idx_agent_messages_session_id", "agent_messages", ["session_id", "id"]),
    ("idx_structure_branch", "message_structure", ["session_id", "branch_id"]),
    ("idx_turn_usage_session_turn", "turn_usage", ["session_id", "branch_id", "user_turn_number"]),
)
# Version 5 of the functions for the default tables; frozen once released, like the others.
_ROUTINES = server_routines.routines_for(
    "agent_sessions", "agent_messages", default=True, version=5
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


def _dialect() -> str:
    return op.get_context().dialect.name


def _on_mysql() -> bool:
    return _dialect() in ("mysql", "mariadb")


def upgrade() -> None:
    """Re-key the three id tables by session on servers; version 5 of the functions."""
    if _dialect() == "sqlite":
        return
    op.drop_constraint(_OLD_MESSAGE_KEY, "message_structure", type_="foreignkey")
    for table in _ROW_TABLES:
        if _on_mysql():
            op.create_unique_constraint(f"uq_{table}_id", table, ["id"])
        op.drop_constraint(f"pk_{table}", table, type_="primary")
        op.create_primary_key(f"pk_{table}", table, ["session_id", "id"])
    op.drop_index("idx_structure_message_session", table_name="message_structure")
    op.create_index(
        "idx_structure_message_session", "message_structure", ["session_id", "message_id"]
    )
    op.create_foreign_key(
        _NEW_MESSAGE_KEY,
        "message_structure",
        "agent_messages",
        ["session_id", "message_id"],
        ["session_id", "id"],
        ondelete="CASCADE",
    )
    # Only now: on MySQL the session foreign keys may have been using these indexes.
    for name, table, _columns in _DUPLICATES:
        op.drop_index(name, table_name=table)
    if _dialect() == "postgresql":
        for statement in server_routines.routine_ddl(_ROUTINES, **_TABLES):
            op.execute(statement)


def downgrade() -> None:
    """Key the three tables by id alone again; drop version 5 of the functions."""
    if _dialect() == "sqlite":
        return
    if _dialect() == "postgresql":
        _undistribute()
        for statement in server_routines.drop_ddl(_ROUTINES):
            op.execute(statement)
    for name, table, columns in _DUPLICATES:
        op.create_index(name, table, columns)
    op.drop_constraint(_NEW_MESSAGE_KEY, "message_structure", type_="foreignkey")
    op.drop_index("idx_structure_message_session", table_name="message_structure")
    op.create_index(
        "idx_structure_message_session", "message_structure", ["message_id", "session_id"]
    )
    for table in _ROW_TABLES:
        op.drop_constraint(f"pk_{table}", table, type_="primary")
        op.create_primary_key(f"pk_{table}", table, ["id"])
        if _on_mysql():
            op.drop_constraint(f"uq_{table}_id", table, type_="unique")
    op.create_foreign_key(
        _OLD_MESSAGE_KEY,
        "message_structure",
        "agent_messages",
        ["message_id"],
        ["id"],
        ondelete="CASCADE",
    )


def _undistribute() -> None:
    """Bring tables Citus distributes back onto the coordinator (their keys change below).

    Citus refuses keys without the distribution column on distributed tables, so going below
    this revision on a cluster first moves every row of these tables to the coordinator
    (``undistribute_table``, following foreign keys to the tables referencing them).
    """
    bind = op.get_bind()
    if not bind.exec_driver_sql(
        "SELECT to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL"
    ).scalar():
        return
    for table in ("agent_sessions", "branch_reservations", "session_clear_generations"):
        distributed = bind.exec_driver_sql(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition "
            f"WHERE logicalrelid = to_regclass('{table}'))"
        ).scalar()
        if distributed:
            bind.exec_driver_sql(
                f"SELECT undistribute_table('{table}', cascade_via_foreign_keys => true)"
            )
    # Distributing dropped the earlier versions (they cannot run on distributed tables);
    # the revisions that created them are below this one.
    for version in (1, 2, 3, 4):
        routines = server_routines.routines_for(
            "agent_sessions", "agent_messages", default=True, version=version
        )
        for statement in server_routines.routine_ddl(routines, **_TABLES):
            op.execute(statement)
