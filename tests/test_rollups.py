"""Usage rollups: grouped by the database, the same answers on every backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from agents import Agent
from sqlalchemy import Column, MetaData, Table, delete, insert

from tests.conftest import Backend
from tests.helpers import run_result, turn
from tests.usage_helpers import NamedModel, ask, hand_off, reply, set_usage_time, usage
from turnstore import InvalidArgumentError, cost
from turnstore.persistence import engines
from turnstore.persistence.models import DEFAULT_TABLES
from turnstore.persistence.rollups import Owners, offset_periods
from turnstore.persistence.types import IDENTIFIER, TABLE_OPTIONS
from turnstore.usage_report import UsageRow
from turnstore.usage_report import usage as rollup

OWNERS = Table(
    "test_owners",
    MetaData(),
    Column("session_id", IDENTIFIER, primary_key=True),
    Column("user_id", IDENTIFIER),
    **TABLE_OPTIONS,
)


@pytest.fixture(autouse=True)
def _no_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


async def build(backend: Backend) -> None:
    """Six turns over two users, three models, an unknown one and a branch.

    s1 (alice) main: turn 1 gpt-4o, Mon 2026-01-05 10:00 UTC; turn 2 handed off from
    gpt-4o-mini to o3 at 23:30 UTC (already Tuesday in Paris). s1 branch alt: its turn 2 on
    gpt-4o, Tue 08:00. s2 (bob) main: turn 1 gpt-4o, Mon 2026-01-12; turn 2 stored without a
    model record (as before this release), Sun 2026-02-01, with 40 cached tokens in the SDK's
    details only; turn 3 gpt-4o on 2026-03-29 22:30 UTC, already 03-30 in Paris (summer time).
    """
    s1, s2 = backend.session("s1"), backend.session("s2")
    await s1.add_items(turn("first"))
    await s1.store_run_usage(
        run_result(input_tokens=1000, output_tokens=100, cached_tokens=200), model="gpt-4o"
    )
    mini, o3 = NamedModel("gpt-4o-mini"), NamedModel("o3")
    billing = Agent(name="Billing", model=o3)
    triage = Agent(name="Triage", model=mini, handoffs=[billing])
    hand_off(mini, "billing", usage(500, 50))
    reply(o3, "Done.", usage(300, 40, reasoning=20))
    await ask(triage, s1, "second")
    await s1.create_branch_from_turn(2, "alt")
    await s1.add_items(turn("second, differently"))
    await s1.store_run_usage(run_result(input_tokens=700, output_tokens=70), model="gpt-4o")
    await s2.add_items(turn("bob"))
    await s2.store_run_usage(
        run_result(input_tokens=2000, output_tokens=300, cached_tokens=1000), model="gpt-4o"
    )
    await s2.add_items(turn("bob again"))
    await s2.store_run_usage(run_result(input_tokens=100, output_tokens=10, cached_tokens=40))
    await s2.add_items(turn("bob in spring"))
    await s2.store_run_usage(run_result(input_tokens=10, output_tokens=1), model="gpt-4o")
    tm = DEFAULT_TABLES.turn_models
    async with backend.engine.begin() as conn:
        await conn.execute(delete(tm).where(tm.c.session_id == "s2", tm.c.user_turn_number == 2))
        await conn.run_sync(OWNERS.create)
        await conn.execute(
            insert(OWNERS),
            [{"session_id": "s1", "user_id": "alice"}, {"session_id": "s2", "user_id": "bob"}],
        )
    for session_id, branch, number, when in [
        ("s1", "main", 1, utc(2026, 1, 5, 10)),
        ("s1", "main", 2, utc(2026, 1, 5, 23, 30)),
        ("s1", "alt", 2, utc(2026, 1, 6, 8)),
        ("s2", "main", 1, utc(2026, 1, 12, 9)),
        ("s2", "main", 2, utc(2026, 2, 1, 12)),
        ("s2", "main", 3, utc(2026, 3, 29, 22, 30)),
    ]:
        await set_usage_time(backend, session_id, branch, number, when)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Any]:
    await build(backend)
    handle = engines.acquire_for_engine(backend.engine)

    async def run(**options: Any) -> list[UsageRow]:
        options.setdefault("owners", Owners(OWNERS, "user_id"))
        return await rollup(handle, DEFAULT_TABLES, **options)

    yield run
    await engines.release(handle)


def counts(row: UsageRow) -> tuple[int, ...]:
    return (
        row.turns,
        row.requests,
        row.input_tokens,
        row.cached_tokens,
        row.output_tokens,
        row.reasoning_tokens,
        row.total_tokens,
    )


def by(rows: list[UsageRow], field: str) -> dict[Any, UsageRow]:
    return {getattr(row, field): row for row in rows}


# gpt-4o: $2.50 uncached, $1.25 cached, $10 output per million tokens.
GPT_4O = {
    "s1 turn 1": (800 * Decimal("2.5") + 200 * Decimal("1.25") + 100 * 10) / 1_000_000,
    "alt": (700 * Decimal("2.5") + 70 * 10) / 1_000_000,
    "s2 turn 1": (1000 * Decimal("2.5") + 1000 * Decimal("1.25") + 300 * 10) / 1_000_000,
    "s2 turn 3": (10 * Decimal("2.5") + 1 * 10) / 1_000_000,
}


async def test_totals_count_each_turn_once(store: Any) -> None:
    (total,) = await store(group_by=())
    # Requests: five single-request turns and the handed-off turn's two.
    assert counts(total) == (6, 7, 4610, 1240, 571, 20, 5181)
    assert total.cost is None
    assert total.cost_reason == cost.UNKNOWN_MODEL


async def test_by_model(store: Any) -> None:
    rows = by(await store(group_by=("model",)), "model")
    assert set(rows) == {"gpt-4o", "gpt-4o-mini", "o3", None}
    assert counts(rows["gpt-4o"]) == (4, 4, 3710, 1200, 471, 0, 4181)
    assert counts(rows["gpt-4o-mini"]) == (1, 1, 500, 0, 50, 0, 550)
    assert counts(rows["o3"]) == (1, 1, 300, 0, 40, 20, 340)
    # The turn without a model record: its cached tokens come from the SDK's details.
    assert counts(rows[None]) == (1, 1, 100, 40, 10, 0, 110)
    assert rows["gpt-4o"].cost == sum(GPT_4O.values())
    # $0.15 in, $0.60 out; o3 $2 in, $8 out.
    assert rows["gpt-4o-mini"].cost == (500 * Decimal("0.15") + 50 * Decimal("0.6")) / 1_000_000
    assert rows["o3"].cost == (300 * 2 + 40 * 8) / Decimal(1_000_000)
    assert (rows[None].cost, rows[None].cost_reason) == (None, cost.UNKNOWN_MODEL)


async def test_by_day_week_and_month_in_utc(store: Any) -> None:
    days = by(await store(group_by=("day",)), "period")
    assert {day: row.turns for day, row in days.items()} == {
        date(2026, 1, 5): 2,
        date(2026, 1, 6): 1,
        date(2026, 1, 12): 1,
        date(2026, 2, 1): 1,
        date(2026, 3, 29): 1,
    }
    assert days[date(2026, 1, 6)].cost == GPT_4O["alt"]
    weeks = by(await store(group_by="week"), "period")
    assert {week: row.turns for week, row in weeks.items()} == {
        date(2026, 1, 5): 3,
        date(2026, 1, 12): 1,
        date(2026, 1, 26): 1,  # Sunday 2026-02-01 is in the week of Monday 01-26
        date(2026, 3, 23): 1,
    }
    months = by(await store(group_by=["month"]), "period")
    assert {month: row.turns for month, row in months.items()} == {
        date(2026, 1, 1): 4,
        date(2026, 2, 1): 1,
        date(2026, 3, 1): 1,
    }


async def test_days_in_a_time_zone_follow_its_summer_time(store: Any) -> None:
    days = by(await store(group_by=("day",), tz="Europe/Paris"), "period")
    assert {day: row.turns for day, row in days.items()} == {
        date(2026, 1, 5): 1,
        date(2026, 1, 6): 2,  # 23:30 UTC is 00:30 in Paris (UTC+1)
        date(2026, 1, 12): 1,
        date(2026, 2, 1): 1,
        date(2026, 3, 30): 1,  # 22:30 UTC is 00:30 in Paris (UTC+2 since 03-29)
    }


async def test_a_time_range_and_a_session(store: Any) -> None:
    rows = await store(
        group_by=("session", "branch"), since=date(2026, 1, 6), until=date(2026, 1, 13)
    )
    assert [(row.session, row.branch, row.turns) for row in rows] == [
        ("s1", "alt", 1),
        ("s2", "main", 1),
    ]
    (only,) = await store(group_by=(), session_id="s1")
    assert counts(only)[0] == 3
    assert await store(group_by=(), since=utc(2030, 1, 1)) == []


async def test_by_user_and_for_one_user(store: Any) -> None:
    users = by(await store(group_by=("user", "model")), "user")
    assert set(users) == {"alice", "bob"}
    bob = [row for row in await store(group_by=("user", "model")) if row.user == "bob"]
    assert {(row.model, row.turns) for row in bob} == {("gpt-4o", 2), (None, 1)}
    (alice,) = await store(group_by=(), user_id="alice")
    assert alice.turns == 3
    expected = (
        GPT_4O["s1 turn 1"]
        + GPT_4O["alt"]
        + (500 * Decimal("0.15") + 50 * Decimal("0.6") + 300 * 2 + 40 * 8) / 1_000_000
    )
    assert alice.cost == expected


async def test_bad_arguments_are_refused_before_any_query(store: Any) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"group_by": ("year",)}, "group_by keys are"),
        ({"group_by": ("day", "week")}, "at most one of day, week and month"),
        ({"group_by": ("model", "model")}, "twice"),
        ({"tz": "Mars/Olympus"}, "IANA time zone"),
        ({"since": date(2026, 2, 1), "until": date(2026, 1, 1)}, "must be before"),
        ({"since": "yesterday"}, "since must be a datetime"),
        ({"user_id": 7}, "user_id must be a str"),
        ({"group_by": ("user",), "owners": None}, "owners"),
    ]
    for bad, message in cases:
        with pytest.raises(InvalidArgumentError, match=message):
            await store(**bad)


def test_offsets_follow_transitions_to_the_second() -> None:
    from zoneinfo import ZoneInfo

    periods = offset_periods(ZoneInfo("Europe/Paris"), utc(2026, 3, 1), utc(2026, 11, 1))
    assert periods == [
        (utc(2026, 3, 1), 3600),
        (utc(2026, 3, 29, 1), 7200),
        (utc(2026, 10, 25, 1), 3600),
    ]
    assert offset_periods(UTC, utc(2026, 1, 1), utc(2026, 1, 1) + timedelta(days=400)) == [
        (utc(2026, 1, 1), 0)
    ]


async def test_the_store_groups_by_the_owners_in_session_info(backend: Backend) -> None:
    from turnstore import Store

    for session_id, owner, model in (
        ("a1", "alice", "gpt-4o"),
        ("a2", "alice", "o3"),
        ("b1", "bob", "o3"),
        ("n1", None, "gpt-4o"),
    ):
        session = backend.session(session_id, user_id=owner)
        await session.add_items(turn(f"hello from {session_id}"))
        await session.store_run_usage(run_result(input_tokens=1000, output_tokens=100), model=model)
    async with Store(engine=backend.engine) as store:
        rows = await store.usage(group_by=("user", "model"))
        assert [(r.user, r.model, r.turns) for r in rows] == [
            ("alice", "gpt-4o", 1),
            ("alice", "o3", 1),
            ("bob", "o3", 1),
            (None, "gpt-4o", 1),
        ]
        (bob,) = await store.usage(group_by=(), user_id="bob")
        assert bob.cost == (1000 * 2 + 100 * 8) / Decimal(1_000_000)  # o3: $2 in, $8 out
        (alice,) = await store.usage(group_by="user", user_id="alice")
        assert (alice.user, alice.turns, alice.total_tokens) == ("alice", 2, 2200)
        hits = (await store.search("hello", user_id="alice")).hits
        assert sorted({hit.session_id for hit in hits}) == ["a1", "a2"]
        assert [node.branch_id for node in await store.branch_tree("b1")] == ["main"]
        assert await store.branch_tree("nobody") == []
