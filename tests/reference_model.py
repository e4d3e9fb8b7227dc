"""An in-memory reference model of a branching session, for the model-based test.

It is written from the documented behaviour of the SDK's ``AdvancedSQLiteSession`` (see the
spec and ``tests/test_sqlite_compat.py``), not from turnstore's code: plain Python lists per
branch, no SQL. Each operation either returns what the real session must return and updates
the model, or raises the error the real session must raise and leaves the model untouched.

The rules, as the SDK behaves:

- A branch exists while it has items; ``main`` is where a session starts and returns after
  ``clear_session`` or a forced deletion of the current branch.
- ``add_items`` numbers user turns per branch: every user message opens the next turn after the
  branch's highest, other items belong to the branch's highest turn (0 before any user turn).
- ``create_branch_from_turn(n)`` needs a user message with turn ``n`` on the current branch;
  the new branch holds the items with a lower turn (usage is not copied) and becomes current.
  Branch names are reserved for the life of the session, ``clear_session`` included.
- ``pop_item`` removes the newest item of the current branch; a turn's usage goes with its
  last item.
- ``store_run_usage`` stores (replaces) the usage of the current branch's highest turn, and
  does nothing on a branch without items.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from turnstore import (
    BranchNameTakenError,
    BranchNotFoundError,
    ContentNotFoundError,
    InvalidArgumentError,
    ProtectedBranchError,
    TurnNotFoundError,
)

MAIN = "main"

# Item types that count as tool invocations in get_tool_usage (the SDK's list).
TOOL_CALL_TYPES = frozenset(
    {
        "tool_call",
        "function_call",
        "computer_call",
        "file_search_call",
        "web_search_call",
        "code_interpreter_call",
        "tool_search_call",
        "custom_tool_call",
        "mcp_call",
        "mcp_approval_request",
        "shell_call",
        "apply_patch_call",
    }
)
# Built-in tool items that carry no name: the tool is named after the item type.
NAMED_BY_TYPE = frozenset(
    {
        "computer_call",
        "file_search_call",
        "web_search_call",
        "code_interpreter_call",
        "shell_call",
        "apply_patch_call",
    }
)
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def kind_of(item: dict[str, Any]) -> str:
    """The stored message type: the role for user/assistant messages, else the item type."""
    if item.get("role") in ("user", "assistant"):
        return str(item["role"])
    return str(item["type"]) if item.get("type") else "other"


def tool_of(item: dict[str, Any]) -> str | None:
    """The tool name of the (simple, un-namespaced) items the test generates."""
    if item.get("type") in NAMED_BY_TYPE:
        return str(item["type"])
    name = item.get("name")
    return None if name is None else str(name)


def contains(text: str, term: str) -> bool:
    """Literal containment, ignoring the case of ASCII letters only (as SQLite's LIKE)."""
    return term.translate(_ASCII_LOWER) in text.translate(_ASCII_LOWER)


def texts_of(content: Any) -> list[str]:
    """The searchable texts of a user message's content."""
    if isinstance(content, str):
        return [content]
    return [str(part.get("text", "")) for part in content]


def preview(content: Any, length: int | None) -> str:
    """A user message's content as text, cut to ``length`` characters plus ``...``."""
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    if length is not None and len(text) > length:
        return text[:length] + "..."
    return text


@dataclass(frozen=True)
class Entry:
    """One item as it sits on one branch."""

    item: dict[str, Any]
    turn: int

    @property
    def kind(self) -> str:
        return kind_of(self.item)

    @property
    def tool(self) -> str | None:
        return tool_of(self.item)


@dataclass(frozen=True)
class UsageRow:
    """Usage stored for one turn of one branch."""

    requests: int
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, Any] | None
    output_tokens_details: dict[str, Any] | None


def _check_name(name: object, message: str) -> None:
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgumentError(message)


def _check_turn(turn: object) -> None:
    if isinstance(turn, bool) or not isinstance(turn, int):
        raise InvalidArgumentError("turn_number must be an int")
    if turn < 0:  # the SDK's class raises ValueError too ("Turn -1 does not contain ...")
        raise InvalidArgumentError("turn_number must be at least 0")


