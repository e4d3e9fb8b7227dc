"""Benchmarks for the store: listing pages at any depth and size, per-user pages, prune.

Run from a checkout::

    python benchmarks/store.py --backend sqlite
    python benchmarks/store.py --backend postgres [--url postgresql+asyncpg://...]
    python benchmarks/store.py --backend sqlite --million     # adds the 1,000,000 listing
    python benchmarks/store.py --quick                        # tiny sizes, for the smoke test

Workloads (``--only``):

* ``listing``: a page of 50 (newest first) at 1,000 and 100,000 sessions (and 1,000,000 with
  ``--million``): the first page, and a page 90 % of the way down, reached by its cursor.
* ``per_user``: a user's first page among 100,000 users (two sessions each).
* ``prune``: removing 100,000 inactive sessions in batches (sessions/s) while a writer appends
  turns to other sessions; the writer's p50/p99 latency alone and during the prune.

Stores are filled with bulk inserts (two items, one usage row and the info of each session),
then analyzed where the database keeps statistics, as autovacuum would. Every workload runs on
a fresh database: a temporary file for SQLite, a private database on the server (dropped
afterwards) for Postgres and MySQL, a private schema on a Citus coordinator (``--backend
citus``). The last line of output is ``BENCH_JSON {...}``.
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
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

# Measure the checkout this script lives in, even where another copy of turnstore is installed.
_CHECKOUT_SOURCE = Path(__file__).resolve().parents[1] / "src"
if (_CHECKOUT_SOURCE / "turnstore").is_dir():
    sys.path.insert(0, str(_CHECKOUT_SOURCE))

from citus_cluster import private_store  # noqa: E402  # a private schema on a coordinator

import turnstore  # noqa: E402
from turnstore import Store  # noqa: E402
from turnstore.persistence.models import DEFAULT_TABLES  # noqa: E402
from turnstore.persistence.store_queries import Selection  # noqa: E402

WORKLOADS = ("listing", "per_user", "prune")
DEFAULT_URLS = {
    "postgres": "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
    "mysql": "mysql+asyncmy://root@127.0.0.1:3306/test",
    "citus": "postgresql+asyncpg://postgres@127.0.0.1:9700/turnstore",
}
JSON_PREFIX = "BENCH_JSON "
PAGE = 50
# 2026-01-01, in µs since the epoch; sessions are spaced a millisecond apart from there.
EPOCH_2026 = 1_767_225_600_000_000
USER_ITEM = json.dumps({"role": "user", "content": "What is the weather in Lisbon tomorrow?"})
ASSISTANT_ITEM = json.dumps({"role": "assistant", "content": "Sunny, 21 degrees."})
CHUNK = 5_000


@dataclass(frozen=True)
class Sizes:
    """How big each workload is and how often it measures."""

    listing: tuple[int, ...] = (1_000, 100_000)
    users: int = 100_000
    prune: int = 100_000
    repeats: int = 200
    writer_baseline_s: float = 3.0


QUICK = Sizes(listing=(200, 2_000), users=500, prune=1_000, repeats=20, writer_baseline_s=0.3)


# -- databases ----------------------------------------------------------------------------


@asynccontextmanager
async def fresh_database(backend: str, server_url: str | None) -> AsyncIterator[str]:
    """The URL of a new, empty database, removed afterwards."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            yield f"sqlite+aiosqlite:///{Path(folder) / 'store.db'}"
            await turnstore.dispose_engines()
        return
    base = server_url or DEFAULT_URLS[backend]
    if backend == "citus":
        # A database on a cluster needs the extension and the workers registered anew: a
        # schema of its own instead, reached through a role's search_path.
        async with private_store(base) as url:
            yield url
        return
    name = f"bench_store_{uuid.uuid4().hex[:10]}"
    admin = create_async_engine(base, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f"CREATE DATABASE {name}")
        try:
            yield make_url(base).set(database=name).render_as_string(hide_password=False)
        finally:
            await turnstore.dispose_engines()
            drop = f"DROP DATABASE {name}" + (" WITH (FORCE)" if backend == "postgres" else "")
            async with admin.connect() as conn:
                await conn.exec_driver_sql(drop)
    finally:
        await admin.dispose()


@dataclass(frozen=True)
class Planned:
    """One session to bulk-insert."""

    session_id: str
    user_id: str | None
    activity_us: int


