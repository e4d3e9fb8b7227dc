"""``turnstore export``, ``import`` and ``copy``: move conversations between databases.

JSON shapes (``--json``), stable: each prints ``{"sessions", "replaced", "skipped",
"messages", "items", "usage", "seconds"}`` (what was exported or written); ``copy`` adds
``"target"`` (what it did to the target's schema) and, with ``--verify``, ``"verified"`` (how
many sessions were compared). ``export`` to standard output prints its summary on stderr,
since stdout carries the export.

Progress goes to stderr: a bar (sessions, items, rows/s, ETA) on a terminal, otherwise a
plain line every few seconds.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from turnstore import transfer
from turnstore.cli import common
from turnstore.errors import (
    CopyMismatchError,
    DatabaseUnavailableError,
    ForeignDatabaseError,
    InvalidArgumentError,
    SchemaMissingError,
    SessionNotFoundError,
    TurnstoreError,
)
from turnstore.info import check_user_id, to_micros
from turnstore.persistence import engines
from turnstore.persistence.dialects import profile_for
from turnstore.persistence.engines import EngineHandle
from turnstore.persistence.models import DEFAULT_TABLES
from turnstore.persistence.moving import DEFAULT_BATCH_SIZE, OnConflict, SessionReader
from turnstore.persistence.store_queries import Position, Selection, StoreQueries
from turnstore.schema import migrate
from turnstore.schema.adoption import DatabaseKind
from turnstore.session import AdvancedSession
from turnstore.verification import compare_sessions

# Seconds between plain progress lines when stderr is not a terminal.
PLAIN_PROGRESS_EVERY = 2.0


def register(app: typer.Typer) -> None:
    """Add ``export``, ``import`` and ``copy`` to ``app``."""
    app.command(name="export")(export)
    app.command(name="import")(import_)
    app.command(name="copy")(copy)


# -- options ---------------------------------------------------------------------------------

SessionOption = Annotated[
    list[str] | None,
    typer.Option(
        "--session",
        "-s",
        help="Only this session (repeat for several); every session when absent. "
        "Example: --session user-42",
    ),
]
UserOption = Annotated[
    str | None,
    typer.Option(
        "--user",
        help="Only the sessions of this owner (user_id). Example: --user alice",
    ),
]
ActiveAfterOption = Annotated[
    str | None,
    typer.Option(
        "--active-after",
        help="Only sessions last active at or after this ISO 8601 time (UTC unless it says). "
        "Example: --active-after 2026-01-01",
    ),
]
ActiveBeforeOption = Annotated[
    str | None,
    typer.Option(
        "--active-before",
        help="Only sessions last active before this ISO 8601 time (UTC unless it says). "
        "Example: --active-before 2026-06-30T12:00",
    ),
]
OnConflictOption = Annotated[
    OnConflict,
    typer.Option(
        "--on-conflict",
        help="What to do with a session the target already has: skip it (so a rerun "
        "finishes an interrupted run), replace it (deletes the target's; asks first, or pass "
        "--yes), or fail. Example: --on-conflict replace --yes",
    ),
]
MigrateOption = Annotated[
    bool,
    typer.Option(
        "--migrate",
        help="Upgrade (or adopt) a target whose schema is behind; without it such a target "
        "is refused. An empty target is always migrated. Example: --migrate",
    ),
]
BatchOption = Annotated[
    int,
    typer.Option(
        "--batch-size",
        min=1,
        help="Rows per batch (memory use grows with it). Example: --batch-size 5000",
    ),
]


# -- helpers ---------------------------------------------------------------------------------


def _hidden(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _parsed(url: str) -> str:
    try:
        parsed = make_url(url)
        profile_for(parsed.get_backend_name())
    except Exception as exc:
        raise InvalidArgumentError(
            f"Not a usable database URL: {common.hidden_url(url)!r} ({common.one_line(exc)}); "
            "expected e.g. "
            "sqlite+aiosqlite:///conversations.db or postgresql+asyncpg://app@db/app"
        ) from None
    return url


async def _check_source(url: str) -> None:
    """A source must exist and hold conversations; reading never creates or changes it."""
    parsed = make_url(url)
    missing = profile_for(parsed.get_backend_name()).missing_file(parsed)
    if missing is not None:
        raise DatabaseUnavailableError(
            f"Cannot open {_hidden(url)}: the file {missing} does not exist"
        )
    found, _recorded = await migrate.inspect_target(url)
    if found.kind is DatabaseKind.EMPTY:
        raise SchemaMissingError(
            f"{_hidden(url)} holds no conversations (it has neither turnstore's nor the "
            "Agents SDK's tables)"
        )
    if found.kind is DatabaseKind.FOREIGN or found.incompatible:
        raise ForeignDatabaseError(f"Cannot read conversations from {_hidden(url)}: {found.reason}")


@asynccontextmanager
async def _opened(url: str) -> AsyncIterator[EngineHandle]:
    handle = engines.acquire_for_url(url)
    try:
        yield handle
    finally:
        await engines.release(handle)
        await engines.dispose_engines(url)


def _moment(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidArgumentError(
            f"{option} must be an ISO 8601 date or time, e.g. 2026-01-31 or "
            f"2026-01-31T08:00:00+01:00; got {value!r}"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class _Filters:
    """What the command line chose to move."""

    sessions: list[str] | None
    user: str | None
    active_after: str | None
    active_before: str | None

    def selection(self) -> Selection | None:
        after = _moment(self.active_after, "--active-after")
        before = _moment(self.active_before, "--active-before")
        if self.user is None and after is None and before is None:
            return None
        if self.sessions:
            raise InvalidArgumentError(
                "Pass --session or the filters (--user, --active-after, --active-before), not both"
            )
        return Selection(
            user_id=check_user_id(self.user, "--user"),
            active_after_us=None if after is None else to_micros(after, "--active-after"),
            active_before_us=None if before is None else to_micros(before, "--active-before"),
        )


async def _selected(
    handle: EngineHandle, filters: _Filters
) -> tuple[list[str] | AsyncIterator[str] | None, int]:
    """The chosen sessions (``None``: all) and how many there are."""
    selection = filters.selection()
    if selection is not None:
        queries = StoreQueries(handle, DEFAULT_TABLES)
        try:
            total = await queries.count(selection)
        except DBAPIError:
            raise SchemaMissingError(
                "Filtering by owner or activity needs turnstore's session info table, which "
                "this database predates; upgrade it, or choose sessions with --session"
            ) from None
        return _matching(queries, selection), total
    reader = SessionReader(handle, DEFAULT_TABLES)
    if filters.sessions:
        chosen = list(dict.fromkeys(filters.sessions))
        # A mistyped id would otherwise give an empty export (or copy) and exit 0.
        unknown = await reader.unknown(chosen)
        if unknown:
            named = ", ".join(repr(session_id) for session_id in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise SessionNotFoundError(
                f"No session {named}{more} in this database (turnstore sessions lists them)"
            )
        return chosen, len(chosen)
    total = 0
    async for _ in reader.all_session_ids():
        total += 1
    return None, total


async def _matching(queries: StoreQueries, selection: Selection) -> AsyncIterator[str]:
    after: Position | None = None
    while True:
        page = await queries.positions(selection, after, 1000)
        for _activity, session_id in page:
            yield session_id
        if len(page) < 1000:
            return
        after = page[-1]


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02}s"
    return f"{seconds}s"


@contextmanager
def _progress(verb: str, total: int | None) -> Iterator[Callable[[transfer.Progress], None]]:
    """A progress callback: a bar on a terminal's stderr, else a plain line every few seconds."""
    if not common.is_terminal(sys.stderr):
        last = [time.monotonic()]

        def plain(progress: transfer.Progress) -> None:
            now = time.monotonic()
            if now - last[0] < PLAIN_PROGRESS_EVERY:
                return
            last[0] = now
            of_total = f"/{progress.sessions_total}" if progress.sessions_total else ""
            eta = progress.eta_seconds
            rows = (
                f", {progress.items} items, {progress.rows_per_second:,.0f} rows/s"
                if progress.rows
                else ""
            )
            typer.echo(
                f"{verb} {progress.sessions_done}{of_total} sessions{rows}"
                + ("" if eta is None else f", ETA {_duration(eta)}"),
                err=True,
            )

        yield plain
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True, no_color=bool(os.environ.get("NO_COLOR")))
    columns = (
        TextColumn(f"{verb} sessions"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[items]:,} items"),
        TextColumn("{task.fields[rate]:,.0f} rows/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(verb, total=total, items=0, rate=0.0)

        def draw(progress: transfer.Progress) -> None:
            bar.update(
                task,
                completed=progress.sessions_done,
                items=progress.items,
                rate=progress.rows_per_second,
            )

        yield draw


def _counts_line(verb: str, summary: transfer.TransferSummary) -> str:
    parts = [
        f"{verb} {summary.sessions} sessions ({summary.items} items, {summary.messages} "
        f"messages, {summary.usage} usage rows)"
    ]
    if summary.replaced:
        parts.append(f"{summary.replaced} replaced")
    if summary.skipped:
        parts.append(f"{summary.skipped} skipped (already there)")
    return ", ".join(parts) + f" in {summary.seconds:.1f}s"


# -- export ----------------------------------------------------------------------------------


def export(
    url: common.UrlOption = None,
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            help="File to write the export to; - for standard output. Example: -o backup.jsonl",
        ),
    ] = "-",
    session: SessionOption = None,
    user: UserOption = None,
    active_after: ActiveAfterOption = None,
    active_before: ActiveBeforeOption = None,
    batch_size: BatchOption = DEFAULT_BATCH_SIZE,
    as_json: common.JsonOption = False,
) -> None:
    """Export conversations as turnstore's JSON Lines format (docs/export-format.md).

    Example: turnstore export --url sqlite+aiosqlite:///conversations.db -o backup.jsonl
    """
    source = _parsed(common.resolve_url(url))
    to_stdout = output == "-"
    filters = _Filters(session, user, active_after, active_before)
    filters.selection()  # bad filters fail before anything is written
    if not to_stdout:
        _check_output(Path(output))

    async def run(file: IO[bytes]) -> transfer.TransferSummary:
        await _check_source(source)
        async with _opened(source) as handle:
            chosen, total = await _selected(handle, filters)
            with _progress("exported", total) as report:
                return await transfer.write_export(
                    handle,
                    DEFAULT_TABLES,
                    file,
                    session_ids=chosen,
                    batch_size=batch_size,
                    source=_hidden(source),
                    progress=report,
                )

    if to_stdout:
        summary = asyncio.run(run(sys.stdout.buffer))
        sys.stdout.buffer.flush()
    else:
        path = Path(output)
        partial = path.with_name(path.name + ".partial")
        # Written beside the target and renamed at the end: an interrupted export never
        # leaves a file that looks complete (the reader would also refuse it as truncated).
        try:
            with partial.open("wb") as file:
                summary = asyncio.run(run(file))
            partial.replace(path)
        except BaseException as exc:
            partial.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.filename in (str(partial), str(path)):
                # The file could not be written (disk full, permissions): was an
                # "unexpected OSError" that left the .partial file behind.
                raise TurnstoreError(
                    f"Cannot write the export to {output}: {exc.strerror or exc}"
                ) from exc
            raise
    data = summary.as_dict()
    text = _counts_line("exported", summary) + ("" if to_stdout else f" to {output}")
    if to_stdout:
        typer.echo(json_text(data) if as_json else text, err=True)
    else:
        common.emit(data, text, as_json=as_json)


