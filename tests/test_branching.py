"""Branching: create from turn or content, switch, delete, list, reserved names."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from tests.conftest import Backend
from tests.helpers import function_call, function_output, run_result, turn, user
from turnstore import (
    AdvancedSession,
    BranchNameTakenError,
    BranchNotFoundError,
    ContentNotFoundError,
    InvalidArgumentError,
    ProtectedBranchError,
    TurnNotFoundError,
)
from turnstore.persistence.models import DEFAULT_TABLES


async def three_turns(backend: Backend) -> AdvancedSession:
    session = backend.session()
    for text in ("capital of France?", "weather there?", "how expensive?"):
        await session.add_items(turn(text))
    return session


async def test_branch_holds_items_before_the_turn_and_becomes_current(backend: Backend) -> None:
    session = await three_turns(backend)
    branch = await session.create_branch_from_turn(2, "alt")
    assert branch == "alt"
    assert await session.get_items() == turn("capital of France?")
    await session.add_items(turn("attractions?"))
    assert await session.get_items() == [*turn("capital of France?"), *turn("attractions?")]
    assert [t["turn"] for t in await session.get_conversation_turns()] == [1, 2]
    main = await session.get_items(branch_id="main")
    assert len(main) == 6  # main is untouched
    branches = {b["branch_id"]: b for b in await session.list_branches()}
    assert branches["alt"]["is_current"]
    assert not branches["main"]["is_current"]


async def test_branch_copies_structure_not_message_bodies(backend: Backend) -> None:
    session = await three_turns(backend)
    await session.create_branch_from_turn(3)
    async with backend.engine.connect() as conn:
        messages = await conn.scalar(select(func.count()).select_from(DEFAULT_TABLES.messages))
        structure = await conn.scalar(select(func.count()).select_from(DEFAULT_TABLES.structure))
    assert messages == 6
    assert structure == 6 + 4


async def test_branch_from_first_turn_is_empty_until_written(backend: Backend) -> None:
    session = await three_turns(backend)
    await session.create_branch_from_turn(1, "fresh")
    assert await session.get_items() == []
    # An empty branch has no rows, so it is not listed until it gets items.
    assert [b["branch_id"] for b in await session.list_branches()] == ["main"]
    await session.add_items(turn("restart"))
    assert [t["turn"] for t in await session.get_conversation_turns()] == [1]


async def test_auto_names_are_unique_within_one_second(backend: Backend) -> None:
    session = await three_turns(backend)
    names = []
    for _ in range(3):
        await session.switch_to_branch("main")
        names.append(await session.create_branch_from_turn(2))
    assert len(set(names)) == 3
    assert all(name.startswith("branch_from_turn_2_") for name in names)
    second = int(names[0].split("_")[4])
    assert abs(second - time.time()) < 60


async def test_branch_names_stay_reserved_after_delete_and_clear(backend: Backend) -> None:
    session = await three_turns(backend)
    await session.create_branch_from_turn(2, "alt")
    await session.switch_to_branch("main")
    await session.delete_branch("alt")
    with pytest.raises(BranchNameTakenError, match="'alt' has already been used"):
        await session.create_branch_from_turn(2, "alt")
    await session.clear_session()
    await session.add_items(turn("again"))
    with pytest.raises(BranchNameTakenError):
        await session.create_branch_from_turn(1, "alt")
    with pytest.raises(BranchNameTakenError, match="'main'"):
        await session.create_branch_from_turn(1, "main")


async def test_reserved_names_are_per_session(backend: Backend) -> None:
    first, second = await three_turns(backend), await three_turns(backend)
    assert await first.create_branch_from_turn(2, "alt") == "alt"
    assert await second.create_branch_from_turn(2, "alt") == "alt"


async def test_failed_branch_creation_changes_nothing(backend: Backend) -> None:
    session = await three_turns(backend)
    with pytest.raises(TurnNotFoundError, match="Turn 9 does not contain a user message"):
        await session.create_branch_from_turn(9, "never")
    assert [b["branch_id"] for b in await session.list_branches()] == ["main"]
    # The failed attempt did not reserve the name.
    assert await session.create_branch_from_turn(2, "never") == "never"


@pytest.mark.parametrize(
    ("turn_number", "error"),
    [
        (0, TurnNotFoundError),
        (4, TurnNotFoundError),
        (2**63, TurnNotFoundError),
        (-1, InvalidArgumentError),
    ],
)
async def test_missing_turns_are_value_errors(
    backend: Backend, turn_number: int, error: type[Exception]
) -> None:
    # Turn 0 is a number no turn has; a negative one is not a turn number at all. Both are
    # ValueErrors, as the SDK's class raises.
    session = await three_turns(backend)
    with pytest.raises(error) as raised:
        await session.create_branch_from_turn(turn_number)
    assert isinstance(raised.value, ValueError)


async def test_negative_turns_are_value_errors_too(backend: Backend) -> None:
    # Turns count from 1: a negative number is a bad argument (a ValueError, as the SDK's).
    session = await three_turns(backend)
    with pytest.raises(InvalidArgumentError, match="at least 0") as raised:
        await session.create_branch_from_turn(-1)
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("turn_number", [True, "2", 2.0, None])
async def test_turn_number_must_be_an_int(backend: Backend, turn_number: object) -> None:
    session = await three_turns(backend)
    with pytest.raises(InvalidArgumentError, match="turn_number must be an int"):
        await session.create_branch_from_turn(turn_number)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "   ", "\t\n"])
async def test_blank_branch_names_are_refused(backend: Backend, name: str) -> None:
    session = await three_turns(backend)
    with pytest.raises(InvalidArgumentError, match="Branch name cannot be empty"):
        await session.create_branch_from_turn(2, name)


async def test_create_branch_from_content_uses_the_earliest_match(backend: Backend) -> None:
    session = backend.session()
    for text in ("hello", "Weather in Paris?", "and the weather tomorrow?"):
        await session.add_items(turn(text))
    branch = await session.create_branch_from_content("weather", "weather_focus")
    assert branch == "weather_focus"
    assert await session.get_items() == turn("hello")
    with pytest.raises(ContentNotFoundError, match="No user turns found containing 'zzz'"):
        await session.create_branch_from_content("zzz")


async def test_switch_to_unknown_branch_fails_and_keeps_current(backend: Backend) -> None:
    session = await three_turns(backend)
    await session.create_branch_from_turn(2, "alt")
    with pytest.raises(BranchNotFoundError, match="Branch 'nope' does not exist"):
        await session.switch_to_branch("nope")
    current = [b["branch_id"] for b in await session.list_branches() if b["is_current"]]
    assert current == ["alt"]


async def test_delete_branch_protections(backend: Backend) -> None:
    session = await three_turns(backend)
    await session.create_branch_from_turn(2, "alt")
    with pytest.raises(ProtectedBranchError, match="Cannot delete the 'main' branch"):
        await session.delete_branch("main")
    with pytest.raises(ProtectedBranchError, match="Cannot delete current branch 'alt'"):
        await session.delete_branch("alt")
    with pytest.raises(BranchNotFoundError):
        await session.delete_branch("nope")
    with pytest.raises(InvalidArgumentError, match="Branch ID cannot be empty"):
        await session.delete_branch(" ")
    assert {b["branch_id"] for b in await session.list_branches()} == {"main", "alt"}


async def test_force_deleting_current_branch_switches_to_main(backend: Backend) -> None:
    session = await three_turns(backend)
    await session.create_branch_from_turn(3, "alt")
    await session.add_items(turn("only on alt"))
    await session.store_run_usage(run_result())
    await session.delete_branch("alt", force=True)
    assert [b["branch_id"] for b in await session.list_branches()] == ["main"]
    assert len(await session.get_items()) == 6
    assert await session.get_turn_usage(branch_id="alt") == []


async def test_delete_keeps_messages_shared_with_other_branches(backend: Backend) -> None:
    session = await three_turns(backend)
    await session.create_branch_from_turn(3, "alt")
    await session.add_items(turn("only on alt"))
    await session.switch_to_branch("main")
    await session.delete_branch("alt")
    async with backend.engine.connect() as conn:
        messages = await conn.scalar(select(func.count()).select_from(DEFAULT_TABLES.messages))
    assert messages == 6  # alt's own two messages are gone, the shared four stay
    assert len(await session.get_items()) == 6


async def test_pop_on_branch_keeps_shared_message_for_main(backend: Backend) -> None:
    session = await three_turns(backend)
    await session.create_branch_from_turn(2, "alt")
    assert await session.pop_item() == turn("capital of France?")[1]
    assert await session.get_items() == [user("capital of France?")]
    assert len(await session.get_items(branch_id="main")) == 6


async def test_list_branches_shape_and_counts(backend: Backend) -> None:
    session = await three_turns(backend)
    await session.create_branch_from_turn(2, "alt")
    await session.add_items([user("tool turn"), function_call("lookup"), function_output()])
    branches = await session.list_branches()
    assert [b["branch_id"] for b in branches] == ["main", "alt"]
    main, alt = branches
    assert set(main) == {"branch_id", "message_count", "user_turns", "is_current", "created_at"}
    assert (main["message_count"], main["user_turns"], main["is_current"]) == (6, 3, False)
    assert (alt["message_count"], alt["user_turns"], alt["is_current"]) == (5, 2, True)
    assert isinstance(alt["created_at"], str)
    assert len(alt["created_at"]) == 19


async def test_turns_are_numbered_per_branch(backend: Backend) -> None:
    session = await three_turns(backend)
    await session.create_branch_from_turn(2, "alt")
    await session.add_items(turn("alt two"))
    await session.add_items(turn("alt three"))
    await session.switch_to_branch("main")
    await session.add_items(turn("main four"))
    assert [t["turn"] for t in await session.get_conversation_turns()] == [1, 2, 3, 4]
    alt_turns = await session.get_conversation_turns(branch_id="alt")
    assert [(t["turn"], t["content"]) for t in alt_turns] == [
        (1, "capital of France?"),
        (2, "alt two"),
        (3, "alt three"),
    ]


async def test_branch_of_a_branch(backend: Backend) -> None:
    session = await three_turns(backend)
    await session.create_branch_from_turn(3, "alt")
    await session.add_items(turn("alt three"))
    await session.create_branch_from_turn(3, "alt-of-alt")
    assert await session.get_items() == [*turn("capital of France?"), *turn("weather there?")]


async def test_clear_by_another_instance_sends_branch_readers_back_to_main(
    backend: Backend,
) -> None:
    session = await three_turns(backend)
    await session.create_branch_from_turn(2, "alt")
    other = backend.session(session.session_id)
    await other.clear_session()
    await other.add_items(turn("fresh start"))
    assert await session.get_items() == turn("fresh start")
    await session.add_items(turn("continues on main"))
    assert [b["branch_id"] for b in await session.list_branches()] == ["main"]
