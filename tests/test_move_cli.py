"""``turnstore export``, ``import`` and ``copy`` from the command line."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import create_async_engine
from typer.testing import CliRunner

from tests.conftest import Backend, fresh_citus_schema_url
from tests.migration_helpers import fresh_postgres_database, run_cli
from tests.moving_helpers import all_answers, populate
from turnstore.cli import common
from turnstore.cli.main import app
from turnstore.persistence import engines
from turnstore.schema import migrate

NO_URL = {common.URL_VARIABLE: None}


async def invoke(args: list[str]) -> Any:
    """Run a command in process, on a thread: the command runs its own event loop."""
    return await asyncio.to_thread(CliRunner().invoke, app, args, env=NO_URL)


@asynccontextmanager
async def target_url(backend: Backend, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A URL of an empty database on the backend (the CLI cannot reach a private schema)."""
    if backend.name == "postgres":
        async with fresh_postgres_database(request.getfixturevalue("postgres_url")) as url:
            yield url
    elif backend.name == "citus":
        async with fresh_citus_schema_url(request.getfixturevalue("citus_url")) as url:
            yield url
    else:
        yield backend.url


async def answers_at(url: str, session_ids: list[str]) -> dict[str, Any]:
    engine = create_async_engine(url)
    try:
        return await all_answers(engine, session_ids)
    finally:
        await engine.dispose()
        await engines.dispose_engines()


@pytest.fixture
async def source(tmp_path: Path) -> AsyncIterator[tuple[str, list[str]]]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'source.db'}"
    engine = create_async_engine(url)
    try:
        yield url, await populate(engine)
    finally:
        await engine.dispose()
        await engines.dispose_engines()


async def test_copy_with_verify_to_every_backend(
    backend: Backend, request: pytest.FixtureRequest, source: tuple[str, list[str]]
) -> None:
    url, session_ids = source
    async with target_url(backend, request) as target:
        result = await invoke(["copy", "--from", url, "--to", target, "--verify", "--json"])
        assert result.exit_code == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["sessions"] == len(session_ids)
        assert report["verified"] == len(session_ids)
        assert report["target"] == "migrated the empty target"
        assert await answers_at(target, session_ids) == await answers_at(url, session_ids)
        again = await invoke(["copy", "--from", url, "--to", target])
        assert again.exit_code == 0, again.stderr
        assert f"{len(session_ids)} skipped (already there)" in again.stdout


