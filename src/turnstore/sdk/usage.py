"""Reading token usage out of an Agents SDK run result."""

from __future__ import annotations

from typing import Any

from turnstore.persistence.repository import UsageRecord


def usage_from_result(result: Any) -> UsageRecord | None:
    """The usage of a ``RunResult`` (``result.context_wrapper.usage``), or ``None`` if absent."""
    usage = result.context_wrapper.usage
    if usage is None:
        return None
    return UsageRecord(
        requests=usage.requests or 0,
        input_tokens=usage.input_tokens or 0,
        output_tokens=usage.output_tokens or 0,
        total_tokens=usage.total_tokens or 0,
        input_tokens_details=_details(getattr(usage, "input_tokens_details", None)),
        output_tokens_details=_details(getattr(usage, "output_tokens_details", None)),
    )


def _details(details: Any) -> dict[str, Any] | None:
    """A token-details object as a JSON-ready dict (``None`` when absent)."""
    if not details:
        return None
    if hasattr(details, "model_dump"):
        dumped: dict[str, Any] = details.model_dump(mode="json")
        return dumped
    if isinstance(details, dict):
        return dict(details)
    return dict(vars(details))
