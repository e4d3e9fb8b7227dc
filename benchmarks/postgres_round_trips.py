"""How many turns per second a given number of round trips per turn allows, at best.

No turnstore: 50 concurrent tasks each play turns of ``--round-trips`` trivial statements
(``SELECT $1::int``) on 30 pooled connections, so the figure is the ceiling that the round
trips alone put on a turn rate on this machine and server, whatever a library does around
them. ``--through asyncpg`` (the default) uses plain asyncpg; ``--through sqlalchemy`` runs
each statement as turnstore runs a unit of work on Postgres (an autocommit connection from an
``AsyncEngine`` pool, ``run_sync``, ``Connection.execute``)::

    python benchmarks/postgres_round_trips.py --round-trips 12 6 3
    python benchmarks/postgres_round_trips.py --through sqlalchemy --round-trips 3

Prints turns/s and the client's CPU time per turn for each count.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

import asyncpg
from sqlalchemy import Integer, bindparam, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
POOL = 30

#: One turn of a task: ``round_trips`` statements.
Turn = Callable[[int], Awaitable[None]]


async def _timed(tasks: int, turns: int, play_turn: Turn, round_trips: int) -> tuple[float, float]:
    async def play() -> None:
        for _ in range(turns):
            await play_turn(round_trips)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(play() for _ in range(tasks)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    played = tasks * turns
    return played / wall, cpu / played * 1000


async def through_asyncpg(
    dsn: str, round_trips: int, tasks: int, turns: int
) -> tuple[float, float]:
    """Turns/s and client CPU ms per turn, on plain asyncpg."""
    pool = await asyncpg.create_pool(dsn, min_size=POOL, max_size=POOL)
    try:

        async def play_turn(count: int) -> None:
            async with pool.acquire() as conn:
                for _ in range(count):
                    await conn.fetchval("SELECT $1::int", 1)

        return await _timed(tasks, turns, play_turn, round_trips)
    finally:
        await pool.close()


async def through_sqlalchemy(
    dsn: str, round_trips: int, tasks: int, turns: int
) -> tuple[float, float]:
    """Turns/s and client CPU ms per turn, one autocommit unit of work per statement."""
    engine = create_async_engine(
        dsn.replace("postgresql://", "postgresql+asyncpg://", 1), pool_size=POOL, max_overflow=0
    )
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    statement = select(bindparam("x", type_=Integer))

    def unit_of_work(conn: Connection) -> None:
        conn.execute(statement, {"x": 1}).all()

    async def play_turn(count: int) -> None:
        for _ in range(count):
            async with autocommit.connect() as conn:
                await conn.run_sync(unit_of_work)

    try:
        return await _timed(tasks, turns, play_turn, round_trips)
    finally:
        await engine.dispose()


def main() -> None:
    """Parse arguments and print one line per round-trip count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="asyncpg DSN (not a SQLAlchemy URL)")
    parser.add_argument("--through", choices=("asyncpg", "sqlalchemy"), default="asyncpg")
    parser.add_argument("--round-trips", type=int, nargs="+", default=[12, 6, 3])
    parser.add_argument("--tasks", type=int, default=50, help="concurrent sessions")
    parser.add_argument("--turns", type=int, default=40, help="turns per task")
    args = parser.parse_args()
    for count in args.round_trips:
        measure = through_asyncpg if args.through == "asyncpg" else through_sqlalchemy
        rate, cpu_ms = asyncio.run(measure(args.dsn, count, args.tasks, args.turns))
        print(f"{count:3d} round trips per turn: {rate:7.0f} turns/s, {cpu_ms:.2f} ms client CPU")


if __name__ == "__main__":
    main()
