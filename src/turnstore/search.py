"""Search across every conversation of a store, newest match first, paged by an opaque cursor.

The term matches literally (``%`` and ``_`` are plain characters), ASCII case ignored, in what
a person reads in an item: message text, tool arguments and tool output (not JSON keys or
ids). Pages follow one another by message id (keyset): a page may hold fewer hits than
``limit`` while more follow; go on while ``next_cursor`` is not ``None``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from turnstore.errors import InvalidArgumentError
from turnstore.persistence import search as queries
from turnstore.persistence.engines import EngineHandle
from turnstore.persistence.models import StoreTables
from turnstore.persistence.rollups import Owners
from turnstore.sdk.items import decode, item_texts, search_pattern, stored_form

MAX_PAGE = 1000
SNIPPET_CONTEXT = 40


@dataclass(frozen=True)
class SearchHit:
    """One item that contains the term.

    Attributes:
        session_id: Its session.
        message_id: The stored message's id.
        branches: The branches holding it (a message before a fork is on several).
        turn: Its user turn (on the first of ``branches``).
        kind: The item's role (``user``, ``assistant``) or type (``function_call``...).
        snippet: The text around the first match.
        created_at: When it was stored (UTC).
    """

    session_id: str
    message_id: int
    branches: list[str]
    turn: int | None
    kind: str | None
    snippet: str
    created_at: str | None

    def to_dict(self) -> dict[str, Any]:
        """The hit as JSON-ready data (the shape of ``turnstore search --json``)."""
        return {
            "session_id": self.session_id,
            "message_id": self.message_id,
            "branches": self.branches,
            "turn": self.turn,
            "kind": self.kind,
            "snippet": self.snippet,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class SearchPage:
    """A page of hits and the cursor of the next one (``None`` at the end)."""

    hits: list[SearchHit]
    next_cursor: str | None


def _fingerprint(term: str, user_id: str | None) -> str:
    return hashlib.sha256(json.dumps([term, user_id]).encode()).hexdigest()[:16]


def _encode(before_id: int, term: str, user_id: str | None) -> str:
    raw = json.dumps({"b": before_id, "f": _fingerprint(term, user_id)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode(cursor: object, term: str, user_id: str | None) -> int | None:
    if cursor is None:
        return None
    try:
        assert isinstance(cursor, str)
        padded = cursor + "=" * (-len(cursor) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        before, fingerprint = data["b"], data["f"]
        assert isinstance(before, int)
        assert not isinstance(before, bool)
    except Exception:
        raise InvalidArgumentError(
            "cursor is not one a search returned; pass the next_cursor of the previous page"
        ) from None
    if fingerprint != _fingerprint(term, user_id):
        raise InvalidArgumentError(
            "cursor belongs to another search (a different term or user); start again without it"
        )
    return before


async def search(
    handle: EngineHandle,
    tables: StoreTables,
    term: object,
    *,
    user_id: object = None,
    limit: object = 20,
    cursor: object = None,
    owners: Owners | None = None,
) -> SearchPage:
    """One page of items containing ``term``, newest first; see the module docstring.

    Raises:
        InvalidArgumentError: A blank or non-str term, a bad limit, a cursor that is not one
            this search returned, or a user filter without session owners.
    """
    if not isinstance(term, str) or not term.strip():
        raise InvalidArgumentError("the search term must be a non-blank str")
    if user_id is not None and not isinstance(user_id, str):
        raise InvalidArgumentError(f"user_id must be a str; got {type(user_id).__name__}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise InvalidArgumentError(f"limit must be an int from 1 to {MAX_PAGE}; got {limit!r}")
    if user_id is not None and owners is None:
        raise InvalidArgumentError(
            "searching one user's sessions needs the sessions' owners (the store's session info)"
        )
    before = _decode(cursor, term, user_id)
    rows = await queries.candidates(
        handle,
        tables,
        stored_form(term),
        before_id=before,
        limit=limit,
        owners=owners,
        user_id=user_id,
    )
    pattern = search_pattern(term)
    matched: list[tuple[int, str, Any, str, str | None]] = []
    for message_id, session_id, data, created_at in rows:
        item = decode(data)
        for text in item_texts(item):
            found = pattern.search(text)
            if found is not None:
                matched.append(
                    (
                        message_id,
                        session_id,
                        item,
                        _snippet(text, found.start(), found.end()),
                        created_at,
                    )
                )
                break
    where = await queries.places(handle, tables, [(sid, mid) for mid, sid, *_ in matched])
    hits = []
    for message_id, session_id, item, snippet, created_at in matched:
        spots = where.get((session_id, message_id), [])
        spots.sort(key=lambda spot: spot[0] != "main")
        kind = item.get("role") or item.get("type") if isinstance(item, dict) else None
        hits.append(
            SearchHit(
                session_id=session_id,
                message_id=message_id,
                branches=[branch for branch, _ in spots],
                turn=spots[0][1] if spots else None,
                kind=kind if isinstance(kind, str) else None,
                snippet=snippet,
                created_at=created_at,
            )
        )
    next_cursor = _encode(rows[-1][0], term, user_id) if len(rows) == limit else None
    return SearchPage(hits, next_cursor)


def _snippet(text: str, start: int, end: int) -> str:
    left = max(start - SNIPPET_CONTEXT, 0)
    right = min(end + SNIPPET_CONTEXT, len(text))
    body = " ".join(text[left:right].split())
    return ("…" if left > 0 else "") + body + ("…" if right < len(text) else "")
