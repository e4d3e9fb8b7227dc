"""Which model served a turn: recorded by store_run_usage from the run, on every backend."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from agents import Agent, RunConfig
from agents.extensions.memory import AdvancedSQLiteSession as SDKSession
from agents.models import get_default_model
from agents.testing import ScriptedModel
from sqlalchemy import inspect as sqlalchemy_inspect

from tests.conftest import Backend
from tests.helpers import run_result, turn
from tests.usage_helpers import NamedModel, ask, hand_off, reply, usage
from turnstore import AdvancedSession, AdvancedSQLiteSession
from turnstore.errors import DistributionError
from turnstore.sdk.usage import model_name


@pytest.fixture(autouse=True)
def _no_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")


def share(
    model: str | None, i: int, o: int, *, cached: int = 0, reasoning: int = 0
) -> dict[str, Any]:
    return {
        "model": model,
        "requests": 1,
        "input_tokens": i,
        "cached_tokens": cached,
        "output_tokens": o,
        "reasoning_tokens": reasoning,
        "total_tokens": i + o,
    }


async def test_the_agents_model_name_is_recorded_with_its_tokens(backend: Backend) -> None:
    model = NamedModel("gpt-4o")
    agent = Agent(name="a", model=model)
    session = backend.session()
    reply(model, "Paris.", usage(120, 30, cached=100, reasoning=7))
    await ask(agent, session, "Capital of France?")
    reply(model, "Sunny.", usage(200, 10))
    await ask(agent, session, "Weather?")
    assert await session.get_turn_models() == {
        1: [share("gpt-4o", 120, 30, cached=100, reasoning=7)],
        2: [share("gpt-4o", 200, 10)],
    }
    # The SDK's own usage records are unchanged.
    assert await session.get_session_usage() == {
        "requests": 2,
        "input_tokens": 320,
        "output_tokens": 40,
        "total_tokens": 360,
        "total_turns": 2,
    }


async def test_a_handoff_records_each_model_with_its_share(backend: Backend) -> None:
    triage_model, billing_model = NamedModel("gpt-4o-mini"), NamedModel("o3")
    billing = Agent(name="Billing", model=billing_model)
    triage = Agent(name="Triage", model=triage_model, handoffs=[billing])
    hand_off(triage_model, "billing", usage(100, 10))
    reply(billing_model, "Refunded.", usage(300, 40, reasoning=25))
    session = backend.session()
    await ask(triage, session, "Refund my order")
    assert await session.get_turn_models() == {
        1: [share("gpt-4o-mini", 100, 10), share("o3", 300, 40, reasoning=25)]
    }


async def test_the_model_argument_overrides_and_storing_again_replaces(backend: Backend) -> None:
    model = NamedModel("gpt-4o")
    agent = Agent(name="a", model=model)
    session = backend.session()
    reply(model, "Hi.", usage(10, 2))
    result = await ask(agent, session, "Hello", model="my-finetune")
    assert await session.get_turn_models() == {1: [share("my-finetune", 10, 2)]}
    await session.store_run_usage(result)
    assert await session.get_turn_models() == {1: [share("gpt-4o", 10, 2)]}


async def test_a_run_config_model_wins_over_the_agents(backend: Backend) -> None:
    configured = NamedModel("gpt-4.1")
    agent = Agent(name="a", model=NamedModel("gpt-4o"))
    session = backend.session()
    reply(configured, "Hi.", usage(10, 2))
    config = RunConfig(model=configured)
    await ask(agent, session, "Hello", run={"run_config": config}, run_config=config)
    assert await session.get_turn_models() == {1: [share("gpt-4.1", 10, 2)]}


async def test_a_model_object_without_a_name_is_recorded_unknown(backend: Backend) -> None:
    model = ScriptedModel()
    agent = Agent(name="a", model=model)
    session = backend.session()
    reply(model, "Hi.", usage(10, 2))
    await ask(agent, session, "Hello")
    assert await session.get_turn_models() == {1: [share(None, 10, 2)]}


def test_model_names_resolve_as_the_sdk_resolves_them() -> None:
    assert model_name(Agent(name="a", model="gpt-4.1-mini")) == "gpt-4.1-mini"
    assert model_name(Agent(name="a", model=NamedModel("o4-mini"))) == "o4-mini"
    assert model_name(Agent(name="a")) == get_default_model()
    assert model_name(Agent(name="a", model="gpt-4o"), SimpleNamespace(model="gpt-5")) == "gpt-5"
    assert model_name(Agent(name="a", model=ScriptedModel())) is None


async def test_usage_without_responses_is_recorded_unknown(backend: Backend) -> None:
    # A result stand-in with usage only (as the SDK's own tests build them): no agent, no
    # responses, so nothing tells the model.
    session = backend.session()
    await session.add_items(turn("hi"))
    await session.store_run_usage(run_result(input_tokens=9, output_tokens=3))
    assert await session.get_turn_models() == {1: [share(None, 9, 3)]}


async def test_model_rows_go_with_their_turn_branch_and_session(backend: Backend) -> None:
    session = backend.session()
    await session.add_items(turn("one"))
    await session.store_run_usage(run_result(), model="gpt-4o")
    await session.add_items(turn("two"))
    await session.store_run_usage(run_result(), model="gpt-4o")
    await session.pop_item()
    assert set(await session.get_turn_models()) == {1, 2}  # turn 2 still has its user message
    await session.pop_item()
    assert set(await session.get_turn_models()) == {1}
    await session.create_branch_from_turn(1, "side")
    await session.add_items(turn("other"))
    await session.store_run_usage(run_result(), model="o3")
    assert set(await session.get_turn_models()) == {1}
    await session.delete_branch("side", force=True)
    assert await session.get_turn_models(branch_id="side") == {}
    await session.clear_session()
    assert await session.get_turn_models(branch_id="main") == {}


async def test_turns_stored_by_the_sdks_class_read_back_with_the_model_unknown(
    sqlite_path: Path,
) -> None:
    sdk: Any = SDKSession(session_id="s", db_path=sqlite_path, create_tables=True)
    await sdk.add_items(turn("from the sdk"))
    await sdk.store_run_usage(run_result(input_tokens=4))
    sdk.close()
    async with AdvancedSQLiteSession(session_id="s", db_path=sqlite_path, create_tables=True) as s:
        assert await s.get_turn_models() == {}
        await s.add_items(turn("from turnstore"))
        await s.store_run_usage(run_result(input_tokens=6), model="gpt-4o")
        assert await s.get_turn_models() == {2: [share("gpt-4o", 6, 5)]}
        await s.create_branch_from_turn(2, "alt")
    # The SDK's class still reads and writes the file that now holds turnstore's rows.
    sdk = SDKSession(session_id="s", db_path=sqlite_path)
    assert len(await sdk.get_items()) == 4
    await sdk.add_items(turn("sdk again"))
    await sdk.store_run_usage(run_result())
    assert sorted(b["branch_id"] for b in await sdk.list_branches()) == ["alt", "main"]
    await sdk.delete_branch("alt")
    await sdk.clear_session()
    sdk.close()
    with sqlite3.connect(sqlite_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


async def test_migration_0007_down_and_up_keeps_the_conversation(backend: Backend) -> None:
    from tests.migration_helpers import engine_drift
    from turnstore.persistence.models import DEFAULT_TABLES
    from turnstore.schema import migrate

    await migrate.upgrade(backend.engine)
    session = backend.session("kept", create_tables=False)
    await session.add_items(turn("one"))
    await session.store_run_usage(run_result(input_tokens=7), model="gpt-4o")
    await session.add_items(turn("two"))
    await session.create_branch_from_turn(2, "side")
    assert (await session.branch_tree())[0].children[0].origin == "recorded"
    before = (await session.get_items(branch_id="main"), await session.get_session_usage())

    await migrate.downgrade(backend.engine, "0005")
    async with backend.engine.connect() as conn:
        names = set(await conn.run_sync(lambda sync: sqlalchemy_inspect(sync).get_table_names()))
    assert DEFAULT_TABLES.turn_models.name not in names
    assert DEFAULT_TABLES.lineage.name not in names
    if backend.name == "citus":
        # Below 0008 the tables went back onto the coordinator, rows and all; upgrading never
        # moves rows into shards on its own (a long, table-locking copy is always explicit),
        # so on a cluster the way back up is db distribute, which upgrades to head too.
        with pytest.raises(DistributionError, match="turnstore db distribute"):
            await migrate.upgrade(backend.engine)
        await migrate.distribute(backend.engine)
    else:
        await migrate.upgrade(backend.engine)
    assert await engine_drift(backend.engine) == []
    engine = backend.new_engine()  # a process started after the upgrade
    try:
        again = AdvancedSession(session_id="kept", engine=engine)
        assert (await again.get_items(branch_id="main"), await again.get_session_usage()) == before
        assert await again.get_turn_models(branch_id="main") == {}  # model unknown again
        tree = await again.branch_tree()  # lineage inferred from the shared items
        assert (tree[0].children[0].branch_id, tree[0].children[0].origin) == ("side", "inferred")
        await again.aclose()
    finally:
        await engine.dispose()
