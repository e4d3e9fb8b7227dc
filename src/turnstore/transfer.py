"""Moving conversations: export to records or a file, import them, copy between databases.

Built on :mod:`turnstore.persistence.moving` (sessions as streams of rows, written one
session per transaction with new message ids) and :mod:`turnstore.persistence.exportfile`
(the JSON Lines format). :class:`turnstore.Store` exposes these as ``export``,
``import_records``, ``import_file`` and ``copy_to``.

Every session is read from one snapshot and written in one transaction, so an import or copy
that is stopped at any moment leaves whole sessions only; run again with
``on_conflict="skip"`` (the default) it writes the sessions still missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import IO, TYPE_CHECKING, Any, cast

from turnstore.errors import (
    ExportFileError,
    ForeignDatabaseError,
    InvalidArgumentError,
    SchemaMissingError,
    SessionExistsError,
)
from turnstore.persistence.engines import EngineHandle
from turnstore.persistence.exportfile import (
    LineWriter,
    Record,
    RecordDecoder,
    batch_records,
    end_record,
    file_records,
    header_record,
    numbered,
    session_end_record,
    session_record,
)
from turnstore.persistence.models import StoreTables
from turnstore.persistence.moving import (
    DEFAULT_BATCH_SIZE,
    Batch,
    ExtraRow,
    MessageRow,
    OnConflict,
    SessionCounts,
    SessionData,
    SessionHead,
    SessionReader,
    SessionWriter,
    StructureRow,
    UsageRow,
)
from turnstore.schema.adoption import DatabaseKind

if TYPE_CHECKING:
    from turnstore.schema import migrate


@dataclass(frozen=True)
class Progress:
    """Where a running export, import or copy stands; handed to a progress callback.

    Attributes:
        sessions_done: Sessions handled so far (written, replaced or skipped).
        sessions_total: Sessions to handle, when known up front.
        items: Items (structure rows) written or exported so far.
        rows: Rows of every kind written or exported so far.
        elapsed: Seconds since the operation started.
        session_id: The session just handled.
    """

    sessions_done: int
    sessions_total: int | None
    items: int
    rows: int
    elapsed: float
    session_id: str

    @property
    def rows_per_second(self) -> float:
        """Rows handled per second so far."""
        return self.rows / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the rate so far, when the total is known."""
        if not self.sessions_total or not self.sessions_done or self.elapsed <= 0:
            return None
        rate = self.sessions_done / self.elapsed
        return max(0.0, (self.sessions_total - self.sessions_done) / rate)


ProgressCallback = Callable[[Progress], object]


@dataclass
class TransferSummary:
    """What an export, import or copy did.

    Attributes:
        sessions: Sessions written (exported, for an export), replaced ones included.
        replaced: Sessions that existed in the target and were replaced.
        skipped: Sessions that existed in the target and were left as they were.
        messages: Message rows written.
        items: Items (structure rows) written.
        usage: Usage rows written.
        seconds: How long it took.
        session_ids: The ids of the sessions written (only if asked for).
    """

    sessions: int = 0
    replaced: int = 0
    skipped: int = 0
    messages: int = 0
    items: int = 0
    usage: int = 0
    seconds: float = 0.0
    session_ids: list[str] | None = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        """Rows of every kind written."""
        return self.messages + self.items + self.usage

    def _add(self, counts: SessionCounts) -> None:
        self.messages += counts.messages
        self.items += counts.structure
        self.usage += counts.usage

    def as_dict(self) -> dict[str, Any]:
        """The counts as a plain dict (for ``--json`` output)."""
        return {
            "sessions": self.sessions,
            "replaced": self.replaced,
            "skipped": self.skipped,
            "messages": self.messages,
            "items": self.items,
            "usage": self.usage,
            "seconds": round(self.seconds, 3),
        }


