"""turnstore on a Citus cluster: turn latency, 50-session throughput, pushdown, listing pages.

Runs against a coordinator (``--url``, default the local cluster of
``shared/citus/citus-cluster.sh``: 127.0.0.1:9700, database ``turnstore``), in a schema and
role of its own that are dropped afterwards, with the tables turnstore creates there
(distributed by ``session_id``)::

    python benchmarks/citus_cluster.py [--url ...] [--quick]

Prints, as a table and as one JSON line:

- **turn cycle**: one session, one turn after another: read the newest 20 items, append a
  turn's four items, store its usage (the SDK Runner's calls); median and 95th percentile.
- **throughput**: ``--sessions`` conversations at once, each playing ``--turns`` turns as fast
  as it can; turns per second, and the CPU per turn of the coordinator's and the workers'
  backends (read from /proc, so the nodes must run on this machine).
- **pushdown**: the share of appends and usage writes the coordinator delegated whole to the
  worker holding the session. Each node draws ids from its own range (the coordinator's from 1,
  worker *g*'s from *g*·2^48), so the ids of the rows the functions inserted say where they
  ran.
- **listing page**: the store's first page (50 sessions, newest activity first) and a page
  deep in the keyset order, at ``--listing-sessions`` sessions; median of repeated reads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

# Measure the checkout this script lives in, even where another copy of turnstore is installed.
_CHECKOUT_SOURCE = Path(__file__).resolve().parents[1] / "src"
if (_CHECKOUT_SOURCE / "turnstore").is_dir():
    sys.path.insert(0, str(_CHECKOUT_SOURCE))

from run import run_result, turn_items  # noqa: E402  # the items the main benchmark stores

import turnstore  # noqa: E402
from turnstore import AdvancedSession, Store  # noqa: E402
from turnstore.persistence.store_queries import Selection  # noqa: E402

DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:9700/turnstore"
JSON_PREFIX = "CITUS_JSON "
WORKER_IDS_FROM = 1 << 48
PAGE = 50


@asynccontextmanager
async def private_store(url: str) -> AsyncIterator[str]:
    """A URL whose role's default schema is a fresh one; both dropped afterwards."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin = create_async_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f"CREATE SCHEMA {name}")
            await conn.exec_driver_sql(f"CREATE ROLE {name} LOGIN SUPERUSER")
            await conn.exec_driver_sql(f"ALTER ROLE {name} SET search_path = {name}")
        try:
            yield make_url(url).set(username=name).render_as_string(hide_password=False)
        finally:
            await turnstore.dispose_engines()
            async with admin.connect() as conn:
                await conn.exec_driver_sql(f"DROP SCHEMA {name} CASCADE")
                await conn.exec_driver_sql(f"DROP OWNED BY {name} CASCADE")
                await conn.exec_driver_sql(f"DROP ROLE {name}")
    finally:
        await admin.dispose()


async def play_turn(session: AdvancedSession, turn: int) -> None:
    """One turn as the Runner plays it: read the context, append the turn, store usage."""
    await session.get_items(limit=20)
    await session.add_items(turn_items(turn))
    await session.store_run_usage(run_result(turn))


