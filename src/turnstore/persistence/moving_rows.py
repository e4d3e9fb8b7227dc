"""The rows a moving session is made of, as plain records, and what writing one did.

Shared by :mod:`turnstore.persistence.moving` (which reads and writes them) and
:mod:`turnstore.persistence.exportfile` (which turns them into export records and back).
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from turnstore.errors import InvalidArgumentError

#: Rows per batch when a caller does not say.
DEFAULT_BATCH_SIZE = 10_000


class OnConflict(StrEnum):
    """What writing a session does when the target already has a session of that id."""

    SKIP = "skip"
    REPLACE = "replace"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class SessionHead:
    """What a session is besides its rows.

    Attributes:
        session_id: The session.
        has_session_row: Whether the session has its ``agent_sessions`` row (a session
            cleared and not written since has only its generation and reserved names).
        created_at: The session row's creation time (export text form), if any.
        updated_at: The session row's last update time (export text form), if any.
        clear_generation: How often the session was cleared (``None``: never recorded).
        reserved_branches: Branch names reserved for good, in name order.
        info: The session's store information (owner, title, metadata), if any.
    """

    session_id: str
    has_session_row: bool
    created_at: str | None
    updated_at: str | None
    clear_generation: int | None
    reserved_branches: tuple[str, ...]
    info: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class MessageRow:
    """One stored message: its id in the source, its creation time, its text as stored."""

    id: int
    created_at: str | None
    data: str


@dataclass(frozen=True, slots=True)
class StructureRow:
    """One structure row; ``message_id`` is the message's id in the source."""

    message_id: int
    branch_id: str
    message_type: str
    sequence_number: int
    user_turn_number: int | None
    branch_turn_number: int | None
    tool_name: str | None
    created_at: str | None


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One ``turn_usage`` row; token details are the JSON text the source stored."""

    branch_id: str
    user_turn_number: int
    requests: int | None
    input_tokens: int | None
    output_tokens: int | None
    total_tokens: int | None
    input_tokens_details: str | None
    output_tokens_details: str | None
    created_at: str | None


#: A batch of one kind of row. A session's batches come messages first, then structure rows,
#: then usage rows.
@dataclass(frozen=True, slots=True)
class ExtraRow:
    """A row of one of turnstore's own per-session tables (turn models, branch lineage,
    append keys): every column but ``session_id``, timestamps in export text form."""  # noqa: D205, D209

    table: str
    values: dict[str, Any]


Batch = list[MessageRow] | list[StructureRow] | list[UsageRow] | list[ExtraRow]


@dataclass(frozen=True, slots=True)
class SessionCounts:
    """How many rows of each kind a session has."""

    messages: int = 0
    structure: int = 0
    usage: int = 0
    extras: int = 0

    @property
    def items(self) -> int:
        """Structure rows: the items of every branch."""
        return self.structure

    def __add__(self, other: SessionCounts) -> SessionCounts:
        return SessionCounts(
            self.messages + other.messages,
            self.structure + other.structure,
            self.usage + other.usage,
            self.extras + other.extras,
        )


@dataclass(slots=True)
class SessionData:
    """A whole (small) session in memory: its head and every row."""

    head: SessionHead
    messages: list[MessageRow]
    structure: list[StructureRow]
    usage: list[UsageRow]
    extras: list[ExtraRow] = field(default_factory=list)

    @property
    def counts(self) -> SessionCounts:
        """How many rows of each kind it has."""
        return SessionCounts(
            len(self.messages), len(self.structure), len(self.usage), len(self.extras)
        )


def export_timestamp(value: object) -> str | None:
    """A stored timestamp in the export's text form: UTC, microseconds only if not zero.

    SQLite's text passes through as it is stored.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        if value.microsecond:
            return value.strftime("%Y-%m-%d %H:%M:%S.%f")
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


class MessageIdMap:
    """Old message ids to new ones, for one session: 16 bytes a message.

    Old ids arrive in increasing order (as sessions are read and as export files must list
    them), so a lookup is a binary search.
    """

    def __init__(self) -> None:
        self._old = array("q")
        self._new = array("q")

    def __len__(self) -> int:
        return len(self._old)

    def add(self, old_ids: Sequence[int], new_ids: Sequence[int]) -> None:
        """Record a batch of ids, old ids increasing and above every one recorded before.

        Raises:
            InvalidArgumentError: The old ids are not increasing.
        """
        previous = self._old[-1] if self._old else None
        for old in old_ids:
            if previous is not None and old <= previous:
                raise InvalidArgumentError(
                    f"message ids must increase within a session; {old} follows {previous}"
                )
            previous = old
        self._old.extend(old_ids)
        self._new.extend(new_ids)

    def get(self, old_id: int) -> int | None:
        """The new id of ``old_id``, or ``None`` if the session defined no such message."""
        at = bisect.bisect_left(self._old, old_id)
        if at < len(self._old) and self._old[at] == old_id:
            return self._new[at]
        return None


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """What writing one session did.

    Attributes:
        written: Whether the session was written (``False``: skipped, it existed).
        replaced: Whether an existing session of that id was replaced.
        counts: The rows written.
    """

    written: bool
    replaced: bool
    counts: SessionCounts
