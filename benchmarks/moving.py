"""Moving conversations: copy SQLite -> Postgres against asyncpg's binary COPY, export, import.

Builds a SQLite store of ``--sessions`` sessions of 100 items each (15 turns on main, a branch
from turn 6 with 5 turns of its own, tool calls, usage on every turn), then, each in a process
of its own so peak memory is its own:

* **floor**: the same rows read from the SQLite file and loaded into empty tables of a fresh
  Postgres schema with asyncpg's ``copy_records_to_table`` (binary COPY), as fast as one
  process can move them, with no id remapping;
* **copy**: ``turnstore.transfer.copy_sessions`` (what ``turnstore copy`` runs) into another
  fresh schema at head: new message ids, one transaction per group of whole sessions;
* **export** and **import** on each backend: the store written as an export file, and that
  file imported into an empty database (then exported again) on SQLite, Postgres, MariaDB.

Prints one line per figure and ``COPY_JSON {...}`` with all of them::

    python benchmarks/moving.py                  # 10,000 sessions, 1,000,000 items
    python benchmarks/moving.py --sessions 1000  # 100,000 items
    python benchmarks/moving.py --quick          # a few seconds: the smoke test's run

Servers come from ``--postgres``/``--mysql`` (default: the test suite's variables, else local
defaults); ``--mysql ''`` skips MariaDB. Every schema and database is private and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

_CHECKOUT_SOURCE = Path(__file__).resolve().parents[1] / "src"
if (_CHECKOUT_SOURCE / "turnstore").is_dir():
    sys.path.insert(0, str(_CHECKOUT_SOURCE))

from turnstore import transfer  # noqa: E402
from turnstore.persistence import engines  # noqa: E402
from turnstore.persistence.models import DEFAULT_TABLES  # noqa: E402
from turnstore.schema import migrate  # noqa: E402

POSTGRES = os.environ.get(
    "TURNSTORE_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
MYSQL = os.environ.get("TURNSTORE_TEST_MYSQL_URL", "mysql+asyncmy://root@127.0.0.1:3306/test")
MAIN_TURNS, BRANCH_AT, BRANCH_TURNS = 15, 6, 5
STAMP = "2026-01-01 12:00:00"


# -- the source store ----------------------------------------------------------------------------


def _turn(session: str, number: int) -> list[tuple[str, str, str | None]]:
    """(message_data, message_type, tool_name) of one four-item turn, ~300 bytes each."""
    text = f"{session} turn {number}: " + "lorem ipsum dolor sit amet " * 6
    call = f"call_{session}_{number}"
    return [
        (json.dumps({"role": "user", "content": text}), "user", None),
        (
            json.dumps(
                {"type": "function_call", "name": "lookup", "call_id": call, "arguments": "{}"}
            ),
            "function_call",
            "lookup",
        ),
        (
            json.dumps({"type": "function_call_output", "call_id": call, "output": text}),
            "function_call_output",
            None,
        ),
        (
            json.dumps(
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text}],
                }
            ),
            "assistant",
            None,
        ),
    ]


def build_source(path: Path, sessions: int) -> dict[str, int]:
    """Write the source store with sqlite3 directly (fast); its row counts."""
    asyncio.run(migrate.upgrade(f"sqlite+aiosqlite:///{path}"))
    db = sqlite3.connect(path)
    details = json.dumps({"cached_tokens": 3, "cache_write_tokens": 0})
    out_details = json.dumps({"reasoning_tokens": 2})
    message_id = 0
    counts = {"messages": 0, "structure": 0, "usage": 0}
    with db:
        for number in range(sessions):
            sid = f"session-{number:07}"
            db.execute(
                "INSERT INTO agent_sessions (session_id, created_at, updated_at) VALUES (?,?,?)",
                (sid, STAMP, STAMP),
            )
            messages, structure, usage = [], [], []
            main_ids: list[tuple[int, str, int, str | None]] = []
            sequence = 0
            for turn in range(1, MAIN_TURNS + 1):
                for data, kind, tool in _turn(sid, turn):
                    message_id += 1
                    sequence += 1
                    messages.append((message_id, sid, data, STAMP))
                    structure.append((sid, message_id, "main", kind, sequence, turn, turn, tool))
                    main_ids.append((message_id, kind, turn, tool))
                usage.append((sid, "main", turn, 1, 100, 20, 120, details, out_details, STAMP))
            for mid, kind, turn, tool in main_ids:
                if turn < BRANCH_AT:
                    sequence += 1
                    structure.append((sid, mid, "alt", kind, sequence, turn, turn, tool))
            for turn in range(BRANCH_AT, BRANCH_AT + BRANCH_TURNS):
                for data, kind, tool in _turn(f"{sid}-alt", turn):
                    message_id += 1
                    sequence += 1
                    messages.append((message_id, sid, data, STAMP))
                    structure.append((sid, message_id, "alt", kind, sequence, turn, turn, tool))
                usage.append((sid, "alt", turn, 1, 90, 10, 100, details, out_details, STAMP))
            db.executemany(
                "INSERT INTO agent_messages (id, session_id, message_data, created_at) "
                "VALUES (?,?,?,?)",
                messages,
            )
            db.executemany(
                "INSERT INTO message_structure (session_id, message_id, branch_id, "
                "message_type, sequence_number, user_turn_number, branch_turn_number, "
                "tool_name, created_at) VALUES (?,?,?,?,?,?,?,?,'" + STAMP + "')",
                structure,
            )
            db.executemany(
                "INSERT INTO turn_usage (session_id, branch_id, user_turn_number, requests, "
                "input_tokens, output_tokens, total_tokens, input_tokens_details, "
                "output_tokens_details, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                usage,
            )
            db.execute(
                "INSERT INTO branch_reservations (session_id, branch_id) VALUES (?, 'alt')", (sid,)
            )
            counts["messages"] += len(messages)
            counts["structure"] += len(structure)
            counts["usage"] += len(usage)
    db.close()
    return counts


# -- private databases -----------------------------------------------------------------------


@asynccontextmanager
async def private_database(kind: str, base: str, tmp: Path) -> AsyncIterator[AsyncEngine]:
    """An engine on an empty schema (Postgres), database (MariaDB) or file (SQLite)."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    if kind == "sqlite":
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp / (name + '.db')}")
        try:
            yield engine
        finally:
            await engine.dispose()
        return
    admin = create_async_engine(base, isolation_level="AUTOCOMMIT")
    create, drop = (
        (f"CREATE SCHEMA {name}", f"DROP SCHEMA {name} CASCADE")
        if kind == "postgres"
        else (f"CREATE DATABASE {name}", f"DROP DATABASE {name}")
    )
    async with admin.connect() as conn:
        await conn.exec_driver_sql(create)
    try:
        if kind == "postgres":
            engine = create_async_engine(
                base, connect_args={"server_settings": {"search_path": name}}
            )
        else:
            engine = create_async_engine(make_url(base).set(database=name))
        try:
            yield engine
        finally:
            await engine.dispose()
    finally:
        async with admin.connect() as conn:
            await conn.exec_driver_sql(drop)
        await admin.dispose()


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- phases (each run in a process of its own) -----------------------------------------------