def percentile(values: list[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``values`` lie."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def turn_cycle(url: str, cycles: int, warmup: int) -> dict[str, float]:
    """Median and 95th-percentile time of one turn, one session playing alone."""
    session = AdvancedSession.from_url(session_id="cycle", url=url, create_tables=True)
    for turn in range(1, warmup + 1):
        await play_turn(session, turn)
    times = []
    for turn in range(warmup + 1, warmup + cycles + 1):
        started = time.perf_counter()
        await play_turn(session, turn)
        times.append((time.perf_counter() - started) * 1000)
    await session.aclose()
    return {"median_ms": statistics.median(times), "p95_ms": percentile(times, 0.95)}


async def throughput(url: str, sessions: int, turns: int) -> dict[str, float]:
    """Turns per second with ``sessions`` conversations playing at once."""
    opened = [
        AdvancedSession.from_url(session_id=f"load-{n}", url=url, create_tables=True)
        for n in range(sessions)
    ]
    await asyncio.gather(*(s.get_items(limit=1) for s in opened))  # schema and pool ready

    async def converse(session: AdvancedSession) -> None:
        for turn in range(1, turns + 1):
            await play_turn(session, turn)

    nodes = await node_urls(url)
    done = asyncio.Event()
    watching = asyncio.create_task(watch_nodes(nodes, done))
    started = time.perf_counter()
    await asyncio.gather(*(converse(s) for s in opened))
    elapsed = time.perf_counter() - started
    done.set()
    ticks = await watching
    await asyncio.gather(*(s.aclose() for s in opened))
    per_turn = 1000 / os.sysconf("SC_CLK_TCK") / (sessions * turns)
    return {
        "turns_per_s": sessions * turns / elapsed,
        "seconds": elapsed,
        "coordinator_cpu_ms_per_turn": ticks[0] * per_turn,
        "workers_cpu_ms_per_turn": sum(ticks[1:]) * per_turn,
    }


async def node_urls(url: str) -> list[str]:
    """The coordinator's URL, then each worker's (same database), from the node catalog."""
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            found = await conn.exec_driver_sql(
                "SELECT nodename, nodeport FROM pg_dist_node "
                "WHERE noderole = 'primary' AND groupid <> 0 ORDER BY groupid"
            )
            workers: list[Any] = list(found.all())
    finally:
        await engine.dispose()
    base = make_url(url)
    return [url] + [
        base.set(host=host, port=port).render_as_string(hide_password=False)
        for host, port in workers
    ]


async def watch_nodes(urls: list[str], done: asyncio.Event) -> list[int]:
    """CPU ticks each node's client backends for this database used until ``done``.

    Reads each backend's own counters (/proc/PID/stat, so the nodes must run on this machine)
    several times a second and keeps the last reading per backend; other work on the machine
    is not counted. Backends that exit between readings lose their last fraction of a second.
    """
    engines = [create_async_engine(u, poolclass=NullPool) for u in urls]
    used: list[dict[int, int]] = [{} for _ in urls]
    try:
        connections = [await engine.connect() for engine in engines]
        while not done.is_set():
            for conn, seen in zip(connections, used, strict=True):
                found = await conn.exec_driver_sql(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
                )
                for (pid,) in found.all():
                    ticks = process_ticks(pid)
                    if ticks is not None:
                        seen[pid] = ticks
            await asyncio.sleep(0.1)
        for conn in connections:
            await conn.close()
    finally:
        for engine in engines:
            await engine.dispose()
    return [sum(seen.values()) for seen in used]


def process_ticks(pid: int) -> int | None:
    """User and system CPU ticks of a process so far; ``None`` once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime


async def pushdown(engine: AsyncEngine) -> dict[str, float]:
    """Shares of appends and usage rows written on a worker, from the ids they got."""
    shares = {}
    async with engine.connect() as conn:
        for name, table in (("appends", "agent_messages"), ("usage_writes", "turn_usage")):
            row: Any = (
                await conn.exec_driver_sql(
                    f"SELECT count(*) FILTER (WHERE id >= {WORKER_IDS_FROM}), count(*) FROM {table}"
                )
            ).one()
            shares[f"{name}_on_workers"] = row[0] / row[1] if row[1] else 0.0
    return shares


async def fill_sessions(engine: AsyncEngine, count: int) -> None:
    """``count`` sessions with info rows and one item each, written by the database itself."""
    now_us = int(time.time() * 1_000_000)
    async with engine.begin() as conn:
        await conn.exec_driver_sql(
            "INSERT INTO agent_sessions (session_id) "
            f"SELECT 'listed-' || g FROM generate_series(1, {count}) AS g"
        )
        await conn.exec_driver_sql(
            "INSERT INTO turnstore_session_info (session_id, user_id, created_at_us, "
            "last_activity_us) "
            f"SELECT 'listed-' || g, 'user-' || (g % 100), {now_us} - g * 1000, "
            f"{now_us} - g * 1000 FROM generate_series(1, {count}) AS g"
        )
        await conn.exec_driver_sql(
            "INSERT INTO agent_messages (session_id, message_data) "
            'SELECT \'listed-\' || g, \'{"role": "user", "content": "hello"}\' '
            f"FROM generate_series(1, {count}) AS g"
        )
        await conn.exec_driver_sql(
            "INSERT INTO message_structure (session_id, message_id, branch_id, message_type, "
            "sequence_number, user_turn_number, branch_turn_number) "
            "SELECT session_id, id, 'main', 'user', 1, 1, 1 FROM agent_messages "
            "WHERE session_id LIKE 'listed-%'"
        )
        await conn.exec_driver_sql("ANALYZE")


async def median_ms(read: Callable[[], Awaitable[object]], reps: int) -> float:
    """Median time of ``read`` after one warm-up call."""
    await read()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        await read()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def listing(url: str, engine: AsyncEngine, count: int, reps: int) -> dict[str, float]:
    """Store listing pages (first, deep, one user's) at ``count`` sessions."""
    await fill_sessions(engine, count)
    store = Store(url=url)
    queries = await store._queries()
    everyone = Selection()
    first = await queries.page(everyone, None, PAGE)
    assert len(first) == PAGE
    deep_after = (first[-1].last_activity_us - (count // 2) * 1000, "listed-0")
    one_user = Selection(user_id="user-7")
    result = {
        "first_page_ms": await median_ms(lambda: queries.page(everyone, None, PAGE), reps),
        "deep_page_ms": await median_ms(lambda: queries.page(everyone, deep_after, PAGE), reps),
        "one_users_page_ms": await median_ms(lambda: queries.page(one_user, None, PAGE), reps),
    }
    await store.aclose()
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement, in a store of its own."""
    results: dict[str, Any] = {}
    async with private_store(args.url) as url:
        results["turn_cycle"] = await turn_cycle(url, args.cycles, args.warmup)
        results["throughput"] = await throughput(url, args.sessions, args.turns)
        engine = create_async_engine(url, poolclass=NullPool)
        try:
            results["pushdown"] = await pushdown(engine)
            results["listing"] = await listing(url, engine, args.listing_sessions, args.reps)
        finally:
            await engine.dispose()
    results["listing"]["sessions"] = args.listing_sessions
    results["throughput"]["sessions"] = args.sessions
    return results


def main(argv: list[str] | None = None) -> int:
    """Run and print the figures; the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="the coordinator's database URL")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--sessions", type=int, help="concurrent sessions (default 50)")
    parser.add_argument("--turns", type=int, help="turns per concurrent session (default 20)")
    parser.add_argument("--listing-sessions", type=int, help="sessions listed (default 100000)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.sessions = args.sessions or (4 if quick else 50)
    args.turns = args.turns or (2 if quick else 20)
    args.listing_sessions = args.listing_sessions or (200 if quick else 100_000)
    args.cycles, args.warmup, args.reps = (5, 1, 3) if quick else (50, 5, 20)
    results = asyncio.run(run(args))
    cycle, load, shares, pages = (
        results["turn_cycle"],
        results["throughput"],
        results["pushdown"],
        results["listing"],
    )
    print(f"turn cycle           median {cycle['median_ms']:.2f} ms, p95 {cycle['p95_ms']:.2f} ms")
    print(
        f"throughput           {load['turns_per_s']:.0f} turns/s ({load['sessions']} sessions); "
        f"CPU per turn: coordinator {load['coordinator_cpu_ms_per_turn']:.2f} ms, "
        f"workers {load['workers_cpu_ms_per_turn']:.2f} ms"
    )
    print(
        f"pushdown             appends {shares['appends_on_workers']:.1%}, "
        f"usage writes {shares['usage_writes_on_workers']:.1%} run on a worker"
    )
    print(
        f"listing ({pages['sessions']} sessions) first page {pages['first_page_ms']:.2f} ms, "
        f"deep page {pages['deep_page_ms']:.2f} ms, one user's {pages['one_users_page_ms']:.2f} ms"
    )
    print(JSON_PREFIX + json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
