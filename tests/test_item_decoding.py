"""Stored item text decodes exactly as json.loads decodes it; unreadable text is skipped.

Every test runs twice: with the fast decoder (msgspec) in front, and with the standard
library alone, as on an interpreter without msgspec.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from turnstore.persistence import jsoncodec
from turnstore.sdk.items import decode


@pytest.fixture(autouse=True, params=["fast", "stdlib"])
def decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "fast":
        assert jsoncodec._fast_decode is not None, "msgspec is a dependency on CPython"
    else:
        monkeypatch.setattr(jsoncodec, "_fast_decode", None)
    return str(request.param)


def same(left: Any, right: Any) -> bool:
    """Equal values of the same types all the way down (1 and 1.0 and True differ)."""
    if type(left) is not type(right):
        return False
    if isinstance(left, dict):
        return list(left) == list(right) and all(same(left[k], right[k]) for k in left)
    if isinstance(left, list):
        return len(left) == len(right) and all(map(same, left, right))
    if isinstance(left, float) and math.isnan(left):
        return math.isnan(right)
    return bool(left == right)


def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(children, max_size=4) | st.dictionaries(
        st.text(max_size=8), children, max_size=4
    )


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats()
    | st.text(),
    containers,
    max_leaves=20,
)


@given(
    value=JSON_VALUES,
    padding=st.sampled_from(["", " ", "\n", " \t\r\n "]),
    ensure_ascii=st.booleans(),
)
def test_decoding_matches_json_loads(value: Any, padding: str, ensure_ascii: bool) -> None:
    text = padding + json.dumps(value, ensure_ascii=ensure_ascii) + padding
    if value is None:
        assert decode(text) is None  # JSON null is not an item
    else:
        assert same(decode(text), json.loads(text))


@pytest.mark.parametrize(
    "text",
    [
        '"\\ud800"',  # an unpaired surrogate escape
        '["\\udfff", "\\ud83d\\ude00"]',
        "123456789012345678901234567890",  # beyond 64 bits
        "-9223372036854775809",
        "18446744073709551616",
        "1E400",  # out of range: json reads infinity
        "-1e999",
        "123456789012345678901234567890.5",
        '{"a": 1, "b": 2, "a": 3}',  # duplicate keys: the last value, the first position
        '{"a": -0, "b": -0.0, "c": 0.1e1, "d": 1e2, "e": 5e-324}',
        '"\\u0000 \\u2028 \\/"',
        "[" * 200 + "]" * 200,
    ],
)
def test_edge_cases_decode_as_json_loads_reads_them(text: str) -> None:
    assert same(decode(text), json.loads(text))


def test_constants_that_json_dumps_writes_decode_as_json_loads_reads_them() -> None:
    not_a_number = decode("NaN")
    assert isinstance(not_a_number, float)
    assert math.isnan(not_a_number)
    assert decode("[1, Infinity, -Infinity]") == [1, math.inf, -math.inf]


def test_text_with_a_lone_surrogate_character_decodes_as_json_loads_reads_it() -> None:
    text = '{"content": "half a pair: \ud83d"}'
    assert same(decode(text), json.loads(text))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        '{"a": [1',
        '{"a": 1} trailing',
        "1 2",
        "nul",
        "[1,]",
        "1" * 5000,
        '"a\x01b"',  # a raw control character inside a string
        "\ufeff[1]",  # a byte-order mark
        "[1]\u00a0",  # whitespace JSON does not allow
    ],
)
def test_unreadable_text_is_skipped_with_a_warning(
    text: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="turnstore"):
        assert decode(text) is None
    assert "not valid JSON" in caplog.text


def test_nesting_deeper_than_the_standard_parser_allows_fails_as_it_does() -> None:
    # The SDK's class lets json.loads's RecursionError through; so does turnstore.
    with pytest.raises(RecursionError):
        decode("[" * 100_000 + "]" * 100_000)
