"""Cold start: what a fresh process pays for its first ``add_items``, on every backend.

Each measurement starts a new Python process that imports turnstore, opens a session with
``AdvancedSession.from_url`` on a database already at the newest migration, and calls
``add_items`` twice. It reports the import time (turnstore, then the database driver), the
first call (engine, connection, schema
check with ``create_tables=True``, first statements), the second call (warm), and whether the
Agents SDK got imported (it must not: nothing here involves SDK objects)::

    python benchmarks/cold_start.py                       # sqlite, postgres and mysql
    python benchmarks/cold_start.py --backend postgres --url postgresql+asyncpg://...
    python benchmarks/cold_start.py --quick               # one process per case (smoke test)

The figure that matters is ``first - warm``: how much more a fresh process's first
operation costs than the same operation once warm. The case ``sqlalchemy_floor`` measures the
same for plain SQLAlchemy running ``SELECT 1`` on the same URL: creating the engine and opening
the process's first connection, which no library on SQLAlchemy avoids. Each figure is given in
wall time and in the child's CPU time (``time.process_time``, every thread of the process): on
a shared machine the wall time follows the load, the CPU time far less. The CPU time leaves
out what the database server does (on Postgres, compiling turnstore's server functions on a
connection's first call). The last line is ``COLD_JSON {...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
_CHECKOUT_SOURCE = SCRIPT.parents[1] / "src"
if (_CHECKOUT_SOURCE / "turnstore").is_dir():
    sys.path.insert(0, str(_CHECKOUT_SOURCE))

from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.ext.asyncio import create_async_engine  # noqa: E402

from turnstore.schema import migrate  # noqa: E402

BACKENDS = ("sqlite", "postgres", "mysql")
DEFAULT_URLS = {
    "postgres": "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres",
    "mysql": "mysql+asyncmy://root@127.0.0.1:3306/",
    "citus": "postgresql+asyncpg://postgres@127.0.0.1:9700/turnstore",
}
JSON_PREFIX = "COLD_JSON "
CASES = ("create_tables", "no_create_tables", "sqlalchemy_floor")
FIGURES = (
    "import_ms",
    "driver_import_ms",
    "first_ms",
    "warm_ms",
    "first_minus_warm_ms",
    "first_cpu_ms",
    "warm_cpu_ms",
    "first_minus_warm_cpu_ms",
    "process_ms",
)

# The child process: everything it does is measured from its first line.
CHILD = """
import time
started = time.perf_counter()
import asyncio, json, sys
from turnstore import AdvancedSession, dispose_engines
imported = time.perf_counter()
# The database driver is imported by the first engine; an application imports it at start-up
# like any library, so it is counted apart from the first call (driver_import_ms).
from sqlalchemy.engine import make_url
make_url(sys.argv[1]).get_dialect().import_dbapi()
driver_imported = time.perf_counter()

ITEMS = [
    {"role": "user", "content": "What's the weather in Paris?"},
    {"type": "message", "role": "assistant",
     "content": [{"type": "output_text", "text": "Sunny."}]},
]


async def main() -> dict:
    session = AdvancedSession.from_url(
        session_id=sys.argv[2], url=sys.argv[1], create_tables=sys.argv[3] == "1"
    )
    c0, t0 = time.process_time(), time.perf_counter()
    await session.add_items(ITEMS)
    c1, t1 = time.process_time(), time.perf_counter()
    await session.add_items(ITEMS)
    c2, t2 = time.process_time(), time.perf_counter()
    await session.aclose()
    await dispose_engines()
    return {
        "first_ms": (t1 - t0) * 1e3, "warm_ms": (t2 - t1) * 1e3,
        "first_cpu_ms": (c1 - c0) * 1e3, "warm_cpu_ms": (c2 - c1) * 1e3,
    }


figures = asyncio.run(main())
figures["import_ms"] = (imported - started) * 1e3
figures["driver_import_ms"] = (driver_imported - imported) * 1e3
figures["sdk_imported"] = "agents" in sys.modules
print(json.dumps(figures))
"""


# The floor: plain SQLAlchemy on the same URL, no turnstore. Its first ``SELECT 1`` creates the
# engine and opens the process's first connection (dialect initialization included); turnstore
# cannot be cheaper.
FLOOR_CHILD = """
import time
started = time.perf_counter()
import asyncio, json, sys
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
make_url(sys.argv[1]).get_dialect().import_dbapi()
imported = time.perf_counter()


