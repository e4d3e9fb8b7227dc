"""Store-wide search and per-turn costs, on every backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from tests.conftest import Backend
from tests.helpers import function_call, function_output, run_result, turn, user
from turnstore import InvalidArgumentError, cost
from turnstore.persistence import engines
from turnstore.persistence.models import DEFAULT_TABLES
from turnstore.search import SearchPage, search


@pytest.fixture
async def find(backend: Backend) -> AsyncIterator[Any]:
    handle = engines.acquire_for_engine(backend.engine)

    async def run(term: object, **options: Any) -> SearchPage:
        return await search(handle, DEFAULT_TABLES, term, **options)

    yield run
    await engines.release(handle)


async def test_search_finds_text_across_sessions_newest_first(backend: Backend, find: Any) -> None:
    a, b = backend.session("a"), backend.session("b")
    await a.add_items(turn("Where is 100% of the café's revenue?"))
    await a.add_items([user("weather?"), function_call("get_weather", city="Lyon")])
    await a.add_items([function_output(output="Rain in Lyon")])
    await b.add_items(turn("Lyon or Paris?"))
    await a.create_branch_from_turn(2, "alt")

    page = await find("lyon")
    assert [(h.session_id, h.kind) for h in page.hits] == [
        ("b", "assistant"),
        ("b", "user"),
        ("a", "function_call_output"),
    ]
    assert page.hits[2].branches == ["main"]
    assert page.hits[2].turn == 2
    assert page.next_cursor is None
    # Literal matching: % is a plain character; text in JSON keys does not match.
    found = (await find("100% OF")).hits
    assert [h.kind for h in found] == ["assistant", "user"]
    hit = found[1]
    assert hit.snippet == "Where is 100% of the café's revenue?"
    assert hit.branches == ["main", "alt"]
    assert (await find("role")).hits == []
    assert (await find("city")).hits == []  # a key of the tool call, not its text
    assert [h.snippet for h in (await find("_")).hits] == ["get_weather"]  # not a wildcard


async def test_search_pages_by_cursor_and_refuses_foreign_ones(backend: Backend, find: Any) -> None:
    session = backend.session("s")
    for number in range(5):
        await session.add_items([user(f"needle {number}")])
    seen: list[str] = []
    cursor = None
    while True:
        page = await find("needle", limit=2, cursor=cursor)
        seen += [h.snippet for h in page.hits]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == [f"needle {n}" for n in (4, 3, 2, 1, 0)]
    first = await find("needle", limit=2)
    for bad in (
        {"cursor": "garbage"},
        {"cursor": 17},
        {"cursor": first.next_cursor, "term": "other"},
        {"limit": 0},
        {"limit": True},
        {"term": "  "},
        {"term": None},
        {"user_id": "u1"},  # no owners table yet
    ):
        term = bad.pop("term", "needle")
        with pytest.raises(InvalidArgumentError):
            await find(term, **bad)


async def test_turn_costs_price_each_model_at_the_turns_time(backend: Backend) -> None:
    session = backend.session()
    await session.add_items(turn("one"))
    await session.store_run_usage(
        run_result(input_tokens=3000, output_tokens=800, cached_tokens=1000), model="gpt-4o"
    )
    await session.add_items(turn("two"))
    await session.store_run_usage(run_result(input_tokens=10, output_tokens=1), model="nope-9")
    await session.add_items(turn("three"))
    costs = await session.get_turn_costs()
    assert set(costs) == {1, 2}
    assert costs[1]["cost_usd"] == Decimal("0.01425")  # 2,000 x 2.50 + 1,000 x 1.25 + 800 x 10
    assert costs[1]["cost_reason"] is None
    assert [m["model"] for m in costs[1]["models"]] == ["gpt-4o"]
    assert costs[2]["cost_usd"] is None
    assert costs[2]["cost_reason"] == "no price is known for model 'nope-9'"
    by_turn = await session.get_items_by_turn()
    assert sorted(by_turn) == [1, 2, 3]
    assert [item.get("role") for item in by_turn[3]] == ["user", "assistant"]


async def test_without_the_extra_turn_costs_are_none(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cost, "_calc", lambda: None)
    session = backend.session()
    await session.add_items(turn("one"))
    await session.store_run_usage(run_result(), model="gpt-4o")
    assert (await session.get_turn_costs())[1]["cost_reason"] == cost.NO_EXTRA
