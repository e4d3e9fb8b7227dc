"""The documented workflows, end to end through the SDK's real Runner and ScriptedModel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from agents import Agent, Runner, function_tool
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
from agents.usage import Usage

from tests.conftest import Backend
from turnstore import AdvancedSession, AdvancedSQLiteSession


@pytest.fixture(autouse=True)
def _no_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")


def usage(input_tokens: int, output_tokens: int) -> Usage:
    return Usage(
        requests=1,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
    )


def support_agent(model: ScriptedModel) -> Agent[Any]:
    @function_tool
    def check_order_status(order_id: str) -> str:
        """Check the status of a customer order."""
        if order_id == "ORD-123":
            return "Order shipped on Dec 15, arriving Dec 20"
        return "Order not found"

    return Agent(
        name="Support Agent",
        instructions="Help customers with order inquiries.",
        model=model,
        tools=[check_order_status],
    )


async def ask(agent: Agent[Any], session: AdvancedSession, text: str) -> Any:
    result = await Runner.run(agent, text, session=session)
    await session.store_run_usage(result)
    return result


async def test_support_conversation_with_tool_usage_and_branching(backend: Backend) -> None:
    model = ScriptedModel(
        [
            ModelStep(
                output=[function_call("check_order_status", {"order_id": "ORD-123"}, call_id="c1")],
                usage=usage(120, 20),
            ),
            ModelStep(output=[assistant_message("It shipped Dec 15.")], usage=usage(150, 17)),
            ModelStep(output=[assistant_message("Standard costs $20 less.")], usage=usage(90, 10)),
            ModelStep(output=[assistant_message("It already shipped.")], usage=usage(80, 12)),
        ]
    )
    agent = support_agent(model)
    session = backend.session()

    first = await ask(agent, session, "What's the status of order ORD-123?")
    assert first.final_output == "It shipped Dec 15."
    await ask(agent, session, "What if I had chosen standard shipping?")

    # The model saw the whole history on the second run.
    second_input = model.calls[2].input
    assert [item.get("role") or item.get("type") for item in second_input] == [
        "user",
        "function_call",
        "function_call_output",
        "assistant",
        "user",
    ]

    assert await session.get_tool_usage() == [("check_order_status", 1, 1)]
    turns = await session.get_turn_usage()
    assert isinstance(turns, list)
    assert [(t["user_turn_number"], t["requests"], t["total_tokens"]) for t in turns] == [
        (1, 2, 307),
        (2, 1, 100),
    ]

    available = await session.get_conversation_turns()
    assert [t["content"] for t in available] == [
        "What's the status of order ORD-123?",
        "What if I had chosen standard shipping?",
    ]
    branch = await session.create_branch_from_turn(2)
    await ask(agent, session, "Actually, can I change the shipping address?")
    assert len(await session.get_items()) == 6
    await session.switch_to_branch("main")
    assert len(await session.get_items()) == 6
    await session.switch_to_branch(branch)
    items = await session.get_items()
    assert items[4]["content"] == "Actually, can I change the shipping address?"

    totals = await session.get_session_usage()
    assert totals == {
        "requests": 4,
        "input_tokens": 440,
        "output_tokens": 59,
        "total_tokens": 499,
        "total_turns": 3,
    }
    model.assert_complete()


async def test_documented_branch_workflow(backend: Backend) -> None:
    answers = ["Paris.", "Sunny.", "The Louvre.", "About 150 euros a day."]
    model = ScriptedModel(
        [ModelStep(output=[assistant_message(a)], usage=usage(10, 2)) for a in answers]
    )
    agent = Agent(name="Assistant", instructions="Reply very concisely.", model=model)
    session = backend.session()

    await ask(agent, session, "What's the capital of France?")
    await ask(agent, session, "What's the weather like there?")
    branch_id = await session.create_branch_from_turn(2, "weather_focus")
    await ask(agent, session, "What are the main tourist attractions in Paris?")
    await session.switch_to_branch("main")
    await ask(agent, session, "How expensive is it to visit?")

    branches = {b["branch_id"]: b for b in await session.list_branches()}
    assert (branches["main"]["user_turns"], branches["main"]["message_count"]) == (3, 6)
    assert (branches[branch_id]["user_turns"], branches[branch_id]["message_count"]) == (2, 4)
    assert branches["main"]["is_current"]
    # What the model saw on the branch: turn 1 only, then the new question.
    branch_call_input = model.calls[2].input
    assert [item["role"] for item in branch_call_input] == ["user", "assistant", "user"]
    weather_usage = await session.get_turn_usage(branch_id=branch_id)
    assert isinstance(weather_usage, list)
    assert [t["user_turn_number"] for t in weather_usage] == [2]


async def test_session_settings_limit_bounds_what_the_model_sees(backend: Backend) -> None:
    model = ScriptedModel([ModelStep(output=[assistant_message(f"a{i}")]) for i in range(3)])
    agent = Agent(name="Assistant", model=model)
    session = backend.session(session_settings={"limit": 2})
    for i in range(3):
        await Runner.run(agent, f"q{i}", session=session)
    # History limited to the two newest items, plus the new input.
    assert [item.get("content") for item in model.calls[2].input][-1] == "q2"
    assert len(model.calls[2].input) == 3


async def test_drop_in_sqlite_class_with_runner(tmp_path: Path) -> None:
    model = ScriptedModel(
        [ModelStep(output=[assistant_message("San Francisco")], usage=usage(12, 3))]
    )
    agent = Agent(name="Assistant", model=model)
    async with AdvancedSQLiteSession(
        session_id="conversation_123", db_path=tmp_path / "conversations.db", create_tables=True
    ) as session:
        result = await Runner.run(agent, "What city is the Golden Gate Bridge in?", session=session)
        await session.store_run_usage(result)
        assert result.final_output == "San Francisco"
        assert await session.get_session_usage() == {
            "requests": 1,
            "input_tokens": 12,
            "output_tokens": 3,
            "total_tokens": 15,
            "total_turns": 1,
        }
