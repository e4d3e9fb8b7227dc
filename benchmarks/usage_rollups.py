"""What recording models and rolling usage up cost.

Two figures, on a fresh database of the chosen backend::

    python benchmarks/usage_rollups.py --backend postgres [--url URL]
    python benchmarks/usage_rollups.py --backend sqlite --quick     # tiny sizes, smoke test

1. ``store_run_usage`` latency (p50/p95, ms) recording the turn's model rows, beside the same
   call as the previous release made it (usage only; on Postgres one call of the version 2
   usage function), alternating the two.
2. A rollup by day and model over the last 7 days, which always hold the same number of turns,
   in stores holding ``small`` and ``large`` turns in total: the range is read through the
   usage time index, so the two should cost about the same.

The last line is ``BENCH_JSON {...}`` with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Text, bindparam, insert
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

SCRIPT = Path(__file__).resolve()
_CHECKOUT_SOURCE = SCRIPT.parents[1] / "src"
if (_CHECKOUT_SOURCE / "turnstore").is_dir():
    sys.path.insert(0, str(_CHECKOUT_SOURCE))

from turnstore import AdvancedSession, dispose_engines  # noqa: E402
from turnstore.persistence import engines  # noqa: E402
from turnstore.persistence.dialects import profile_for  # noqa: E402
from turnstore.persistence.models import DEFAULT_TABLES  # noqa: E402
from turnstore.usage_report import usage  # noqa: E402

DEFAULT_URLS = {
    "postgres": "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
    "mysql": "mysql+asyncmy://root@127.0.0.1:3306/test",
}
RECENT_TURNS = 1_000


def result(requests: int = 1) -> Any:
    """A run result stand-in carrying usage only."""
    from agents.usage import Usage

    spent = Usage(requests=requests, input_tokens=120, output_tokens=30, total_tokens=150)
    return SimpleNamespace(context_wrapper=SimpleNamespace(usage=spent))


@asynccontextmanager
async def database(backend: str, url: str | None) -> AsyncIterator[AsyncEngine]:
    """A fresh database: a temporary SQLite file, or a private database on the server."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            engine = create_async_engine(f"sqlite+aiosqlite:///{Path(folder) / 'bench.db'}")
            try:
                yield engine
            finally:
                await engine.dispose()
        return
    base = make_url(url or DEFAULT_URLS[backend])
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin = create_async_engine(base, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.exec_driver_sql(f"CREATE DATABASE {name}")
    engine = create_async_engine(base.set(database=name))
    try:
        yield engine
    finally:
        await engine.dispose()
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f"DROP DATABASE {name}")
        await admin.dispose()


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p95."""
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.95) - 1]


async def usage_writes(engine: AsyncEngine, count: int) -> dict[str, float]:
    """p50/p95 of store_run_usage with model rows and as the previous release wrote it."""
    session = AdvancedSession(session_id="writer", engine=engine, create_tables=True)
    await session.add_items(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    )
    handle = session._binding().handle  # the benchmark looks inside on purpose
    key = DEFAULT_TABLES.metadata
    timings: dict[str, list[float]] = {"with_models": [], "previous": []}
    for index in range(count * 2):
        mode = "with_models" if index % 2 == 0 else "previous"
        if mode == "previous":
            handle.absent_tables[key] = frozenset(
                {DEFAULT_TABLES.turn_models.name, DEFAULT_TABLES.lineage.name}
            )
        started = time.perf_counter()
        await session.store_run_usage(result(), model="gpt-4o" if mode == "with_models" else None)
        timings[mode].append((time.perf_counter() - started) * 1000)
        handle.absent_tables.pop(key, None)
    await session.aclose()
    figures = {}
    for mode, samples in timings.items():
        p50, p95 = percentiles(samples[5:])
        figures[f"usage_write_{mode}_p50_ms"] = round(p50, 3)
        figures[f"usage_write_{mode}_p95_ms"] = round(p95, 3)
    return figures


async def fill(engine: AsyncEngine, total: int, now: datetime) -> None:
    """``total`` turns over 1,000 sessions and a year; the last 7 days hold RECENT_TURNS."""
    t = DEFAULT_TABLES
    profile = profile_for(engine.dialect.name)
    sessions = [{"session_id": f"s{i}"} for i in range(1_000)]
    usage_rows: list[dict[str, Any]] = []
    model_rows: list[dict[str, Any]] = []
    for i in range(total):
        recent = i < RECENT_TURNS
        age = timedelta(days=7 * i / RECENT_TURNS) if recent else timedelta(days=8 + i % 350)
        stamp = now - age
        session_id, turn = f"s{i % 1_000}", i // 1_000 + 1
        usage_rows.append(
            {
                "session_id": session_id,
                "branch_id": "main",
                "user_turn_number": turn,
                "requests": 1,
                "input_tokens": 120,
                "output_tokens": 30,
                "total_tokens": 150,
                "created_at": stamp,
            }
        )
        model_rows.append(
            {
                "session_id": session_id,
                "branch_id": "main",
                "user_turn_number": turn,
                "position": 0,
                "model": ("gpt-4o", "gpt-4o-mini", "o3")[i % 3],
                "requests": 1,
                "input_tokens": 120,
                "cached_tokens": 0,
                "output_tokens": 30,
                "reasoning_tokens": 0,
                "total_tokens": 150,
            }
        )
    # SQLite stores timestamps as the text CURRENT_TIMESTAMP writes.
    stamp_type = Text() if profile.name == "sqlite" else t.usage.c.created_at.type
    usage_insert = insert(t.usage).values(
        {
            **{name: bindparam(name) for name in usage_rows[0] if name != "created_at"},
            "created_at": bindparam("created_at", type_=stamp_type),
        }
    )
    async with engine.begin() as conn:
        await conn.execute(insert(t.sessions), sessions)
        for start in range(0, total, 5_000):
            chunk = usage_rows[start : start + 5_000]
            for row in chunk:
                row["created_at"] = _stored(profile, row["created_at"])
            await conn.execute(usage_insert, chunk)
            await conn.execute(insert(t.turn_models), model_rows[start : start + 5_000])
    # Statistics, as autovacuum (off on the local Postgres) or a DBA would gather them.
    async with engine.begin() as conn:
        if engine.dialect.name in ("postgresql", "sqlite"):
            await conn.exec_driver_sql("ANALYZE")
        else:
            await conn.exec_driver_sql("ANALYZE TABLE turn_usage, turnstore_turn_models")


def _stored(profile: Any, stamp: datetime) -> Any:
    return stamp.strftime("%Y-%m-%d %H:%M:%S") if profile.name == "sqlite" else stamp


async def rollup_time(engine: AsyncEngine, now: datetime, repeats: int) -> float:
    """Median ms of a 7-day rollup by day and model."""
    handle = engines.acquire_for_engine(engine)
    try:
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            rows = await usage(
                handle, DEFAULT_TABLES, group_by=("day", "model"), since=now - timedelta(days=7)
            )
            samples.append((time.perf_counter() - started) * 1000)
            assert sum(row.turns for row in rows) == RECENT_TURNS, rows
        return round(statistics.median(samples), 2)
    finally:
        await engines.release(handle)


async def main() -> None:
    """Run both measurements and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres", "mysql"), default="sqlite")
    parser.add_argument("--url", help="server URL (defaults to the local services)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--large", type=int, default=100_000, help="turns of the large store")
    parser.add_argument("--no-writes", action="store_true", help="skip the write latencies")
    args = parser.parse_args()
    writes, small, large, repeats = (
        (40, 1_000, 3_000, 3)
        if args.quick
        else (
            1_000,
            1_000,
            args.large,
            15,
        )
    )
    figures: dict[str, Any] = {"backend": args.backend}
    if not args.no_writes:
        async with database(args.backend, args.url) as engine:
            figures.update(await usage_writes(engine, writes))
    now = datetime.now(UTC).replace(microsecond=0)
    for total in (small, large):
        async with database(args.backend, args.url) as engine:
            schema = AdvancedSession(session_id="schema", engine=engine, create_tables=True)
            await schema.get_items()
            await schema.aclose()
            await fill(engine, total, now)
            figures[f"rollup_7_days_of_{total}_turns_ms"] = await rollup_time(engine, now, repeats)
    await dispose_engines()
    ratio = figures[f"rollup_7_days_of_{large}_turns_ms"] / max(
        figures[f"rollup_7_days_of_{small}_turns_ms"], 0.001
    )
    figures["rollup_large_over_small"] = round(ratio, 2)
    for name, value in figures.items():
        print(f"{name:>40}: {value}")
    print("BENCH_JSON " + json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