def on_conflict_value(value: object) -> OnConflict:
    """Check an ``on_conflict`` argument.

    Raises:
        InvalidArgumentError: Not one of ``"skip"``, ``"replace"``, ``"fail"``.
    """
    if isinstance(value, OnConflict):
        return value
    if isinstance(value, str) and value in OnConflict._value2member_map_:
        return OnConflict(value)
    raise InvalidArgumentError(f'on_conflict must be "skip", "replace" or "fail"; got {value!r}')


def check_batch_size(batch_size: object) -> int:
    """Check a ``batch_size`` argument.

    Raises:
        InvalidArgumentError: Not a positive int.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be a positive int; got {batch_size!r}")
    return batch_size


def producer() -> str:
    """This turnstore, as an export header names it."""
    try:
        return f"turnstore {metadata.version('turnstore')}"
    except metadata.PackageNotFoundError:  # a source checkout that is not installed
        return "turnstore"


class _Clock:
    def __init__(self, total: int | None, progress: ProgressCallback | None) -> None:
        self.start = time.monotonic()
        self.total = total
        self.progress = progress
        self.done = 0

    def tick(self, summary: TransferSummary, session_id: str) -> None:
        self.done += 1
        summary.seconds = time.monotonic() - self.start
        if self.progress is not None:
            self.progress(
                Progress(
                    self.done,
                    self.total,
                    summary.items,
                    summary.rows,
                    summary.seconds,
                    session_id,
                )
            )


async def _session_ids(
    reader: SessionReader, session_ids: Iterable[str] | AsyncIterator[str] | None
) -> AsyncIterator[str]:
    if session_ids is None:
        async for session_id in reader.all_session_ids():
            yield session_id
        return
    seen: set[str] = set()
    if isinstance(session_ids, AsyncIterator):
        async for session_id in session_ids:
            if session_id not in seen:
                seen.add(session_id)
                yield session_id
        return
    for session_id in session_ids:
        if not isinstance(session_id, str):
            raise InvalidArgumentError(
                f"session ids must be strings; got {type(session_id).__name__}"
            )
        if session_id not in seen:
            seen.add(session_id)
            yield session_id


async def _session_records(reader: SessionReader, session_id: str) -> AsyncIterator[Record]:
    counts = SessionCounts()
    found = False
    async for part in reader.read(session_id):
        if isinstance(part, SessionHead):
            found = True
            yield session_record(part)
            continue
        counts = counts + _counts(part)
        for record in batch_records(part):
            yield record
    if found:
        yield session_end_record(session_id, counts)


def _data_records(data: SessionData) -> Iterator[Record]:
    """The records of a session read whole."""
    yield session_record(data.head)
    for rows in (data.messages, data.structure, data.usage, data.extras):
        yield from batch_records(rows)
    yield session_end_record(data.head.session_id, data.counts)


async def export_records(
    handle: EngineHandle,
    tables: StoreTables,
    *,
    session_ids: Iterable[str] | AsyncIterator[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    source: str | None = None,
    progress: ProgressCallback | None = None,
    summary: TransferSummary | None = None,
) -> AsyncIterator[Record]:
    """The export of a store as records: header, each session's records, end.

    Args:
        handle: The store's engine handle.
        tables: The store's tables.
        session_ids: The sessions to export (ids the store lacks are left out); all when
            ``None``.
        batch_size: Rows read per database round trip.
        source: Where the export comes from, for the header.
        progress: Called after each session.
        summary: Filled in with what was exported.
    """
    reader = SessionReader(handle, tables, batch_size=check_batch_size(batch_size))
    summary = summary if summary is not None else TransferSummary()
    clock = _Clock(None, progress)
    yield header_record(producer=producer(), source=source)

    def done(data_counts: SessionCounts, session_id: str) -> None:
        summary.sessions += 1
        summary._add(data_counts)
        clock.tick(summary, session_id)

    # Small sessions are read several at a time (one snapshot, one query per table); a
    # session larger than a batch streams from a snapshot of its own.
    async for page in _pages(_session_ids(reader, session_ids), ID_PAGE):
        sizes = await reader.sizes(page)
        group: list[str] = []
        rows = 0
        for position, session_id in enumerate(page):
            size = sizes.get(session_id, 0)
            if size <= batch_size:
                group.append(session_id)
                rows += size
            last = position == len(page) - 1
            if group and (size > batch_size or rows > batch_size or last):
                for data in await reader.read_group(group):
                    for record in _data_records(data):
                        yield record
                    done(data.counts, data.head.session_id)
                group, rows = [], 0
            if size > batch_size:
                async for record in _session_records(reader, session_id):
                    if record["record"] == "session_end":
                        done(
                            SessionCounts(
                                record["messages"],
                                record["structure"],
                                record["usage"],
                                record["rows"],
                            ),
                            session_id,
                        )
                    yield record
    summary.seconds = time.monotonic() - clock.start
    yield end_record(summary.sessions)


async def write_export(
    handle: EngineHandle,
    tables: StoreTables,
    file: IO[Any],
    *,
    session_ids: Iterable[str] | AsyncIterator[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    source: str | None = None,
    progress: ProgressCallback | None = None,
) -> TransferSummary:
    """Write the export of a store to a file object (binary or text); what was exported."""
    summary = TransferSummary()
    writer = LineWriter(file)
    pending: list[Record] = []
    async for record in export_records(
        handle,
        tables,
        session_ids=session_ids,
        batch_size=batch_size,
        source=source,
        progress=progress,
        summary=summary,
    ):
        pending.append(record)
        if len(pending) >= batch_size:
            writer.write(pending)
            pending = []
    writer.write(pending)
    return summary


async def import_records(
    handle: EngineHandle,
    tables: StoreTables,
    records: Iterable[tuple[int, Any]] | AsyncIterable[tuple[int, Any]],
    *,
    on_conflict: OnConflict = OnConflict.SKIP,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: ProgressCallback | None = None,
    total: int | None = None,
) -> TransferSummary:
    """Import numbered export records (see :func:`import_file`); what was written.

    Raises:
        ExportFileError: A record is wrong; sessions before it stay written.
        SessionExistsError: A session exists and ``on_conflict`` is ``fail``.
    """
    decoder = RecordDecoder(records, batch_size=check_batch_size(batch_size))
    await decoder.read_header()
    writer = SessionWriter(handle, tables)
    summary = TransferSummary()
    clock = _Clock(total, progress)
    # Small sessions are gathered and written several to a transaction, as a copy does; a
    # session larger than a batch streams in a transaction of its own.
    group: list[SessionData] = []
    group_rows = 0

    async def flush() -> None:
        nonlocal group, group_rows
        if group and on_conflict is OnConflict.FAIL:
            # Write the sessions before the first one the target has, then stop at it.
            there = await writer.existing([data.head.session_id for data in group])
            first = next((n for n, d in enumerate(group) if d.head.session_id in there), None)
            if first is not None:
                conflict = group[first].head.session_id
                group, group_rows = group[:first], 0
                await flush()
                raise SessionExistsError(
                    f"Session {conflict!r} already exists in the target; "
                    "it and the sessions after it were not imported. Pass "
                    'on_conflict="skip" to keep it or "replace" to overwrite it.'
                )
        if group:
            outcomes = await writer.write_group(group, on_conflict)
            for data, outcome in zip(group, outcomes, strict=True):
                _count(summary, outcome.written, outcome.replaced, outcome.counts)
                clock.tick(summary, data.head.session_id)
        group, group_rows = [], 0

    try:
        async for head, batches in decoder.sessions():
            data = SessionData(head, [], [], [])
            rows = 0
            overflow: Batch | None = None
            async for batch in batches:
                if rows + len(batch) > batch_size:
                    overflow = batch
                    break
                rows += len(batch)
                _extend(data, batch)
            if overflow is None:
                if group_rows + rows > batch_size:
                    await flush()
                group.append(data)
                group_rows += rows
                continue
            await flush()
            try:
                outcome = await writer.write(head, _chain(data, overflow, batches), on_conflict)
            except InvalidArgumentError as exc:
                # The decoder checks what the writer would refuse; a last line of defence.
                raise ExportFileError(decoder.line, str(exc)) from exc
            _count(summary, outcome.written, outcome.replaced, outcome.counts)
            clock.tick(summary, head.session_id)
    except ExportFileError:
        # The sessions read whole before the bad line are written; the bad one is not.
        await flush()
        raise
    await flush()
    summary.seconds = time.monotonic() - clock.start
    return summary


def _extend(data: SessionData, batch: Batch) -> None:
    first = batch[0]
    if isinstance(first, MessageRow):
        data.messages.extend(cast(list[MessageRow], batch))
    elif isinstance(first, StructureRow):
        data.structure.extend(cast(list[StructureRow], batch))
    elif isinstance(first, UsageRow):
        data.usage.extend(cast(list[UsageRow], batch))
    else:
        data.extras.extend(cast(list[ExtraRow], batch))


async def _chain(
    data: SessionData, overflow: Batch, rest: AsyncIterator[Batch]
) -> AsyncIterator[Batch]:
    """The batches of a session read partly already, then the rest of them."""
    for kept in (data.messages, data.structure, data.usage, data.extras):
        if kept:
            yield kept
    yield overflow
    async for batch in rest:
        yield batch


async def import_file(
    handle: EngineHandle,
    tables: StoreTables,
    file: IO[Any],
    *,
    on_conflict: OnConflict = OnConflict.SKIP,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: ProgressCallback | None = None,
    total: int | None = None,
) -> TransferSummary:
    """Import an export file (binary or text file object), one session per transaction.

    ``total``, the number of sessions the file holds when known (:func:`check_file`), lets
    the progress callback tell how far along the import is.

    Raises:
        ExportFileError: The file is truncated, corrupt, of an unknown version, or refers to
            a message it never defined; the message names the line. Nothing of the session
            that line belongs to is written; sessions before it are.
        SessionExistsError: A session exists and ``on_conflict`` is ``fail``.
    """
    return await import_records(
        handle,
        tables,
        file_records(file),
        on_conflict=on_conflict,
        batch_size=batch_size,
        progress=progress,
        total=total,
    )


async def check_file(
    file: IO[Any],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: ProgressCallback | None = None,
) -> TransferSummary:
    """Read a whole export file and check every record, writing nothing anywhere.

    Lets a caller refuse a bad file before importing any of it (``turnstore import`` does),
    where :func:`import_file` alone writes the sessions before a bad line.

    Returns:
        What the file holds, counted as an import of every session would count it.

    Raises:
        ExportFileError: The file is truncated, corrupt, of an unknown version, refers to a
            message it never defined, or holds an item that is not a JSON object; the message
            names the line.
    """
    decoder = RecordDecoder(file_records(file), batch_size=check_batch_size(batch_size))
    await decoder.read_header()
    summary = TransferSummary()
    clock = _Clock(None, progress)
    async for head, batches in decoder.sessions():
        counts = SessionCounts()
        async for batch in batches:
            counts = counts + _counts(batch)
        _count(summary, True, False, counts)
        clock.tick(summary, head.session_id)
    summary.seconds = time.monotonic() - clock.start
    return summary


def numbered_records(
    records: Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]],
) -> Iterable[tuple[int, Any]] | AsyncIterator[tuple[int, Any]]:
    """Records given as dicts (say, from ``Store.export``), numbered for :func:`import_records`."""
    return numbered(records)


def _count(summary: TransferSummary, written: bool, replaced: bool, counts: SessionCounts) -> None:
    if not written:
        summary.skipped += 1
        return
    summary.sessions += 1
    summary.replaced += int(replaced)
    summary._add(counts)


async def _batches_after_head(
    parts: AsyncIterator[SessionHead | Batch],
) -> AsyncIterator[Batch]:
    async for part in parts:
        assert not isinstance(part, SessionHead)
        yield part


#: Session ids looked at together when copying: existence checked and sizes read in one go.
ID_PAGE = 256


async def _pages(ids: AsyncIterator[str], size: int) -> AsyncIterator[list[str]]:
    page: list[str] = []
    async for session_id in ids:
        page.append(session_id)
        if len(page) >= size:
            yield page
            page = []
    if page:
        yield page


@dataclass(frozen=True)
class _Group:
    """Whole small sessions to write together, or one large session to stream."""

    sessions: list[SessionData]
    stream: str | None = None


async def copy_sessions(
    source: tuple[EngineHandle, StoreTables],
    target: tuple[EngineHandle, StoreTables],
    *,
    session_ids: Iterable[str] | AsyncIterator[str] | None = None,
    on_conflict: OnConflict = OnConflict.SKIP,
    batch_size: int = DEFAULT_BATCH_SIZE,
    total: int | None = None,
    progress: ProgressCallback | None = None,
    collect_ids: bool = False,
) -> TransferSummary:
    """Copy sessions from one store to another, no file between.

    Sessions small enough are read together and written together, up to ``batch_size`` rows
    per transaction (a transaction always holds whole sessions); a larger session is streamed
    in batches within a transaction of its own. Reading the next group overlaps writing the
    current one.

    Args:
        source: The source store's handle and tables.
        target: The target store's handle and tables (the schema must be in place).
        session_ids: The sessions to copy; all when ``None``.
        on_conflict: What to do with sessions the target already has.
        batch_size: Rows per batch and per transaction of small sessions.
        total: How many sessions will be copied, if known (for the progress's ETA).
        progress: Called after each session.
        collect_ids: List the ids of the sessions written in the summary's ``session_ids``.

    Raises:
        SessionExistsError: A session exists and ``on_conflict`` is ``fail``; the sessions
            before it are copied.
    """
    reader = SessionReader(*source, batch_size=check_batch_size(batch_size))
    writer = SessionWriter(*target)
    summary = TransferSummary(session_ids=[] if collect_ids else None)
    clock = _Clock(total, progress)
    queue: asyncio.Queue[_Group | BaseException | None] = asyncio.Queue(maxsize=2)
    conflict: list[str] = []

    async def produce() -> None:
        try:
            async for page in _pages(_session_ids(reader, session_ids), ID_PAGE):
                if on_conflict is not OnConflict.REPLACE:
                    there = await writer.existing(page)
                    if on_conflict is OnConflict.FAIL and there:
                        first = next(sid for sid in page if sid in there)
                        conflict.append(first)
                        page = page[: page.index(first)]
                    else:
                        for session_id in page:
                            if session_id in there:
                                summary.skipped += 1
                                clock.tick(summary, session_id)
                        page = [sid for sid in page if sid not in there]
                sizes = await reader.sizes(page)
                group: list[str] = []
                rows = 0
                for session_id in page:
                    size = sizes.get(session_id, 0)
                    if group and (size > batch_size or rows + size > batch_size):
                        await queue.put(_Group(await reader.read_group(group)))
                        group, rows = [], 0
                    if size > batch_size:
                        await queue.put(_Group([], stream=session_id))
                    else:
                        group.append(session_id)
                        rows += size
                if group:
                    await queue.put(_Group(await reader.read_group(group)))
                if conflict:
                    break
            await queue.put(None)
        except BaseException as exc:
            await queue.put(exc)
            raise

    producer = asyncio.create_task(produce())
    try:
        while True:
            item = await queue.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            if item.stream is not None:
                await _copy_one(reader, writer, item.stream, on_conflict, summary, clock)
                continue
            outcomes = await writer.write_group(item.sessions, on_conflict)
            for data, outcome in zip(item.sessions, outcomes, strict=True):
                _count(summary, outcome.written, outcome.replaced, outcome.counts)
                if outcome.written and summary.session_ids is not None:
                    summary.session_ids.append(data.head.session_id)
                clock.tick(summary, data.head.session_id)
    finally:
        if not producer.done():
            producer.cancel()
        with contextlib.suppress(BaseException):
            await producer
    summary.seconds = time.monotonic() - clock.start
    if conflict:
        raise SessionExistsError(
            f"Session {conflict[0]!r} already exists in the target; it and the sessions after "
            'it were not copied. Pass on_conflict="skip" to keep it or "replace" to overwrite it.'
        )
    return summary


async def _copy_one(
    reader: SessionReader,
    writer: SessionWriter,
    session_id: str,
    on_conflict: OnConflict,
    summary: TransferSummary,
    clock: _Clock,
) -> None:
    """Stream one large session from the source into the target, in one transaction."""
    parts = reader.read(session_id)
    head = await anext(parts, None)
    if head is None:
        return
    assert isinstance(head, SessionHead)
    outcome = await writer.write(head, _batches_after_head(parts), on_conflict)
    _count(summary, outcome.written, outcome.replaced, outcome.counts)
    if outcome.written and summary.session_ids is not None:
        summary.session_ids.append(session_id)
    clock.tick(summary, session_id)


def _counts(batch: Batch) -> SessionCounts:
    if not batch:
        return SessionCounts()
    if isinstance(batch[0], MessageRow):
        return SessionCounts(messages=len(batch))
    if isinstance(batch[0], StructureRow):
        return SessionCounts(structure=len(batch))
    if isinstance(batch[0], UsageRow):
        return SessionCounts(usage=len(batch))
    return SessionCounts(extras=len(batch))


# -- the target of a copy ---------------------------------------------------------------------


async def prepare_target(target: migrate.Target, *, migrate_schema: bool, where: str) -> str:
    """Make sure a copy's target has the current schema; what was done, in a few words.

    An empty database is migrated. A turnstore database behind this version's schema, or a
    file of the SDK's class, is migrated (adopted) only with ``migrate_schema``, and refused
    otherwise, so a copy never changes a production schema by surprise.

    Args:
        target: The target's URL or engine.
        migrate_schema: Upgrade (or adopt) a target that is behind.
        where: The target as the user named it, for messages.

    Raises:
        SchemaMissingError: The target is behind and ``migrate_schema`` is false.
        ForeignDatabaseError: The target holds tables turnstore cannot use.
    """
    # Imported here: Alembic costs every process that imports turnstore a few hundred ms,
    # and only schema changes need it.
    from turnstore.schema import migrate

    found, recorded = await migrate.inspect_target(target)
    head = migrate.head()
    if found.kind is DatabaseKind.EMPTY:
        await migrate.upgrade(target)
        return "migrated the empty target"
    if found.kind is DatabaseKind.FOREIGN or found.incompatible:
        raise ForeignDatabaseError(f"Refusing to copy into {where}: {found.reason}")
    if found.kind is DatabaseKind.SDK:
        if not migrate_schema:
            raise SchemaMissingError(
                f"The target {where} is an Agents SDK database without turnstore's schema; "
                "adopt it first, or pass --migrate to adopt it as part of the copy",
                fix=f"turnstore db adopt --url {where}",
            )
        await migrate.adopt(target)
        return "adopted the target"
    if head in recorded:
        return "target schema current"
    if not migrate_schema:
        behind = ", ".join(recorded) or "no revision"
        raise SchemaMissingError(
            f"The target {where} is at revision {behind}, behind this turnstore's {head}; "
            "upgrade it first, or pass --migrate to upgrade it as part of the copy",
            fix=f"turnstore db upgrade --url {where}",
        )
    await migrate.upgrade(target)
    return "upgraded the target"
