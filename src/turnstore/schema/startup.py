"""What a session or store runs before its first operation with ``create_tables=True``.

:func:`at_head` is the cheap check (:mod:`turnstore.schema.check`); :func:`bring_to_head`
imports Alembic (a few hundred milliseconds) only when a database really needs migrating.
"""

from __future__ import annotations

from sqlalchemy.engine import Connection

from turnstore.schema.check import at_head

__all__ = ["at_head", "bring_to_head"]


def bring_to_head(connection: Connection) -> None:
    """:func:`turnstore.schema.migrate.bring_to_head`, importing Alembic only when called."""
    from turnstore.schema import migrate

    migrate.bring_to_head(connection)