def _source_rows(path: Path, batch: int = 10_000) -> Iterator[tuple[str, list[tuple[Any, ...]]]]:
    """Every row of the source, table by table, in batches, as Postgres's COPY takes them."""
    from datetime import UTC, datetime

    def stamp(text: str | None) -> datetime | None:
        return None if text is None else datetime.fromisoformat(text).replace(tzinfo=UTC)

    db = sqlite3.connect(path)
    queries = {
        "agent_sessions": "SELECT session_id, created_at, updated_at FROM agent_sessions",
        "agent_messages": "SELECT id, session_id, message_data, created_at FROM agent_messages",
        "message_structure": "SELECT session_id, message_id, branch_id, message_type, "
        "sequence_number, user_turn_number, branch_turn_number, tool_name, created_at "
        "FROM message_structure",
        "turn_usage": "SELECT session_id, branch_id, user_turn_number, requests, input_tokens, "
        "output_tokens, total_tokens, input_tokens_details, output_tokens_details, created_at "
        "FROM turn_usage",
        "branch_reservations": "SELECT session_id, branch_id FROM branch_reservations",
    }
    stamped = {"created_at", "updated_at"}
    for table, query in queries.items():
        cursor = db.execute(query)
        names = [d[0] for d in cursor.description]
        at = [i for i, n in enumerate(names) if n in stamped]
        while rows := cursor.fetchmany(batch):
            if at:
                rows = [
                    tuple(stamp(v) if i in at else v for i, v in enumerate(row)) for row in rows
                ]
            yield table, rows
    db.close()


