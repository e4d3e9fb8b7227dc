"""A local stand-in for the OpenAI client the SDK's compaction wrapper calls (no network)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from agents.memory import OpenAIResponsesCompactionSession


class FakeResponses:
    """``client.responses`` whose ``compact`` keeps the user messages and adds a summary.

    That is the shape the Responses API's compaction returns: the caller's messages, then one
    opaque ``compaction`` item standing for everything else.
    """

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.outputs: list[list[dict[str, Any]]] = []

    async def compact(self, **request: Any) -> Any:
        self.calls.append(request)
        kept = [dict(item) for item in request.get("input", []) if item.get("role") == "user"]
        output = [*kept, summary(len(self.calls))]
        self.outputs.append(output)
        return SimpleNamespace(output=output, usage=None)


def summary(number: int) -> dict[str, Any]:
    """The compaction item of the ``number``-th compaction."""
    return {"type": "compaction", "encrypted_content": f"summary-{number}"}


def compacting(
    session: Any, **options: Any
) -> tuple[OpenAIResponsesCompactionSession, FakeResponses]:
    """The SDK's compaction wrapper around ``session``, compacting whenever asked or run."""
    responses = FakeResponses()
    options.setdefault("should_trigger_compaction", lambda _context: True)
    wrapper = OpenAIResponsesCompactionSession(
        session.session_id,
        session,
        client=cast(Any, SimpleNamespace(responses=responses)),
        compaction_mode="input",
        **options,
    )
    return wrapper, responses
