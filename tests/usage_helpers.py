"""Shared pieces of the model, cost, lineage and rollup tests."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from agents import Agent, Runner
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
from agents.usage import Usage
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails
from sqlalchemy import update

from tests.conftest import Backend
from turnstore import AdvancedSession
from turnstore.persistence.dialects import profile_for
from turnstore.persistence.models import DEFAULT_TABLES


class NamedModel(ScriptedModel):
    """A scripted model with a name, as the SDK's OpenAI models carry one in ``model``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.model = name


def usage(input_tokens: int, output_tokens: int, *, cached: int = 0, reasoning: int = 0) -> Usage:
    return Usage(
        requests=1,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=cached, cache_write_tokens=0),
        output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning),
    )


def reply(model: ScriptedModel, text: str, spent: Usage) -> None:
    model.enqueue(ModelStep(output=[assistant_message(text)], usage=spent))


def hand_off(model: ScriptedModel, to: str, spent: Usage) -> None:
    model.enqueue(
        ModelStep(output=[function_call(f"transfer_to_{to}", {}, call_id="h1")], usage=spent)
    )


async def ask(agent: Agent[Any], session: AdvancedSession, text: str, **store: Any) -> Any:
    result = await Runner.run(agent, text, session=session, **store.pop("run", {}))
    await session.store_run_usage(result, **store)
    return result


async def set_usage_time(
    backend: Backend, session_id: str, branch: str, turn: int, when: datetime
) -> None:
    """Move a stored turn's usage to ``when`` (aware), as if it had been stored then."""
    u = DEFAULT_TABLES.usage
    profile = profile_for(backend.engine.dialect.name)
    async with backend.engine.begin() as conn:
        await conn.execute(
            update(u)
            .where(
                u.c.session_id == session_id,
                u.c.branch_id == branch,
                u.c.user_turn_number == turn,
            )
            .values(created_at=profile.timestamp_value(when))
        )