def _check_output(path: Path) -> None:
    """Refuse an export file that cannot be written, before the database is read.

    Raises:
        InvalidArgumentError: The path is a folder, or its folder does not exist.
    """
    if path.is_dir():
        raise InvalidArgumentError(f"--output {path} is a folder; name a file in it")
    if not path.parent.is_dir():
        raise InvalidArgumentError(
            f"--output {path}: the folder {path.parent} does not exist (create it first)"
        )


def json_text(data: dict[str, Any]) -> str:
    """One JSON document, as :func:`turnstore.cli.common.emit` prints it."""
    import json

    return json.dumps(data, ensure_ascii=False, sort_keys=True)


# -- import ----------------------------------------------------------------------------------


def import_(
    file: Annotated[
        str,
        typer.Argument(
            help="The export file to import; - for standard input. Example: backup.jsonl",
            show_default=False,
        ),
    ],
    url: common.UrlOption = None,
    on_conflict: OnConflictOption = OnConflict.SKIP,
    migrate_schema: MigrateOption = False,
    batch_size: BatchOption = DEFAULT_BATCH_SIZE,
    yes: common.YesOption = False,
    as_json: common.JsonOption = False,
) -> None:
    """Import an export file, one session per transaction (rerun to finish an interrupted one).

    The whole file is checked first: a file with a bad line (truncated, corrupt, an item that
    is not a JSON object) is refused with exit code 8 and nothing of it is imported.
    --on-conflict replace deletes sessions the target has, so it asks first (or needs --yes).

    Example: turnstore import --url postgresql+asyncpg://app@db/app backup.jsonl
    """
    target = _parsed(common.resolve_url(url))
    if file != "-" and not Path(file).is_file():
        raise InvalidArgumentError(f"No such export file: {file}")
    _confirm_replace(on_conflict, target, yes=yes, source="the file")

    async def run(stream: IO[bytes]) -> transfer.TransferSummary:
        with _progress("checked", None) as report:
            checked = await transfer.check_file(stream, batch_size=batch_size, progress=report)
        stream.seek(0)
        await transfer.prepare_target(target, migrate_schema=migrate_schema, where=_hidden(target))
        async with _opened(target) as handle:
            with _progress("imported", checked.sessions) as report:
                return await transfer.import_file(
                    handle,
                    DEFAULT_TABLES,
                    stream,
                    on_conflict=on_conflict,
                    batch_size=batch_size,
                    progress=report,
                    total=checked.sessions,
                )

    with _seekable(file) as stream:
        summary = asyncio.run(run(stream))
    common.emit(summary.as_dict(), _counts_line("imported", summary), as_json=as_json)