async def phase_floor(source: Path, tmp: Path) -> dict[str, Any]:
    """The floor: the source's rows by binary COPY into a fresh schema, one transaction."""
    async with private_database("postgres", POSTGRES, tmp) as engine:
        await migrate.upgrade(engine)
        columns = {
            "agent_sessions": ["session_id", "created_at", "updated_at"],
            "agent_messages": ["id", "session_id", "message_data", "created_at"],
            "message_structure": [
                "session_id",
                "message_id",
                "branch_id",
                "message_type",
                "sequence_number",
                "user_turn_number",
                "branch_turn_number",
                "tool_name",
                "created_at",
            ],
            "turn_usage": [
                "session_id",
                "branch_id",
                "user_turn_number",
                "requests",
                "input_tokens",
                "output_tokens",
                "total_tokens",
                "input_tokens_details",
                "output_tokens_details",
                "created_at",
            ],
            "branch_reservations": ["session_id", "branch_id"],
        }
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            driver: Any = raw.driver_connection
            started = time.perf_counter()
            rows = 0
            async with driver.transaction():
                for table, batch in _source_rows(source):
                    await driver.copy_records_to_table(table, records=batch, columns=columns[table])
                    rows += len(batch)
            seconds = time.perf_counter() - started
    return {"rows": rows, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}


