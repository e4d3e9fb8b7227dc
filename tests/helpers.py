"""Item and run-result builders shaped like what the Agents SDK's Runner stores."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from agents.usage import Usage
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def function_call(name: str, call_id: str = "call_1", **extra: Any) -> dict[str, Any]:
    return {"type": "function_call", "name": name, "call_id": call_id, "arguments": "{}", **extra}


def function_output(call_id: str = "call_1", output: str = "ok") -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": output}


def turn(text: str, reply: str | None = None) -> list[dict[str, Any]]:
    """A user message and the assistant's reply, as one batch."""
    return [user(text), assistant(reply or f"reply to {text}")]


def run_result(
    requests: int = 1,
    input_tokens: int = 10,
    output_tokens: int = 5,
    cached_tokens: int = 0,
    reasoning_tokens: int = 0,
) -> Any:
    """An object shaped like a RunResult, carrying only what store_run_usage reads."""
    usage = Usage(
        requests=requests,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=cached_tokens, cache_write_tokens=0),
        output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning_tokens),
    )
    return SimpleNamespace(context_wrapper=SimpleNamespace(usage=usage))
