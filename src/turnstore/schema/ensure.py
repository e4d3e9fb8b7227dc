"""What the faces call for ``create_tables=True``: check cheaply, migrate only when behind.

:func:`at_head` reads the version row without Alembic; :func:`bring_to_head_when_needed`
imports Alembic (a few hundred milliseconds) only for a database that is not at head. Kept
apart from :mod:`turnstore.schema.check`, which :mod:`turnstore.schema.migrate` itself uses, so
that the lazy import below does not close an import circle.
"""

from __future__ import annotations

from sqlalchemy.engine import Connection

from turnstore.schema.check import at_head

__all__ = ["at_head", "bring_to_head_when_needed"]


def bring_to_head_when_needed(connection: Connection) -> None:
    """Migrate to head inside ``connection``'s transaction, importing Alembic only now."""
    from turnstore.schema.migrate import bring_to_head

    bring_to_head(connection)
