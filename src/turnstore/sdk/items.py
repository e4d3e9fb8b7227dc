"""What turnstore knows about Agents SDK items: how to store, classify and read them back.

Items are the Responses-API input items the SDK's Runner hands to a session (dicts with a
``role`` or a ``type``). This module turns them into
:class:`~turnstore.persistence.records.NewMessage`
records for the repository and back; the repository itself never looks inside an item.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from turnstore.errors import InvalidItemError
from turnstore.persistence import jsoncodec
from turnstore.persistence.records import NewMessage, ToolCountRule
from turnstore.persistence.validation import text_problem
from turnstore.redaction import model_data

logger = logging.getLogger(__name__)

# Tool invocations whose items carry no ``name``; the SDK names them after their type.
_NAMED_BY_TYPE = frozenset(
    {
        "computer_call",
        "file_search_call",
        "web_search_call",
        "code_interpreter_call",
        "shell_call",
        "apply_patch_call",
    }
)
_TOOL_SEARCH_TYPES = frozenset({"tool_search_call", "tool_search_output"})
_MCP_TYPES = frozenset({"mcp_call", "mcp_approval_request"})

TOOL_COUNT_RULE = ToolCountRule(
    call_types=frozenset(
        {
            "tool_call",
            "function_call",
            "custom_tool_call",
            "tool_search_call",
            *_MCP_TYPES,
            *_NAMED_BY_TYPE,
        }
    ),
    # Rows written before these types got a tool name are still counted under their type.
    named_by_type=frozenset({"shell_call", "apply_patch_call"}),
    unpaired_outputs=("tool_search_output", "tool_search_call"),
)


def is_user_message(item: Mapping[str, Any]) -> bool:
    """Whether ``item`` is a user message, which opens a new user turn."""
    return item.get("role") == "user"


def message_type(item: Mapping[str, Any]) -> str:
    """The ``message_type`` stored for an item: its role for chat messages, else its type."""
    role = item.get("role")
    if role in ("user", "assistant"):
        return str(role)
    item_type = item.get("type")
    return str(item_type) if item_type else "other"


def tool_name(item: Mapping[str, Any]) -> str | None:
    """The tool an item invokes or answers, named as the SDK names it; ``None`` otherwise.

    MCP items are ``server.tool``; built-in tools without a name are named by their type (tool
    search by ``tool_search``); function tools are ``namespace.name`` when namespaced, except in
    the SDK's synthetic namespace that repeats the name.
    """
    item_type = item.get("type")
    if item_type in _MCP_TYPES and "server_label" in item:
        server, name = item.get("server_label"), item.get("name")
        if server and name:
            return f"{server}.{name}"
        return str(server) if server else (str(name) if name else None)
    if item_type in _TOOL_SEARCH_TYPES:
        return "tool_search"
    if item_type in _NAMED_BY_TYPE:
        return str(item_type)
    if "name" not in item or item["name"] is None:
        return None
    name = str(item["name"])
    namespace = item.get("namespace")
    namespace = str(namespace) if namespace is not None else None
    if name and namespace and namespace != name:
        return f"{namespace}.{name}"
    return name


#: Default of a session's ``max_item_bytes``: the most bytes one item may take as JSON.
DEFAULT_MAX_ITEM_BYTES = 64 * 1024 * 1024

#: The deepest nesting an item may have (the item itself is level 1). Deeper items could be
#: written but not read back by every JSON decoder at every stack depth, so they are refused.
MAX_ITEM_DEPTH = 500


def to_new_messages(
    items: Sequence[Any], *, max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES
) -> list[NewMessage]:
    """Serialize and classify a batch of items, all or nothing.

    Args:
        items: The batch.
        max_item_bytes: The most bytes one item may take as JSON.

    Raises:
        InvalidItemError: ``items`` is not a list, or an item is not a mapping, not
            JSON-serializable, nested deeper than :data:`MAX_ITEM_DEPTH`, larger than
            ``max_item_bytes``, or has a type or tool name that is not storable text; the
            message names the item's index, never its content.
    """
    if not isinstance(items, Sequence) or isinstance(items, str | bytes):
        raise InvalidItemError(f"items must be a list of dicts; got {type(items).__name__}")
    messages: list[NewMessage] = []
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise InvalidItemError(
                f"Item {index} must be a dict (a Responses input item); got {type(item).__name__}"
            )
        too_deep = InvalidItemError(
            f"Item {index} nests deeper than {MAX_ITEM_DEPTH} levels; flatten it or store it "
            "as a JSON string"
        )
        try:
            data = json.dumps(item)
        except RecursionError:
            raise too_deep from None
        except (TypeError, ValueError) as exc:
            raise InvalidItemError(f"Item {index} is not JSON serializable: {exc}") from exc
        if len(data) > max_item_bytes:  # json.dumps writes ASCII: characters are bytes
            raise InvalidItemError(
                f"Item {index} is {len(data):,} bytes as JSON, over the session's "
                f"max_item_bytes ({max_item_bytes:,}); keep large payloads elsewhere and store "
                "a reference, or raise max_item_bytes"
            )
        # Nesting needs at least one bracket per level: only a text with that many can be
        # too deep, so the walk is skipped for nearly every item.
        if data.count("{") + data.count("[") > MAX_ITEM_DEPTH and _deeper_than(
            item, MAX_ITEM_DEPTH
        ):
            raise too_deep
        kind, tool = message_type(item), tool_name(item)
        for what, value in (("type", kind), ("tool name", tool)):
            problem = None if value is None else text_problem(value)
            if problem is not None:
                # Stored in a text column of its own (not escaped like the item's JSON).
                raise InvalidItemError(f"Item {index}'s {what} {problem}")
        messages.append(NewMessage(data, kind, tool, is_user_message(item)))
    return messages


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests containers more than ``limit`` levels deep (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        current, depth = stack.pop()
        if isinstance(current, Mapping):
            children: Any = current.values()
        elif isinstance(current, list | tuple):
            children = current
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def decode(data: str) -> Any | None:
    """Parse one stored item; ``None`` (and a warning) for text that is not valid JSON."""
    try:
        return jsoncodec.loads(data)
    except (TypeError, ValueError):
        # The start of the text helps find the row; it is content, so only where allowed.
        logger.warning(
            "Skipping a stored item that is not valid JSON: %r",
            model_data(data[:80] if isinstance(data, str) else type(data).__name__),
        )
        return None


def decode_all(texts: Sequence[str]) -> list[Any]:
    """Parse stored items, skipping unreadable ones."""
    items = []
    for data in texts:
        item = decode(data)
        if item is not None:
            items.append(item)
    return items


def content_preview(content: Any, max_length: int | None = None) -> str:
    """A user message's content as text (structured parts as JSON), cut to ``max_length``."""
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    if max_length is not None and len(text) > max_length:
        return text[:max_length] + "..."
    return text


def content_texts(content: Any) -> list[str]:
    """The searchable texts of a message's content: the string, or its parts' ``text``."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [str(part.get("text", "")) for part in content if isinstance(part, Mapping)]
    return []


def search_pattern(term: str) -> re.Pattern[str]:
    """Literal, ASCII-case-insensitive matcher for a search term (as SQLite's LIKE matches)."""
    return re.compile(re.escape(term), re.IGNORECASE | re.ASCII)


def stored_form(term: str) -> str:
    """How ``term`` appears inside stored JSON text (escaped as ``json.dumps`` escapes it)."""
    return json.dumps(term)[1:-1]


def item_texts(item: Any) -> list[str]:
    """What a person reads in an item: message text, tool arguments, tool output.

    Used by store-wide search, so JSON keys and ids never match a search term.
    """
    if not isinstance(item, Mapping):
        return []
    texts = content_texts(item.get("content", ""))
    for key in ("arguments", "output", "name"):
        value = item.get(key)
        if isinstance(value, str):
            texts.append(value)
        elif value is not None and key == "output":
            texts.append(json.dumps(value, ensure_ascii=False))
    return [text for text in texts if text]
