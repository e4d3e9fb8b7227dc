"""The store's commands: ``sessions`` (list), ``rm``, ``prune`` and ``erase-user``.

JSON shapes (``--json``), stable: ``sessions`` prints ``{"sessions": [summary...],
"next_cursor": str|null}``, each summary ``{"session_id", "user_id", "title", "metadata",
"created_at", "last_activity", "items", "user_turns", "branches", "total_tokens",
"preview"}`` (times ISO 8601, UTC); ``rm``, ``prune`` and ``erase-user`` print
``{"sessions": n, "items": n, "usage_rows": n, "dry_run": bool}``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar

import typer

from turnstore.cli import common
from turnstore.cli.db import _require_existing_sqlite_file, run_on_database
from turnstore.errors import (
    InvalidArgumentError,
    TurnstoreError,
)
from turnstore.info import SessionSummary
from turnstore.store import DEFAULT_BATCH_SIZE, Removed, SessionPage, Store

T = TypeVar("T")

_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}

UserOption = Annotated[
    str | None,
    typer.Option("--user", help="Only this user's sessions. Example: --user alice"),
]
BatchOption = Annotated[
    int,
    typer.Option(
        "--batch-size",
        min=1,
        max=10000,
        help="Sessions removed per transaction (1-10000). Example: --batch-size 500",
    ),
]
DryRunOption = Annotated[
    bool,
    typer.Option("--dry-run", help="Only count what would be removed. Example: --dry-run"),
]


def register(app: typer.Typer) -> None:
    """Add ``sessions``, ``rm``, ``prune`` and ``erase-user`` to ``app``."""
    app.command("sessions")(sessions)
    app.command("rm")(rm)
    app.command("prune")(prune)
    app.command("erase-user")(erase_user)


def parse_time(value: str, option: str) -> datetime:
    """An ISO 8601 date or date-time (naive: UTC).

    Raises:
        InvalidArgumentError: Not one.
    """
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidArgumentError(
            f"{option} takes an ISO 8601 date or time (UTC unless it says otherwise); "
            f"got {value!r}. Example: {option} 2026-01-31 or {option} 2026-01-31T12:00:00Z"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_duration(value: str) -> timedelta:
    """A duration such as ``30d``, ``12h``, ``2w3d`` or ``90m``.

    Raises:
        InvalidArgumentError: Not one.
    """
    text = value.strip().lower()
    parts = _DURATION.findall(text)
    if not text or _DURATION.sub("", text).strip():
        raise InvalidArgumentError(
            f"--inactive-for takes a duration like 30d, 12h, 2w3d or 90m; got {value!r}"
        )
    try:
        return sum(
            (timedelta(**{_UNITS[unit]: int(amount)}) for amount, unit in parts), timedelta()
        )
    except OverflowError:
        # Longer than a timedelta holds: older than any session can be, as prune() clamps.
        return timedelta.max


def _run(url: str | None, work: Callable[[Store], Awaitable[T]]) -> T:
    target = common.resolve_url(url)
    # Listing, and a prune or erasure with nothing to remove, must not leave an empty
    # database file behind a mistyped path (SQLite creates the file on connect).
    _require_existing_sqlite_file(target)

    async def go() -> T:
        async with Store(url=target) as store:
            return await work(store)

    return run_on_database(target, go)


def summary_data(summary: SessionSummary) -> dict[str, Any]:
    """A summary as the JSON output shows it."""
    data = asdict(summary)
    data["created_at"] = summary.created_at.isoformat()
    data["last_activity"] = summary.last_activity.isoformat()
    return data


def _print_page(page: SessionPage) -> None:
    if not page.sessions:
        common.line("no sessions")
    for summary in page.sessions:
        label = summary.title or summary.preview or ""
        common.line(
            f"{summary.last_activity:%Y-%m-%d %H:%M:%S}  {common.shown_id(summary.session_id)}  "
            f"user={'-' if summary.user_id is None else common.shown_id(summary.user_id)}  "
            f"items={summary.items}  {label}".rstrip()
        )
    if page.next_cursor:
        common.line(f"more: --cursor {page.next_cursor}")


def sessions(
    url: common.UrlOption = None,
    user: UserOption = None,
    active_after: Annotated[
        str | None,
        typer.Option(
            "--active-after",
            help="Only sessions active at or after this time (ISO 8601, UTC). "
            "Example: --active-after 2026-01-31",
        ),
    ] = None,
    active_before: Annotated[
        str | None,
        typer.Option(
            "--active-before",
            help="Only sessions last active before this time. Example: --active-before 2026-02-01",
        ),
    ] = None,
    limit: Annotated[
        int,
        typer.Option(
            "--limit", min=1, max=1000, help="Sessions per page (1-1000). Example: --limit 20"
        ),
    ] = 50,
    cursor: Annotated[
        str | None,
        typer.Option(
            "--cursor",
            help="Continue where the previous page stopped (same filters). "
            "Example: --cursor c1.eyJh...",
        ),
    ] = None,
    as_json: common.JsonOption = False,
) -> None:
    """List sessions, most recently active first, one page at a time."""
    after = None if active_after is None else parse_time(active_after, "--active-after")
    before = None if active_before is None else parse_time(active_before, "--active-before")
    page = _run(
        url,
        lambda store: store.list_sessions(
            user_id=user, active_after=after, active_before=before, limit=limit, cursor=cursor
        ),
    )
    data = {
        "sessions": [summary_data(summary) for summary in page.sessions],
        "next_cursor": page.next_cursor,
    }
    common.emit(data, lambda: _print_page(page), as_json=as_json)


def _removed_data(removed: Removed, dry_run: bool) -> dict[str, Any]:
    return {**asdict(removed), "dry_run": dry_run}


def _counts(removed: Removed) -> str:
    return f"{removed.sessions} session(s), {removed.items} item(s)"


def rm(
    session_id: Annotated[str, typer.Argument(help="The session to delete. Example: chat-42")],
    url: common.UrlOption = None,
    yes: common.YesOption = False,
    as_json: common.JsonOption = False,
) -> None:
    """Delete one session entirely: items, branches, usage and info (asks first)."""

    def work(store: Store) -> Awaitable[Removed]:
        shown = common.shown_id(session_id)
        common.confirm(
            f"Delete session {shown} and everything in it?",
            yes=yes,
            refusal=f"deleting session {shown} removes it for good",
        )
        return store.delete_session(session_id)

    removed = _run(url, work)
    if removed.sessions == 0:
        typer.echo(
            common.error_line(
                "turnstore rm",
                # Quoted as every error quotes an id (repr: escapes included).
                TurnstoreError(f"No session {session_id!r} in this database"),
            ),
            err=True,
        )
        common.exit_with(common.ExitCode.NOT_FOUND)
    common.emit(
        _removed_data(removed, False),
        f"deleted session {common.shown_id(session_id)} ({removed.items} item(s))",
        as_json=as_json,
    )


def _erase(
    url: str | None,
    *,
    what: str,
    run: Callable[[Store, bool, Callable[[Removed], None] | None], Awaitable[Removed]],
    yes: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    async def work(store: Store) -> Removed:
        planned = await run(store, True, None)
        if dry_run or planned.sessions == 0:
            return planned
        common.confirm(
            f"Remove {_counts(planned)}: {what}?",
            yes=yes,
            refusal=f"this removes {_counts(planned)} ({what}) for good",
        )
        with common.progress(planned.sessions, "removing sessions") as advance:
            done = 0

            def report(totals: Removed) -> None:
                nonlocal done
                advance(totals.sessions - done)
                done = totals.sessions

            return await run(store, False, report)

    removed = _run(url, work)
    verb = "would remove" if dry_run else "removed"
    common.emit(
        _removed_data(removed, dry_run), f"{verb} {_counts(removed)}: {what}", as_json=as_json
    )


def prune(
    url: common.UrlOption = None,
    inactive_for: Annotated[
        str | None,
        typer.Option(
            "--inactive-for",
            help="Remove sessions untouched for this long (s, m, h, d, w). "
            "Example: --inactive-for 90d",
        ),
    ] = None,
    before: Annotated[
        str | None,
        typer.Option(
            "--before",
            help="Remove sessions last active before this time (ISO 8601, UTC). "
            "Example: --before 2026-01-01",
        ),
    ] = None,
    user: UserOption = None,
    batch_size: BatchOption = DEFAULT_BATCH_SIZE,
    dry_run: DryRunOption = False,
    yes: common.YesOption = False,
    as_json: common.JsonOption = False,
) -> None:
    """Remove sessions nobody touched since a cut-off, in short batches (asks first).

    Safe beside running applications: each batch is its own short transaction, and a
    session written meanwhile is kept whole. Stopped midway, run it again to finish.
    """
    if (inactive_for is None) == (before is None):
        common.usage_error("Pass exactly one of --inactive-for or --before")
    idle = None if inactive_for is None else parse_duration(inactive_for)
    cutoff = None if before is None else parse_time(before, "--before")
    what = f"inactive for {inactive_for}" if idle is not None else f"last active before {before}"
    if user is not None:
        what += f", of user {common.shown_id(user)}"

    def run(store: Store, dry: bool, report: Callable[[Removed], None] | None) -> Any:
        return store.prune(
            inactive_for=idle,
            before=cutoff,
            user_id=user,
            batch_size=batch_size,
            dry_run=dry,
            progress=report,
        )

    _erase(url, what=what, run=run, yes=yes, dry_run=dry_run, as_json=as_json)


def erase_user(
    user_id: Annotated[str, typer.Argument(help="The user whose sessions all go. Example: alice")],
    url: common.UrlOption = None,
    batch_size: BatchOption = DEFAULT_BATCH_SIZE,
    dry_run: DryRunOption = False,
    yes: common.YesOption = False,
    as_json: common.JsonOption = False,
) -> None:
    """Remove every session of a user (a GDPR erasure), in short batches (asks first)."""

    def run(store: Store, dry: bool, report: Callable[[Removed], None] | None) -> Any:
        return store.erase_user(user_id, batch_size=batch_size, dry_run=dry, progress=report)

    _erase(
        url,
        what=f"every session of user {common.shown_id(user_id)}",
        run=run,
        yes=yes,
        dry_run=dry_run,
        as_json=as_json,
    )
