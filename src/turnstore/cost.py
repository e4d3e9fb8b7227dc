"""What usage cost, priced by pydantic's ``genai-prices`` (the optional ``turnstore[cost]`` extra).

Prices come from the price data bundled with the installed ``genai-prices``: no network call is
made unless you opt in to price updates, by running ``genai_prices.UpdatePrices`` yourself (a
context manager that refreshes prices in a background thread) or with ``--update-prices`` on
the command line. Without the extra, every cost is ``None`` and says why.

A cost is never a guess: an unknown model, a model ``genai-prices`` has no price for, or a
missing extra gives ``None`` with the reason, never 0.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache
from typing import Any

logger = logging.getLogger(__name__)

#: Why a cost is missing when the extra is not installed.
NO_EXTRA = "prices need the cost extra: pip install 'turnstore[cost]'"
UNKNOWN_MODEL = "the model is not known"


@dataclass(frozen=True)
class Cost:
    """A price in US dollars, or why there is none.

    Attributes:
        usd: The price, or ``None`` when it cannot be known.
        reason: Why ``usd`` is ``None`` (``None`` when it is not).
    """

    usd: Decimal | None
    reason: str | None = None

    def __add__(self, other: Cost) -> Cost:
        if self.usd is None or other.usd is None:
            reasons = [reason for reason in (self.reason, other.reason) if reason]
            return Cost(None, "; ".join(dict.fromkeys(reasons)) or None)
        return Cost(self.usd + other.usd)

    @staticmethod
    def total(costs: Iterable[Cost]) -> Cost:
        """The sum of ``costs``: ``None`` with every reason if any of them is ``None``."""
        result = Cost(Decimal(0))
        for cost in costs:
            result = result + cost
        return result


@dataclass(frozen=True)
class TokenCounts:
    """Token counts of one or more requests to one model."""

    requests: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    reasoning_tokens: int


def available() -> bool:
    """Whether prices can be looked up (the ``cost`` extra is installed)."""
    return _calc() is not None


@cache
def _calc() -> Any:
    try:
        from genai_prices import calc_price
    except ImportError:
        return None
    return calc_price


def price(model: str | None, counts: TokenCounts, at: datetime | None) -> Cost:
    """The price of ``counts`` served by ``model`` at time ``at`` (UTC if naive).

    Summed counts of several requests are priced as that many requests of their average size:
    exact for per-token prices, and for tiered prices (a higher rate above a context size)
    whenever the requests fall in the same tier.

    Args:
        model: The model name as the SDK used it (``None``: unknown).
        counts: What was used.
        at: When it was used; prices that changed over time are taken as of then.
    """
    if model is None:
        return Cost(None, UNKNOWN_MODEL)
    calc_price = _calc()
    if calc_price is None:
        return Cost(None, NO_EXTRA)
    from genai_prices import Usage

    requests = max(counts.requests, 1)
    per_request = Usage(
        input_tokens=Decimal(counts.input_tokens) / requests,
        cache_read_tokens=Decimal(counts.cached_tokens) / requests,
        output_tokens=Decimal(counts.output_tokens) / requests,
        output_reasoning_tokens=Decimal(counts.reasoning_tokens) / requests,
    )
    when = at if at is None or at.tzinfo is not None else at.replace(tzinfo=UTC)
    try:
        calculation = calc_price(per_request, model, genai_request_timestamp=when)
    except LookupError:
        return Cost(None, f"no price is known for model {model!r}")
    except (ValueError, ArithmeticError) as exc:
        logger.debug("Pricing %r failed: %s", model, exc)
        return Cost(None, f"the price of model {model!r} cannot be computed ({exc})")
    return Cost(Decimal(calculation.total_price) * requests)