async def test_export_then_import_through_a_file_and_standard_output(
    tmp_path: Path, source: tuple[str, list[str]]
) -> None:
    url, session_ids = source
    exported = tmp_path / "backup.jsonl"
    result = await invoke(["export", "--url", url, "-o", str(exported)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"exported {len(session_ids)} sessions")
    assert not (tmp_path / "backup.jsonl.partial").exists()
    piped = await invoke(["export", "--url", url])
    assert piped.exit_code == 0
    # The same records but the header's time and source.
    assert piped.stdout.splitlines()[1:] == exported.read_text().splitlines()[1:]
    assert piped.stderr.startswith("exported ")

    target = f"sqlite+aiosqlite:///{tmp_path / 'target.db'}"
    imported = await invoke(["import", "--url", target, str(exported), "--json"])
    assert imported.exit_code == 0, imported.stderr
    assert json.loads(imported.stdout)["sessions"] == len(session_ids)
    assert await answers_at(target, session_ids) == await answers_at(url, session_ids)


async def test_filters_pick_sessions(tmp_path: Path, source: tuple[str, list[str]]) -> None:
    url, _ = source
    exported = tmp_path / "user.jsonl"
    result = await invoke(["export", "--url", url, "--user", "user-1", "-o", str(exported)])
    assert result.exit_code == 0, result.stderr
    chosen = [
        json.loads(line)["session_id"]
        for line in exported.read_text().splitlines()
        if json.loads(line)["record"] == "session"
    ]
    assert sorted(chosen) == ["awkward", "branchy"]
    later = await invoke(
        ["export", "--url", url, "--active-after", "2999-01-01", "-o", str(exported)]
    )
    assert later.exit_code == 0
    assert later.stdout.startswith("exported 0 sessions")


async def test_errors_are_one_line_with_the_documented_exit_code(
    tmp_path: Path, source: tuple[str, list[str]]
) -> None:
    url, _ = source
    nowhere = f"sqlite+aiosqlite:///{tmp_path}/nope.db"
    missing = await invoke(["copy", "--from", nowhere, "--to", url])
    assert missing.exit_code == common.ExitCode.UNAVAILABLE
    assert "does not exist" in missing.stderr
    unfinished = tmp_path / "unfinished.jsonl"
    failed_export = await invoke(["export", "--url", nowhere, "-o", str(unfinished)])
    assert failed_export.exit_code == common.ExitCode.UNAVAILABLE
    # Nothing is left that looks like an export.
    assert not await asyncio.to_thread(lambda: list(tmp_path.glob("unfinished.jsonl*")))

    # A folder, or a file in a folder that does not exist: refused before reading, nothing
    # left behind (was "unexpected IsADirectoryError" with the .partial file left).
    for output, problem in ((tmp_path, "is a folder"), (tmp_path / "no" / "x.jsonl", "does not")):
        unwritable = await invoke(["export", "--url", url, "-o", str(output)])
        assert unwritable.exit_code == common.ExitCode.USAGE, unwritable.stderr
        assert problem in unwritable.stderr
        assert unwritable.stderr.count("\n") == 1
    assert not await asyncio.to_thread(lambda: list(tmp_path.glob("*.partial")))

    both = await invoke(["export", "--url", url, "--session", "a", "--user", "b"])
    assert both.exit_code == common.ExitCode.USAGE
    assert "not both" in both.stderr
    bad_time = await invoke(["export", "--url", url, "--active-after", "yesterday"])
    assert bad_time.exit_code == common.ExitCode.USAGE

    behind = f"sqlite+aiosqlite:///{tmp_path / 'behind.db'}"
    await migrate.upgrade(behind, "0004")
    refused = await invoke(["copy", "--from", url, "--to", behind])
    assert refused.exit_code == common.ExitCode.REFUSED
    assert "pass --migrate" in refused.stderr
    assert "turnstore db upgrade --url" in refused.stderr
    assert (await invoke(["copy", "--from", url, "--to", behind, "--migrate"])).exit_code == 0

    broken = tmp_path / "broken.jsonl"
    export = await invoke(["export", "--url", url, "-o", str(broken)])
    assert export.exit_code == 0
    lines = broken.read_text().splitlines()
    broken.write_text("\n".join(lines[:5]) + "\n")
    failed = await invoke(
        ["import", "--url", f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", str(broken)]
    )
    assert failed.exit_code == common.ExitCode.BAD_FILE
    assert failed.stderr.startswith("turnstore import: error: line 6: the file ends before")
    assert len(failed.stderr.strip().splitlines()) == 1


def with_message_data(lines: list[str], data: str) -> tuple[str, int]:
    """The export ``lines`` with the last message's stored text replaced; and its line."""
    at = max(n for n, line in enumerate(lines) if json.loads(line)["record"] == "message")
    record = json.loads(lines[at])
    record["data"] = data
    return "\n".join([*lines[:at], json.dumps(record), *lines[at + 1 :]]) + "\n", at + 1


async def test_import_refuses_items_that_are_not_json_objects_and_imports_nothing(
    backend: Backend,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    source: tuple[str, list[str]],
) -> None:
    # An item the SDK stores is the JSON of an object. A message whose text was anything
    # else was imported as it was, and then silently skipped by every read; the sessions
    # before the bad line were written.
    url, session_ids = source
    exported = tmp_path / "backup.jsonl"
    assert (await invoke(["export", "--url", url, "-o", str(exported)])).exit_code == 0
    lines = exported.read_text().splitlines()
    async with target_url(backend, request) as target:
        for data, problem in (
            ("not json {", "'data' is not JSON text"),
            ('["a"]', "'data' must be the JSON of an item, an object; got the JSON of an array"),
            ("null", "got the JSON of null"),
            ('"text"', "got the JSON of a string"),
            ("42", "got the JSON of a number"),
        ):
            text, line = with_message_data(lines, data)
            bad = tmp_path / "bad.jsonl"
            bad.write_text(text)
            for args in (["import", "--url", target, str(bad)], ["import", "--url", target, "-"]):
                result = await asyncio.to_thread(
                    CliRunner().invoke, app, args, env=NO_URL, input=text
                )
                assert result.exit_code == common.ExitCode.BAD_FILE, result.stderr
                assert result.stdout == ""
                assert result.stderr.startswith(
                    f"turnstore import: error: line {line}: message record: "
                ), result.stderr
                assert problem in result.stderr
                assert result.stderr.count("\n") == 1
        # Nothing was written, not even the sessions before the bad line, nor the schema.
        found, recorded = await migrate.inspect_target(target)
        assert (found.kind.value, recorded) == ("empty", ())
        await engines.dispose_engines()
        imported = await invoke(["import", "--url", target, str(exported), "--json"])
        assert imported.exit_code == 0, imported.stderr
        assert json.loads(imported.stdout)["sessions"] == len(session_ids)
        await engines.dispose_engines()


async def test_replacing_sessions_asks_first(
    tmp_path: Path, source: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # --on-conflict replace deletes the target's sessions: it went ahead without asking.
    url, session_ids = source
    exported = tmp_path / "backup.jsonl"
    assert (await invoke(["export", "--url", url, "-o", str(exported)])).exit_code == 0
    target = f"sqlite+aiosqlite:///{tmp_path / 'target.db'}"
    assert (await invoke(["import", "--url", target, str(exported)])).exit_code == 0
    before = await answers_at(target, session_ids)
    for args in (
        ["import", "--url", target, str(exported), "--on-conflict", "replace"],
        ["copy", "--from", url, "--to", target, "--on-conflict", "replace"],
    ):
        refused = await invoke(args)
        assert refused.exit_code == common.ExitCode.NOT_CONFIRMED, refused.stderr
        assert refused.stdout == ""
        assert refused.stderr.count("\n") == 1
        assert "--on-conflict replace deletes every session" in refused.stderr
        assert refused.stderr.endswith("pass --yes to go ahead (nothing was changed)\n")
        with monkeypatch.context() as patch:
            patch.setattr(common, "stdin_is_terminal", lambda: True)
            patch.setattr(common, "is_terminal", lambda _stream: True)
            declined = await asyncio.to_thread(
                CliRunner().invoke, app, args, env=NO_URL, input="n\n"
            )
        assert declined.exit_code == common.ExitCode.NOT_CONFIRMED, declined.stderr
        assert "Replace every session" in declined.stderr
    # The file on standard input leaves no one to ask: --yes it is.
    piped = await asyncio.to_thread(
        CliRunner().invoke,
        app,
        ["import", "--url", target, "-", "--on-conflict", "replace"],
        env=NO_URL,
        input=exported.read_text(),
    )
    assert piped.exit_code == common.ExitCode.NOT_CONFIRMED
    assert await answers_at(target, session_ids) == before
    shell = await asyncio.to_thread(
        run_cli, ["import", "--url", target, str(exported), "--on-conflict", "replace"]
    )
    assert shell.returncode == common.ExitCode.NOT_CONFIRMED
    assert "pass --yes to go ahead" in shell.stderr
    replaced = await invoke(
        ["import", "--url", target, str(exported), "--on-conflict", "replace", "--yes", "--json"]
    )
    assert replaced.exit_code == 0, replaced.stderr
    assert json.loads(replaced.stdout)["replaced"] == len(session_ids)
    copied = await invoke(
        ["copy", "--from", url, "--to", target, "--on-conflict", "replace", "-y", "--json"]
    )
    assert copied.exit_code == 0, copied.stderr
    assert json.loads(copied.stdout)["replaced"] == len(session_ids)
    # Skipping and failing change nothing that exists: they never ask.
    kept = await invoke(["import", "--url", target, str(exported), "--on-conflict", "skip"])
    assert kept.exit_code == 0, kept.stderr


async def test_a_real_process_copies_and_prints_plain_progress_and_counts(
    tmp_path: Path, source: tuple[str, list[str]]
) -> None:
    url, session_ids = source
    target = f"sqlite+aiosqlite:///{tmp_path / 'copied.db'}"
    done = await asyncio.to_thread(run_cli, ["copy", "--from", url, "--to", target, "--verify"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"copied {len(session_ids)} sessions")
    assert "verified 6 sessions: every read answers the same" in done.stdout
    assert "\x1b[" not in done.stdout + done.stderr  # no terminal decoration in a pipe


def test_without_a_terminal_progress_is_a_plain_line_every_few_seconds(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from turnstore import transfer
    from turnstore.cli import move

    monkeypatch.setattr(move, "PLAIN_PROGRESS_EVERY", 0.0)
    with move._progress("copied", 10) as report:
        report(transfer.Progress(4, 10, 400, 1000, 2.0, "s4"))
    line = capsys.readouterr().err
    assert line == "copied 4/10 sessions, 400 items, 500 rows/s, ETA 3s\n"
    monkeypatch.setattr(move, "PLAIN_PROGRESS_EVERY", 3600.0)
    with move._progress("copied", 10) as report:
        report(transfer.Progress(5, 10, 500, 1200, 2.0, "s5"))
    assert capsys.readouterr().err == ""


def test_on_a_terminal_progress_is_a_bar(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from turnstore import transfer
    from turnstore.cli import move

    monkeypatch.setattr(common, "is_terminal", lambda stream: True)
    with move._progress("copied", 10) as report:
        report(transfer.Progress(4, 10, 400, 1000, 2.0, "s4"))
        report(transfer.Progress(10, 10, 1000, 2500, 3.0, "s10"))
    assert capsys.readouterr().out == ""  # the bar is drawn on stderr only


async def test_verify_names_the_sessions_and_reads_that_differ(
    tmp_path: Path, source: tuple[str, list[str]]
) -> None:
    from sqlalchemy import delete

    from turnstore.cli import move
    from turnstore.errors import CopyMismatchError
    from turnstore.persistence.models import DEFAULT_TABLES

    url, session_ids = source
    target = f"sqlite+aiosqlite:///{tmp_path / 'tampered.db'}"
    copied = await invoke(["copy", "--from", url, "--to", target])
    assert copied.exit_code == 0, copied.stderr
    engine = create_async_engine(target)
    usage = DEFAULT_TABLES.usage
    async with engine.begin() as conn:
        await conn.execute(delete(usage).where(usage.c.session_id == "branchy"))
    await engine.dispose()
    with pytest.raises(CopyMismatchError) as caught:
        await move._verify(url, target, session_ids)
    message = str(caught.value)
    assert message.startswith("1 of 6 copied sessions answer differently on the target:")
    assert "'branchy': get_session_usage" in message
    await engines.dispose_engines()


async def test_a_session_that_does_not_exist_is_not_found_and_nothing_is_written(
    tmp_path: Path, source: tuple[str, list[str]]
) -> None:
    # Was an empty export (and an empty copy) with exit 0: a mistyped id looked like success.
    url, session_ids = source
    output = tmp_path / "one.jsonl"
    missing = await invoke(
        [
            "export",
            "--url",
            url,
            "--session",
            session_ids[0],
            "--session",
            "nosuch",
            "-o",
            str(output),
        ]
    )
    assert missing.exit_code == common.ExitCode.NOT_FOUND, missing.stderr
    assert missing.stderr.startswith("turnstore export: error: No session 'nosuch' in this")
    assert missing.stderr.count("\n") == 1
    assert not await asyncio.to_thread(lambda: list(tmp_path.glob("one.jsonl*")))
    target = f"sqlite+aiosqlite:///{tmp_path / 'target.db'}"
    copied = await invoke(["copy", "--from", url, "--to", target, "--session", "nosuch"])
    assert copied.exit_code == common.ExitCode.NOT_FOUND, copied.stderr
    assert not (tmp_path / "target.db").exists()
    found = await invoke(["export", "--url", url, "--session", session_ids[0], "-o", str(output)])
    assert found.exit_code == 0, found.stderr
    assert found.stdout.startswith("exported 1 session")
