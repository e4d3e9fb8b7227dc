"""Store-wide search of stored items: the newest matches first, paged by message id.

A substring can match anywhere in a text, so no index can find it: the database scans
messages from the newest down (by primary key, from the cursor on) until a page of candidates
matches. A page's cost is the number of messages scanned to fill it: flat where matches are
common, up to the whole table for a term that matches nothing. The candidates are matched on
the stored JSON text (literally, ASCII case ignored) and refined by the caller on the decoded
items, as a session's own search is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Text, bindparam, func, select, tuple_
from sqlalchemy.engine import Connection

from turnstore.persistence.engines import EngineHandle
from turnstore.persistence.models import StoreTables
from turnstore.persistence.records import escaped_for_like, format_timestamp
from turnstore.persistence.rollups import Owners


async def candidates(
    handle: EngineHandle,
    tables: StoreTables,
    stored_term: str,
    *,
    before_id: int | None,
    limit: int,
    owners: Owners | None,
    user_id: str | None,
) -> list[tuple[int, str, str, str | None]]:
    """Up to ``limit`` ``(message id, session id, item text, created at)``, newest first.

    Args:
        handle: The engine.
        tables: The store's tables.
        stored_term: The term as it appears in stored JSON text.
        before_id: Only messages with a smaller id (the cursor), or ``None``.
        limit: Most rows.
        owners: Where owners live (required with ``user_id``).
        user_id: Only sessions of this owner.
    """
    m = tables.messages
    pattern = f"%{escaped_for_like(stored_term)}%"
    stmt = select(m.c.id, m.c.session_id, m.c.message_data, m.c.created_at).where(
        func.lower(m.c.message_data).like(
            func.lower(bindparam("pattern", pattern, type_=Text)), escape="/"
        )
    )
    if before_id is not None:
        stmt = stmt.where(m.c.id < before_id)
    if user_id is not None:
        assert owners is not None
        info = owners.table
        stmt = stmt.join(info, info.c.session_id == m.c.session_id).where(
            info.c[owners.user_column] == user_id
        )
    stmt = stmt.order_by(m.c.id.desc()).limit(limit)

    def run(conn: Connection) -> list[tuple[int, str, str, str | None]]:
        return [
            (int(i), str(s), str(data), format_timestamp(created))
            for i, s, data, created in conn.execute(stmt).all()
        ]

    return await handle.read(run)


async def places(
    handle: EngineHandle, tables: StoreTables, messages: Sequence[tuple[str, int]]
) -> dict[tuple[str, int], list[tuple[str, int | None]]]:
    """Where messages sit: ``{(session, message id): [(branch, user turn), ...]}``."""
    if not messages:
        return {}
    s = tables.structure
    stmt = (
        select(s.c.session_id, s.c.message_id, s.c.branch_id, s.c.user_turn_number)
        .where(tuple_(s.c.message_id, s.c.session_id).in_([(i, sid) for sid, i in messages]))
        .order_by(s.c.session_id, s.c.message_id, s.c.sequence_number)
    )

    def run(conn: Connection) -> list[Any]:
        return list(conn.execute(stmt).all())

    found: dict[tuple[str, int], list[tuple[str, int | None]]] = {}
    for session_id, message_id, branch, turn in await handle.read(run):
        found.setdefault((str(session_id), int(message_id)), []).append((str(branch), turn))
    return found
