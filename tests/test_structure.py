"""Structure queries: turns, content search, conversation by turns, tool usage."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Backend
from tests.helpers import assistant, function_call, function_output, turn, user
from turnstore import InvalidArgumentError


async def test_conversation_turns_shape_and_preview(backend: Backend) -> None:
    session = backend.session()
    long_text = "x" * 150
    await session.add_items(turn("short"))
    await session.add_items(turn(long_text))
    turns = await session.get_conversation_turns()
    assert [set(t) for t in turns] == [
        {"turn", "content", "full_content", "timestamp", "can_branch"}
    ] * 2
    assert turns[0]["content"] == "short"
    assert turns[1]["content"] == "x" * 100 + "..."
    assert turns[1]["full_content"] == long_text
    assert all(t["can_branch"] is True for t in turns)
    assert isinstance(turns[0]["timestamp"], str)


async def test_structured_user_content_is_previewed_as_json(backend: Backend) -> None:
    session = backend.session()
    parts = [{"type": "input_text", "text": "look at this"}, {"type": "input_image", "url": "u"}]
    await session.add_items([{"role": "user", "content": parts}])
    (only,) = await session.get_conversation_turns()
    assert only["full_content"] == parts
    assert only["content"].startswith('[{"type": "input_text"')
    matches = await session.find_turns_by_content("LOOK AT")
    assert [m["turn"] for m in matches] == [1]
    assert await session.find_turns_by_content("input_image") == []


async def test_find_matches_user_text_only_and_ignores_ascii_case(backend: Backend) -> None:
    session = backend.session()
    await session.add_items([user("Tell me about the Weather"), assistant("weather is nice")])
    await session.add_items(turn("something else"))
    await session.add_items(turn("WEATHER again"))
    matches = await session.find_turns_by_content("weather")
    assert [m["turn"] for m in matches] == [1, 3]
    assert matches[0]["content"] == "Tell me about the Weather"
    assert await session.find_turns_by_content("nice") == []  # assistant text is not searched
    assert await session.find_turns_by_content("role") == []  # nor JSON keys


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        ("100%", [2]),
        ("a_b", [3]),
        ("%", [2]),
        ("_", [3]),
        ('say "hi"', [4]),
        ("back\\slash", [5]),
        ("it's", [6]),
        ("東京", [7]),
        ("🚀", [7]),
        ("", [1, 2, 3, 4, 5, 6, 7]),
    ],
)
async def test_search_terms_are_literal(backend: Backend, term: str, expected: list[int]) -> None:
    session = backend.session()
    for text in (
        "plain",
        "100% sure",
        "a_b variable",
        'say "hi" please',
        "back\\slash path",
        "it's fine",
        "東京 🚀",
    ):
        await session.add_items(turn(text))
    assert [m["turn"] for m in await session.find_turns_by_content(term)] == expected


async def test_find_on_another_branch(backend: Backend) -> None:
    session = backend.session()
    await session.add_items(turn("alpha"))
    await session.add_items(turn("beta"))
    await session.create_branch_from_turn(2, "alt")
    assert await session.find_turns_by_content("beta") == []
    assert [m["turn"] for m in await session.find_turns_by_content("beta", "main")] == [2]


async def test_search_term_must_be_a_string(backend: Backend) -> None:
    session = backend.session()
    with pytest.raises(InvalidArgumentError, match="search_term must be a str"):
        await session.find_turns_by_content(42)  # type: ignore[arg-type]


async def test_conversation_by_turns(backend: Backend) -> None:
    session = backend.session()
    await session.add_items([user("q"), function_call("get_weather"), function_output()])
    await session.add_items([assistant("a")])
    await session.add_items(turn("q2"))
    assert await session.get_conversation_by_turns() == {
        1: [
            {"type": "user", "tool_name": None},
            {"type": "function_call", "tool_name": "get_weather"},
            {"type": "function_call_output", "tool_name": None},
            {"type": "assistant", "tool_name": None},
        ],
        2: [{"type": "user", "tool_name": None}, {"type": "assistant", "tool_name": None}],
    }


def _tool_item(item_type: str, **fields: Any) -> dict[str, Any]:
    return {"type": item_type, "id": f"{item_type}_1", **fields}


async def test_tool_usage_names_tools_as_the_sdk_does(backend: Backend) -> None:
    session = backend.session()
    await session.add_items(
        [
            user("use tools"),
            function_call("lookup", "c1"),
            function_output("c1"),
            function_call("lookup", "c2"),
            function_call("search", "c3", namespace="crm"),
            function_call("deferred", "c4", namespace="deferred"),
            _tool_item("mcp_call", server_label="github", name="create_issue"),
            _tool_item("mcp_approval_request", server_label="github"),
            _tool_item("computer_call"),
            _tool_item("file_search_call"),
            _tool_item("web_search_call"),
            _tool_item("code_interpreter_call"),
            _tool_item("shell_call"),
            _tool_item("apply_patch_call"),
            _tool_item("custom_tool_call", name="grammar"),
            _tool_item("tool_search_call"),
            _tool_item("tool_search_output"),
        ]
    )
    await session.add_items([user("second"), _tool_item("tool_search_output")])
    assert await session.get_tool_usage() == [
        ("apply_patch_call", 1, 1),
        ("code_interpreter_call", 1, 1),
        ("computer_call", 1, 1),
        ("crm.search", 1, 1),
        ("deferred", 1, 1),
        ("file_search_call", 1, 1),
        ("github", 1, 1),
        ("github.create_issue", 1, 1),
        ("grammar", 1, 1),
        ("lookup", 2, 1),
        ("shell_call", 1, 1),
        ("tool_search", 1, 1),
        ("web_search_call", 1, 1),
        # A tool-search output with no call in its turn still counts as a use.
        ("tool_search", 1, 2),
    ]


async def test_tool_usage_of_branch(backend: Backend) -> None:
    session = backend.session()
    await session.add_items([user("q"), function_call("one")])
    await session.add_items([user("q2"), function_call("two")])
    await session.create_branch_from_turn(2, "alt")
    await session.add_items([user("q2 alt"), function_call("three")])
    assert await session.get_tool_usage() == [("one", 1, 1), ("three", 1, 2)]
    assert await session.get_tool_usage("main") == [("one", 1, 1), ("two", 1, 2)]
