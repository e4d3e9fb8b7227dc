"""Cost from genai-prices, checked against prices worked out by hand from the providers' lists."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from turnstore import cost
from turnstore.cost import Cost, TokenCounts

AT = datetime(2025, 9, 1, 12, tzinfo=UTC)
COUNTS = TokenCounts(
    requests=1, input_tokens=3_000, cached_tokens=1_000, output_tokens=800, reasoning_tokens=300
)


@pytest.mark.parametrize(
    ("model", "per_million"),
    [
        # (uncached input, cached input, output) in dollars per million tokens, from OpenAI's
        # price list; reasoning tokens are output tokens and are billed as such.
        ("gpt-4o", (Decimal("2.50"), Decimal("1.25"), Decimal("10.00"))),
        ("gpt-4o-mini", (Decimal("0.15"), Decimal("0.075"), Decimal("0.60"))),
        ("o3", (Decimal("2.00"), Decimal("0.50"), Decimal("8.00"))),
    ],
)
def test_known_models_cost_what_their_price_list_says(
    model: str, per_million: tuple[Decimal, Decimal, Decimal]
) -> None:
    uncached, cached, output = per_million
    expected = (2_000 * uncached + 1_000 * cached + 800 * output) / 1_000_000
    assert cost.price(model, COUNTS, AT) == Cost(expected)


def test_gpt_4o_by_hand() -> None:
    # 2,000 uncached at $2.50/M, 1,000 cached at $1.25/M, 800 out at $10/M.
    assert cost.price("gpt-4o", COUNTS, AT).usd == Decimal("0.01425")


def test_the_price_is_the_one_in_force_when_the_turn_was_taken() -> None:
    # OpenAI cut o3 from $10/$40 to $2/$8 per million on 2025-06-10.
    counts = TokenCounts(1, 3_000, 0, 800, 0)
    before = cost.price("o3", counts, datetime(2025, 5, 1, tzinfo=UTC)).usd
    after = cost.price("o3", counts, datetime(2025, 7, 1, tzinfo=UTC)).usd
    assert before == Decimal("0.062")  # 3,000 x $10/M + 800 x $40/M
    assert after == Decimal("0.0124")  # 3,000 x $2/M + 800 x $8/M


def test_several_requests_are_priced_request_by_request() -> None:
    one = cost.price("gpt-4o", COUNTS, AT).usd
    assert one is not None
    doubled = TokenCounts(2, 6_000, 2_000, 1_600, 600)
    assert cost.price("gpt-4o", doubled, AT).usd == 2 * one


def test_an_unknown_model_has_no_cost_and_says_why() -> None:
    priced = cost.price("my-local-llama-7b", COUNTS, AT)
    assert priced.usd is None
    assert priced.reason == "no price is known for model 'my-local-llama-7b'"
    unknown = cost.price(None, COUNTS, AT)
    assert unknown == Cost(None, cost.UNKNOWN_MODEL)


def test_without_the_extra_every_cost_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cost, "_calc", lambda: None)
    assert not cost.available()
    assert cost.price("gpt-4o", COUNTS, AT) == Cost(None, cost.NO_EXTRA)


def test_a_sum_with_an_unpriced_part_is_none_never_a_partial_figure() -> None:
    known = cost.price("gpt-4o", COUNTS, AT)
    total = Cost.total([known, Cost(None, "no price is known for model 'x'"), known])
    assert total == Cost(None, "no price is known for model 'x'")
    assert Cost.total([known, known]).usd == 2 * Decimal("0.01425")
    assert Cost.total([]) == Cost(Decimal(0))