async def bulk_fill(engine: AsyncEngine, backend: str, planned: list[Planned]) -> None:
    """Insert sessions with two items, one usage row and their info, in large batches."""
    t = DEFAULT_TABLES
    for start in range(0, len(planned), CHUNK):
        chunk = planned[start : start + CHUNK]
        first_id = start * 2 + 1
        messages, structure, usage, info = [], [], [], []
        for n, session in enumerate(chunk):
            sid, user_message, reply = session.session_id, first_id + 2 * n, first_id + 2 * n + 1
            messages += [
                {"id": user_message, "session_id": sid, "message_data": USER_ITEM},
                {"id": reply, "session_id": sid, "message_data": ASSISTANT_ITEM},
            ]
            for sequence, (message, kind) in enumerate(
                ((user_message, "user"), (reply, "assistant")), start=1
            ):
                structure.append(
                    {
                        "session_id": sid,
                        "message_id": message,
                        "branch_id": "main",
                        "message_type": kind,
                        "sequence_number": sequence,
                        "user_turn_number": 1,
                        "branch_turn_number": 1,
                        "tool_name": None,
                    }
                )
            usage.append(
                {
                    "session_id": sid,
                    "branch_id": "main",
                    "user_turn_number": 1,
                    "requests": 1,
                    "input_tokens": 30,
                    "output_tokens": 12,
                    "total_tokens": 42,
                }
            )
            info.append(
                {
                    "session_id": sid,
                    "user_id": session.user_id,
                    "title": None,
                    "metadata": None,
                    "created_at_us": session.activity_us,
                    "last_activity_us": session.activity_us,
                }
            )
        async with engine.begin() as conn:
            await conn.execute(insert(t.sessions), [{"session_id": p.session_id} for p in chunk])
            await conn.execute(insert(t.messages), messages)
            await conn.execute(insert(t.structure), structure)
            await conn.execute(insert(t.usage), usage)
            await conn.execute(insert(t.info), info)
    async with engine.begin() as conn:
        if backend in ("postgres", "citus"):
            # Explicit ids leave the sequences behind; later appends must not collide.
            for table in (t.messages, t.structure, t.usage):
                await conn.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                    f"(SELECT max(id) FROM {table.name}))"
                )
            await conn.exec_driver_sql("ANALYZE")
        elif backend == "mysql":
            for table in t.metadata.sorted_tables:
                await conn.exec_driver_sql(f"ANALYZE TABLE {table.name}")


async def prepared_store(url: str) -> tuple[AsyncEngine, Store]:
    """A store on ``url`` as an application opens it, and an engine for bulk loading.

    The store runs on turnstore's own engine for the URL (on SQLite, its writer and reader
    threads), with its schema created.
    """
    store = Store(url=url, create_tables=True)
    await store.count_sessions()  # creates the schema
    return create_async_engine(url), store


def milliseconds(samples: list[float]) -> dict[str, float]:
    """Fastest, p50 and p99 of samples in seconds, in milliseconds.

    On a shared machine the fastest run shows what the work costs; p50 and p99 add the
    machine's contention.
    """
    ordered = sorted(samples)
    return {
        "min_ms": round(ordered[0] * 1e3, 3),
        "p50_ms": round(statistics.median(ordered) * 1e3, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3, 3),
    }


async def timed(repeats: int, call: Callable[[], Any]) -> list[float]:
    """Seconds each of ``repeats`` awaited calls took, after a short warm-up."""
    for _ in range(3):  # warm caches and prepared statements
        await call()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


# -- workloads ----------------------------------------------------------------------------


async def listing(backend: str, server_url: str | None, sizes: Sizes) -> dict[str, Any]:
    """A page at the top and 90 % down, per store size, and how they compare."""
    figures: dict[str, Any] = {}
    for count in sizes.listing:
        async with fresh_database(backend, server_url) as url:
            engine, store = await prepared_store(url)
            try:
                plan = [
                    Planned(f"s{n:08d}", f"u{n % 1000}", EPOCH_2026 + n * 1000)
                    for n in range(count)
                ]
                started = time.perf_counter()
                await bulk_fill(engine, backend, plan)
                fill_s = time.perf_counter() - started
                i = DEFAULT_TABLES.info
                async with engine.connect() as conn:
                    # Set-up only: the position 90 % of the way down, found the slow way.
                    deep = (
                        await conn.execute(
                            select(i.c.last_activity_us, i.c.session_id)
                            .order_by(i.c.last_activity_us.desc(), i.c.session_id.desc())
                            .offset(min(int(count * 0.9), count - PAGE - 1))
                            .limit(1)
                        )
                    ).one()
                cursor = store._cursors.encode((deep[0], deep[1]), Selection())
                first = await timed(sizes.repeats, partial(store.list_sessions, limit=PAGE))
                deeper = await timed(
                    sizes.repeats, partial(store.list_sessions, limit=PAGE, cursor=cursor)
                )
                page = await store.list_sessions(limit=PAGE, cursor=cursor)
                assert len(page.sessions) == PAGE, page
                assert page.sessions[0].items == 2, page.sessions[0]
                count_s = await timed(3, store.count_sessions)
                figures[str(count)] = {
                    "fill_s": round(fill_s, 2),
                    "page_1": milliseconds(first),
                    "page_90pct": milliseconds(deeper),
                    "count_sessions_ms": round(statistics.median(count_s) * 1e3, 2),
                }
            finally:
                await store.aclose()
                await engine.dispose()
    smallest, largest = figures[str(sizes.listing[0])], figures[str(sizes.listing[-1])]
    for where in ("page_1", "page_90pct"):
        for statistic in ("min_ms", "p50_ms"):
            figures[f"ratio_largest_to_smallest_{where}_{statistic.removesuffix('_ms')}"] = round(
                largest[where][statistic] / smallest[where][statistic], 2
            )
    return figures


