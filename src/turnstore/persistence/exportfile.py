"""turnstore's export format: JSON Lines records, one session after another (docs/export-format.md).

Records are plain dicts, the same in a file and in ``Store.export()``'s iterator. A file
starts with a header naming the format and its version and ends with an end record; each
session is a ``session`` record, its ``message``, ``structure`` and ``usage`` records in that
order, and a ``session_end`` record with its counts. :class:`RecordDecoder` checks every
record as it streams and raises :class:`~turnstore.errors.ExportFileError` naming the line
where a file is truncated, corrupt, of an unknown version, or refers to a message it never
defined.
"""

from __future__ import annotations

import bisect
import io
import json
from array import array
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from datetime import UTC, datetime
from typing import IO, Any

from turnstore.errors import ExportFileError, InvalidArgumentError
from turnstore.persistence import jsoncodec
from turnstore.persistence.models import APPEND_KEYS_TABLE, LINEAGE_TABLE, TURN_MODELS_TABLE
from turnstore.persistence.moving import (
    Batch,
    ExtraRow,
    MessageRow,
    SessionCounts,
    SessionHead,
    StructureRow,
    UsageRow,
)
from turnstore.persistence.types import parse_timestamp
from turnstore.persistence.validation import check_identifier, fits_integer_column

FORMAT_NAME = "turnstore-export"
#: The version this turnstore writes. It reads every version up to this one.
FORMAT_VERSION = 1

Record = dict[str, Any]


def _encoder() -> Callable[[Any], bytes]:
    try:
        import msgspec
    except ImportError:  # not on this interpreter: the standard library encodes

        def encode(value: Any) -> bytes:
            return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()

        return encode
    return msgspec.json.Encoder().encode


_encode = _encoder()


# -- records -------------------------------------------------------------------------------


def header_record(*, producer: str, source: str | None = None) -> Record:
    """The first record of an export."""
    record: Record = {
        "record": "header",
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "exported_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "producer": producer,
    }
    if source is not None:
        record["source"] = source
    return record


def session_record(head: SessionHead) -> Record:
    """The record opening a session."""
    return {
        "record": "session",
        "session_id": head.session_id,
        "has_session_row": head.has_session_row,
        "created_at": head.created_at,
        "updated_at": head.updated_at,
        "clear_generation": head.clear_generation,
        "reserved_branches": list(head.reserved_branches),
        "info": head.info,
    }


def batch_records(batch: Batch) -> list[Record]:
    """The records of a batch of rows."""
    if not batch:
        return []
    if isinstance(batch[0], ExtraRow):
        return [
            {"record": "row", "table": row.table, "values": row.values}
            for row in batch
            if isinstance(row, ExtraRow)
        ]
    if isinstance(batch[0], MessageRow):
        return [
            {"record": "message", "id": row.id, "created_at": row.created_at, "data": row.data}
            for row in batch
            if isinstance(row, MessageRow)
        ]
    if isinstance(batch[0], StructureRow):
        return [
            {
                "record": "structure",
                "message_id": row.message_id,
                "branch_id": row.branch_id,
                "message_type": row.message_type,
                "sequence_number": row.sequence_number,
                "user_turn_number": row.user_turn_number,
                "branch_turn_number": row.branch_turn_number,
                "tool_name": row.tool_name,
                "created_at": row.created_at,
            }
            for row in batch
            if isinstance(row, StructureRow)
        ]
    return [
        {
            "record": "usage",
            "branch_id": row.branch_id,
            "user_turn_number": row.user_turn_number,
            "requests": row.requests,
            "input_tokens": row.input_tokens,
            "output_tokens": row.output_tokens,
            "total_tokens": row.total_tokens,
            "input_tokens_details": row.input_tokens_details,
            "output_tokens_details": row.output_tokens_details,
            "created_at": row.created_at,
        }
        for row in batch
        if isinstance(row, UsageRow)
    ]


def session_end_record(session_id: str, counts: SessionCounts) -> Record:
    """The record closing a session, with how many records of each kind it had."""
    return {
        "record": "session_end",
        "session_id": session_id,
        "messages": counts.messages,
        "structure": counts.structure,
        "usage": counts.usage,
        "rows": counts.extras,
    }


def end_record(sessions: int) -> Record:
    """The last record of an export."""
    return {"record": "end", "sessions": sessions}


def encode_line(record: Record) -> bytes:
    """One record as a line of UTF-8 JSON (newline included)."""
    return _encode(record) + b"\n"


