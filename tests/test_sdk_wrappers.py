"""turnstore under the SDK's own session wrappers, driven by the real Runner and ScriptedModel.

``OpenAIResponsesCompactionSession`` gets a local fake client (no network) whose ``compact``
keeps the user messages it is sent and appends one compaction item, as the Responses API does.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from agents import Agent, RunConfig, Runner
from agents.extensions.memory import EncryptedSession as SDKEncryptedSession
from agents.memory import SessionSettings
from agents.memory.session import _session_accepts_wrapper
from agents.testing import ModelStep, ScriptedModel, assistant_message
from cryptography.fernet import Fernet, InvalidToken

from tests.conftest import Backend
from tests.fake_compaction import compacting, summary
from tests.helpers import run_result, turn, user
from turnstore import AdvancedSession, AdvancedSQLiteSession, Store
from turnstore.sdk.encrypted import EncryptedSession
from turnstore.sdk.wrapper_hooks import SDK_VERSIONS_CHECKED


@pytest.fixture(autouse=True)
def _no_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")


def replies(count: int) -> ScriptedModel:
    return ScriptedModel(
        [ModelStep(output=[assistant_message(f"answer {i}")]) for i in range(count)]
    )


async def branched(backend: Backend) -> AdvancedSession:
    """Main with three turns and usage on each; current branch ``alt`` forked before turn 3."""
    session = backend.session()
    for number in (1, 2, 3):
        await session.add_items(turn(f"main {number}"))
        await session.store_run_usage(run_result(input_tokens=10 * number))
    await session.create_branch_from_turn(3, "alt")
    await session.store_run_usage(run_result(input_tokens=7))
    return session


async def snapshot_of_store(session: AdvancedSession) -> dict[str, Any]:
    """Everything compaction of the current branch must leave alone."""
    return {
        "main": await session.get_items(branch_id="main"),
        "main_turns": await session.get_turn_usage(branch_id="main"),
        "usage": await session.get_session_usage(),
        "alt_usage": await session.get_turn_usage(branch_id="alt"),
    }


def test_the_sdk_version_was_checked() -> None:
    from agents.version import __version__

    assert __version__ in SDK_VERSIONS_CHECKED


async def test_automatic_compaction_replaces_the_current_branch_only(backend: Backend) -> None:
    session = await branched(backend)
    kept = await snapshot_of_store(session)
    compaction, responses = compacting(session)
    agent = Agent(name="a", model=replies(2))

    await Runner.run(agent, "alt question", session=compaction)

    assert len(responses.calls) == 1
    assert session.current_branch_id == "alt"
    expected = [user("main 1"), user("main 2"), user("alt question"), summary(1)]
    assert await session.get_items() == expected
    assert await snapshot_of_store(session) == kept
    # Turns are numbered as if the summary had been appended to an empty branch.
    turns = await session.get_conversation_turns()
    assert [(t["turn"], t["content"]) for t in turns] == [
        (1, "main 1"),
        (2, "main 2"),
        (3, "alt question"),
    ]
    assert list((await session.get_conversation_by_turns()).items()) == [
        (1, [{"type": "user", "tool_name": None}]),
        (2, [{"type": "user", "tool_name": None}]),
        (3, [{"type": "user", "tool_name": None}, {"type": "compaction", "tool_name": None}]),
    ]
    branches = {b["branch_id"]: b["message_count"] for b in await session.list_branches()}
    assert branches == {"main": 6, "alt": 4}

    # The next run sees the compacted history.
    await Runner.run(agent, "follow-up", session=compaction)
    model = cast(ScriptedModel, agent.model)
    assert model.calls[1].input[:4] == expected


async def test_a_partial_suffix_keeps_the_items_the_model_did_not_see(backend: Backend) -> None:
    session = await branched(backend)
    kept = await snapshot_of_store(session)
    compaction, responses = compacting(session)
    agent = Agent(name="a", model=replies(1))
    # The model sees the newest two stored items only, so only they and the run's items are
    # compacted; the older items stay, numbered as before.
    limited = RunConfig(session_settings=SessionSettings(limit=2))

    await Runner.run(agent, "alt question", session=compaction, run_config=limited)

    sent = responses.calls[0]["input"]
    assert [item.get("role") for item in sent] == ["user", "assistant", "user", "assistant"]
    assert (sent[0]["content"], sent[2]["content"]) == ("main 2", "alt question")
    items = await session.get_items()
    assert items == [*turn("main 1"), user("main 2"), user("alt question"), summary(1)]
    turns = await session.get_conversation_turns()
    assert [t["turn"] for t in turns] == [1, 2, 3]
    assert await snapshot_of_store(session) == kept


async def test_manual_compaction_replaces_the_current_branch_atomically(backend: Backend) -> None:
    session = await branched(backend)
    await session.add_items(turn("alt 3"))
    kept = await snapshot_of_store(session)
    info = await session.get_info()
    compaction, responses = compacting(session)

    await compaction.run_compaction({"force": True})

    # The store lists the session as just written; its main branch is as it was.
    after = await session.get_info()
    assert info is not None
    assert after is not None
    assert after.last_activity > info.last_activity
    assert (after.items, after.branches) == (info.items, info.branches)

    assert responses.calls[0]["input"] == [*turn("main 1"), *turn("main 2"), *turn("alt 3")]
    assert await session.get_items() == [user("main 1"), user("main 2"), user("alt 3"), summary(1)]
    assert await snapshot_of_store(session) == kept
    assert session.current_branch_id == "alt"


async def test_suffix_replacement_refuses_after_another_writer(backend: Backend) -> None:
    session = await branched(backend)
    other = backend.session(session.session_id)
    await other.switch_to_branch("alt")
    before = await session.get_items()

    snapshot = await session._get_compaction_snapshot(10)
    assert snapshot.complete
    assert snapshot.items == before
    await other.add_items([user("late")])
    assert await snapshot.replace_suffix(0, [summary(1)]) is False
    assert await session.get_items() == [*before, user("late")]

    snapshot = await session._get_compaction_snapshot(2)
    assert not snapshot.complete
    assert await other.pop_item() == user("late")
    await other.add_items([user("late")])  # same content, a different row
    assert await snapshot.replace_suffix(0, [summary(1)]) is False

    snapshot = await session._get_compaction_snapshot(2)
    await other.clear_session()
    assert await snapshot.replace_suffix(0, [summary(1)]) is False
    assert await session.get_items(branch_id="main") == []

    # An unchanged branch is replaced from the given index on.
    await session.add_items(turn("again"))
    snapshot = await session._get_compaction_snapshot(2)
    assert await snapshot.replace_suffix(1, [summary(2)]) is True
    assert await session.get_items() == [user("again"), summary(2)]
    assert await snapshot.replace_suffix(1, [summary(3)]) is False  # stale now
    await other.aclose()


async def test_replacement_racing_an_append_loses_nothing(backend: Backend) -> None:
    session = backend.session()
    # A second engine, as another process would have: the two writers really race.
    engine = backend.new_engine()
    other = AdvancedSession(session_id=session.session_id, engine=engine)
    await session.add_items(turn("start"))
    for round_number in range(8):
        before = await session.get_items()
        snapshot = await session._get_compaction_snapshot(len(before))
        late = user(f"late {round_number}")
        replaced, _ = await asyncio.gather(
            snapshot.replace_suffix(0, [summary(round_number)]), other.add_items([late])
        )
        after = await session.get_items()
        # Either the replacement came first and the append followed it, or the append came
        # first and the replacement refused: never a lost append, never half of either.
        assert after in ([summary(round_number), late], [*before, late]), (replaced, after)
        assert replaced == (after[0] == summary(round_number))
        turns = [t["turn"] for t in await session.get_conversation_turns()]
        assert turns == list(range(1, len(turns) + 1))
    await other.aclose()
    await engine.dispose()


async def test_replacement_may_prune_the_oldest_items(backend: Backend) -> None:
    session = backend.session()
    old = [{"role": "user", "content": f"old {i}", "expired": True} for i in range(5)]
    await session.add_items(old)
    await session.add_items([user("kept"), {"role": "user", "content": "old too", "expired": True}])
    await session.add_items(turn("new"))

    snapshot = await session._get_compaction_snapshot(
        2, prune_prefix=lambda item: bool(item.get("expired"))
    )
    assert await snapshot.replace_suffix(0, [summary(1)]) is True
    # The expired items before the first kept one went, in batches of the snapshot's size.
    assert await session.get_items() == [
        user("kept"),
        {"role": "user", "content": "old too", "expired": True},
        summary(1),
    ]


async def test_encrypted_compacted_session_under_the_runner(backend: Backend) -> None:
    session = await branched(backend)
    # Encryption starts on a fresh branch (envelopes have no role, so they open no turns).
    kept_alt = await session.get_items()
    await session.create_branch_from_turn(1, "sealed")
    kept = await snapshot_of_store(session)
    compaction, responses = compacting(session)
    key = Fernet.generate_key().decode()
    encrypted = SDKEncryptedSession(session.session_id, cast(Any, compaction), key, ttl=3600)
    agent = Agent(name="a", model=replies(2))

    await Runner.run(agent, "secret question", session=encrypted)
    await Runner.run(agent, "secret follow-up", session=encrypted)

    # The compaction API saw plaintext; the store holds only envelopes of the result.
    assert responses.calls[-1]["input"][0] == {"content": "secret question", "role": "user"}
    stored = await session.get_items()
    assert stored
    assert all(item.get("__enc__") == 1 for item in stored)
    assert "secret" not in str(stored)
    expected = [
        {"content": "secret question", "role": "user"},
        {"content": "secret follow-up", "role": "user"},
        summary(2),
    ]
    assert await encrypted.get_items() == expected
    assert await encrypted.get_items(limit=2) == expected[1:]
    assert await session.get_items(branch_id="alt") == kept_alt
    assert await snapshot_of_store(session) == kept


async def test_compaction_under_encryption_reclaims_expired_envelopes(backend: Backend) -> None:
    session = await branched(backend)
    await session.create_branch_from_turn(1, "sealed")
    kept = await snapshot_of_store(session)
    compaction, _responses = compacting(session)
    encrypted: Any = SDKEncryptedSession(
        session.session_id, cast(Any, compaction), Fernet.generate_key().decode(), ttl=60
    )
    long_ago = int(time.time()) - 3600
    expired = [
        {"__enc__": 1, "v": 1, "kid": "hkdf-v1", "payload": token.decode()}
        for token in (
            encrypted.cipher.encrypt_at_time(json.dumps(user(f"old {i}")).encode(), long_ago)
            for i in range(5)
        )
    ]
    await session.add_items(expired)
    assert await encrypted.get_items() == []
    agent = Agent(name="a", model=replies(1))

    await Runner.run(agent, "new question", session=encrypted)

    assert await encrypted.get_items() == [{"content": "new question", "role": "user"}, summary(1)]
    assert len(await session.get_items()) == 2  # the expired envelopes are gone
    assert await snapshot_of_store(session) == kept


async def test_encrypted_session_round_trips_and_limits(backend: Backend) -> None:
    # The SDK annotates underlying_session as its SessionABC; turnstore follows the protocol.
    session: Any = backend.session()
    key = Fernet.generate_key().decode()
    encrypted = SDKEncryptedSession(session.session_id, session, key)
    agent = Agent(name="a", model=replies(2))

    await Runner.run(agent, "first", session=encrypted)
    await Runner.run(agent, "second", session=encrypted)

    model = cast(ScriptedModel, agent.model)
    assert [item.get("content") for item in model.calls[1].input][:1] == ["first"]
    items = await encrypted.get_items()
    assert [item.get("content") for item in items if item.get("role") == "user"] == [
        "first",
        "second",
    ]
    assert await encrypted.get_items(limit=2) == items[-2:]
    # Unreadable rows (another key) do not count towards the limit.
    other_key: Any = SDKEncryptedSession(
        session.session_id, session, Fernet.generate_key().decode()
    )
    await other_key.add_items([user("foreign")])
    assert await encrypted.get_items(limit=2) == items[-2:]
    assert await encrypted.get_items(limit=1) == items[-1:]


@pytest.mark.parametrize("key_kind", ["sdk class", "turnstore class"])
async def test_pops_of_unreadable_items(backend: Backend, key_kind: str) -> None:
    session: Any = backend.session()
    key = Fernet.generate_key().decode()
    cls = SDKEncryptedSession if key_kind == "sdk class" else EncryptedSession
    encrypted: Any = cls(session.session_id, session, key)
    foreign: Any = cls(session.session_id, session, Fernet.generate_key().decode())
    await encrypted.add_items([user("mine")])
    await foreign.add_items([user("theirs")])

    if cls is SDKEncryptedSession:
        # The SDK's class authenticates before deleting only over its plain SQLiteSession:
        # over turnstore (as over its own AdvancedSQLiteSession) it discards the foreign item.
        assert await encrypted.pop_item() == user("mine")
        assert await session.get_items() == []
        return
    # turnstore's subclass leaves an item that does not authenticate where it is.
    with pytest.raises(InvalidToken):
        await encrypted.pop_item()
    assert len(await session.get_items()) == 2
    assert await foreign.pop_item() == user("theirs")
    assert await encrypted.pop_item() == user("mine")
    assert await encrypted.pop_item() is None


async def test_validated_pop_rolls_back_what_it_refuses(backend: Backend) -> None:
    session = backend.session()
    await session.add_items(turn("one"))
    await session.store_run_usage(run_result(input_tokens=3))

    def refuse(item: Any) -> None:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        await session._pop_item_with_validation(refuse)
    assert await session.get_items() == turn("one")
    assert await session._pop_item_with_validation(lambda item: None) == turn("one")[1]
    assert await session.get_session_usage() is not None


# -- the run context ----------------------------------------------------------------------


@dataclass
class Tenant:
    name: str


async def test_runner_passes_its_context_and_a_router_uses_it(
    backend: Backend, tmp_path: Any
) -> None:
    conversation = f"c-{uuid.uuid4().hex[:8]}"
    # Tenant "acme" lives on the backend's database, tenant "globex" in a SQLite file of its
    # own: the same conversation id, two stores.
    tenants = {
        "acme": backend.session(conversation),
        "globex": AdvancedSession(
            session_id=conversation,
            url=f"sqlite+aiosqlite:///{tmp_path / 'globex.db'}",
            create_tables=True,
        ),
    }
    seen: list[Any] = []

    def by_tenant(wrapper: Any) -> AdvancedSession:
        seen.append(wrapper)
        return tenants[wrapper.context.name]

    front = backend.session(f"front-{conversation}", session_for_context=by_tenant)
    assert _session_accepts_wrapper(front)
    agent = Agent(name="a", model=replies(3))

    await Runner.run(agent, "hi from acme", session=front, context=Tenant("acme"))
    result = await Runner.run(agent, "hi from globex", session=front, context=Tenant("globex"))
    await front.store_run_usage(result)

    assert seen
    assert all(wrapper.context.name in tenants for wrapper in seen)
    acme, globex = tenants["acme"], tenants["globex"]
    assert next(item.get("content") for item in await acme.get_items()) == "hi from acme"
    assert next(item.get("content") for item in await globex.get_items()) == "hi from globex"
    assert await globex.get_session_usage() is not None
    assert await acme.get_session_usage() is None
    # Calls without a run context are this session's own.
    assert await front.get_items() == []
    await front.add_items([user("direct")])
    assert await front.get_items() == [user("direct")]
    assert len(await acme.get_items()) == 2
    await globex.aclose()


async def test_without_a_router_the_run_context_is_ignored(backend: Backend) -> None:
    session = backend.session()
    agent = Agent(name="a", model=replies(1))
    await Runner.run(agent, "hello", session=session, context=Tenant("acme"))
    assert (await session.get_items())[0] == {"content": "hello", "role": "user"}
    assert await session.pop_item(wrapper=object()) is not None
    await session.clear_session(wrapper=object())
    assert await session.get_items(wrapper=object()) == []


async def test_the_drop_in_under_the_wrappers(sqlite_path: Path) -> None:
    """The drop-in runs its writes on turnstore's own SQLite writer thread: the same hooks."""
    session: Any = AdvancedSQLiteSession(session_id="s", db_path=sqlite_path, create_tables=True)
    for number in (1, 2):
        await session.add_items(turn(f"main {number}"))
        await session.store_run_usage(run_result(input_tokens=number))
    await session.create_branch_from_turn(2, "alt")
    usage = await session.get_session_usage()
    compaction, _responses = compacting(session)
    agent = Agent(name="a", model=replies(1))

    await Runner.run(agent, "alt question", session=compaction)

    assert session._current_branch_id == "alt"
    assert await session.get_items() == [user("main 1"), user("alt question"), summary(1)]
    assert await session.get_items(branch_id="main") == [*turn("main 1"), *turn("main 2")]
    assert await session.get_session_usage() == usage

    key = Fernet.generate_key().decode()
    encrypted: Any = EncryptedSession("s", session, key)
    foreign: Any = EncryptedSession("s", session, Fernet.generate_key().decode())
    await encrypted.add_items([user("mine")])
    await foreign.add_items([user("theirs")])
    with pytest.raises(InvalidToken):
        await encrypted.pop_item()
    assert await foreign.pop_item() == user("theirs")
    assert await encrypted.pop_item() == user("mine")
    await session.aclose()


async def test_a_store_routes_each_tenant_to_its_own_store(
    backend: Backend, tmp_path: Path
) -> None:
    """One store per tenant; the front session comes from a store as well."""
    acme = Store(engine=backend.engine, create_tables=True)
    globex = Store(url=f"sqlite+aiosqlite:///{tmp_path / 'globex.db'}", create_tables=True)
    stores = {"acme": acme, "globex": globex}
    sessions: dict[str, AdvancedSession] = {}

    def tenant_session(wrapper: Any) -> AdvancedSession:
        name = wrapper.context.name
        if name not in sessions:
            sessions[name] = stores[name].session("conversation", user_id=name)
        return sessions[name]

    front = acme.session("front", session_for_context=tenant_session)
    agent = Agent(name="a", model=replies(2))

    await Runner.run(agent, "hello from globex", session=front, context=Tenant("globex"))

    info = await globex.get_session_info("conversation")
    assert info is not None
    assert (info.user_id, info.user_turns) == ("globex", 1)
    assert await acme.get_session_info("conversation") is None
    for session in [front, *sessions.values()]:
        await session.aclose()
    await acme.aclose()
    await globex.aclose()
