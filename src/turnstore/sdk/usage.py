"""Reading token usage, and the models that served it, out of an Agents SDK run result."""

from __future__ import annotations

from typing import Any

from turnstore.persistence.records import ModelShare, UsageRecord


def usage_from_result(
    result: Any, *, model: str | None = None, run_config: Any = None
) -> UsageRecord | None:
    """The usage of a ``RunResult`` (``result.context_wrapper.usage``), or ``None`` if absent.

    Args:
        result: The run's result.
        model: Names the model that served the whole run, instead of working it out.
        run_config: The ``RunConfig`` the run was given, if any: a model set there overrides
            the agents' own, as it does in the SDK. (The result does not carry it.)
    """
    usage = result.context_wrapper.usage
    if usage is None:
        return None
    total = _share(None, usage)
    shares: tuple[ModelShare, ...]
    if model is not None:
        shares = (_share(model, usage),)
    else:
        shares = _shares_by_model(result, total, run_config)
    return UsageRecord(
        requests=usage.requests or 0,
        input_tokens=usage.input_tokens or 0,
        output_tokens=usage.output_tokens or 0,
        total_tokens=usage.total_tokens or 0,
        input_tokens_details=_details(getattr(usage, "input_tokens_details", None)),
        output_tokens_details=_details(getattr(usage, "output_tokens_details", None)),
        models=shares,
    )


def model_name(agent: Any, run_config: Any = None) -> str | None:
    """The model name the SDK resolves for ``agent`` (``None`` when it cannot be known).

    As the SDK's runner does: the run configuration's model first, then the agent's; a name
    is taken as it is, a ``Model`` object by its ``model`` attribute (the SDK's OpenAI models
    and LiteLLM's have one), and an agent without a model runs the SDK's default model.
    """
    configured = getattr(run_config, "model", None)
    if configured is not None:
        return _name_of(configured)
    if agent is None:
        return None
    chosen = getattr(agent, "model", None)
    if chosen is not None:
        return _name_of(chosen)
    try:
        from agents.models import get_default_model
    except ImportError:  # pragma: no cover - a result always comes from the SDK
        return None
    return get_default_model()


def _name_of(model: Any) -> str | None:
    if isinstance(model, str):
        return model or None
    name = getattr(model, "model", None)
    return name if isinstance(name, str) and name else None


def _shares_by_model(result: Any, total: ModelShare, run_config: Any) -> tuple[ModelShare, ...]:
    """The run's usage split by the model of each model response (per-request figures)."""
    responses = list(getattr(result, "raw_responses", None) or [])
    items = list(getattr(result, "new_items", None) or [])
    agent_of_output: dict[int, Any] = {}
    for item in items:
        raw = getattr(item, "raw_item", None)
        agent = getattr(item, "agent", None)
        if raw is not None and agent is not None:
            agent_of_output[id(raw)] = agent
    last_agent = getattr(result, "last_agent", None)
    # Without handoffs every response came from the one agent; with them, a response whose
    # items cannot be matched to an agent is left unknown rather than guessed.
    one_agent = len({id(agent) for agent in agent_of_output.values()}) <= 1
    shares: dict[str | None, ModelShare] = {}
    for response in responses:
        usage = getattr(response, "usage", None)
        if usage is None:
            continue
        agent = next(
            (
                agent_of_output[id(output)]
                for output in getattr(response, "output", None) or ()
                if id(output) in agent_of_output
            ),
            last_agent if one_agent else None,
        )
        name = model_name(agent, run_config) if agent is not None else None
        share = _share(name, usage)
        shares[name] = shares[name] + share if name in shares else share
    if not shares:
        return (ModelShare(model_name(last_agent, run_config), *total.counts),)
    remainder = total - sum(shares.values(), ModelShare.zero(None))
    if any(count > 0 for count in remainder.counts):
        # Usage the responses do not account for (a custom result, say): its model is unknown.
        shares[None] = shares[None] + remainder if None in shares else remainder
    return tuple(shares.values())


def share_record(share: ModelShare) -> dict[str, Any]:
    """A model's share of a turn as the public dict shape."""
    return {
        "model": share.model,
        "requests": share.requests,
        "input_tokens": share.input_tokens,
        "cached_tokens": share.cached_tokens,
        "output_tokens": share.output_tokens,
        "reasoning_tokens": share.reasoning_tokens,
        "total_tokens": share.total_tokens,
    }


def _share(name: str | None, usage: Any) -> ModelShare:
    input_details = getattr(usage, "input_tokens_details", None)
    output_details = getattr(usage, "output_tokens_details", None)
    return ModelShare(
        model=name,
        requests=int(getattr(usage, "requests", 0) or 0),
        input_tokens=int(getattr(usage, "input_tokens", 0) or 0),
        cached_tokens=int(getattr(input_details, "cached_tokens", 0) or 0),
        output_tokens=int(getattr(usage, "output_tokens", 0) or 0),
        reasoning_tokens=int(getattr(output_details, "reasoning_tokens", 0) or 0),
        total_tokens=int(getattr(usage, "total_tokens", 0) or 0),
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
