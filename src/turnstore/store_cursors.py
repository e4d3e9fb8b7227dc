"""Listing cursors: opaque, tamper-checked, and bound to the filter they were made with.

A cursor carries the keyset position of a page's last row (its last activity and session id)
and a fingerprint of the listing's filter, signed with HMAC-SHA256. Decoding checks the
signature, the shape of every field and the filter, so a cursor that was edited, cut short,
made up, or taken from another listing is refused with :class:`InvalidArgumentError` before
any query runs. Cursors are not secret: they reveal the position they hold (a session id and
a time the caller has already seen on the page).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import asdict
from typing import Any

from turnstore.errors import InvalidArgumentError
from turnstore.persistence.store_queries import Position, Selection

_VERSION = "c1"
_DEFAULT_KEY = b"turnstore listing cursor v1"
_MAC_BYTES = 16
#: Longer than any cursor turnstore makes (a session id is at most a few KiB).
MAX_CURSOR_LENGTH = 8192


class CursorCodec:
    """Makes and reads cursors with one signing key."""

    def __init__(self, key: bytes | str | None) -> None:
        if key is None:
            key = _DEFAULT_KEY
        if isinstance(key, str):
            key = key.encode()
        if not isinstance(key, bytes) or not key:
            raise InvalidArgumentError("cursor_key must be non-empty bytes or str, or None")
        self._key = key

    def encode(self, position: Position, selection: Selection) -> str:
        """The cursor for the page after ``position`` of the listing ``selection``."""
        payload = json.dumps(
            {"a": position[0], "s": position[1], "f": fingerprint(selection)},
            separators=(",", ":"),
            ensure_ascii=True,
        ).encode()
        return f"{_VERSION}.{_b64(payload)}.{_b64(self._mac(payload))}"

    def decode(self, cursor: object, selection: Selection) -> Position:
        """The position a cursor holds, if it was made by this codec for ``selection``.

        Raises:
            InvalidArgumentError: Not a cursor of this store, altered, or made for a listing
                with another filter.
        """
        if not isinstance(cursor, str):
            raise InvalidArgumentError(
                f"cursor must be a str (a page's next_cursor) or None; got {type(cursor).__name__}"
            )
        payload = self._verified_payload(cursor)
        try:
            fields = json.loads(payload)
            activity, session_id, filter_print = fields["a"], fields["s"], fields["f"]
        except (ValueError, KeyError, TypeError):
            raise _not_ours() from None
        if (
            not isinstance(activity, int)
            or isinstance(activity, bool)
            or not isinstance(session_id, str)
            or not isinstance(filter_print, str)
            or len(fields) != 3
        ):
            raise _not_ours()
        if not hmac.compare_digest(filter_print, fingerprint(selection)):
            raise InvalidArgumentError(
                "This cursor belongs to a listing with another filter (user_id, metadata, "
                "active_after or active_before). Pass the same filter as for the page that "
                "gave the cursor, or start again without a cursor."
            )
        return activity, session_id

    def _verified_payload(self, cursor: str) -> bytes:
        if len(cursor) > MAX_CURSOR_LENGTH:
            raise _not_ours()
        parts = cursor.split(".")
        if len(parts) != 3 or parts[0] != _VERSION:
            raise _not_ours()
        try:
            payload, mac = _unb64(parts[1]), _unb64(parts[2])
        except (ValueError, binascii.Error):
            raise _not_ours() from None
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise _not_ours()
        return payload

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:_MAC_BYTES]


def fingerprint(selection: Selection) -> str:
    """A short digest identifying a listing's filter (the same filter, the same digest)."""
    described: dict[str, Any] = asdict(selection)
    if described["metadata"] is not None:
        described["metadata"] = dict(sorted(described["metadata"].items()))
    text = json.dumps(described, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _not_ours() -> InvalidArgumentError:
    return InvalidArgumentError(
        "cursor is not a cursor of this store's listings, or it was altered. Pass the "
        "next_cursor of a page unchanged (stores that share cursors need the same "
        "cursor_key), or start again without a cursor."
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not text.isascii():
        raise ValueError("not base64")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
