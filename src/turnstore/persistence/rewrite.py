"""Rewriting the end of one branch: the statements behind compaction.

The Agents SDK's compaction wrapper summarizes a conversation's newest items and asks the store
to swap them for the summary. These helpers run inside a write transaction the repository has
opened and locked; they touch only the rows of one branch (structure rows, and message rows no
other branch shares) and never the usage table, so other branches and the stored usage survive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import and_, case, delete, exists, func, select, update
from sqlalchemy.engine import Connection

from turnstore.persistence.dialects.base import DialectProfile, utc_now
from turnstore.persistence.models import StoreTables


class Numbered(Protocol):
    """An item to store, serialized and classified (``records.NewMessage``)."""

    @property
    def data(self) -> str:  # noqa: D102
        ...

    @property
    def message_type(self) -> str:  # noqa: D102
        ...

    @property
    def tool_name(self) -> str | None:  # noqa: D102
        ...

    @property
    def is_user_message(self) -> bool:  # noqa: D102
        ...


@dataclass(frozen=True, slots=True)
class TailRow:
    """One stored item of a branch, with what identifies this very row."""

    structure_id: int
    message_id: int
    sequence_number: int
    message_data: str | None


@dataclass(frozen=True, slots=True)
class BranchTail:
    """The newest items of a branch as one read saw them.

    Attributes:
        branch_id: The branch read.
        generation: The session's clear generation at the time of the read.
        rows: Up to the requested number of newest rows, oldest first.
        complete: Whether ``rows`` is the whole branch.
    """

    branch_id: str
    generation: int
    rows: list[TailRow]
    complete: bool


def _newest_rows(tables: StoreTables, session_id: str, branch_id: str, count: int) -> Any:
    s, m = tables.structure, tables.messages
    return (
        select(s.c.id, s.c.message_id, s.c.sequence_number, m.c.message_data)
        .select_from(
            s.outerjoin(m, and_(m.c.id == s.c.message_id, m.c.session_id == s.c.session_id))
        )
        .where(s.c.session_id == session_id, s.c.branch_id == branch_id)
        .order_by(s.c.sequence_number.desc())
        .limit(count)
    )


def _rows(result: Any) -> list[TailRow]:
    return [TailRow(int(sid), int(mid), int(sequence), data) for sid, mid, sequence, data in result]


def read_tail(
    conn: Connection, tables: StoreTables, session_id: str, branch_id: str, limit: int
) -> BranchTail:
    """The newest ``limit`` rows of a branch, and whether there are no others.

    One row more than asked is read, to know whether the branch is complete without counting it.
    """
    g = tables.generations
    generation = conn.scalar(select(g.c.generation).where(g.c.session_id == session_id))
    fetched = _rows(conn.execute(_newest_rows(tables, session_id, branch_id, limit + 1)))
    rows = fetched[:limit]
    rows.reverse()
    return BranchTail(branch_id, int(generation or 0), rows, len(fetched) <= limit)


def tail_unchanged(
    conn: Connection, tables: StoreTables, session_id: str, branch_id: str, expected: list[TailRow]
) -> bool:
    """Whether the branch still ends with exactly ``expected`` (same rows, same contents)."""
    current = _rows(conn.execute(_newest_rows(tables, session_id, branch_id, len(expected))))
    current.reverse()
    return current == expected


def delete_rows(
    conn: Connection, tables: StoreTables, session_id: str, rows: Sequence[TailRow]
) -> None:
    """Delete structure rows, and their messages where no other structure row refers to them."""
    if not rows:
        return
    s, m = tables.structure, tables.messages
    conn.execute(
        delete(s).where(s.c.session_id == session_id, s.c.id.in_([r.structure_id for r in rows]))
    )
    conn.execute(
        delete(m).where(
            m.c.session_id == session_id,
            m.c.id.in_(sorted({r.message_id for r in rows})),
            ~exists().where(s.c.session_id == session_id, s.c.message_id == m.c.id),
        )
    )


def prune_prefix(
    conn: Connection,
    tables: StoreTables,
    session_id: str,
    branch_id: str,
    before_sequence: int,
    prunable: Callable[[str | None], bool],
    batch: int,
) -> int:
    """Delete the branch's oldest rows while ``prunable`` accepts them, in batches of ``batch``.

    Stops at the first row ``prunable`` refuses or at ``before_sequence``.

    Returns:
        How many rows were deleted.
    """
    s, m = tables.structure, tables.messages
    deleted = 0
    after = -1
    while True:
        page = _rows(
            conn.execute(
                select(s.c.id, s.c.message_id, s.c.sequence_number, m.c.message_data)
                .select_from(
                    s.outerjoin(m, and_(m.c.id == s.c.message_id, m.c.session_id == s.c.session_id))
                )
                .where(
                    s.c.session_id == session_id,
                    s.c.branch_id == branch_id,
                    s.c.sequence_number > after,
                    s.c.sequence_number < before_sequence,
                )
                .order_by(s.c.sequence_number)
                .limit(batch)
            )
        )
        accepted: list[TailRow] = []
        for row in page:
            if not prunable(row.message_data):
                break
            accepted.append(row)
        delete_rows(conn, tables, session_id, accepted)
        deleted += len(accepted)
        if len(accepted) < batch or len(page) < batch:
            return deleted
        after = accepted[-1].sequence_number


def delete_branch_rows(
    conn: Connection, tables: StoreTables, session_id: str, branch_id: str
) -> int:
    """Delete every structure row of a branch, and the messages only it refers to.

    Returns:
        How many messages were deleted.
    """
    s, m = tables.structure, tables.messages
    # Messages every structure row of which is on this branch: one pass over the
    # session's rows, grouped. A correlated "no other branch has it" check per message
    # is faster with good statistics, but Postgres plans it as a session scan per message
    # while a newly filled table has none (12 s for a 2,000-turn branch). The grouped
    # pass is a derived table so that MariaDB materializes it once; as a plain IN
    # subquery it re-ran the pass for every message of the session (minutes at 10,000).
    only_here = (
        select(s.c.message_id)
        .where(s.c.session_id == session_id)
        .group_by(s.c.message_id)
        .having(func.count() == func.count(case((s.c.branch_id == branch_id, 1))))
        .subquery("only_here")
    )
    messages = conn.execute(
        delete(m).where(m.c.session_id == session_id, m.c.id.in_(select(only_here.c.message_id)))
    ).rowcount
    conn.execute(delete(s).where(s.c.session_id == session_id, s.c.branch_id == branch_id))
    return int(messages)


def structure_rows(
    session_id: str,
    branch_id: str,
    messages: Sequence[Numbered],
    message_ids: Sequence[int],
    last_sequence: int,
    last_turn: int,
) -> list[dict[str, Any]]:
    """The ``message_structure`` rows that append stored messages to the end of a branch.

    Every append numbers the same way (an SDK append, a suffix replace, a copy), so the rule
    lives here once: sequence numbers continue the session's newest (``last_sequence``), and
    each user message opens the branch's next turn after ``last_turn``.
    """
    sequence, turn = last_sequence, last_turn
    rows = []
    for message, message_id in zip(messages, message_ids, strict=True):
        sequence += 1
        if message.is_user_message:
            turn += 1
        rows.append(
            {
                "session_id": session_id,
                "message_id": message_id,
                "branch_id": branch_id,
                "message_type": message.message_type,
                "sequence_number": sequence,
                "user_turn_number": turn,
                "branch_turn_number": turn,
                "tool_name": message.tool_name,
            }
        )
    return rows


def append_numbered(
    conn: Connection,
    tables: StoreTables,
    profile: DialectProfile,
    session_id: str,
    branch_id: str,
    messages: Sequence[Numbered],
) -> None:
    """Append messages to the end of a branch, numbered as an append numbers them.

    Sequence numbers continue the session's; user turns continue the branch's newest turn.
    """
    s = tables.structure
    max_sequence = conn.scalar(
        select(func.max(s.c.sequence_number)).where(s.c.session_id == session_id)
    )
    turn = conn.scalar(
        select(func.max(s.c.user_turn_number)).where(
            s.c.session_id == session_id, s.c.branch_id == branch_id
        )
    )
    sequence, turn = int(max_sequence or 0), int(turn or 0)
    sessions = tables.sessions
    conn.execute(
        update(sessions).where(sessions.c.session_id == session_id).values(updated_at=utc_now())
    )
    if not messages:
        return
    ids = profile.insert_returning_ids(
        conn,
        profile.returning_insert(tables.messages),
        [{"session_id": session_id, "message_data": m.data} for m in messages],
        {"session_id": session_id},
    )
    conn.execute(s.insert(), structure_rows(session_id, branch_id, messages, ids, sequence, turn))
