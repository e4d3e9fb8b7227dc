"""The plain records the repository takes and returns, and the name of a session's first branch.

The faces build and receive these; none of them knows SQL or the Agents SDK.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

MAIN_BRANCH = "main"


@dataclass(frozen=True, slots=True)
class NewMessage:
    """One item to append, already serialized and classified by the caller."""

    data: str
    message_type: str
    tool_name: str | None
    is_user_message: bool


@dataclass(frozen=True, slots=True)
class InfoDefaults:
    """What a write stores as a session's info when the session has none yet.

    Attributes:
        user_id: The owner.
        title: The title.
        metadata: The metadata, a JSON-serializable dict (validated by the caller).
    """

    user_id: str | None = None
    title: str | None = None
    metadata: dict[str, Any] | None = None

    @property
    def given(self) -> bool:
        """Whether any value is set (such a session needs the info table)."""
        return self.user_id is not None or self.title is not None or self.metadata is not None


NO_INFO = InfoDefaults()


@dataclass(frozen=True, slots=True)
class BranchPointer:
    """The branch an operation acted on and the session's clear generation it saw."""

    branch_id: str
    generation: int


@dataclass(frozen=True, slots=True)
class ModelShare:
    """The part of a turn's usage one model served (``model`` ``None``: not known)."""

    model: str | None
    requests: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int
    total_tokens: int

    @classmethod
    def zero(cls, model: str | None) -> ModelShare:
        """No usage, for ``model``."""
        return cls(model, 0, 0, 0, 0, 0, 0)

    @property
    def counts(self) -> tuple[int, int, int, int, int, int]:
        """Requests, input, cached, output, reasoning and total tokens."""
        return (
            self.requests,
            self.input_tokens,
            self.cached_tokens,
            self.output_tokens,
            self.reasoning_tokens,
            self.total_tokens,
        )

    def __add__(self, other: ModelShare) -> ModelShare:
        return ModelShare(
            self.model, *(a + b for a, b in zip(self.counts, other.counts, strict=True))
        )

    def __sub__(self, other: ModelShare) -> ModelShare:
        """What ``self`` has beyond ``other``, never below zero; the model is not kept."""
        return ModelShare(
            None, *(max(a - b, 0) for a, b in zip(self.counts, other.counts, strict=True))
        )


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """Token usage of one run, to be stored against a user turn.

    ``models`` splits it by the model that served it; empty when not known at all.
    """

    requests: int
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, Any] | None
    output_tokens_details: dict[str, Any] | None
    models: tuple[ModelShare, ...] = ()


@dataclass(frozen=True, slots=True)
class StoredTurnModel:
    """A stored turn-models row."""

    branch_id: str
    user_turn_number: int
    share: ModelShare


@dataclass(frozen=True, slots=True)
class StoredLineage:
    """A recorded branch origin."""

    branch_id: str
    parent_branch_id: str
    fork_turn: int
    fork_preview: str | None
    created_at: str | None


@dataclass(frozen=True, slots=True)
class StoredTurnUsage:
    """A stored ``turn_usage`` row."""

    user_turn_number: int
    requests: int | None
    input_tokens: int | None
    output_tokens: int | None
    total_tokens: int | None
    input_tokens_details: Any
    output_tokens_details: Any


@dataclass(frozen=True, slots=True)
class UserTurn:
    """A user message that opens a turn on a branch."""

    turn: int
    message_data: str
    created_at: str | None


@dataclass(frozen=True, slots=True)
class BranchSummary:
    """One branch of a session, as ``list_branches`` reports it."""

    branch_id: str
    message_count: int
    user_turns: int
    created_at: str | None


@dataclass(frozen=True, slots=True)
class CreatedBranch:
    """Outcome of a branch creation."""

    branch_id: str
    source_branch_id: str
    generation: int
    copied_messages: int
    fork_preview: str | None = None


@dataclass(frozen=True, slots=True)
class DeletedBranch:
    """What a branch deletion removed."""

    structure_rows: int
    usage_rows: int
    messages: int


@dataclass(frozen=True, slots=True)
class PoppedItem:
    """The structure row a pop removed; ``message_data`` is ``None`` if its message was gone."""

    message_data: str | None


@dataclass(frozen=True, slots=True)
class ToolCountRule:
    """Which message types count as tool invocations, given by the caller that knows them.

    Attributes:
        call_types: Message types that are tool invocations.
        named_by_type: Invocation types whose rows carry no tool name and are counted under
            their message type instead.
        unpaired_outputs: ``(output_type, call_type)``: an output row of ``output_type`` counts
            as an invocation of its tool when its turn has no ``call_type`` row for that tool.
    """

    call_types: frozenset[str]
    named_by_type: frozenset[str]
    unpaired_outputs: tuple[str, str] | None


def format_timestamp(value: object) -> str | None:
    """Render a stored timestamp as SQLite's ``CURRENT_TIMESTAMP`` text, in UTC."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return None if value is None else str(value)


def escaped_for_like(text: str) -> str:
    """``text`` as a literal inside a LIKE pattern whose escape character is ``/``."""
    return text.replace("/", "//").replace("%", "/%").replace("_", "/_")
