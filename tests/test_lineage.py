"""Branch lineage: recorded at creation, inferred for branches made without a record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agents.extensions.memory import AdvancedSQLiteSession as SDKSession

from tests.conftest import Backend
from tests.helpers import run_result, turn
from turnstore import AdvancedSQLiteSession
from turnstore.lineage import BranchNode


def shape(nodes: list[BranchNode]) -> list[Any]:
    """The tree as (branch, parent, fork turn, origin, children) tuples."""
    return [
        (n.branch_id, n.parent_branch_id, n.fork_turn, n.origin, shape(n.children)) for n in nodes
    ]


async def test_recorded_lineage_builds_the_tree(backend: Backend) -> None:
    session = backend.session()
    for text in ("one", "two", "three"):
        await session.add_items(turn(text))
        await session.store_run_usage(run_result(input_tokens=10, output_tokens=5))
    await session.create_branch_from_turn(2, "b2")  # holds turn 1
    await session.add_items(turn("two, again"))
    await session.create_branch_from_turn(2, "b2_child")  # from b2, holds turn 1
    await session.switch_to_branch("main")
    await session.create_branch_from_turn(3, "b3")
    tree = await session.branch_tree()
    assert shape(tree) == [
        (
            "main",
            None,
            None,
            "root",
            [
                ("b2", "main", 2, "recorded", [("b2_child", "b2", 2, "recorded", [])]),
                ("b3", "main", 3, "recorded", []),
            ],
        )
    ]
    main = tree[0]
    assert (main.message_count, main.user_turns, main.total_tokens) == (6, 3, 45)
    b2 = main.children[0]
    assert b2.fork_preview == "two"
    assert b2.children[0].fork_preview == "two, again"
    assert [n.is_current for n in (main, b2, main.children[1])] == [False, False, True]
    as_data = main.to_dict()
    assert as_data["children"][0]["children"][0]["branch_id"] == "b2_child"
    assert as_data["children"][1]["fork_turn"] == 3


async def test_a_deleted_parent_leaves_its_children_as_roots_that_say_so(
    backend: Backend,
) -> None:
    session = backend.session()
    await session.add_items(turn("one"))
    await session.add_items(turn("two"))
    await session.create_branch_from_turn(2, "mid")
    await session.add_items(turn("two, mid"))
    await session.create_branch_from_turn(2, "leaf")
    await session.delete_branch("mid")
    tree = await session.branch_tree()
    assert shape(tree) == [
        ("main", None, None, "root", []),
        ("leaf", None, 2, "recorded", []),
    ]
    assert tree[1].note == "forked from branch 'mid', since deleted"


async def sdk_branches(path: Path) -> None:
    """Branches made by the SDK's class, which records no lineage."""
    sdk: Any = SDKSession(session_id="s", db_path=path, create_tables=True)
    for text in ("one", "two", "three"):
        await sdk.add_items(turn(text))
    await sdk.create_branch_from_turn(3, "from_main_3")
    await sdk.add_items(turn("three, again"))
    await sdk.add_items(turn("four"))
    await sdk.create_branch_from_turn(4, "from_branch_4")  # shares from_main_3's own turn 3
    await sdk.add_items(turn("four, again"))
    await sdk.switch_to_branch("main")
    await sdk.create_branch_from_turn(1, "from_main_1")  # shares nothing
    await sdk.add_items(turn("first, again"))
    sdk.close()


async def test_branches_without_a_record_are_inferred_or_marked_unknown(sqlite_path: Path) -> None:
    await sdk_branches(sqlite_path)
    async with AdvancedSQLiteSession(session_id="s", db_path=sqlite_path, create_tables=True) as s:
        await s.create_branch_from_turn(2, "recorded")  # main is current: forks main
        tree = await s.branch_tree()
    by_id = {node.branch_id: node for node in _walk(tree)}
    assert shape(tree)[0][:4] == ("main", None, None, "root")
    assert by_id["from_main_3"].origin == "inferred"
    assert (by_id["from_main_3"].parent_branch_id, by_id["from_main_3"].fork_turn) == ("main", 3)
    assert by_id["from_main_3"].fork_preview == "three"
    # Its first two turns are main's too, but it shares turn 3 with from_main_3 only.
    assert by_id["from_branch_4"].origin == "inferred"
    assert by_id["from_branch_4"].parent_branch_id == "from_main_3"
    assert (by_id["from_branch_4"].fork_turn, by_id["from_branch_4"].fork_preview) == (4, "four")
    # Forked at turn 1, it shares no item with anyone: its parent is not guessed.
    unknown = by_id["from_main_1"]
    assert (unknown.origin, unknown.parent_branch_id) == ("unknown", None)
    assert unknown in tree
    assert unknown.note is not None
    assert "shares no items" in unknown.note
    assert by_id["recorded"].origin == "recorded"
    assert by_id["recorded"].parent_branch_id == "main"


async def test_equal_prefixes_pick_the_ancestor_and_say_so(sqlite_path: Path) -> None:
    sdk: Any = SDKSession(session_id="s", db_path=sqlite_path, create_tables=True)
    for text in ("one", "two", "three"):
        await sdk.add_items(turn(text))
    await sdk.create_branch_from_turn(3, "copy_of_two_turns")
    await sdk.switch_to_branch("main")
    # Forked at turn 2: its one shared turn is in main and in copy_of_two_turns alike.
    await sdk.create_branch_from_turn(2, "late")
    sdk.close()
    async with AdvancedSQLiteSession(session_id="s", db_path=sqlite_path) as s:
        by_id = {node.branch_id: node for node in _walk(await s.branch_tree())}
    late = by_id["late"]
    assert (late.origin, late.parent_branch_id, late.fork_turn) == ("inferred", "main", 2)
    assert late.note is not None
    assert "copy_of_two_turns" in late.note


def _walk(nodes: list[BranchNode]) -> list[BranchNode]:
    found = []
    for node in nodes:
        found.append(node)
        found.extend(_walk(node.children))
    return found