class LineWriter:
    """Writes records to a binary or text file object, one JSON line each."""

    def __init__(self, file: IO[Any]) -> None:
        self._text = _takes_text(file)
        self._file = file

    def write(self, records: Iterable[Record]) -> None:
        """Write the records."""
        data = b"".join(encode_line(record) for record in records)
        if self._text:
            self._file.write(data.decode("utf-8"))
        else:
            self._file.write(data)


def _takes_text(file: object) -> bool:
    if isinstance(file, io.TextIOBase):
        return True
    if isinstance(file, io.RawIOBase | io.BufferedIOBase):
        return False
    return "b" not in str(getattr(file, "mode", ""))


# -- reading -------------------------------------------------------------------------------


def file_records(file: IO[Any]) -> Iterator[tuple[int, Any]]:
    """``(line number, decoded JSON)`` for each line of an export file (binary or text).

    Raises:
        ExportFileError: A line is not JSON, or not UTF-8.
    """
    number = 0
    for line in file:
        number += 1
        if isinstance(line, bytes):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ExportFileError(number, f"not UTF-8 text ({exc.reason})") from None
        else:
            text = line
        if not text.endswith("\n"):
            if not text.strip():
                continue
            truncated = " (the file ends in the middle of this line: truncated?)"
        else:
            truncated = ""
        try:
            value = jsoncodec.loads(text.strip())
        except (ValueError, RecursionError):
            raise ExportFileError(number, f"not a JSON record{truncated}") from None
        yield number, value


def numbered(
    records: Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]],
) -> Iterable[tuple[int, Any]] | AsyncIterator[tuple[int, Any]]:
    """Records given as objects, numbered from 1 like the lines of a file."""
    if isinstance(records, AsyncIterable):
        return _numbered_async(records)
    return enumerate(records, start=1)


async def _numbered_async(
    records: AsyncIterable[Mapping[str, Any]],
) -> AsyncIterator[tuple[int, Any]]:
    number = 0
    async for record in records:
        number += 1
        yield number, record


_SESSION_KEYS = {
    "record",
    "session_id",
    "has_session_row",
    "created_at",
    "updated_at",
    "clear_generation",
    "reserved_branches",
    "info",
}
_MESSAGE_KEYS = {"record", "id", "created_at", "data"}
_STRUCTURE_KEYS = {
    "record",
    "message_id",
    "branch_id",
    "message_type",
    "sequence_number",
    "user_turn_number",
    "branch_turn_number",
    "tool_name",
    "created_at",
}
_USAGE_KEYS = {
    "record",
    "branch_id",
    "user_turn_number",
    "requests",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "input_tokens_details",
    "output_tokens_details",
    "created_at",
}
_SESSION_END_KEYS = {"record", "session_id", "messages", "structure", "usage", "rows"}
_ROW_KEYS = {"record", "table", "values"}
#: turnstore's own per-session tables whose rows an export carries as ``row`` records.
ROW_TABLES = frozenset({TURN_MODELS_TABLE, LINEAGE_TABLE, APPEND_KEYS_TABLE})
# The row tables' id columns (VARCHAR(255) with an exact collation on MariaDB).
_ID_COLUMNS = frozenset({"branch_id", "parent_branch_id", "model", "append_key"})
_HEADER_KEYS = {"record", "format", "version", "exported_at", "producer", "source"}
_KIND_ORDER = {"message": 0, "structure": 1, "usage": 2, "row": 3}