@dataclass
class SessionModel:
    """The state of one session: branches of entries, the current branch, names, usage."""

    branches: dict[str, list[Entry]] = field(default_factory=dict)
    current: str = MAIN
    reserved: set[str] = field(default_factory=lambda: {MAIN})
    usage: dict[tuple[str, int], UsageRow] = field(default_factory=dict)

    # -- reads ---------------------------------------------------------------------------

    def entries(self, branch: str | None = None) -> list[Entry]:
        return self.branches.get(self.current if branch is None else branch, [])

    def existing(self) -> list[str]:
        """Branches that exist (have items), sorted by name."""
        return sorted(name for name, entries in self.branches.items() if entries)

    def items(self, branch: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        items = [entry.item for entry in self.entries(branch)]
        if limit is None or limit < 0:
            return items
        return items[-limit:] if limit else []

    def max_turn(self, branch: str | None = None) -> int | None:
        turns = [entry.turn for entry in self.entries(branch)]
        return max(turns) if turns else None

    def user_turns(self, branch: str | None = None) -> list[Entry]:
        return [entry for entry in self.entries(branch) if entry.kind == "user"]

    def list_branches(self) -> list[tuple[str, int, int, bool]]:
        """``(branch_id, message_count, user_turns, is_current)``, sorted by name."""
        return [
            (name, len(self.branches[name]), len(self.user_turns(name)), name == self.current)
            for name in self.existing()
        ]

    def conversation_turns(self, branch: str | None = None) -> list[dict[str, Any]]:
        return [
            {
                "turn": entry.turn,
                "content": preview(entry.item["content"], 100),
                "full_content": entry.item["content"],
                "can_branch": True,
            }
            for entry in self.user_turns(branch)
        ]

    def find_turns(self, term: str, branch: str | None = None) -> list[dict[str, Any]]:
        return [
            {
                "turn": entry.turn,
                "content": preview(entry.item["content"], None),
                "full_content": entry.item["content"],
                "can_branch": True,
            }
            for entry in self.user_turns(branch)
            if any(contains(text, term) for text in texts_of(entry.item["content"]))
        ]

    def conversation_by_turns(
        self, branch: str | None = None
    ) -> list[tuple[int, list[dict[str, str | None]]]]:
        """Turns in order of first appearance, each with its items' type and tool."""
        grouped: dict[int, list[dict[str, str | None]]] = {}
        for entry in self.entries(branch):
            grouped.setdefault(entry.turn, []).append({"type": entry.kind, "tool_name": entry.tool})
        return list(grouped.items())

    def tool_usage(self, branch: str | None = None) -> list[tuple[str, int, int]]:
        counts = Counter(
            (entry.turn, entry.tool)
            for entry in self.entries(branch)
            if entry.kind in TOOL_CALL_TYPES and entry.tool is not None
        )
        return [(tool, count, turn) for (turn, tool), count in sorted(counts.items())]

    def session_usage(self, branch: str | None = None) -> dict[str, int] | None:
        rows = [row for (name, _), row in self.usage.items() if branch in (None, name)]
        if not rows:
            return None
        return {
            "requests": sum(row.requests for row in rows),
            "input_tokens": sum(row.input_tokens for row in rows),
            "output_tokens": sum(row.output_tokens for row in rows),
            "total_tokens": sum(row.total_tokens for row in rows),
            "total_turns": len(rows),
        }

    def turn_usage(self, branch: str | None = None) -> list[dict[str, Any]]:
        name = self.current if branch is None else branch
        return [
            {"user_turn_number": turn, **vars(self.usage[name, turn])}
            for turn in sorted(turn for (owner, turn) in self.usage if owner == name)
        ]

    def one_turn_usage(self, turn: int, branch: str | None = None) -> dict[str, Any]:
        row = self.usage.get((self.current if branch is None else branch, turn))
        return {} if row is None else dict(vars(row))

    # -- writes --------------------------------------------------------------------------

    def add_items(self, items: list[dict[str, Any]]) -> None:
        if not items:
            return
        entries = self.branches.setdefault(self.current, [])
        turn = self.max_turn() or 0
        for item in items:
            if kind_of(item) == "user":
                turn += 1
            entries.append(Entry(item, turn))

    def pop_item(self) -> dict[str, Any] | None:
        entries = self.entries()
        if not entries:
            return None
        popped = entries.pop()
        if not any(entry.turn == popped.turn for entry in entries):
            self.usage.pop((self.current, popped.turn), None)
        return popped.item

    def clear_session(self) -> None:
        self.reserved.update(self.branches)
        self.branches.clear()
        self.usage.clear()
        self.current = MAIN

    def replace_branch(self, items: list[dict[str, Any]]) -> None:
        """turnstore's compaction: the current branch becomes ``items``, numbered afresh.

        Other branches, the current branch and all usage rows stay as they were.
        """
        self.branches[self.current] = []
        self.add_items(items)

    def store_run_usage(self, row: UsageRow) -> None:
        turn = self.max_turn()
        if turn is not None:
            self.usage[self.current, turn] = row

    def check_branch_from_turn(self, turn: object, name: str | None) -> None:
        """Raise what ``create_branch_from_turn`` must raise, if anything; change nothing."""
        _check_turn(turn)
        if name is not None:
            _check_name(name, "Branch name cannot be empty")
        if not any(entry.turn == turn for entry in self.user_turns()):
            raise TurnNotFoundError(f"Turn {turn} does not contain a user message")
        if name is not None and name in self.reserved:
            raise BranchNameTakenError(f"Branch ID '{name}' has already been used")

    def branch_from_turn(self, turn: int, name: str) -> None:
        """Record the branch the session created (under the name it chose) and switch to it."""
        assert name not in self.reserved, f"branch name {name!r} handed out twice"
        self.reserved.add(name)
        self.branches[name] = [entry for entry in self.entries() if entry.turn < turn]
        self.current = name

    def turn_for_content(self, term: str) -> int:
        matches = self.find_turns(term)
        if not matches:
            raise ContentNotFoundError(f"No user turns found containing '{term}'")
        turn: int = matches[0]["turn"]
        return turn

    def switch_to_branch(self, name: str) -> None:
        if not self.entries(name):
            raise BranchNotFoundError(f"Branch '{name}' does not exist")
        self.current = name

    def delete_branch(self, name: str, force: bool) -> None:
        _check_name(name, "Branch ID cannot be empty")
        if name == MAIN:
            raise ProtectedBranchError("Cannot delete the 'main' branch")
        if name == self.current and not force:
            raise ProtectedBranchError(f"Cannot delete current branch '{name}'")
        if not self.entries(name):
            raise BranchNotFoundError(f"Branch '{name}' does not exist")
        del self.branches[name]
        for key in [key for key in self.usage if key[0] == name]:
            del self.usage[key]
        if name == self.current:
            self.current = MAIN


def auto_name_pattern(turn: int) -> re.Pattern[str]:
    """Generated branch names: ``branch_from_turn_<turn>_<unix time>``, ``_2``... if taken."""
    return re.compile(rf"branch_from_turn_{turn}_\d+(?:_\d+)?")
