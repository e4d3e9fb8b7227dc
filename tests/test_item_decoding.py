"""Stored item text decodes exactly as json.loads decodes it; unreadable text is skipped."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from turnstore.items import decode

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(value=JSON_VALUES, padding=st.sampled_from(["", " ", "\n", " \t\r\n "]))
def test_decoding_matches_json_loads(value: Any, padding: str) -> None:
    text = padding + json.dumps(value) + padding
    if value is None:
        assert decode(text) is None  # JSON null is not an item
    else:
        assert decode(text) == json.loads(text)


def test_constants_that_json_dumps_writes_decode_as_json_loads_reads_them() -> None:
    not_a_number = decode("NaN")
    assert isinstance(not_a_number, float)
    assert math.isnan(not_a_number)
    assert decode("[1, Infinity, -Infinity]") == [1, math.inf, -math.inf]


@pytest.mark.parametrize("text", ["", "{", '{"a": [1', '{"a": 1} trailing', "1 2", "nul"])
def test_unreadable_text_is_skipped_with_a_warning(
    text: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="turnstore"):
        assert decode(text) is None
    assert "not valid JSON" in caplog.text