async def phase_copy(source: Path, tmp: Path) -> dict[str, Any]:
    """Turnstore's copy into a fresh schema at head."""
    async with private_database("postgres", POSTGRES, tmp) as engine:
        await migrate.upgrade(engine)
        source_handle = engines.acquire_for_url(f"sqlite+aiosqlite:///{source}")
        target_handle = engines.acquire_for_engine(engine)
        started = time.perf_counter()
        summary = await transfer.copy_sessions(
            (source_handle, DEFAULT_TABLES), (target_handle, DEFAULT_TABLES)
        )
        seconds = time.perf_counter() - started
        await engines.release(source_handle)
        await engines.release(target_handle)
    # The session rows and reservations count as rows too, as the floor loads them.
    rows = summary.rows + 2 * summary.sessions
    return {
        "rows": rows,
        "items": summary.items,
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


async def phase_moves(source: Path, tmp: Path, backends: list[str]) -> dict[str, Any]:
    """Export the source, import the file into each backend, export it again from there."""
    figures: dict[str, Any] = {}
    exported = tmp / "export.jsonl"
    handle = engines.acquire_for_url(f"sqlite+aiosqlite:///{source}")
    with exported.open("wb") as file:
        started = time.perf_counter()
        summary = await transfer.write_export(handle, DEFAULT_TABLES, file)
        figures["export_sqlite_items_per_s"] = summary.items / (time.perf_counter() - started)
    await engines.release(handle)
    figures["export_file_mb"] = exported.stat().st_size / 1e6
    for kind in backends:
        base = POSTGRES if kind == "postgres" else MYSQL
        async with private_database(kind, base, tmp) as engine:
            await migrate.upgrade(engine)
            target = engines.acquire_for_engine(engine)
            with exported.open("rb") as file:
                started = time.perf_counter()
                summary = await transfer.import_file(target, DEFAULT_TABLES, file)
                seconds = time.perf_counter() - started
            figures[f"import_{kind}_items_per_s"] = summary.items / seconds
            started = time.perf_counter()
            with (tmp / f"again-{kind}.jsonl").open("wb") as file:
                summary = await transfer.write_export(target, DEFAULT_TABLES, file)
            figures[f"export_{kind}_items_per_s"] = summary.items / (time.perf_counter() - started)
            await engines.release(target)
            await engines.dispose_engines()
    figures["moves_peak_rss_mb"] = peak_rss_mb()
    return figures


def run_phase(phase: str, source: Path, tmp: Path, backends: list[str]) -> dict[str, Any]:
    """Run one phase in a fresh process; its figures."""
    done = subprocess.run(  # noqa: S603 - this script, by the running interpreter
        [
            sys.executable,
            __file__,
            "--phase",
            phase,
            "--source",
            str(source),
            "--tmp",
            str(tmp),
            "--backends",
            ",".join(backends),
            "--postgres",
            POSTGRES,
            "--mysql",
            MYSQL,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{done.stderr}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("PHASE_JSON "))
    result: dict[str, Any] = json.loads(line.removeprefix("PHASE_JSON "))
    return result


def main() -> None:
    """Build the source, run each phase in a process of its own, print the figures."""
    global POSTGRES, MYSQL
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=10_000, help="100 items each")
    parser.add_argument("--quick", action="store_true", help="50 sessions: a smoke run")
    parser.add_argument(
        "--copy-only", action="store_true", help="the floor and the copy, no export/import rates"
    )
    parser.add_argument("--postgres", default=POSTGRES)
    parser.add_argument("--mysql", default=MYSQL, help="'' to leave MariaDB out")
    parser.add_argument("--phase", choices=["floor", "copy", "moves"], help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--backends", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    POSTGRES, MYSQL = args.postgres, args.mysql
    if args.phase:
        backends = [b for b in args.backends.split(",") if b]
        runners = {
            "floor": lambda: phase_floor(args.source, args.tmp),
            "copy": lambda: phase_copy(args.source, args.tmp),
            "moves": lambda: phase_moves(args.source, args.tmp, backends),
        }
        print("PHASE_JSON " + json.dumps(asyncio.run(runners[args.phase]())))
        return
    sessions = 50 if args.quick else args.sessions
    backends = ["sqlite", "postgres"] + (["mysql"] if MYSQL else [])
    with tempfile.TemporaryDirectory(prefix="turnstore-copy-") as folder:
        tmp = Path(folder)
        source = tmp / "source.db"
        started = time.perf_counter()
        counts = build_source(source, sessions)
        items = counts["structure"]
        print(
            f"source: {sessions:,} sessions, {items:,} items, built in "
            f"{time.perf_counter() - started:.1f}s"
        )
        floor = run_phase("floor", source, tmp, backends)
        copied = run_phase("copy", source, tmp, backends)
        moves = {} if args.copy_only else run_phase("moves", source, tmp, backends)
    floor_rate = floor["rows"] / floor["seconds"]
    copy_rate = copied["rows"] / copied["seconds"]
    figures = {
        "sessions": sessions,
        "items": items,
        "floor_rows_per_s": floor_rate,
        "floor_peak_rss_mb": floor["peak_rss_mb"],
        "copy_rows_per_s": copy_rate,
        "copy_items_per_s": copied["items"] / copied["seconds"],
        "copy_seconds": copied["seconds"],
        "copy_peak_rss_mb": copied["peak_rss_mb"],
        "copy_to_floor": copy_rate / floor_rate,
        **moves,
    }
    print(
        f"floor (binary COPY, one process): {floor_rate:,.0f} rows/s, "
        f"peak RSS {floor['peak_rss_mb']:.0f} MB"
    )
    print(
        f"copy SQLite -> Postgres: {copy_rate:,.0f} rows/s ({figures['copy_items_per_s']:,.0f} "
        f"items/s) = {figures['copy_to_floor']:.2f}x the floor, peak RSS "
        f"{copied['peak_rss_mb']:.0f} MB"
    )
    for key, value in moves.items():
        print(f"{key}: {value:,.1f}")
    print("COPY_JSON " + json.dumps(figures))


if __name__ == "__main__":
    main()