class _Checker:
    """Field checks of one record, raising :class:`ExportFileError` for its line."""

    __slots__ = ("line", "record")

    def __init__(self, line: int, record: Mapping[str, Any], keys: set[str]) -> None:
        self.line = line
        self.record = record
        unknown = sorted(set(record) - keys)
        if unknown:
            raise ExportFileError(
                line, f"{record['record']} record has unknown field(s) {', '.join(unknown)}"
            )

    def fail(self, problem: str) -> ExportFileError:
        return ExportFileError(self.line, f"{self.record['record']} record: {problem}")

    def _get(self, key: str, optional: bool) -> Any:
        if key not in self.record:
            if optional:
                return None
            raise self.fail(f"missing field {key!r}")
        return self.record[key]

    def text(self, key: str, *, optional: bool = False) -> Any:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.fail(f"{key!r} must be a string; got {_kind(value)}")
        return value

    def identifier(self, key: str) -> str:
        """A session or branch id, held to the rules every write applies.

        Without this a file could carry ids no backend stores alike: MariaDB refused a
        300-character branch id with a driver error while SQLite and Postgres took it.
        """
        value = self.text(key)
        try:
            return check_identifier(value, repr(key))
        except InvalidArgumentError as exc:
            raise self.fail(str(exc)) from None

    def integer(self, key: str, *, optional: bool = False, stored: bool = True) -> Any:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{key!r} must be an integer; got {_kind(value)}")
        # A value that goes into an INTEGER column must fit it on every backend (Postgres and
        # MariaDB refuse past 32 bits with a driver error, SQLite takes it).
        if stored and not fits_integer_column(value):
            raise self.fail(f"{key!r} is {value}, beyond what the INTEGER columns hold")
        return value

    def timestamp(self, key: str) -> str | None:
        value = self.text(key, optional=True)
        if value is not None:
            try:
                parse_timestamp(value)
            except ValueError:
                raise self.fail(f"{key!r} is not an ISO 8601 timestamp: {value!r}") from None
        return value  # type: ignore[no-any-return]

    def json_text(self, key: str) -> str | None:
        return self.text(key, optional=True)  # type: ignore[no-any-return]

    def item_text(self, key: str) -> str:
        """A message's stored item: the JSON text of an object, as every session stores one.

        Anything else would be written as it is and then read back by no one: the sessions
        skip a row they cannot decode, so the item would silently vanish from its history.
        """
        value: str = self.text(key)
        try:
            item = jsoncodec.loads(value)
        except (ValueError, RecursionError):
            raise self.fail(f"{key!r} is not JSON text (the stored item's JSON)") from None
        if not isinstance(item, dict):
            raise self.fail(
                f"{key!r} must be the JSON of an item, an object; got the JSON of "
                f"{_json_kind(item)}"
            )
        return value


_INFO_KEYS = {"user_id", "title", "metadata", "created_at_us", "last_activity_us"}


