"""Property test: any valid ids, branch names and items round-trip and stay isolated.

Hypothesis generates session ids (unicode, whitespace, look-alikes of one another), branch
names and items (deep, wide, unicode, huge integers, lone surrogates in strings); every
backend must store and read them back exactly, and one session's writes must never show in
another's reads, however alike their ids look.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import Backend
from turnstore import AdvancedSession

# Valid id characters: anything but NUL and surrogates (refused as ids everywhere).
_ID_CHARACTERS = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
_LOOKALIKE_SUFFIXES = ["", " ", "  ", "\t", "\n", "\u00a0", "\u200b", "\u3000"]


@st.composite
def id_pairs(draw: st.DrawFn) -> tuple[str, str]:
    """Two different ids, often differing only by case, whitespace or an invisible char."""
    base = draw(st.text(_ID_CHARACTERS, max_size=30))
    first = base + draw(st.sampled_from(_LOOKALIKE_SUFFIXES))
    kind = draw(st.sampled_from(["suffix", "prefix", "case", "any"]))
    if kind == "suffix":
        second = base + draw(st.sampled_from(_LOOKALIKE_SUFFIXES))
    elif kind == "prefix":
        second = draw(st.sampled_from(_LOOKALIKE_SUFFIXES)) + first
    elif kind == "case":
        second = first.swapcase()
    else:
        second = draw(st.text(_ID_CHARACTERS, max_size=255))
    # Unique per example: the database is shared by every example of the run.
    tag = uuid.uuid4().hex[:6]
    first, second = f"{tag}{first}"[:255], f"{tag}{second}"[:255]
    if first == second:
        second = f"{second[:254]}!" if not second.endswith("!") else f"{second[:254]}?"
    return first, second


branch_names = st.one_of(
    st.sampled_from(["main ", " main", "Main", "MAIN", "main\t", "ma\u200bin", "\u043cain"]),
    st.text(_ID_CHARACTERS, min_size=1, max_size=255).filter(
        lambda name: bool(name.strip()) and name != "main"
    ),
)

_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**200), max_value=10**200),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.sampled_from(["\ud800", "lone \udfff low", "nul \x00 inside", "\U0001f642\u200d"]),
)
_VALUES = st.recursive(
    _LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(max_size=10), children, max_size=5),
    ),
    max_leaves=40,
)


def _nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"d": value}
    return value


_PAYLOADS = st.one_of(
    _VALUES,
    st.builds(_nested, st.integers(1, 400), _LEAVES),
    st.lists(_LEAVES, min_size=200, max_size=600),
)


@st.composite
def batches(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A user message and one or two other items carrying generated payloads."""
    text = draw(st.text(max_size=60))
    items: list[dict[str, Any]] = [{"role": "user", "content": text}]
    for _ in range(draw(st.integers(1, 2))):
        items.append({"type": "function_call_output", "call_id": "c", "output": draw(_PAYLOADS)})
    return items


def _same(left: Any, right: Any) -> bool:
    """Equality that also holds for -0.0 and 0.0 only when both are the same float."""
    if isinstance(left, float) and isinstance(right, float):
        return math.copysign(1, left) == math.copysign(1, right) and left == right
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(_same(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(_same, left, right))
    return type(left) is type(right) and left == right


async def _round_trip_and_isolation(
    engine: Any, ids: tuple[str, str], branch: str, parts: list[list[dict[str, Any]]]
) -> None:
    first_id, second_id = ids
    first = AdvancedSession(session_id=first_id, engine=engine, create_tables=True)
    second = AdvancedSession(session_id=second_id, engine=engine, create_tables=True)
    one, two, three, four = parts
    await first.add_items(one)
    await first.add_items(two)
    assert await first.create_branch_from_turn(2, branch) == branch
    await first.add_items(three)
    await second.add_items(four)

    again = AdvancedSession(session_id=first_id, engine=engine)
    assert _same(await again.get_items(branch_id="main"), [*one, *two])
    assert _same(await again.get_items(branch_id=branch), [*one, *three])
    assert _same(await second.get_items(), four)
    assert {b["branch_id"] for b in await again.list_branches()} == {"main", branch}
    assert [b["branch_id"] for b in await second.list_branches()] == ["main"]
    assert await second.get_items(branch_id=branch) == []

    await second.clear_session()
    assert _same(await again.get_items(branch_id=branch), [*one, *three])
    await first.clear_session()
    assert await again.get_items(branch_id="main") == []
    assert await second.get_items() == []


def test_ids_names_and_items_round_trip_in_isolation(backend: Backend) -> None:
    # The backend fixture's engine belongs to pytest's loop; examples run on a loop of their
    # own, with an engine of their own on the same database.
    engine = backend.new_engine()

    @given(ids=id_pairs(), branch=branch_names, parts=st.lists(batches(), min_size=4, max_size=4))
    def examples(ids: tuple[str, str], branch: str, parts: list[list[dict[str, Any]]]) -> None:
        runner.run(_round_trip_and_isolation(engine, ids, branch, parts))

    with asyncio.Runner() as runner:
        try:
            examples()
        finally:
            runner.run(engine.dispose())