async def per_user(backend: str, server_url: str | None, sizes: Sizes) -> dict[str, Any]:
    """A user's first page among many users."""
    async with fresh_database(backend, server_url) as url:
        engine, store = await prepared_store(url)
        try:
            users = sizes.users
            plan = [
                Planned(f"s{n:08d}", f"user-{n % users:06d}", EPOCH_2026 + n * 1000)
                for n in range(users * 2)
            ]
            await bulk_fill(engine, backend, plan)
            cycle = iter(range(10**9))

            async def one_users_page() -> None:
                user = f"user-{(next(cycle) * 7919) % users:06d}"
                page = await store.list_sessions(user_id=user, limit=PAGE)
                assert len(page.sessions) == 2

            samples = await timed(sizes.repeats, one_users_page)
            return {"users": users, "sessions": users * 2, "page": milliseconds(samples)}
        finally:
            await store.aclose()
            await engine.dispose()


async def prune(backend: str, server_url: str | None, sizes: Sizes) -> dict[str, Any]:
    """Prune throughput and the latency a concurrent writer of other sessions sees."""
    async with fresh_database(backend, server_url) as url:
        engine, store = await prepared_store(url)
        try:
            old = [Planned(f"old{n:08d}", None, EPOCH_2026 + n) for n in range(sizes.prune)]
            await bulk_fill(engine, backend, old)
            writers = [store.session(f"live-{n}") for n in range(10)]
            for session in writers:
                await session.add_items([{"role": "user", "content": "hello"}])

            async def write_for(stop: asyncio.Event, samples: list[float]) -> None:
                turn = 0
                while not stop.is_set():
                    session = writers[turn % len(writers)]
                    started = time.perf_counter()
                    await session.add_items(
                        [
                            {"role": "user", "content": f"question {turn}"},
                            {"role": "assistant", "content": "answer"},
                        ]
                    )
                    samples.append(time.perf_counter() - started)
                    turn += 1
                    await asyncio.sleep(0.002)  # a steady trickle, not a flood

            baseline: list[float] = []
            stop = asyncio.Event()
            writer = asyncio.create_task(write_for(stop, baseline))
            await asyncio.sleep(sizes.writer_baseline_s)
            stop.set()
            await writer

            during: list[float] = []
            stop = asyncio.Event()
            writer = asyncio.create_task(write_for(stop, during))
            cutoff = turnstore.info.from_micros(EPOCH_2026 + sizes.prune + 1)
            started = time.perf_counter()
            removed = await store.prune(before=cutoff)
            elapsed = time.perf_counter() - started
            stop.set()
            await writer
            assert removed.sessions == sizes.prune, removed
            alone, busy = milliseconds(baseline), milliseconds(during)
            return {
                "sessions": removed.sessions,
                "seconds": round(elapsed, 2),
                "sessions_per_s": round(removed.sessions / elapsed),
                "writer_alone": alone,
                "writer_during_prune": busy,
                "added_p50_ms": round(busy["p50_ms"] - alone["p50_ms"], 3),
                "added_p99_ms": round(busy["p99_ms"] - alone["p99_ms"], 3),
                "writes_during_prune": len(during),
            }
        finally:
            await store.aclose()
            await engine.dispose()


RUNNERS = {"listing": listing, "per_user": per_user, "prune": prune}


def print_table(figures: dict[str, Any]) -> None:
    """One line per figure, dotted paths as names."""

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            print(f"{prefix:55s} {value}")

    walk("", figures)


async def main(argv: list[str] | None = None) -> int:
    """Run the chosen workloads and print their figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend", choices=("sqlite", "postgres", "mysql", "citus"), default="sqlite"
    )
    parser.add_argument("--url", help="server URL whose user may create databases")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--million", action="store_true", help="add the 1,000,000 listing")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(WORKLOADS)}")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    if args.million:
        sizes = Sizes(
            listing=(*sizes.listing, 1_000_000),
            users=sizes.users,
            prune=sizes.prune,
            repeats=sizes.repeats,
            writer_baseline_s=sizes.writer_baseline_s,
        )
    chosen = args.only.split(",") if args.only else list(WORKLOADS)
    unknown = set(chosen) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    figures = {}
    for name in chosen:
        figures[name] = await RUNNERS[name](args.backend, args.url, sizes)
        print_table({name: figures[name]})
    report = {"backend": args.backend, "quick": args.quick, "figures": figures}
    print(JSON_PREFIX + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
