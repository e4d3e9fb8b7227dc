"""The store's moving methods: export, import and copy (mixed into :class:`turnstore.Store`).

See :mod:`turnstore.transfer` for what each guarantees, and ``docs/export-format.md`` for the
format.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Generator, Iterable, Mapping
from datetime import datetime
from typing import IO, Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from turnstore import transfer
from turnstore.errors import InvalidArgumentError
from turnstore.info import check_metadata_filter, check_user_id, to_micros
from turnstore.persistence import engines
from turnstore.persistence.exportfile import Record
from turnstore.persistence.models import StoreTables
from turnstore.persistence.moving import DEFAULT_BATCH_SIZE
from turnstore.persistence.repository import ConversationRepository
from turnstore.persistence.store_queries import Position, Selection, StoreQueries
from turnstore.schema.startup import at_head, bring_to_head_when_needed
from turnstore.transfer import ProgressCallback, TransferSummary


class Export:
    """An export in progress: ``async for`` its records, or ``await`` it to write a file.

    Returned by :meth:`StoreMoving.export`; nothing is read until it is iterated or awaited.
    """

    def __init__(
        self,
        store: StoreMoving,
        file: IO[Any] | None,
        session_ids: AsyncIterator[str] | None,
        batch_size: int,
        progress: ProgressCallback | None,
    ) -> None:
        self._store = store
        self._file = file
        self._session_ids = session_ids
        self._batch_size = batch_size
        self._progress = progress
        #: What the export wrote or yielded so far (complete once it has finished).
        self.summary = TransferSummary()

    def __aiter__(self) -> AsyncIterator[Record]:
        if self._file is not None:
            raise InvalidArgumentError(
                "This export writes to a file: await it instead of iterating it"
            )
        return self._records()

    async def _records(self) -> AsyncIterator[Record]:
        handle, tables = await self._store._moving_source()
        async for record in transfer.export_records(
            handle,
            tables,
            session_ids=self._session_ids,
            batch_size=self._batch_size,
            progress=self._progress,
            summary=self.summary,
        ):
            yield record

    def __await__(self) -> Generator[Any, None, TransferSummary]:
        return self._write().__await__()

    async def _write(self) -> TransferSummary:
        if self._file is None:
            raise InvalidArgumentError(
                "Pass a file object to export(file) to await it, or iterate the export's "
                "records with `async for`"
            )
        handle, tables = await self._store._moving_source()
        self.summary = await transfer.write_export(
            handle,
            tables,
            self._file,
            session_ids=self._session_ids,
            batch_size=self._batch_size,
            progress=self._progress,
        )
        return self.summary


class StoreMoving:
    """Export, import and copy, for :class:`turnstore.Store` (which provides the plumbing)."""

    _tables: StoreTables
    _create_tables: bool
    _url: str | URL | None
    _engine: AsyncEngine | None

    def _handle(self) -> engines.EngineHandle:
        raise NotImplementedError

    async def _queries(self) -> StoreQueries:
        raise NotImplementedError

    async def _moving_source(self) -> tuple[engines.EngineHandle, StoreTables]:
        """The handle and tables, with the schema checked (the info table is optional)."""
        handle = self._handle()
        repository = ConversationRepository(handle, self._tables)
        await repository.prepare_schema(
            create=self._create_tables,
            migrate_default=bring_to_head_when_needed,
            default_is_current=at_head,
        )
        return handle, self._tables

    def _selected(
        self,
        session_ids: Iterable[str] | None,
        user_id: str | None,
        metadata: Mapping[str, Any] | None,
        active_after: datetime | None,
        active_before: datetime | None,
    ) -> AsyncIterator[str] | None:
        """The session ids a moving method works on (``None``: every session)."""
        filtered = any(v is not None for v in (user_id, metadata, active_after, active_before))
        if session_ids is not None:
            if filtered:
                raise InvalidArgumentError(
                    "Pass session_ids or filters (user_id, metadata, active_after, "
                    "active_before), not both"
                )
            if isinstance(session_ids, str):
                raise InvalidArgumentError(
                    "session_ids must be a list of session ids, not one string"
                )
            return _as_async(list(session_ids))
        if not filtered:
            return None
        selection = Selection(
            user_id=check_user_id(user_id),
            metadata=check_metadata_filter(metadata),
            active_after_us=None
            if active_after is None
            else to_micros(active_after, "active_after"),
            active_before_us=(
                None if active_before is None else to_micros(active_before, "active_before")
            ),
        )
        return self._matching(selection)

    async def _matching(self, selection: Selection) -> AsyncIterator[str]:
        """Every session the selection matches, newest activity first, a page at a time."""
        queries = await self._queries()
        after: Position | None = None
        page_size = 1000
        while True:
            page = await queries.positions(selection, after, page_size)
            for _activity, session_id in page:
                yield session_id
            if len(page) < page_size:
                return
            after = page[-1]

    # -- export ----------------------------------------------------------------------------

    def export(
        self,
        file: IO[Any] | None = None,
        *,
        session_ids: Iterable[str] | None = None,
        user_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        active_after: datetime | None = None,
        active_before: datetime | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: ProgressCallback | None = None,
    ) -> Export:
        """Export sessions in turnstore's JSON Lines format (``docs/export-format.md``).

        ``async for record in store.export(...)`` yields the records as dicts;
        ``summary = await store.export(file, ...)`` writes them to a file object (binary or
        text) and returns what was exported. Each session is read from one snapshot, a batch
        of rows at a time, so memory stays flat whatever the store's size.

        Args:
            file: Where to write, when awaited.
            session_ids: Only these sessions (ids the store lacks are left out).
            user_id: Only this owner's sessions (like :meth:`list_sessions`' filters).
            metadata: Only sessions whose top-level metadata keys equal these.
            active_after: Only sessions last active at or after this time.
            active_before: Only sessions last active before this time.
            batch_size: Rows read per database round trip.
            progress: Called with a :class:`~turnstore.transfer.Progress` after each session.

        Raises:
            InvalidArgumentError: Both ``session_ids`` and filters, or a bad filter.
        """
        ids = self._selected(session_ids, user_id, metadata, active_after, active_before)
        return Export(self, file, ids, transfer.check_batch_size(batch_size), progress)

    # -- import ----------------------------------------------------------------------------

    async def import_file(
        self,
        file: IO[Any],
        *,
        on_conflict: str = "skip",
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: ProgressCallback | None = None,
    ) -> TransferSummary:
        """Import an export file (binary or text file object), one session per transaction.

        Args:
            file: The export, as written by :meth:`export` or ``turnstore export``.
            on_conflict: For a session the store already has: ``"skip"`` it (so a rerun
                finishes an interrupted import), ``"replace"`` it, or ``"fail"``.
            batch_size: Rows written per statement.
            progress: Called after each session.

        Raises:
            ExportFileError: The file is truncated, corrupt, of an unknown version, or
                refers to a message it never defined; the message names the line. Nothing of
                that session is written; the sessions before it are.
            SessionExistsError: A session exists and ``on_conflict`` is ``"fail"``.
        """
        choice = transfer.on_conflict_value(on_conflict)
        handle, tables = await self._moving_source()
        return await transfer.import_file(
            handle, tables, file, on_conflict=choice, batch_size=batch_size, progress=progress
        )

    async def import_records(
        self,
        records: Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]],
        *,
        on_conflict: str = "skip",
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: ProgressCallback | None = None,
    ) -> TransferSummary:
        """Import export records given as dicts (say, another store's ``export()``).

        As :meth:`import_file`; errors name the record's position (1 is the header).
        """
        choice = transfer.on_conflict_value(on_conflict)
        handle, tables = await self._moving_source()
        return await transfer.import_records(
            handle,
            tables,
            transfer.numbered_records(records),
            on_conflict=choice,
            batch_size=batch_size,
            progress=progress,
        )

    # -- copy ------------------------------------------------------------------------------

    async def copy_to(
        self,
        target: StoreMoving | str | URL | AsyncEngine,
        *,
        session_ids: Iterable[str] | None = None,
        user_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        active_after: datetime | None = None,
        active_before: datetime | None = None,
        on_conflict: str = "skip",
        migrate_target: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: ProgressCallback | None = None,
    ) -> TransferSummary:
        """Copy sessions into another database, streaming, without a file.

        Message ids are given anew by the target; everything else (branches, turns, usage
        with token details, timestamps, clear generations, reserved branch names, info) is
        copied as it is. Small sessions are written several to a transaction, a large one
        in a transaction of its own, never part of one: a copy stopped at any moment and run
        again (with ``on_conflict="skip"``) finishes with every session once.

        Args:
            target: A :class:`~turnstore.Store`, a database URL or an ``AsyncEngine``.
            session_ids: Only these sessions; or filter like :meth:`export`.
            user_id: Only this owner's sessions.
            metadata: Only sessions whose top-level metadata keys equal these.
            active_after: Only sessions last active at or after this time.
            active_before: Only sessions last active before this time.
            on_conflict: ``"skip"``, ``"replace"`` or ``"fail"`` for sessions the target has.
            migrate_target: Upgrade (or adopt) a target whose schema is behind; an empty
                target is always migrated, one that is behind refused without this.
            batch_size: Rows per batch and per transaction of small sessions.
            progress: Called after each session.

        Raises:
            SchemaMissingError: The target's schema is behind and ``migrate_target`` is off.
            SessionExistsError: A session exists and ``on_conflict`` is ``"fail"``.
        """
        choice = transfer.on_conflict_value(on_conflict)
        ids = self._selected(session_ids, user_id, metadata, active_after, active_before)
        source = await self._moving_source()
        target_store: StoreMoving
        if isinstance(target, StoreMoving):
            where = target._engine if target._engine is not None else target._url
            assert where is not None
            target_store, owned = target, False
        else:
            where, owned = target, True
            store_class: Any = type(self)
            target_store = (
                store_class(engine=target)
                if isinstance(target, AsyncEngine)
                else store_class(url=target)
            )
        try:
            if target_store._tables.is_default:
                shown = (
                    "the target"
                    if isinstance(where, AsyncEngine)
                    else make_url(where).render_as_string(hide_password=True)
                )
                await transfer.prepare_target(where, migrate_schema=migrate_target, where=shown)
            destination = await target_store._moving_source()
            return await transfer.copy_sessions(
                source,
                destination,
                session_ids=ids,
                on_conflict=choice,
                batch_size=batch_size,
                progress=progress,
            )
        finally:
            if owned:
                await target_store.aclose()

    async def aclose(self) -> None:
        """Release the store's engines."""
        raise NotImplementedError


async def _as_async(values: list[str]) -> AsyncIterator[str]:
    for value in values:
        yield value
    await asyncio.sleep(0)
