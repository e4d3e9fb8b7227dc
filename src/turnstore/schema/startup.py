"""What a session or store runs before its first operation with ``create_tables=True``.

:func:`at_head` is the cheap check (:mod:`turnstore.schema.check`);
:func:`bring_to_head_when_needed` imports Alembic (a few hundred milliseconds) only when a
database really needs migrating. It lives here, not in ``check``, because ``migrate`` imports
``check``: the lazy import would close an import circle.
"""

from __future__ import annotations

from sqlalchemy.engine import Connection

from turnstore.schema.check import at_head

__all__ = ["at_head", "bring_to_head_when_needed"]


def bring_to_head_when_needed(connection: Connection) -> None:
    """Migrate to head inside ``connection``'s transaction, importing Alembic only now.

    The faces hand this to the repository for ``create_tables=True``; a database that
    :func:`at_head` found current never gets here, so most processes never import Alembic.
    """
    from turnstore.schema.migrate import bring_to_head

    bring_to_head(connection)
