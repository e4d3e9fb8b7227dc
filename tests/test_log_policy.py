"""turnstore's log records follow the SDK's model-data/tool-data logging policy.

Each case runs with the policy redacting (the SDK's default) and allowing data, set the way a
program sets it: through the SDK's flags in ``agents._debug``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any

import pytest
from agents import _debug
from sqlalchemy import func, insert, select

from tests.conftest import Backend
from tests.helpers import run_result, turn
from turnstore.persistence.models import DEFAULT_TABLES
from turnstore.persistence.repository import ConversationRepository
from turnstore.redaction import CONTEXT_FIELD, REDACTED

SECRET = "the secret plan"


@pytest.fixture(params=["redacting", "allowing"])
def allowed(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Whether the policy allows model and tool data in logs, for this run of the test."""
    allow: bool = request.param == "allowing"
    monkeypatch.setattr(_debug, "DONT_LOG_MODEL_DATA", not allow)
    monkeypatch.setattr(_debug, "DONT_LOG_TOOL_DATA", not allow)
    return allow


def ours(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """turnstore's records (drivers log too)."""
    return [r for r in caplog.records if r.name.startswith("turnstore")]


def everything_in(record: logging.LogRecord) -> str:
    """All the text a handler could print for a record: message, traceback, extras."""
    formatter = logging.Formatter()
    return formatter.format(record) + repr(vars(record).get(CONTEXT_FIELD))


class SecretUsage:
    """A usage object whose fields fail with content in the message (as a driver might)."""

    @property
    def requests(self) -> int:
        raise RuntimeError(f"cannot store {SECRET!r}")


async def test_usage_storage_failure(
    backend: Backend, allowed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    session = backend.session()
    await session.add_items(turn("hello"))
    result: Any = run_result()
    result.context_wrapper.usage = SecretUsage()

    with caplog.at_level(logging.DEBUG, logger="turnstore"):
        await session.store_run_usage(result)  # logged, never raised

    [record] = [r for r in ours(caplog) if r.levelno == logging.ERROR]
    assert record.getMessage().startswith("Failed to store session usage (RuntimeError)")
    text = everything_in(record)
    if allowed:
        assert SECRET in text
        assert record.exc_info is not None
        assert vars(record)[CONTEXT_FIELD] == {
            "session_id": session.session_id,
            "branch_id": "main",
        }
    else:
        assert SECRET not in text
        assert session.session_id not in text
        assert record.exc_info is None


async def test_add_items_failure(
    backend: Backend,
    allowed: bool,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    session = backend.session()
    await session.add_items(turn("first"))

    async def failing_append(*args: Any) -> Any:
        raise OSError(f"INSERT failed for parameters ({SECRET!r},)")

    monkeypatch.setattr(ConversationRepository, "append", failing_append)
    with caplog.at_level(logging.ERROR, logger="turnstore"), pytest.raises(OSError, match="INSERT"):
        await session.add_items(turn(SECRET))

    [record] = ours(caplog)
    assert record.getMessage().startswith("Failed to add session items (OSError)")
    assert (SECRET in everything_in(record)) is allowed
    assert (session.session_id in everything_in(record)) is allowed


async def test_tool_data_policy_alone_redacts_item_failures(
    backend: Backend, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Items may carry tool arguments: both policies must allow them, as in the SDK.
    monkeypatch.setattr(_debug, "DONT_LOG_MODEL_DATA", False)
    monkeypatch.setattr(_debug, "DONT_LOG_TOOL_DATA", True)
    session = backend.session()

    async def failing_append(*args: Any) -> Any:
        raise OSError(SECRET)

    monkeypatch.setattr(ConversationRepository, "append", failing_append)
    with caplog.at_level(logging.ERROR, logger="turnstore"), pytest.raises(OSError, match="secret"):
        await session.add_items(turn("x"))
    assert SECRET not in everything_in(ours(caplog)[0])


async def test_branch_records(
    backend: Backend, allowed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    session = backend.session()
    await session.add_items(turn("one"))
    await session.add_items(turn("two"))
    with caplog.at_level(logging.DEBUG, logger="turnstore"):
        await session.create_branch_from_turn(2, "alice-private-branch")
        await session.switch_to_branch("main")
        await session.delete_branch("alice-private-branch")
        await session.store_run_usage(run_result())

    messages = [r.getMessage() for r in ours(caplog) if r.name == "turnstore"]
    assert [m.split()[0] for m in messages] == ["Created", "Switched", "Deleted"]
    for message in messages:
        assert ("alice-private-branch" in message) is allowed
        assert (REDACTED in message) is not allowed


async def test_corrupt_rows(
    backend: Backend, allowed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    session = backend.session()
    await session.add_items(turn("fine"))
    m, s = DEFAULT_TABLES.messages, DEFAULT_TABLES.structure
    async with backend.engine.begin() as conn:
        sequence = await conn.scalar(
            select(func.max(s.c.sequence_number)).where(s.c.session_id == session.session_id)
        )
        text = '{"role": "user", "content": "' + SECRET  # cut off
        result = await conn.execute(
            insert(m).values(session_id=session.session_id, message_data=text)
        )
        assert result.inserted_primary_key is not None
        await conn.execute(
            insert(s).values(
                session_id=session.session_id,
                message_id=result.inserted_primary_key[0],
                branch_id="main",
                message_type="user",
                sequence_number=sequence + 1,
                user_turn_number=2,
                branch_turn_number=2,
            )
        )

    with caplog.at_level(logging.WARNING, logger="turnstore"):
        assert await session.get_items() == turn("fine")

    [record] = ours(caplog)
    assert "not valid JSON" in record.getMessage()
    assert (SECRET in record.getMessage()) is allowed


@pytest.mark.parametrize(
    ("value", "redacts"),
    [(None, True), ("1", True), ("true", True), ("0", False), ("false", False)],
)
def test_without_the_sdk_the_variables_decide(value: str | None, redacts: bool) -> None:
    """Read as the SDK reads them, without importing the SDK."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_AGENTS_DONT_LOG")}
    if value is not None:
        env["OPENAI_AGENTS_DONT_LOG_MODEL_DATA"] = value
        env["OPENAI_AGENTS_DONT_LOG_TOOL_DATA"] = value
    program = (
        "import sys, turnstore\n"
        "from turnstore.redaction import dont_log_model_data, dont_log_tool_data\n"
        "assert 'agents' not in sys.modules\n"
        "print(dont_log_model_data(), dont_log_tool_data())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [str(redacts), str(redacts)]
