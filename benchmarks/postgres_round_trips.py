"""How many turns per second a given number of round trips per turn allows, at best.

Plain asyncpg, no SQLAlchemy and no turnstore: 50 concurrent tasks on a pool of 30
connections each play turns of ``--round-trips`` trivial statements (``SELECT $1::int``), so
the figure is the ceiling that the round trips alone put on a turn rate on this machine and
server, whatever a library does around them::

    python benchmarks/postgres_round_trips.py --round-trips 12 6 3

Prints turns/s and the client's CPU time per turn for each count.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import asyncpg

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


async def measure(dsn: str, round_trips: int, tasks: int, turns: int) -> tuple[float, float]:
    """Turns per second and client CPU milliseconds per turn for ``round_trips`` per turn."""
    pool = await asyncpg.create_pool(dsn, min_size=30, max_size=30)
    try:

        async def play() -> None:
            for _ in range(turns):
                async with pool.acquire() as conn:
                    for _ in range(round_trips):
                        await conn.fetchval("SELECT $1::int", 1)

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(play() for _ in range(tasks)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await pool.close()
    played = tasks * turns
    return played / wall, cpu / played * 1000


def main() -> None:
    """Parse arguments and print one line per round-trip count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="asyncpg DSN (not a SQLAlchemy URL)")
    parser.add_argument("--round-trips", type=int, nargs="+", default=[12, 6, 3])
    parser.add_argument("--tasks", type=int, default=50, help="concurrent sessions")
    parser.add_argument("--turns", type=int, default=40, help="turns per task")
    args = parser.parse_args()
    for count in args.round_trips:
        rate, cpu_ms = asyncio.run(measure(args.dsn, count, args.tasks, args.turns))
        print(f"{count:3d} round trips per turn: {rate:7.0f} turns/s, {cpu_ms:.2f} ms client CPU")


if __name__ == "__main__":
    main()
