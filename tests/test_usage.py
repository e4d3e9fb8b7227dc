"""Per-turn usage: store_run_usage, get_session_usage, get_turn_usage."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from tests.conftest import Backend
from tests.helpers import function_call, function_output, run_result, turn, user
from turnstore import InvalidArgumentError


async def test_usage_goes_to_the_latest_user_turn(backend: Backend) -> None:
    session = backend.session()
    await session.add_items([user("one")])
    await session.add_items([function_call("f"), function_output()])
    await session.store_run_usage(run_result(requests=2, input_tokens=30, output_tokens=12))
    await session.add_items(turn("two"))
    await session.store_run_usage(run_result(requests=1, input_tokens=7, output_tokens=3))
    assert await session.get_turn_usage() == [
        {
            "user_turn_number": 1,
            "requests": 2,
            "input_tokens": 30,
            "output_tokens": 12,
            "total_tokens": 42,
            "input_tokens_details": {
                "cached_tokens": 0,
                "cache_write_tokens": 0,
                "cache_write_tokens_details": None,
            },
            "output_tokens_details": {"reasoning_tokens": 0},
        },
        {
            "user_turn_number": 2,
            "requests": 1,
            "input_tokens": 7,
            "output_tokens": 3,
            "total_tokens": 10,
            "input_tokens_details": {
                "cached_tokens": 0,
                "cache_write_tokens": 0,
                "cache_write_tokens_details": None,
            },
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    ]
    assert await session.get_session_usage() == {
        "requests": 3,
        "input_tokens": 37,
        "output_tokens": 15,
        "total_tokens": 52,
        "total_turns": 2,
    }


async def test_storing_twice_replaces_never_double_counts(backend: Backend) -> None:
    session = backend.session()
    await session.add_items(turn("one"))
    await session.store_run_usage(run_result(input_tokens=100, output_tokens=1))
    await session.store_run_usage(run_result(input_tokens=5, output_tokens=5, cached_tokens=3))
    usage = await session.get_turn_usage(1)
    assert usage == {
        "requests": 1,
        "input_tokens": 5,
        "output_tokens": 5,
        "total_tokens": 10,
        "input_tokens_details": {
            "cached_tokens": 3,
            "cache_write_tokens": 0,
            "cache_write_tokens_details": None,
        },
        "output_tokens_details": {"reasoning_tokens": 0},
    }
    session_usage = await session.get_session_usage()
    assert session_usage is not None
    assert session_usage["total_tokens"] == 10
    assert session_usage["total_turns"] == 1


async def test_usage_is_per_branch(backend: Backend) -> None:
    session = backend.session()
    await session.add_items(turn("one"))
    await session.store_run_usage(run_result(input_tokens=10, output_tokens=0))
    await session.add_items(turn("two"))
    await session.store_run_usage(run_result(input_tokens=20, output_tokens=0))
    await session.create_branch_from_turn(2, "alt")
    await session.add_items(turn("alt two"))
    await session.store_run_usage(run_result(input_tokens=40, output_tokens=0))

    alt = await session.get_turn_usage()
    assert isinstance(alt, list)
    assert [(r["user_turn_number"], r["input_tokens"]) for r in alt] == [(2, 40)]
    main = await session.get_turn_usage(branch_id="main")
    assert isinstance(main, list)
    assert [(r["user_turn_number"], r["input_tokens"]) for r in main] == [(1, 10), (2, 20)]
    all_branches = await session.get_session_usage()
    main_only = await session.get_session_usage(branch_id="main")
    assert all_branches is not None
    assert main_only is not None
    assert (all_branches["input_tokens"], all_branches["total_turns"]) == (70, 3)
    assert (main_only["input_tokens"], main_only["total_turns"]) == (30, 2)


async def test_no_usage_gives_none_and_empty_shapes(backend: Backend) -> None:
    session = backend.session()
    assert await session.get_session_usage() is None
    assert await session.get_turn_usage() == []
    assert await session.get_turn_usage(1) == {}
    await session.add_items(turn("one"))
    assert await session.get_session_usage() is None


async def test_usage_without_items_is_not_stored(backend: Backend) -> None:
    session = backend.session()
    await session.store_run_usage(run_result())
    assert await session.get_session_usage() is None


async def test_missing_usage_is_ignored(backend: Backend) -> None:
    session = backend.session()
    await session.add_items(turn("one"))
    await session.store_run_usage(SimpleNamespace(context_wrapper=SimpleNamespace(usage=None)))
    assert await session.get_session_usage() is None


async def test_failures_are_logged_never_raised(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    session = backend.session()
    await session.add_items(turn("one"))
    with caplog.at_level(logging.ERROR, logger="turnstore"):
        await session.store_run_usage(object())
    assert "Failed to store session usage" in caplog.text
    session.close()
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="turnstore"):
        await session.store_run_usage(run_result())
    assert "Failed to store session usage" in caplog.text


async def test_custom_logger_receives_failures(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("my_app.sessions")
    session = backend.session(logger=logger)
    with caplog.at_level(logging.ERROR, logger="my_app.sessions"):
        await session.store_run_usage(object())
    assert [r.name for r in caplog.records] == ["my_app.sessions"]


async def test_popping_a_whole_turn_drops_its_usage(backend: Backend) -> None:
    session = backend.session()
    await session.add_items(turn("one"))
    await session.add_items(turn("two"))
    await session.store_run_usage(run_result())
    await session.pop_item()
    assert await session.get_turn_usage(2) != {}  # the user message is still there
    await session.pop_item()
    assert await session.get_turn_usage(2) == {}
    usage = await session.get_session_usage()
    assert usage is None


async def test_clear_session_drops_usage(backend: Backend) -> None:
    session = backend.session()
    await session.add_items(turn("one"))
    await session.store_run_usage(run_result())
    await session.clear_session()
    assert await session.get_session_usage() is None


async def test_usage_after_another_instance_cleared_is_skipped(backend: Backend) -> None:
    session = backend.session()
    await session.add_items(turn("one"))
    other = backend.session(session.session_id)
    await other.clear_session()
    await other.add_items(turn("new history"))
    # This instance last saw the history before the clear: its run's usage belongs to it.
    await session.store_run_usage(run_result())
    assert await other.get_session_usage() is None


@pytest.mark.parametrize("bad", [True, "1", 1.5])
async def test_turn_number_type_is_checked(backend: Backend, bad: object) -> None:
    session = backend.session()
    with pytest.raises(InvalidArgumentError, match="user_turn_number must be an int"):
        await session.get_turn_usage(bad)  # type: ignore[arg-type]