async def main() -> dict:
    # The engine is made inside the measured call, as turnstore makes its own in its first.
    c0, t0 = time.process_time(), time.perf_counter()
    engine = create_async_engine(sys.argv[1])
    async with engine.connect() as conn:
        await conn.exec_driver_sql("SELECT 1")
    c1, t1 = time.process_time(), time.perf_counter()
    async with engine.connect() as conn:
        await conn.exec_driver_sql("SELECT 1")
    c2, t2 = time.process_time(), time.perf_counter()
    await engine.dispose()
    return {
        "first_ms": (t1 - t0) * 1e3, "warm_ms": (t2 - t1) * 1e3,
        "first_cpu_ms": (c1 - c0) * 1e3, "warm_cpu_ms": (c2 - c1) * 1e3,
    }


figures = asyncio.run(main())
figures["import_ms"] = (imported - started) * 1e3
figures["driver_import_ms"] = 0.0
figures["sdk_imported"] = "agents" in sys.modules
print(json.dumps(figures))
"""


@asynccontextmanager
async def database_at_head(backend: str, server_url: str | None) -> AsyncIterator[str]:
    """A fresh database migrated to head: a temporary file, or a database made on the server."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="turnstore-cold-") as directory:
            url = f"sqlite+aiosqlite:///{Path(directory) / 'cold.db'}"
            await migrate.upgrade(url)
            yield url
        return
    assert server_url is not None
    if backend == "citus":
        # A schema and role of its own on the coordinator (see run.py's citus_schema).
        from run import citus_schema

        async with citus_schema(server_url) as url:
            await migrate.upgrade(url)
            yield url
        return
    name = f"cold_{uuid.uuid4().hex[:10]}"
    admin = create_async_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f"CREATE DATABASE {name}")
        url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
        try:
            await migrate.upgrade(url)
            yield url
        finally:
            force = " WITH (FORCE)" if backend == "postgres" else ""
            async with admin.connect() as conn:
                await conn.exec_driver_sql(f"DROP DATABASE {name}{force}")
    finally:
        await admin.dispose()


def run_child(url: str, case: str) -> dict[str, Any]:
    """One fresh process for ``case``; its figures plus the wall time the parent saw."""
    env = dict(os.environ)
    source = [str(_CHECKOUT_SOURCE), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, source))
    session_id = f"cold-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    program = FLOOR_CHILD if case == "sqlalchemy_floor" else CHILD
    create_tables = "1" if case == "create_tables" else "0"
    result = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, "-c", program, url, session_id, create_tables],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    elapsed = (time.perf_counter() - started) * 1e3
    if result.returncode != 0:
        raise RuntimeError(f"cold-start child failed:\n{result.stderr}")
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    figures["process_ms"] = elapsed
    figures["first_minus_warm_ms"] = figures["first_ms"] - figures["warm_ms"]
    figures["first_minus_warm_cpu_ms"] = figures["first_cpu_ms"] - figures["warm_cpu_ms"]
    return figures


async def measure(backend: str, server_url: str | None, runs: int) -> dict[str, dict[str, Any]]:
    """Medians over ``runs`` fresh processes per case (see :data:`CASES`)."""
    samples: dict[str, list[dict[str, Any]]] = {case: [] for case in CASES}
    async with database_at_head(backend, server_url) as url:
        run_child(url, "create_tables")  # warms the OS file cache and bytecode, not turnstore
        for _ in range(runs):
            # Cases interleaved, so a busy spell of the shared machine hits all of them.
            for case in CASES:
                samples[case].append(await asyncio.to_thread(run_child, url, case))
    results: dict[str, dict[str, Any]] = {}
    for case, measured in samples.items():
        medians: dict[str, Any] = {
            figure: round(statistics.median(s[figure] for s in measured), 2) for figure in FIGURES
        }
        medians["sdk_imported"] = any(s["sdk_imported"] for s in measured)
        results[case] = medians
        print(
            f"{backend:<9}{case:<18}"
            + "".join(f"{figure}={medians[figure]:>9.1f}  " for figure in FIGURES)
            + f"sdk_imported={medians['sdk_imported']}",
            flush=True,
        )
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--backend", choices=(*BACKENDS, "citus", "all"), default="all")
    parser.add_argument("--url", help="server URL whose user may create databases")
    parser.add_argument("--runs", type=int, default=7, help="processes per case (median)")
    parser.add_argument("--quick", action="store_true", help="one process per case")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure the selected backends."""
    backends = BACKENDS if args.backend == "all" else (args.backend,)
    runs = 1 if args.quick else args.runs
    report: dict[str, Any] = {}
    for backend in backends:
        server = None if backend == "sqlite" else args.url or DEFAULT_URLS[backend]
        report[backend] = await measure(backend, server, runs)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print ``COLD_JSON`` last."""
    report = asyncio.run(run(parse_args(argv)))
    print(JSON_PREFIX + json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
