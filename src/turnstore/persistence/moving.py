"""Whole sessions read out of one store and written into another, batch by batch.

Moving a conversation between databases is more than copying rows: message ids are assigned
by each database, and structure rows point at them. A :class:`SessionReader` streams one
session as plain records (its head, then its messages, structure rows and usage rows in
bounded batches, in id order, all from one snapshot); a :class:`SessionWriter` writes such a
stream into a store in one transaction, giving messages new ids and pointing the structure
rows at them. Everything else (sequence and turn numbers, branch names, tool names,
timestamps, token details, reserved branch names, clear generations) is written as read.

Only one batch of rows is in memory at a time, plus 16 bytes per message of the session being
written (the map from old to new message ids).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, insert, select, union
from sqlalchemy.engine import Connection

from turnstore.errors import InvalidArgumentError, SessionExistsError
from turnstore.persistence import jsoncodec
from turnstore.persistence.engines import EngineHandle
from turnstore.persistence.models import StoreTables
from turnstore.persistence.moving_queries import moving_queries, probe_missing
from turnstore.persistence.moving_rows import (
    DEFAULT_BATCH_SIZE,
    Batch,
    ExtraRow,
    MessageIdMap,
    MessageRow,
    OnConflict,
    SessionCounts,
    SessionData,
    SessionHead,
    StructureRow,
    UsageRow,
    WriteOutcome,
    export_timestamp,
)
from turnstore.persistence.prepared import PreparedStatement
from turnstore.persistence.types import parse_timestamp, stored_timestamp

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "Batch",
    "ExtraRow",
    "MessageIdMap",
    "MessageRow",
    "OnConflict",
    "SessionCounts",
    "SessionData",
    "SessionHead",
    "SessionReader",
    "SessionWriter",
    "StructureRow",
    "UsageRow",
    "WriteOutcome",
]


def _json_text(value: object) -> str | None:
    """Token details as JSON text.

    SQLite hands back the stored text. A server's native JSON type keeps no text of its own
    (Postgres's JSONB reorders keys), and some drivers decode it whatever the column is read
    as: such a value is encoded again, which keeps every key and value.
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8")
    return json.dumps(value, ensure_ascii=False)


class SessionReader:
    """Reads sessions of one store as records, each session from one snapshot.

    Args:
        handle: The store's engine handle.
        tables: The store's tables.
        batch_size: Rows per batch.
    """

    def __init__(
        self, handle: EngineHandle, tables: StoreTables, *, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be a positive int; got {batch_size!r}")
        self._handle = handle
        self._q = moving_queries(tables, handle.profile)
        self.batch_size = batch_size
        self._missing: frozenset[str] | None = None

    async def _missing_tables(self) -> frozenset[str]:
        """Bookkeeping tables the store lacks (a file of an older SDK release has neither)."""
        if self._missing is None:
            self._missing = await probe_missing(self._handle, self._q.optional)
        return self._missing

    async def session_ids(self, after: str | None, limit: int) -> list[str]:
        """Up to ``limit`` ids of sessions in the store, in id order, after ``after``.

        A session is known by its row, its clear generation (cleared, not written since) or
        its info (set before the first item), in whichever of those tables the store has.
        """
        missing = await self._missing_tables()
        sessions = self._q.tables.sessions
        parts = [select(sessions.c.session_id.label("session_id"))] + [
            select(table.c.session_id) for table in self._q.knowing if table.name not in missing
        ]
        if after is not None:
            parts = [part.where(part.selected_columns[0] > after) for part in parts]
        known = union(*parts).subquery()
        statement = select(known.c.session_id).order_by(known.c.session_id).limit(limit)
        return await self._handle.read(lambda conn: list(conn.execute(statement).scalars()))

    async def unknown(self, session_ids: Sequence[str]) -> list[str]:
        """Which of ``session_ids`` the store does not know, in the order given."""
        missing = await self._missing_tables()
        sessions = self._q.tables.sessions
        parts = [select(sessions.c.session_id.label("session_id"))] + [
            select(table.c.session_id) for table in self._q.knowing if table.name not in missing
        ]
        found: set[str] = set()
        for start in range(0, len(session_ids), self.batch_size):
            chunk = list(session_ids[start : start + self.batch_size])
            known = union(
                *(part.where(part.selected_columns[0].in_(chunk)) for part in parts)
            ).subquery()
            found.update(await self._handle.read(_scalars, select(known.c.session_id)))
        return [session_id for session_id in session_ids if session_id not in found]

    async def all_session_ids(self) -> AsyncIterator[str]:
        """Every session id of the store, in id order, a page at a time (keyset)."""
        after: str | None = None
        while True:
            page = await self.session_ids(after, self.batch_size)
            for session_id in page:
                yield session_id
            if len(page) < self.batch_size:
                return
            after = page[-1]

    async def read(self, session_id: str) -> AsyncIterator[SessionHead | Batch]:
        """The session's head, then its batches; nothing if the store has no such session.

        Every batch comes from the snapshot the head was read from, so a writer working on
        the session meanwhile cannot make the records disagree with one another.
        """
        q, size = self._q, self.batch_size
        missing = await self._missing_tables()
        async with self._handle.steps(write=False) as steps:
            head = await steps.run(self._head, session_id, missing)
            if head is None:
                return
            yield head
            for statement, shape in (
                (q.messages, _message),
                (q.structure, _structure),
                (q.usage, _usage),
            ):
                after = 0
                while True:
                    params = {"sid": session_id, "after": after, "limit": size}
                    rows = await steps.run(statement.rows, params)
                    if rows:
                        yield [shape(row) for row in rows]  # type: ignore[misc]
                    if len(rows) < size:
                        break
                    after = int(rows[-1][0])
            for name, extra in q.extra_reads.items():
                if name in missing:
                    continue
                found = await steps.run(_mappings, extra, {"sid": session_id})
                if found:
                    yield [ExtraRow(name, _extra_values(row)) for row in found]

    async def sizes(self, session_ids: Sequence[str]) -> dict[str, int]:
        """Rows (messages, structure and usage together) of each of the given sessions."""
        if not session_ids:
            return {}
        queries = self._q.group_sizes

        def count(conn: Connection) -> dict[str, int]:
            found: dict[str, int] = {}
            for statement in queries:
                for session_id, rows in conn.execute(statement, {"ids": list(session_ids)}):
                    found[session_id] = found.get(session_id, 0) + int(rows)
            return found

        return await self._handle.read(count)

    async def read_group(self, session_ids: Sequence[str]) -> list[SessionData]:
        """Whole sessions, all from one snapshot, in the order given (missing ones left out).

        For sessions small enough to hold together in memory (see :meth:`sizes`).
        """
        if not session_ids:
            return []
        missing = await self._missing_tables()
        async with self._handle.steps(write=False) as steps:
            return await steps.run(self._read_group, list(session_ids), missing)

    def _read_group(
        self, conn: Connection, session_ids: list[str], missing: frozenset[str]
    ) -> list[SessionData]:
        q = self._q
        params = {"ids": session_ids}
        data = {
            sid: SessionData(head, [], [], [])
            for sid, head in self._heads(conn, session_ids, missing).items()
        }
        for row in conn.execute(q.group_messages, params):
            if row[0] in data:
                data[row[0]].messages.append(_message(row[1:]))
        for row in conn.execute(q.group_structure, params):
            if row[0] in data:
                data[row[0]].structure.append(_structure(row))
        for row in conn.execute(q.group_usage, params):
            if row[0] in data:
                data[row[0]].usage.append(_usage(row))
        for name, statement in q.extra_group_reads.items():
            if name in missing:
                continue
            for values in _mappings(conn, statement, params):
                sid = values.pop("session_id")
                if sid in data:
                    data[sid].extras.append(ExtraRow(name, _extra_values(values)))
        return list(data.values())

    def _head(
        self, conn: Connection, session_id: str, missing: frozenset[str]
    ) -> SessionHead | None:
        return self._heads(conn, [session_id], missing).get(session_id)

    def _heads(
        self, conn: Connection, session_ids: list[str], missing: frozenset[str]
    ) -> dict[str, SessionHead]:
        """The heads of those of the sessions that exist, in the order given."""
        q = self._q
        reservations, generations, infos = q.bookkeeping
        params = {"ids": session_ids}
        rows = {sid: (c, u) for sid, c, u in conn.execute(q.group_session_rows, params)}
        found_generations: dict[str, int] = {}
        if generations not in missing:
            found_generations = {
                sid: int(g) for sid, g in conn.execute(q.group_generations, params)
            }
        reserved: dict[str, list[str]] = {}
        if reservations not in missing:
            for sid, name in conn.execute(q.group_reserved, params):
                reserved.setdefault(sid, []).append(name)
        info: dict[str, dict[str, Any]] = {}
        if infos not in missing:
            for sid, user_id, title, metadata, created, activity in conn.execute(
                q.group_info, params
            ):
                info[sid] = {
                    "user_id": user_id,
                    "title": title,
                    "metadata": _json_value(metadata),
                    "created_at_us": int(created),
                    "last_activity_us": int(activity),
                }
        heads = {}
        for sid in session_ids:
            row = rows.get(sid)
            generation = found_generations.get(sid)
            if row is None and generation is None and sid not in info:
                continue
            heads[sid] = SessionHead(
                session_id=sid,
                has_session_row=row is not None,
                created_at=None if row is None else export_timestamp(row[0]),
                updated_at=None if row is None else export_timestamp(row[1]),
                clear_generation=generation,
                reserved_branches=tuple(reserved.get(sid, ())),
                info=info.get(sid),
            )
        return heads


def _info_row(head: SessionHead) -> dict[str, Any] | None:
    """The info row to write for a session, if any.

    A session that comes with its info keeps it exactly (owner, title, metadata, creation
    and last activity, so listings order it as the source did). One that comes without
    (from a store older than the info table, or an SDK file) gets what the migration that
    added the table gives such sessions: its times from the sessions row, no owner.
    """
    if head.info is not None:
        return {"session_id": head.session_id, **head.info}
    if not head.has_session_row:
        return None
    created = _micros(head.created_at)
    return {
        "session_id": head.session_id,
        "user_id": None,
        "title": None,
        "metadata": None,
        "created_at_us": created,
        "last_activity_us": _micros(head.updated_at) if head.updated_at else created,
    }


_EPOCH = datetime(1970, 1, 1)


def _micros(text: str | None) -> int:
    """An export timestamp in microseconds since the epoch (now, if it has none)."""
    try:
        moment = parse_timestamp(text) if text else None
    except ValueError:
        moment = None
    if moment is None:
        moment = datetime.now(UTC).replace(tzinfo=None)
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _mappings(conn: Connection, statement: Any, params: dict[str, Any]) -> list[dict[str, Any]]:
    # Column names are SQLAlchemy's quoted_name (a str subclass): plain strings for encoders.
    return [
        {str(key): value for key, value in row.items()}
        for row in conn.execute(statement, params).mappings()
    ]


def _extra_values(values: dict[str, Any]) -> dict[str, Any]:
    """A per-session table's row for an export: its creation time as export text."""
    if "created_at" in values:
        values = {**values, "created_at": export_timestamp(values["created_at"])}
    return values


def _json_value(value: Any) -> Any:
    """A JSON column's value; text a driver did not decode is decoded (invalid: ``None``)."""
    if isinstance(value, str):
        return jsoncodec.loads_or_none(value, "session metadata")
    return value


def _message(row: Sequence[Any]) -> MessageRow:
    return MessageRow(int(row[0]), export_timestamp(row[1]), row[2])


def _structure(row: Sequence[Any]) -> StructureRow:
    return StructureRow(
        int(row[1]), row[2], row[3], int(row[4]), row[5], row[6], row[7], export_timestamp(row[8])
    )


def _usage(row: Sequence[Any]) -> UsageRow:
    return UsageRow(
        row[1],
        int(row[2]),
        row[3],
        row[4],
        row[5],
        row[6],
        _json_text(row[7]),
        _json_text(row[8]),
        export_timestamp(row[9]),
    )


class SessionWriter:
    """Writes sessions, each in one transaction, into one store."""

    def __init__(self, handle: EngineHandle, tables: StoreTables) -> None:
        self._handle = handle
        self._profile = handle.profile
        self._q = moving_queries(tables, handle.profile)
        self._missing: frozenset[str] | None = None

    async def _missing_tables(self) -> frozenset[str]:
        """Tables of turnstore's the target lacks (it predates them); probed once."""
        if self._missing is None:
            self._missing = await probe_missing(self._handle, self._q.optional)
        return self._missing

    async def exists(self, session_id: str) -> bool:
        """Whether the store has a session of that id (rows, generation or info)."""
        return bool(await self.existing([session_id]))

    async def write(
        self,
        head: SessionHead,
        batches: AsyncIterator[Batch],
        on_conflict: OnConflict = OnConflict.SKIP,
    ) -> WriteOutcome:
        """Write one session in one transaction: all of it, or (on any error) nothing.

        Args:
            head: The session's head.
            batches: Its rows, messages first (old ids increasing), then structure rows, then
                usage rows. Not consumed when the session is skipped.
            on_conflict: What to do when the store already has the session.

        Raises:
            SessionExistsError: The session exists and ``on_conflict`` is ``fail``.
            InvalidArgumentError: A structure row refers to a message the session did not
                define, or message ids do not increase.
        """
        try:
            missing = await self._missing_tables()
            async with self._handle.steps(write=True) as steps:
                replaced = await steps.run(self._begin, head, on_conflict, missing)
                if replaced is None:
                    return WriteOutcome(False, False, SessionCounts())
                ids = MessageIdMap()
                messages = structure = usage = extra = 0
                async for batch in batches:
                    if not batch:
                        continue
                    first = batch[0]
                    if isinstance(first, MessageRow):
                        rows = cast(list[MessageRow], batch)
                        await steps.run(self._messages, head.session_id, rows, ids)
                        messages += len(batch)
                    elif isinstance(first, StructureRow):
                        links = cast(list[StructureRow], batch)
                        await steps.run(self._structure, head.session_id, links, ids)
                        structure += len(batch)
                    elif isinstance(first, UsageRow):
                        await steps.run(self._usage, head.session_id, cast(list[UsageRow], batch))
                        usage += len(batch)
                    else:
                        extras = [(head.session_id, row) for row in cast(list[ExtraRow], batch)]
                        await steps.run(self._extras, extras, missing)
                        extra += len(batch)
                return WriteOutcome(
                    True, replaced, SessionCounts(messages, structure, usage, extra)
                )
        finally:
            # A source that reads from a snapshot ends it here, even when nothing was read.
            close = getattr(batches, "aclose", None)
            if close is not None:
                await close()

    async def existing(self, session_ids: Sequence[str]) -> set[str]:
        """Which of the given sessions the store has (rows, generation or info)."""
        if not session_ids:
            return set()
        statement = self._existing_statement(await self._missing_tables())
        return set(
            await self._handle.read(
                lambda conn: list(conn.execute(statement, {"ids": list(session_ids)}).scalars())
            )
        )

    def _existing_statement(self, missing: frozenset[str]) -> Any:
        q = self._q
        return q.group_existing_without_info if q.bookkeeping[2] in missing else q.group_existing

    async def write_group(
        self, sessions: Sequence[SessionData], on_conflict: OnConflict = OnConflict.SKIP
    ) -> list[WriteOutcome]:
        """Write several whole sessions in one transaction: all of them, or none.

        Raises:
            SessionExistsError: One of them exists and ``on_conflict`` is ``fail``; nothing of
                the group is written.
        """
        if not sessions:
            return []
        missing = await self._missing_tables()
        return await self._handle.write(self._write_group, list(sessions), on_conflict, missing)

    def _write_group(
        self,
        conn: Connection,
        sessions: list[SessionData],
        on_conflict: OnConflict,
        missing: frozenset[str],
    ) -> list[WriteOutcome]:
        q, profile, dialect = self._q, self._profile, conn.dialect
        states = self._claim(conn, [data.head for data in sessions], on_conflict, missing)
        outcomes = []
        chosen = []
        for data, state in zip(sessions, states, strict=True):
            if state is None:
                outcomes.append(WriteOutcome(False, False, SessionCounts()))
            else:
                outcomes.append(WriteOutcome(True, state, data.counts))
                chosen.append(data)
        if not chosen:
            return outcomes
        t = q.tables
        # Messages: ids handed out ahead (one statement for the group) where the database can,
        # so every row of the group goes in by its bulk path; else returned by the insert.
        count = sum(len(data.messages) for data in chosen)
        allocated = profile.allocate_ids(conn, t.messages, count)
        maps: list[MessageIdMap] = []
        if allocated is not None:
            at = 0
            message_rows = []
            for data in chosen:
                ids = MessageIdMap()
                new_ids = allocated[at : at + len(data.messages)]
                at += len(data.messages)
                ids.add([row.id for row in data.messages], new_ids)
                maps.append(ids)
                sid = data.head.session_id
                message_rows += [
                    (new_id, sid, row.data, stored_timestamp(row.created_at, dialect))
                    for new_id, row in zip(new_ids, data.messages, strict=True)
                ]
            columns = ("id", "session_id", "message_data", "created_at")
            if not profile.bulk_copy(conn, t.messages, columns, message_rows):
                conn.execute(
                    insert(t.messages),
                    [dict(zip(columns, row, strict=True)) for row in message_rows],
                )
        else:
            for data in chosen:
                ids = MessageIdMap()
                if data.messages:
                    self._messages(conn, data.head.session_id, data.messages, ids)
                maps.append(ids)
        structure = [
            self._structure_row(data.head.session_id, row, ids)
            for data, ids in zip(chosen, maps, strict=True)
            for row in data.structure
        ]
        usage = [
            self._usage_row(data.head.session_id, row) for data in chosen for row in data.usage
        ]
        self._load(conn, q.insert_structure, t.structure, structure)
        self._load(conn, q.insert_usage, t.usage, usage)
        self._extras(conn, [(d.head.session_id, row) for d in chosen for row in d.extras], missing)
        return outcomes

    def _extras(
        self, conn: Connection, rows: list[tuple[str, ExtraRow]], missing: frozenset[str]
    ) -> None:
        """Rows of turnstore's own per-session tables, by table (none where the target lacks
        the table, which only a target behind the schema can)."""  # noqa: D205, D209
        by_table: dict[str, list[dict[str, Any]]] = {}
        for session_id, row in rows:
            by_table.setdefault(row.table, []).append({"sid": session_id, **row.values})
        for name, values in by_table.items():
            if name not in missing:
                conn.execute(self._q.extra_inserts[name], values)

    def _load(
        self,
        conn: Connection,
        statement: PreparedStatement,
        table: Table,
        rows: list[dict[str, Any]],
    ) -> None:
        """Insert rows by the database's bulk path if it has one, else by ``statement``."""
        if not rows:
            return
        profile, dialect = self._profile, conn.dialect
        if not profile.has_bulk_copy(conn):
            statement.execute_many(conn, rows)
            return
        columns = [name for name in rows[0] if name != "sid"]
        records = [
            (
                row["sid"],
                *(
                    stored_timestamp(row[name], dialect)
                    if name in ("created_at", "updated_at")
                    else _valid_json(row[name])
                    if name.endswith("_details")
                    else row[name]
                    for name in columns
                ),
            )
            for row in rows
        ]
        profile.bulk_copy(conn, table, ["session_id", *columns], records)

    def _begin(
        self,
        conn: Connection,
        head: SessionHead,
        on_conflict: OnConflict,
        missing: frozenset[str],
    ) -> bool | None:
        """Lock, settle a conflict, write the head; ``None`` to skip, else whether replaced."""
        return self._claim(conn, [head], on_conflict, missing)[0]

    def _claim(
        self,
        conn: Connection,
        heads: list[SessionHead],
        on_conflict: OnConflict,
        missing: frozenset[str],
    ) -> list[bool | None]:
        """Lock the sessions, settle conflicts, write the heads of those to write.

        Returns:
            Per head: ``None`` if skipped, else whether an existing session was replaced.

        Raises:
            SessionExistsError: One exists and ``on_conflict`` is ``fail``.
        """
        q, t = self._q, self._q.tables
        params = {"ids": [head.session_id for head in heads]}
        if len(heads) > 1 and self._handle.is_distributed(conn):
            # One session per statement, in the order erasure locks them in.
            for session_id in sorted(params["ids"]):
                q.lock_session.rows(conn, {"sid": session_id})
        else:
            conn.execute(q.group_lock, params)
        existing = set(conn.execute(self._existing_statement(missing), params).scalars())
        if existing and on_conflict is OnConflict.FAIL:
            first = next(h.session_id for h in heads if h.session_id in existing)
            raise SessionExistsError(
                f"Session {first!r} already exists in the target; nothing of it was written. "
                'Pass on_conflict="skip" to keep it or "replace" to overwrite it.'
            )
        if existing and on_conflict is OnConflict.REPLACE:
            for name, statement in q.group_erase:
                if name not in missing:
                    conn.execute(statement, {"ids": sorted(existing)})
        states: list[bool | None] = []
        chosen = []
        for head in heads:
            there = head.session_id in existing
            if there and on_conflict is OnConflict.SKIP:
                states.append(None)
            else:
                states.append(there)
                chosen.append(head)
        if not chosen:
            return states
        session_rows = [
            {"sid": h.session_id, "created_at": h.created_at, "updated_at": h.updated_at}
            for h in chosen
            if h.has_session_row
        ]
        self._load(conn, q.insert_session, t.sessions, session_rows)
        generation_rows = [
            {"sid": h.session_id, "generation": h.clear_generation}
            for h in chosen
            if h.clear_generation is not None
        ]
        self._load(conn, q.insert_generation, t.generations, generation_rows)
        reservations = [
            {"sid": h.session_id, "branch_id": name} for h in chosen for name in h.reserved_branches
        ]
        self._load(conn, q.insert_reservation, t.reservations, reservations)
        if t.info.name not in missing:
            infos = [info for info in map(_info_row, chosen) if info is not None]
            if infos:
                conn.execute(q.insert_info, infos)
        return states

    def _messages(
        self, conn: Connection, session_id: str, batch: list[MessageRow], ids: MessageIdMap
    ) -> None:
        dialect = conn.dialect
        rows = [
            {
                "session_id": session_id,
                "message_data": row.data,
                "created_at": stored_timestamp(row.created_at, dialect),
            }
            for row in batch
        ]
        new_ids = self._profile.insert_returning_ids(
            conn, self._q.insert_messages, rows, {"session_id": session_id}
        )
        ids.add([row.id for row in batch], new_ids)

    def _structure(
        self, conn: Connection, session_id: str, batch: list[StructureRow], ids: MessageIdMap
    ) -> None:
        rows = [self._structure_row(session_id, row, ids) for row in batch]
        self._load(conn, self._q.insert_structure, self._q.tables.structure, rows)

    def _usage(self, conn: Connection, session_id: str, batch: list[UsageRow]) -> None:
        rows = [self._usage_row(session_id, row) for row in batch]
        self._load(conn, self._q.insert_usage, self._q.tables.usage, rows)

    @staticmethod
    def _structure_row(session_id: str, row: StructureRow, ids: MessageIdMap) -> dict[str, Any]:
        new_id = ids.get(row.message_id)
        if new_id is None:
            raise InvalidArgumentError(
                f"A structure row of session {session_id!r} refers to message id "
                f"{row.message_id}, which the session does not define"
            )
        return {
            "sid": session_id,
            "message_id": new_id,
            "branch_id": row.branch_id,
            "message_type": row.message_type,
            "sequence_number": row.sequence_number,
            "user_turn_number": row.user_turn_number,
            "branch_turn_number": row.branch_turn_number,
            "tool_name": row.tool_name,
            "created_at": row.created_at,
        }

    @staticmethod
    def _usage_row(session_id: str, row: UsageRow) -> dict[str, Any]:
        return {
            "sid": session_id,
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


def _valid_json(value: Any) -> Any:
    """JSON text as a bulk load takes it: text that is not JSON becomes NULL, as on insert."""
    if value is None or jsoncodec.loads_or_none(value, "token-details") is None:
        return None
    return value


def _scalars(conn: Connection, statement: Any) -> list[Any]:
    """The first column of every row ``statement`` returns."""
    return list(conn.execute(statement).scalars())
