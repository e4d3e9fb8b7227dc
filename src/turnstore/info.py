"""Session info and summaries, as the two faces (a session, the store) take and return them.

A session may carry an owner (``user_id``), a ``title`` and a JSON ``metadata`` dict; the
store keeps them, with the session's last activity, in ``turnstore_session_info``. This module
checks those values before anything is stored, converts times between ``datetime`` and the
stored microseconds, and shapes the stored rows into :class:`SessionSummary` records.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from turnstore.errors import InvalidArgumentError
from turnstore.persistence.dialects.base import JSONScalar
from turnstore.persistence.jsoncodec import loads_or_none
from turnstore.persistence.models import MAX_TITLE_LENGTH
from turnstore.persistence.store_queries import SessionRow
from turnstore.redaction import model_data
from turnstore.sdk.items import content_preview

#: Longest metadata, serialized as JSON, in characters.
MAX_METADATA_LENGTH = 65_536
#: How deep metadata may nest (dicts and lists).
MAX_METADATA_DEPTH = 32
#: Characters of the first user message a summary's ``preview`` keeps.
PREVIEW_LENGTH = 100

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_INT64 = 2**63
# Text no database stores alike: Postgres refuses NUL in text and \u0000 in JSONB, and no
# driver encodes an unpaired surrogate. Refused up front, so every backend answers the same.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class _Unset:
    """The default of keyword arguments that may also be set to ``None``."""

    _instance: _Unset | None = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


#: "Not given": leave the stored value as it is.
UNSET: Any = _Unset()


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """What the store knows about one session, as listings and ``get_session_info`` give it.

    Attributes:
        session_id: The session.
        user_id: Its owner, or ``None``.
        title: Its title, or ``None``.
        metadata: Its metadata (``{}`` when none was set).
        created_at: When the store first knew the session (UTC).
        last_activity: When it was last written: items added or removed, usage stored,
            branches created or deleted, cleared (UTC). Setting info does not count.
        items: Items on the ``main`` branch.
        user_turns: User turns on ``main``.
        branches: Branches that hold items (``main`` included).
        total_tokens: Tokens stored by ``store_run_usage``, over every branch.
        preview: The start of the first user message on ``main`` (``None`` if there is
            none); left out of ``repr`` unless the model-data logging policy allows content.
    """

    session_id: str
    user_id: str | None
    title: str | None
    metadata: dict[str, Any]
    created_at: datetime
    last_activity: datetime
    items: int
    user_turns: int
    branches: int
    total_tokens: int
    preview: str | None = field(repr=False)

    def __repr__(self) -> str:
        return (
            f"SessionSummary(session_id={self.session_id!r}, user_id={self.user_id!r}, "
            f"title={self.title!r}, metadata={self.metadata!r}, "
            f"created_at={self.created_at!r}, last_activity={self.last_activity!r}, "
            f"items={self.items}, user_turns={self.user_turns}, branches={self.branches}, "
            f"total_tokens={self.total_tokens}, preview={self._shown_preview()!r})"
        )

    def _shown_preview(self) -> object:
        return None if self.preview is None else model_data(self.preview)


def summary_from_row(row: SessionRow) -> SessionSummary:
    """Shape a stored row for callers: times as datetimes, the preview decoded and cut."""
    metadata = row.metadata
    if isinstance(metadata, str):  # text storage that a driver did not decode
        metadata = loads_or_none(metadata, "session metadata")
    return SessionSummary(
        session_id=row.session_id,
        user_id=row.user_id,
        title=row.title,
        metadata=dict(metadata) if isinstance(metadata, Mapping) else {},
        created_at=from_micros(row.created_at_us),
        last_activity=from_micros(row.last_activity_us),
        items=row.items,
        user_turns=row.user_turns,
        branches=row.branches,
        total_tokens=row.total_tokens,
        preview=_preview(row.first_user_message),
    )


def _preview(stored: str | None) -> str | None:
    if stored is None:
        return None
    item = loads_or_none(stored, "conversation item")
    if not isinstance(item, Mapping):
        return None
    return content_preview(item.get("content", ""), PREVIEW_LENGTH)


# -- times -------------------------------------------------------------------------------


def from_micros(value: int) -> datetime:
    """Stored microseconds since the epoch as an aware UTC datetime."""
    return _EPOCH + timedelta(microseconds=value)


def to_micros(value: object, argument: str) -> int:
    """An aware datetime (naive ones are taken as UTC) in microseconds since the epoch.

    Raises:
        InvalidArgumentError: ``value`` is not a datetime.
    """
    if not isinstance(value, datetime):
        raise InvalidArgumentError(f"{argument} must be a datetime; got {type(value).__name__}")
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // timedelta(microseconds=1)


# -- checking what callers give ----------------------------------------------------------


def _check_storable(text: str, where: str) -> str:
    if _UNSTORABLE.search(text):
        raise InvalidArgumentError(
            f"{where} contains a NUL character or an unpaired surrogate, which databases "
            "cannot store as text; remove it (or encode the value, e.g. as base64)"
        )
    return text


def check_user_id(value: object, argument: str = "user_id") -> str | None:
    """A user id as given (ids are identities: never trimmed or case-mapped), or ``None``.

    Raises:
        InvalidArgumentError: Not a non-empty str.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{argument} must be a str or None; got {type(value).__name__}")
    if not value:
        raise InvalidArgumentError(f"{argument} must not be empty; pass None for no owner")
    return _check_storable(value, argument)


