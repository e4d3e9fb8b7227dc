"""A session's branch tree: recorded origins, and inferred ones for branches made without them.

turnstore records a branch's parent, fork turn and the fork turn's preview when it creates the
branch. Branches created by the SDK's class, or before turnstore recorded lineage, have no
record; their parent is inferred from the structure rows they share with other branches (a
branch starts with a copy of its parent's items before the fork turn, pointing at the same
messages), and where that cannot single out one parent the branch is marked ``unknown`` with
the reason. Nothing is guessed silently: every node says whether it was recorded or inferred.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from turnstore.persistence.records import MAIN_BRANCH, BranchSummary, StoredLineage

Origin = Literal["root", "recorded", "inferred", "unknown"]


@dataclass
class BranchNode:
    """One branch in the tree.

    Attributes:
        branch_id: The branch.
        parent_branch_id: The branch it forked from (``None`` for ``main`` and unknown origins).
        fork_turn: The parent's user turn it forked before: it holds the parent's earlier turns.
        fork_preview: The start of that turn's user message (the one the branch replaced).
        origin: ``root`` (main), ``recorded`` (at creation), ``inferred`` (from shared items)
            or ``unknown``.
        note: Why an origin is unknown, or what an inference could not tell apart.
        message_count: Items on the branch.
        user_turns: User turns on the branch.
        total_tokens: Tokens of the branch's stored usage.
        is_current: Whether it is the session's current branch.
        created_at: When its first item was stored (UTC, ``YYYY-MM-DD HH:MM:SS``).
        children: Branches forked from it, oldest first.
    """

    branch_id: str
    parent_branch_id: str | None
    fork_turn: int | None
    fork_preview: str | None
    origin: Origin
    note: str | None
    message_count: int
    user_turns: int
    total_tokens: int
    is_current: bool
    created_at: str | None
    children: list[BranchNode] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The node and its subtree as plain data (the JSON shape of ``turnstore tree``)."""
        return {
            "branch_id": self.branch_id,
            "parent_branch_id": self.parent_branch_id,
            "fork_turn": self.fork_turn,
            "fork_preview": self.fork_preview,
            "origin": self.origin,
            "note": self.note,
            "message_count": self.message_count,
            "user_turns": self.user_turns,
            "total_tokens": self.total_tokens,
            "is_current": self.is_current,
            "created_at": self.created_at,
            "children": [child.to_dict() for child in self.children],
        }


def build_tree(
    branches: Sequence[BranchSummary],
    recorded: Sequence[StoredLineage],
    messages: Mapping[str, Sequence[tuple[int, int | None]]],
    tokens: Mapping[str, int],
    current: str,
    preview_of_turn: Callable[[str, int], str | None],
) -> list[BranchNode]:
    """Assemble the tree of a session's branches; returns the roots, ``main`` first.

    Args:
        branches: The branches, in order of creation (as ``list_branches`` orders them).
        recorded: The recorded origins.
        messages: Per branch, ``(message_id, branch_turn_number)`` of its items in order.
        tokens: Per branch, its total tokens.
        current: The current branch.
        preview_of_turn: The preview of a branch's user turn, for inferred forks.
    """
    existing = {branch.branch_id for branch in branches}
    by_branch = {entry.branch_id: entry for entry in recorded}
    nodes: dict[str, BranchNode] = {}
    parents: dict[str, str] = {}
    for branch in branches:
        node = BranchNode(
            branch_id=branch.branch_id,
            parent_branch_id=None,
            fork_turn=None,
            fork_preview=None,
            origin="root",
            note=None,
            message_count=branch.message_count,
            user_turns=branch.user_turns,
            total_tokens=tokens.get(branch.branch_id, 0),
            is_current=branch.branch_id == current,
            created_at=branch.created_at,
        )
        nodes[branch.branch_id] = node
        if branch.branch_id == MAIN_BRANCH:
            continue
        entry = by_branch.get(branch.branch_id)
        if entry is not None:
            node.origin, node.fork_turn, node.fork_preview = (
                "recorded",
                entry.fork_turn,
                entry.fork_preview,
            )
            if entry.parent_branch_id in existing:
                node.parent_branch_id = entry.parent_branch_id
                parents[branch.branch_id] = entry.parent_branch_id
            else:
                node.note = f"forked from branch {entry.parent_branch_id!r}, since deleted"
            continue
        _infer(node, branch, branches, messages, parents, preview_of_turn)

    roots: list[BranchNode] = []
    for branch in branches:
        node = nodes[branch.branch_id]
        parent = parents.get(branch.branch_id)
        if parent is None:
            roots.append(node)
        else:
            nodes[parent].children.append(node)
    roots.sort(key=lambda node: node.branch_id != MAIN_BRANCH)
    return roots


def _infer(
    node: BranchNode,
    branch: BranchSummary,
    branches: Sequence[BranchSummary],
    messages: Mapping[str, Sequence[tuple[int, int | None]]],
    parents: dict[str, str],
    preview_of_turn: Callable[[str, int], str | None],
) -> None:
    """Find the parent of a branch without a record from the items it shares with others."""
    own = messages.get(branch.branch_id, ())
    best: list[tuple[str, int]] = []
    best_length = 0
    # Branches come in order of creation (first stored row, then first row id, which a
    # copy takes at creation): only those before this one can be its parent.
    for other in branches:
        if other.branch_id == branch.branch_id:
            break
        theirs = messages.get(other.branch_id, ())
        length = _common_prefix(own, theirs)
        if length == 0:
            continue
        fork_turn = max((turn or 0 for _, turn in own[:length]), default=0) + 1
        # The parent must have had the fork turn's user message right after the shared part.
        if length >= len(theirs) or theirs[length][1] != fork_turn:
            continue
        if length > best_length:
            best, best_length = [(other.branch_id, fork_turn)], length
        elif length == best_length:
            best.append((other.branch_id, fork_turn))
    if not best:
        node.origin = "unknown"
        node.note = "created without a lineage record and shares no items with another branch"
        return
    names = [name for name, _ in best]
    chosen = _common_ancestor(names, parents)
    if chosen is None:
        node.origin = "unknown"
        node.note = "created without a lineage record; could have forked from " + ", ".join(
            repr(name) for name in names
        )
        return
    fork_turn = dict(best)[chosen]
    node.origin = "inferred"
    node.parent_branch_id = chosen
    node.fork_turn = fork_turn
    node.fork_preview = preview_of_turn(chosen, fork_turn)
    others = [name for name in names if name != chosen]
    node.note = "inferred from the items it shares with its parent" + (
        f" (as do {', '.join(repr(name) for name in others)}, copied from it)" if others else ""
    )
    parents[branch.branch_id] = chosen


def _common_prefix(a: Sequence[tuple[int, int | None]], b: Sequence[tuple[int, int | None]]) -> int:
    length = 0
    for (left, _), (right, _) in zip(a, b, strict=False):
        if left != right:
            break
        length += 1
    return length


def _common_ancestor(names: Sequence[str], parents: Mapping[str, str]) -> str | None:
    """The one candidate every other candidate descends from, if there is one."""
    if len(names) == 1:
        return names[0]
    for name in names:
        if all(other == name or _descends(other, name, parents) for other in names):
            return name
    return None


def _descends(branch: str, ancestor: str, parents: Mapping[str, str]) -> bool:
    seen: set[str] = set()
    while branch in parents and branch not in seen:
        seen.add(branch)
        branch = parents[branch]
        if branch == ancestor:
            return True
    return False
