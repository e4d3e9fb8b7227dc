"""Export, import and copy: lossless on every backend and between them, refusing bad files."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import os
import random
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from scripts.stress import process_context
from sqlalchemy import func, select

from tests.conftest import Backend
from tests.copy_worker import copy_until_killed
from tests.helpers import assistant, user
from tests.moving_helpers import all_answers, empty_store, populate, stored_rows
from tests.test_adopt import SESSIONS, build_sdk_database, sdk_snapshots, snapshot
from tests.test_crash_safety import drain
from turnstore import AdvancedSession, AdvancedSQLiteSession, transfer
from turnstore.errors import ExportFileError, SessionExistsError
from turnstore.persistence import engines
from turnstore.persistence.engines import EngineHandle
from turnstore.persistence.models import DEFAULT_TABLES, LINEAGE_TABLE
from turnstore.persistence.moving import OnConflict
from turnstore.persistence.repository import ConversationRepository
from turnstore.schema import migrate
from turnstore.schema.migrate import bring_to_head
from turnstore.verification import compare_sessions


async def _handle(backend: Backend) -> EngineHandle:
    handle = engines.acquire_for_engine(backend.engine)
    await ConversationRepository(handle, DEFAULT_TABLES).prepare_schema(
        create=True, migrate_default=bring_to_head
    )
    return handle


async def export_bytes(backend: Backend, **options: Any) -> bytes:
    buffer = io.BytesIO()
    await transfer.write_export(await _handle(backend), DEFAULT_TABLES, buffer, **options)
    return buffer.getvalue()


async def import_bytes(backend: Backend, data: bytes, **options: Any) -> transfer.TransferSummary:
    return await transfer.import_file(
        await _handle(backend), DEFAULT_TABLES, io.BytesIO(data), **options
    )


async def copy_store(source: Backend, target: Backend, **options: Any) -> transfer.TransferSummary:
    return await transfer.copy_sessions(
        (await _handle(source), DEFAULT_TABLES), (await _handle(target), DEFAULT_TABLES), **options
    )


async def assert_same(source: Backend, target: Backend, session_ids: list[str]) -> None:
    assert await all_answers(target.engine, session_ids) == await all_answers(
        source.engine, session_ids
    )
    for session_id in session_ids:
        assert await stored_rows(target.engine, session_id) == await stored_rows(
            source.engine, session_id
        ), session_id


async def count_rows(backend: Backend) -> dict[str, int]:
    counts = {}
    async with backend.engine.connect() as conn:
        for table in DEFAULT_TABLES.metadata.sorted_tables:
            counts[table.name] = int(
                await conn.scalar(select(func.count()).select_from(table)) or 0
            )
    return counts


def lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode().splitlines()]


def encode(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)


# -- lossless ---------------------------------------------------------------------------------


async def test_a_file_round_trip_answers_every_read_the_same(
    backend: Backend, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    session_ids = await populate(backend.engine)
    data = await export_bytes(backend)
    async with empty_store(backend.name, request, tmp_path) as target:
        summary = await import_bytes(target, data)
        assert (summary.sessions, summary.skipped) == (len(session_ids), 0)
        await assert_same(backend, target, session_ids)
        assert summary.items == (await count_rows(target))["message_structure"]
        # The copy carries on as a conversation: new turns, and reserved names stay taken.
        session = target.session("branchy")
        await session.add_items([user("a new question"), assistant("a new answer")])
        with pytest.raises(ValueError, match="already been used"):
            await session.create_branch_from_turn(1, "doomed")
        cleared = target.session("cleared and rewritten")
        with pytest.raises(ValueError, match="already been used"):
            await cleared.create_branch_from_turn(1, "old-branch")


async def test_the_export_keeps_stored_text_as_stored(backend: Backend) -> None:
    session = backend.session("raw")
    await session.add_items([user("caf\u00e9 \U0001f600")])
    stored = (await stored_rows(backend.engine, "raw"))["messages"][0][0]
    records = lines(await export_bytes(backend))
    assert [r["record"] for r in records] == [
        "header",
        "session",
        "message",
        "structure",
        "session_end",
        "end",
    ]
    assert records[0]["format"] == "turnstore-export"
    assert records[0]["version"] == 1
    assert records[2]["data"] == stored


@pytest.mark.parametrize(
    ("source_name", "target_name"),
    [("sqlite", "postgres"), ("sqlite", "mysql"), ("postgres", "sqlite")],
)
async def test_a_copy_between_databases_answers_every_read_the_same(
    source_name: str, target_name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    async with (
        empty_store(source_name, request, tmp_path) as source,
        empty_store(target_name, request, tmp_path) as target,
    ):
        session_ids = await populate(source.engine)
        progress: list[transfer.Progress] = []
        summary = await copy_store(source, target, progress=progress.append, batch_size=3)
        assert summary.sessions == len(session_ids)
        assert [p.sessions_done for p in progress] == list(range(1, len(session_ids) + 1))
        await assert_same(source, target, session_ids)
        again = await copy_store(source, target)
        assert (again.sessions, again.skipped) == (0, len(session_ids))
        assert await count_rows(target) == await count_rows(source)
    await engines.dispose_engines()


async def test_only_the_chosen_sessions_move(
    backend: Backend, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    await populate(backend.engine)
    data = await export_bytes(backend, session_ids=["awkward", "no such session", "awkward"])
    assert [r["session_id"] for r in lines(data) if r["record"] == "session"] == ["awkward"]
    async with empty_store(backend.name, request, tmp_path) as target:
        summary = await copy_store(backend, target, session_ids=["branchy"])
        assert summary.sessions == 1
        await assert_same(backend, target, ["branchy"])
        assert (await count_rows(target))["agent_sessions"] == 1


# -- conflicts --------------------------------------------------------------------------------


async def test_on_conflict_skips_replaces_or_fails(
    backend: Backend, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    session_ids = await populate(backend.engine)
    data = await export_bytes(backend)
    async with empty_store(backend.name, request, tmp_path) as target:
        other = target.session("branchy")
        await other.add_items([user("the target's own version")])
        mine = await stored_rows(target.engine, "branchy")

        skipped = await import_bytes(target, data, on_conflict=OnConflict.SKIP)
        assert (skipped.sessions, skipped.skipped) == (len(session_ids) - 1, 1)
        assert await stored_rows(target.engine, "branchy") == mine

        before = await count_rows(target)
        with pytest.raises(SessionExistsError, match="'AWKWARD ' already exists in the target"):
            await import_bytes(target, data, on_conflict=OnConflict.FAIL)
        assert await count_rows(target) == before

        replaced = await import_bytes(target, data, on_conflict=OnConflict.REPLACE)
        assert (replaced.sessions, replaced.replaced) == (len(session_ids), len(session_ids))
        await assert_same(backend, target, session_ids)
        assert await count_rows(target) == await count_rows(backend)


def test_on_conflict_must_be_one_of_three() -> None:
    assert transfer.on_conflict_value("replace") is OnConflict.REPLACE
    with pytest.raises(ValueError, match='on_conflict must be "skip", "replace" or "fail"'):
        transfer.on_conflict_value("overwrite")


# -- bad files --------------------------------------------------------------------------------


def _spoil(records: list[dict[str, Any]], how: str) -> tuple[bytes, int]:
    """The export with the second session spoiled; the line the error must name."""
    records = copy.deepcopy(records)
    starts = [i for i, r in enumerate(records) if r["record"] == "session"]
    second = starts[1]
    body = [i for i in range(second, starts[2]) if records[i]["record"] == "structure"]
    if how == "truncated":
        cut = encode(records[: body[0] + 1])
        return cut[: -len(json.dumps(records[body[0]])) // 2], body[0] + 1
    if how == "truncated between sessions":
        return encode(records[: starts[2]]), starts[2] + 1
    if how == "corrupt":
        data = encode(records).split(b"\n")
        data[body[0]] = b'{"record": "structure", "message_id": 1,,}'
        return b"\n".join(data), body[0] + 1
    if how == "unknown message id":
        records[body[-1]]["message_id"] = 999_999
        return encode(records), body[-1] + 1
    if how == "missing record":
        del records[body[0]]
        end = next(i for i in range(second, len(records)) if records[i]["record"] == "session_end")
        return encode(records), end + 1
    if how == "wrong type":
        records[body[0]]["sequence_number"] = "3"
        return encode(records), body[0] + 1
    # Ids and numbers no backend stores alike: these imported on SQLite and Postgres and
    # failed on MariaDB with a driver error ("Data too long"), or the reverse for numbers.
    if how == "long branch id":
        records[body[0]]["branch_id"] = "b" * 256
        return encode(records), body[0] + 1
    if how == "NUL in session id":
        records[second]["session_id"] = "b-second\x00"
        return encode(records), second + 1
    if how == "long id in a row record":
        at = next(i for i in range(second, starts[2]) if records[i]["record"] == "session_end")
        lineage = {"branch_id": "b" * 256, "parent_branch_id": "main", "fork_turn": 1}
        records.insert(at, {"record": "row", "table": LINEAGE_TABLE, "values": lineage})
        return encode(records), at + 1
    if how == "number past INTEGER":
        records[body[0]]["sequence_number"] = 2**31
        return encode(records), body[0] + 1
    raise AssertionError(how)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", "truncated"),
        ("truncated between sessions", "truncated"),
        ("corrupt", "not a JSON record"),
        ("unknown message id", "refers to message id 999999, which this session does not define"),
        ("missing record", "should have 8 structure records but has 7"),
        ("wrong type", "'sequence_number' must be an integer; got str"),
        ("long branch id", "'branch_id' must be at most 255 characters"),
        ("NUL in session id", "'session_id' contains a NUL character"),
        ("number past INTEGER", "'sequence_number' is 2147483648, beyond what the INTEGER"),
        ("long id in a row record", "'values.branch_id' must be at most 255 characters"),
    ],
)
async def test_a_bad_file_is_refused_at_its_line_and_the_session_left_out(
    backend: Backend, request: pytest.FixtureRequest, tmp_path: Path, how: str, message: str
) -> None:
    source = backend.session("a-first")
    await source.add_items([user("kept"), assistant("kept too")])
    for name in ("b-second", "c-third"):
        session = backend.session(name)
        for number in range(4):
            await session.add_items([user(f"{name} {number}"), assistant("ok")])
    records = lines(await export_bytes(backend))
    data, line = _spoil(records, how)
    async with empty_store(backend.name, request, tmp_path) as target:
        with pytest.raises(ExportFileError, match=message) as caught:
            await import_bytes(target, data)
        assert caught.value.line == line
        assert str(caught.value).startswith(f"line {line}: ")
        assert await stored_rows(target.engine, "a-first") == await stored_rows(
            backend.engine, "a-first"
        )
        # Truncated between sessions, the second is whole: only the third is missing.
        kept = ["b-second"] if how == "truncated between sessions" else []
        for name in kept:
            assert await stored_rows(target.engine, name) == await stored_rows(backend.engine, name)
        for name in {"b-second", "c-third"} - set(kept):
            assert (await stored_rows(target.engine, name))["messages"] == []
        # Nothing of the bad session: a fixed file imports it afterwards.
        await import_bytes(target, encode(records))
        await assert_same(backend, target, ["a-first", "b-second", "c-third"])


@pytest.mark.parametrize(
    ("first_line", "message"),
    [
        (None, "line 1: the file is empty"),
        ({"record": "header", "format": "turnstore-export", "version": 2}, "newer turnstore"),
        ({"record": "header", "format": "something-else", "version": 1}, "not a turnstore export"),
        ([1, 2], r'line 1: not a record \(an object with a "record" field\)'),
    ],
)
async def test_a_file_of_another_format_or_version_is_refused(
    sqlite_path: Path, first_line: Any, message: str
) -> None:
    handle = engines.acquire_for_url(f"sqlite+aiosqlite:///{sqlite_path}")
    try:
        data = b"" if first_line is None else encode([first_line])
        with pytest.raises(ExportFileError, match=message):
            await transfer.import_file(handle, DEFAULT_TABLES, io.BytesIO(data))
    finally:
        await engines.release(handle)


async def test_records_after_the_end_or_unknown_fields_are_refused(sqlite_path: Path) -> None:
    handle = engines.acquire_for_url(f"sqlite+aiosqlite:///{sqlite_path}")
    header = {"record": "header", "format": "turnstore-export", "version": 1}
    try:
        trailing = encode([header, {"record": "end", "sessions": 0}, {"record": "end"}])
        with pytest.raises(ExportFileError, match="line 3: records after the end record"):
            await transfer.import_file(handle, DEFAULT_TABLES, io.BytesIO(trailing))
        extra = encode([{**header, "colour": "blue"}])
        with pytest.raises(ExportFileError, match=r"line 1: .*unknown field\(s\) colour"):
            await transfer.import_file(handle, DEFAULT_TABLES, io.BytesIO(extra))
    finally:
        await engines.release(handle)


# -- killed and run again ---------------------------------------------------------------------

KILLS = 3


async def test_a_killed_copy_run_again_leaves_every_session_once_and_whole(
    backend: Backend, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    rng = random.Random(16)
    async with empty_store("sqlite", request, tmp_path) as source:
        session_ids = []
        for number in range(40):
            session = source.session(f"s{number:02}")
            for turn_number in range(rng.randint(1, 6)):
                await session.add_items([user(f"q{turn_number}"), assistant("a" * 2000)])
            if number % 3 == 0:
                await session.create_branch_from_turn(1, "b")
                await session.add_items([user("branched")])
            session_ids.append(session.session_id)
        await _handle(backend)  # the target's schema, before any copy starts
        await engines.dispose_engines()
        context = process_context()
        copied: set[str] = set()
        for kill in range(KILLS):
            reader, writer_end = context.Pipe(duplex=False)
            worker = context.Process(
                target=copy_until_killed,
                args=(source.url, backend.url, backend.engine_options, writer_end),
            )
            worker.start()
            writer_end.close()
            try:
                assert reader.poll(60), "the copy never started"
                assert reader.recv() == ("ready",)
                for _ in range(rng.randint(1, 4)):
                    assert reader.poll(60), "the copy stalled"
                    message = reader.recv()
                    copied.add(message[1])
                await asyncio.sleep(rng.uniform(0, 0.05))
            finally:
                os.kill(worker.pid or 0, signal.SIGKILL)
                worker.join()
            assert worker.exitcode == -signal.SIGKILL, f"kill {kill}: the copy ended by itself"
            copied.update(m[1] for m in drain(reader) if m[0] == "copied")
            reader.close()
            # Whatever the target holds is whole: each session as in the source, or absent.
            for session_id in session_ids:
                rows = await stored_rows(backend.engine, session_id)
                if session_id in copied or rows["session"]:
                    assert rows == await stored_rows(source.engine, session_id), session_id
        assert len(copied) < len(session_ids), "the copy finished before the last kill"
        summary = await copy_store(source, backend)
        assert summary.skipped >= len(copied)
        assert summary.sessions + summary.skipped == len(session_ids)
        await assert_same(source, backend, session_ids)
        assert await count_rows(backend) == await count_rows(source)


# -- files written by the SDK's own class -----------------------------------------------------


@pytest.mark.parametrize("state", ["as written", "adopted", "older SDK, not adopted"])
async def test_an_sdk_file_copies_to_postgres_and_answers_like_the_sdk(
    state: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    path = tmp_path / "sdk.db"
    await build_sdk_database(path)
    if state == "older SDK, not adopted":
        with sqlite3.connect(path) as conn:
            conn.execute("DROP TABLE branch_reservations")
            conn.execute("DROP TABLE session_clear_generations")
    if state == "adopted":
        await migrate.adopt(f"sqlite+aiosqlite:///{path}")
    expected = await sdk_snapshots(path)
    source_url = f"sqlite+aiosqlite:///{path}"
    source = engines.acquire_for_url(source_url)
    try:
        async with empty_store("postgres", request, tmp_path) as target:
            summary = await transfer.copy_sessions(
                (source, DEFAULT_TABLES), (await _handle(target), DEFAULT_TABLES)
            )
            assert summary.sessions == len(SESSIONS)
            for session_id in SESSIONS:
                copied = AdvancedSession(session_id=session_id, engine=target.engine)
                assert await snapshot(copied) == expected[session_id], session_id
                if state != "older SDK, not adopted":  # turnstore would add the tables
                    original = AdvancedSQLiteSession(session_id=session_id, db_path=path)
                    assert await compare_sessions(original, copied) == []
                    await original.aclose()
                await copied.aclose()
    finally:
        await engines.release(source)


def _documented_example() -> str:
    """The last code block of docs/export-format.md: a complete export."""
    document = (Path(__file__).resolve().parents[1] / "docs" / "export-format.md").read_text()
    return document.rsplit("```\n", 2)[-2]


async def test_the_documented_example_imports(sqlite_path: Path) -> None:
    example = _documented_example()
    handle = engines.acquire_for_url(f"sqlite+aiosqlite:///{sqlite_path}")
    try:
        await ConversationRepository(handle, DEFAULT_TABLES).prepare_schema(
            create=True, migrate_default=bring_to_head
        )
        summary = await transfer.import_file(handle, DEFAULT_TABLES, io.BytesIO(example.encode()))
        assert (summary.sessions, summary.messages, summary.items, summary.usage) == (1, 2, 2, 1)
        session = AdvancedSession(session_id="user-42", url=f"sqlite+aiosqlite:///{sqlite_path}")
        assert await session.get_items() == [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ]
        usage = await session.get_turn_usage(1)
        assert isinstance(usage, dict)
        assert usage["total_tokens"] == 15
        await session.aclose()
    finally:
        await engines.release(handle)


async def test_reader_names_the_session_ids_it_does_not_know(backend: Backend) -> None:
    # What `export --session` and `copy --session` check before they write anything.
    from turnstore.persistence.moving import SessionReader

    session_ids = await populate(backend.engine)
    reader = SessionReader(await _handle(backend), DEFAULT_TABLES, batch_size=2)
    asked = ["nobody", *session_ids, " " + session_ids[0], session_ids[0].upper(), "nobody"]
    unknown = await reader.unknown(asked)
    # Ids are identities: a padded or case-mapped id is another session (never folded).
    expected = ["nobody", " " + session_ids[0]]
    if session_ids[0].upper() != session_ids[0]:
        expected.append(session_ids[0].upper())
    assert unknown == [*expected, "nobody"]
    assert await reader.unknown(session_ids) == []