def _checked_info(check: _Checker, info: object) -> dict[str, Any]:
    """A session record's ``info``: owner, title, metadata and the two activity times."""
    if not isinstance(info, dict):
        raise check.fail(f"'info' must be an object or null; got {_kind(info)}")
    if set(info) != _INFO_KEYS:
        raise check.fail(f"'info' must have exactly the fields {', '.join(sorted(_INFO_KEYS))}")
    for key in ("user_id", "title"):
        if info[key] is not None and not isinstance(info[key], str):
            raise check.fail(f"'info.{key}' must be a string or null; got {_kind(info[key])}")
    if info["metadata"] is not None and not isinstance(info["metadata"], dict):
        raise check.fail(
            f"'info.metadata' must be an object or null; got {_kind(info['metadata'])}"
        )
    for key in ("created_at_us", "last_activity_us"):
        value = info[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise check.fail(f"'info.{key}' must be an integer; got {_kind(value)}")
    return info


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _json_kind(value: object) -> str:
    """What a decoded JSON value is, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "a string" if isinstance(value, str) else "an array"


class RecordDecoder:
    """Checks a stream of numbered records and hands out one session at a time.

    Use :meth:`sessions`; each session's batches must be read, or abandoned (the decoder then
    reads past the rest of the session, still checking it, when asked for the next one).

    Args:
        records: ``(line number, record)`` pairs, from :func:`file_records` or :func:`numbered`.
        batch_size: Rows per batch handed out.
    """

    def __init__(
        self,
        records: Iterable[tuple[int, Any]] | AsyncIterable[tuple[int, Any]],
        *,
        batch_size: int,
    ) -> None:
        self._records: Iterator[tuple[int, Any]] | None = None
        self._async_records: AsyncIterator[tuple[int, Any]] | None = None
        if isinstance(records, AsyncIterable):
            self._async_records = aiter(records)
        else:
            self._records = iter(records)
        self._batch_size = batch_size
        self._last_line = 0
        self.version: int | None = None
        self.header: Record | None = None
        self._in_session: SessionHead | None = None

    @property
    def line(self) -> int:
        """The number of the last line read."""
        return self._last_line

    # -- plumbing

    async def _next(self) -> tuple[int, Any] | None:
        if self._records is not None:
            found = next(self._records, None)
        else:
            assert self._async_records is not None
            found = await anext(self._async_records, None)
        if found is not None:
            self._last_line = found[0]
            if not isinstance(found[1], dict) or not isinstance(found[1].get("record"), str):
                raise ExportFileError(found[0], 'not a record (an object with a "record" field)')
        return found

    async def _expect_more(self, what: str) -> tuple[int, Any]:
        found = await self._next()
        if found is None:
            raise ExportFileError(
                self._last_line + 1, f"the file ends before {what}: it is truncated"
            )
        return found

    async def read_header(self) -> Record:
        """Read and check the header.

        Raises:
            ExportFileError: No header, another format, or a version this turnstore cannot read.
        """
        found = await self._next()
        if found is None:
            raise ExportFileError(1, "the file is empty; expected a turnstore export header")
        line, record = found
        if record.get("record") != "header" or record.get("format") != FORMAT_NAME:
            raise ExportFileError(
                line, f"not a turnstore export: expected a header record of format {FORMAT_NAME!r}"
            )
        check = _Checker(line, record, _HEADER_KEYS)
        version = check.integer("version", stored=False)
        if version > FORMAT_VERSION:
            raise ExportFileError(
                line,
                f"export format version {version} was written by a newer turnstore; this "
                f"version reads versions 1 to {FORMAT_VERSION}. Upgrade turnstore to import it.",
            )
        if version < 1:
            raise ExportFileError(line, f"unknown export format version {version}")
        self.version = version
        self.header = dict(record)
        return self.header

    # -- sessions

    async def sessions(self) -> AsyncIterator[tuple[SessionHead, AsyncIterator[Batch]]]:
        """Each session's head and its batches, in file order, then checks the end record."""
        if self.header is None:
            await self.read_header()
        count = 0
        while True:
            if self._in_session is not None:
                await self._skip_rest()
            line, record = await self._expect_more("its end record")
            kind = record["record"]
            if kind == "end":
                check = _Checker(line, record, {"record", "sessions"})
                declared = check.integer("sessions", stored=False)
                if declared != count:
                    raise check.fail(
                        f"the file says it holds {declared} sessions, but {count} came before "
                        "it: sessions are missing"
                    )
                trailing = await self._next()
                if trailing is not None:
                    raise ExportFileError(trailing[0], "records after the end record")
                return
            if kind != "session":
                raise ExportFileError(line, f"expected a session or end record; got {kind!r}")
            head = self._head(line, record)
            self._in_session = head
            self._state = _SessionState()
            count += 1
            yield head, self._batches(head)

    def _head(self, line: int, record: Mapping[str, Any]) -> SessionHead:
        check = _Checker(line, record, _SESSION_KEYS)
        session_id = check.identifier("session_id")
        has_row = check._get("has_session_row", False)
        if not isinstance(has_row, bool):
            raise check.fail(f"'has_session_row' must be true or false; got {_kind(has_row)}")
        reserved = check._get("reserved_branches", False)
        if not isinstance(reserved, list) or not all(isinstance(n, str) for n in reserved):
            raise check.fail("'reserved_branches' must be a list of strings")
        for name in reserved:
            try:
                check_identifier(name, "a reserved branch name")
            except InvalidArgumentError as exc:
                raise check.fail(str(exc)) from None
        info = check._get("info", True)
        if info is not None:
            info = _checked_info(check, info)
        generation = check.integer("clear_generation", optional=True)
        return SessionHead(
            session_id=session_id,
            has_session_row=has_row,
            created_at=check.timestamp("created_at"),
            updated_at=check.timestamp("updated_at"),
            clear_generation=generation,
            reserved_branches=tuple(reserved),
            info=info,
        )

    async def _skip_rest(self) -> None:
        assert self._in_session is not None
        async for _batch in self._batches(self._in_session):
            pass

    async def _batches(self, session: SessionHead) -> AsyncIterator[Batch]:
        """The (rest of the) batches of ``session``, checked, if it is still being read."""
        if self._in_session is not session:
            return
        state = self._state
        size = self._batch_size
        batch: list[Any] = []
        batch_kind = ""
        while True:
            line, record = await self._expect_more(f"the end of session {session.session_id!r}")
            kind = record["record"]
            if kind == "session_end":
                if batch:
                    yield batch
                self._end(line, record, session, state)
                self._in_session = None
                return
            rank = _KIND_ORDER.get(kind)
            if rank is None:
                raise ExportFileError(
                    line,
                    f"expected a message, structure, usage, row or session_end record inside "
                    f"session {session.session_id!r}; got {kind!r} (is the session_end "
                    "record missing?)",
                )
            if rank < state.rank:
                raise ExportFileError(
                    line,
                    f"{kind} record after {_ORDER_NAMES[state.rank]} records: a session lists "
                    "its messages, then its structure rows, then its usage rows",
                )
            state.rank = rank
            if kind != batch_kind and batch:
                yield batch
                batch = []
            batch_kind = kind
            batch.append(state.row(line, record))
            if len(batch) >= size:
                yield batch
                batch = []

    def _end(
        self, line: int, record: Mapping[str, Any], session: SessionHead, state: _SessionState
    ) -> None:
        check = _Checker(line, record, _SESSION_END_KEYS)
        if check.text("session_id") != session.session_id:
            raise check.fail(
                f"closes session {record['session_id']!r}, but session "
                f"{session.session_id!r} is open"
            )
        seen = {
            "messages": state.messages,
            "structure": state.structure,
            "usage": state.usage,
            "rows": state.extras,
        }
        for key, count in seen.items():
            # ``rows`` came with the row records; an end without it declares none.
            declared = (
                check.integer(key, optional=True, stored=False)
                if key == "rows"
                else check.integer(key, stored=False)
            )
            declared = declared or 0
            if declared != count:
                raise check.fail(
                    f"the session should have {declared} {key} records but has {count}: "
                    "records are missing or extra"
                )

    _state: _SessionState