def check_title(value: object) -> str | None:
    """A title, or ``None``.

    Raises:
        InvalidArgumentError: Not a str, or longer than ``MAX_TITLE_LENGTH`` characters.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgumentError(f"title must be a str or None; got {type(value).__name__}")
    if len(value) > MAX_TITLE_LENGTH:
        raise InvalidArgumentError(
            f"title is at most {MAX_TITLE_LENGTH} characters; got {len(value)}"
        )
    return _check_storable(value, "title")


def check_metadata(value: object) -> dict[str, Any] | None:
    """Metadata as a JSON-ready dict (a deep copy), or ``None``.

    Raises:
        InvalidArgumentError: Not a mapping with str keys whose values are JSON (str, finite
            float, int within 64 bits, bool, None, lists and dicts of them), nested deeper
            than ``MAX_METADATA_DEPTH`` or longer than ``MAX_METADATA_LENGTH`` as JSON.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidArgumentError(f"metadata must be a dict or None; got {type(value).__name__}")
    copied = _json_copy(value, "metadata", 0)
    assert isinstance(copied, dict)
    length = len(json.dumps(copied, ensure_ascii=False, separators=(",", ":")))
    if length > MAX_METADATA_LENGTH:
        raise InvalidArgumentError(
            f"metadata is at most {MAX_METADATA_LENGTH} characters as JSON; got {length}. "
            "Keep large data in your own tables and reference it from metadata."
        )
    return copied


def _json_copy(value: object, where: str, depth: int) -> Any:
    if depth > MAX_METADATA_DEPTH:
        raise InvalidArgumentError(
            f"metadata nests deeper than {MAX_METADATA_DEPTH} levels (at {where})"
        )
    if isinstance(value, str):
        return _check_storable(value, where)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not -_INT64 <= value < _INT64:
            raise InvalidArgumentError(f"{where} is an int beyond 64 bits; store it as a str")
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgumentError(f"{where} is {value!r}, which JSON cannot hold")
        return float(value)
    if isinstance(value, Mapping):
        copied: dict[str, Any] = {}
        for key, inner in value.items():
            if not isinstance(key, str):
                raise InvalidArgumentError(
                    f"{where} has a key of type {type(key).__name__}; JSON keys are str"
                )
            _check_storable(key, f"a key of {where}")
            copied[key] = _json_copy(inner, f"{where}[{key!r}]", depth + 1)
        return copied
    if isinstance(value, list | tuple):
        return [_json_copy(inner, f"{where}[{n}]", depth + 1) for n, inner in enumerate(value)]
    raise InvalidArgumentError(
        f"{where} is a {type(value).__name__}, which is not JSON (use str, int, float, bool, "
        "None, list or dict)"
    )


def check_metadata_filter(value: object) -> dict[str, JSONScalar] | None:
    """A listing's metadata filter: top-level keys and the JSON scalars they must equal.

    Raises:
        InvalidArgumentError: Not a mapping of str keys to str, int, float, bool or None.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidArgumentError(
            f"metadata filter must be a dict or None; got {type(value).__name__}"
        )
    checked: dict[str, JSONScalar] = {}
    for key, wanted in value.items():
        if not isinstance(key, str):
            raise InvalidArgumentError(
                f"metadata filter keys must be str; got {type(key).__name__}"
            )
        if isinstance(wanted, Mapping | list | tuple):
            raise InvalidArgumentError(
                f"metadata filter value for {key!r} is a {type(wanted).__name__}; filters "
                "compare top-level keys with str, int, float, bool or None"
            )
        _check_storable(key, "a metadata filter key")
        checked[key] = _json_copy(wanted, f"metadata filter[{key!r}]", 0)
    return checked