@contextmanager
def _seekable(file: str) -> Iterator[IO[bytes]]:
    """The export file, open for reading twice (checked, then imported).

    Standard input cannot be read twice: it is copied to a temporary file first.
    """
    if file != "-":
        with Path(file).open("rb") as stream:
            yield stream
        return
    with tempfile.TemporaryFile() as spool:
        shutil.copyfileobj(sys.stdin.buffer, spool, 1 << 20)
        spool.seek(0)
        yield spool


def _confirm_replace(on_conflict: OnConflict, target: str, *, yes: bool, source: str) -> None:
    """``--on-conflict replace`` destroys the target's sessions: ask first, as ``rm`` does."""
    if on_conflict is not OnConflict.REPLACE:
        return
    common.confirm(
        f"Replace every session {_hidden(target)} already has that {source} also holds "
        "(deleting its items, branches and usage)?",
        yes=yes,
        refusal=(
            f"--on-conflict replace deletes every session {_hidden(target)} already has that "
            f"{source} also holds"
        ),
    )


# -- copy ------------------------------------------------------------------------------------


def copy(
    source: Annotated[
        str,
        typer.Option(
            "--from",
            help="The database to copy from (left unchanged). "
            "Example: --from sqlite+aiosqlite:///conversations.db",
            show_default=False,
        ),
    ],
    target: Annotated[
        str,
        typer.Option(
            "--to",
            help="The database to copy into. Example: --to postgresql+asyncpg://app@db/app",
            show_default=False,
        ),
    ],
    session: SessionOption = None,
    user: UserOption = None,
    active_after: ActiveAfterOption = None,
    active_before: ActiveBeforeOption = None,
    on_conflict: OnConflictOption = OnConflict.SKIP,
    migrate_schema: MigrateOption = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Afterwards, compare every read method of every copied session on both "
            "databases and fail if any answer differs. Example: --verify",
        ),
    ] = False,
    batch_size: BatchOption = DEFAULT_BATCH_SIZE,
    yes: common.YesOption = False,
    as_json: common.JsonOption = False,
) -> None:
    """Copy conversations from one database to another, streaming, no file between.

    Each session is copied in one transaction with new message ids; rerun an interrupted
    copy to finish it (sessions already copied are skipped). --on-conflict replace deletes
    sessions the target has, so it asks first (or needs --yes).

    Example: turnstore copy --from sqlite+aiosqlite:///conversations.db
    --to postgresql+asyncpg://app@db/app --verify
    """
    _parsed(source)
    _parsed(target)
    if make_url(source) == make_url(target):
        raise InvalidArgumentError("--from and --to name the same database")
    filters = _Filters(session, user, active_after, active_before)
    filters.selection()
    _confirm_replace(on_conflict, target, yes=yes, source=_hidden(source))

    async def run() -> tuple[transfer.TransferSummary, str, int]:
        await _check_source(source)
        async with _opened(source) as from_handle:
            # The sessions are chosen before the target is touched: a mistyped --session
            # leaves it as it was (not even migrated).
            chosen, total = await _selected(from_handle, filters)
            done = await transfer.prepare_target(
                target, migrate_schema=migrate_schema, where=_hidden(target)
            )
            async with _opened(target) as to_handle:
                with _progress("copied", total) as report:
                    summary = await transfer.copy_sessions(
                        (from_handle, DEFAULT_TABLES),
                        (to_handle, DEFAULT_TABLES),
                        session_ids=chosen,
                        on_conflict=on_conflict,
                        batch_size=batch_size,
                        total=total,
                        progress=report,
                        collect_ids=verify,
                    )
        verified = 0
        if verify:
            verified = await _verify(source, target, summary.session_ids or [])
        return summary, done, verified

    summary, done, verified = asyncio.run(run())
    data: dict[str, Any] = {**summary.as_dict(), "target": done}
    text = _counts_line("copied", summary) + f"; {done}"
    if verify:
        data["verified"] = verified
        text += f"; verified {verified} sessions: every read answers the same"
    common.emit(data, text, as_json=as_json)


async def _verify(source: str, target: str, session_ids: list[str]) -> int:
    """Compare every read method of each session on both databases.

    Raises:
        CopyMismatchError: Some session answers differently on the target.
    """
    differing: dict[str, list[str]] = {}
    with _progress("verified", len(session_ids)) as report:
        started = time.monotonic()
        for number, session_id in enumerate(session_ids, start=1):
            async with (
                AdvancedSession(session_id=session_id, url=source) as original,
                AdvancedSession(session_id=session_id, url=target) as copied,
            ):
                found = await compare_sessions(original, copied)
            if found:
                differing[session_id] = found
            report(
                transfer.Progress(
                    number, len(session_ids), 0, 0, time.monotonic() - started, session_id
                )
            )
    if differing:
        shown = "; ".join(
            f"{session_id!r}: {', '.join(methods[:4])}"
            for session_id, methods in list(differing.items())[:5]
        )
        raise CopyMismatchError(
            f"{len(differing)} of {len(session_ids)} copied sessions answer differently on "
            f"the target: {shown}"
        )
    return len(session_ids)