_ORDER_NAMES = {0: "message", 1: "structure", 2: "usage", 3: "row"}


class _SessionState:
    """What the decoder remembers of the session being read.

    8 bytes a message (its id), and the (branch, turn) pairs that have usage.
    """

    __slots__ = ("extras", "ids", "messages", "rank", "structure", "usage", "usage_keys")

    def __init__(self) -> None:
        self.ids = array("q")
        self.rank = 0
        self.messages = self.structure = self.usage = self.extras = 0
        self.usage_keys: set[tuple[str, int]] = set()

    def row(
        self, line: int, record: Mapping[str, Any]
    ) -> MessageRow | StructureRow | UsageRow | ExtraRow:
        kind = record["record"]
        if kind == "row":
            check = _Checker(line, record, _ROW_KEYS)
            table = check.text("table")
            if table not in ROW_TABLES:
                raise check.fail(
                    f"unknown table {table!r}; rows may be of {', '.join(sorted(ROW_TABLES))}"
                )
            values = check._get("values", False)
            if not isinstance(values, dict) or "session_id" in values:
                raise check.fail("'values' must be an object of the row's columns but session_id")
            for name, value in values.items():
                if value is not None and not isinstance(value, str | int | float | bool):
                    raise check.fail(f"'values.{name}' must be a string, number, boolean or null")
                # The same rules as the other records, so MariaDB and Postgres do not refuse
                # with a driver error what SQLite took.
                if isinstance(value, int) and not isinstance(value, bool):
                    if not fits_integer_column(value):
                        raise check.fail(
                            f"'values.{name}' is {value}, beyond what the INTEGER columns hold"
                        )
                elif name in _ID_COLUMNS and isinstance(value, str):
                    try:
                        check_identifier(value, f"'values.{name}'")
                    except InvalidArgumentError as exc:
                        raise check.fail(str(exc)) from None
            self.extras += 1
            return ExtraRow(table, values)
        if kind == "message":
            check = _Checker(line, record, _MESSAGE_KEYS)
            message_id = check.integer("id", stored=False)
            if self.ids and message_id <= self.ids[-1]:
                raise check.fail(
                    f"message ids must increase within a session; {message_id} follows "
                    f"{self.ids[-1]}"
                )
            self.ids.append(message_id)
            self.messages += 1
            return MessageRow(message_id, check.timestamp("created_at"), check.item_text("data"))
        if kind == "structure":
            check = _Checker(line, record, _STRUCTURE_KEYS)
            message_id = check.integer("message_id", stored=False)
            at = bisect.bisect_left(self.ids, message_id)
            if at == len(self.ids) or self.ids[at] != message_id:
                raise check.fail(
                    f"refers to message id {message_id}, which this session does not define"
                )
            self.structure += 1
            return StructureRow(
                message_id,
                check.identifier("branch_id"),
                check.text("message_type"),
                check.integer("sequence_number"),
                check.integer("user_turn_number", optional=True),
                check.integer("branch_turn_number", optional=True),
                check.text("tool_name", optional=True),
                check.timestamp("created_at"),
            )
        check = _Checker(line, record, _USAGE_KEYS)
        key = (check.identifier("branch_id"), check.integer("user_turn_number"))
        if key in self.usage_keys:
            raise check.fail(f"a second usage record for turn {key[1]} of branch {key[0]!r}")
        self.usage_keys.add(key)
        self.usage += 1
        return UsageRow(
            key[0],
            key[1],
            check.integer("requests", optional=True),
            check.integer("input_tokens", optional=True),
            check.integer("output_tokens", optional=True),
            check.integer("total_tokens", optional=True),
            check.json_text("input_tokens_details"),
            check.json_text("output_tokens_details"),
            check.timestamp("created_at"),
        )
