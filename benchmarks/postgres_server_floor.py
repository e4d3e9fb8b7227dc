"""How many turns per second the Postgres server itself takes on this machine, at best.

pgbench, PostgreSQL's own client in C, plays turnstore's turn with the SQL turnstore sends:
the history read (the newest 20 items), one call of the append function with a turn's four
items, one call of the usage function. Each of ``--clients`` concurrent clients plays its own
session on its own connection, in a fresh database migrated to head and dropped afterwards.
pgbench spends a few microseconds per statement, so whatever the figure falls short of a
target is the server's cost, not any client library's::

    python benchmarks/postgres_server_floor.py [--url postgresql+asyncpg://...] [--seconds 15]

By default every client starts its next turn as soon as the last one ends (a closed loop);
``--rate 1000`` offers turns at that rate instead, shared by the clients, and latency then
counts from each turn's scheduled start, as ``benchmarks/run.py``'s open loop does.

Prints turns/s and the median and 95th-percentile latency per turn, then CPU per turn: the
whole machine's (from /proc/stat, so the server's and pgbench's together), pgbench's own, and
the server's own (its backends serving the benchmark's database, from /proc/PID/stat; the
server must run on this machine).
Needs ``pgbench`` on the PATH (Debian: postgresql-client) and Linux for the machine's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

# Measure the checkout this script lives in, even where another copy of turnstore is installed.
_CHECKOUT_SOURCE = Path(__file__).resolve().parents[1] / "src"
if (_CHECKOUT_SOURCE / "turnstore").is_dir():
    sys.path.insert(0, str(_CHECKOUT_SOURCE))

from run import run_result, turn_items  # noqa: E402  # the items the main benchmark stores

from turnstore.persistence import server_routines  # noqa: E402
from turnstore.persistence.dialects import profile_for  # noqa: E402
from turnstore.persistence.models import DEFAULT_TABLES  # noqa: E402
from turnstore.persistence.statements import _statements  # noqa: E402
from turnstore.schema import migrate  # noqa: E402
from turnstore.sdk.items import to_new_messages  # noqa: E402
from turnstore.sdk.usage import usage_from_result  # noqa: E402

DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
HISTORY_LIMIT = 20
JSON_PREFIX = "FLOOR_JSON "
# Each client's session id; pgbench numbers its clients from 0.
SESSION = "('floor-' || :client_id)"


def _literal(value: object) -> str:
    """A SQL literal for a string, number, boolean or NULL."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _array(values: list[object], element_type: str) -> str:
    return f"ARRAY[{', '.join(_literal(v) for v in values)}]::{element_type}[]"


def _with_arguments(sql: str, arguments: Mapping[int, str]) -> str:
    """``sql`` with each ``$n`` placeholder (and any cast after it) replaced."""
    return re.sub(r"\$(\d+)(::[A-Z]+)?", lambda match: arguments[int(match[1])], sql)


def turn_script() -> str:
    """The pgbench script of one turn, as turnstore would send it for this client."""
    history = _statements(DEFAULT_TABLES, profile_for("postgresql")).latest
    plan = history.driver_plan(make_url(DEFAULT_URL).get_dialect()())
    assert plan is not None, "the history read runs on the driver on Postgres"
    values = {"sid": SESSION, "bid": "'main'", "limit": str(HISTORY_LIMIT)}
    read = _with_arguments(
        plan.sql, {n: values[p.name] for n, p in enumerate(plan.parameters, start=1)}
    )

    routines = server_routines.routines_for(
        DEFAULT_TABLES.sessions.name, DEFAULT_TABLES.messages.name, default=True
    )
    messages = to_new_messages(turn_items(1))
    append = _with_arguments(
        routines.append_call,
        {
            1: SESSION,
            2: "'main'",
            3: "0",
            4: _array([m.data for m in messages], "text"),
            5: _array([m.message_type for m in messages], "text"),
            6: _array([m.is_user_message for m in messages], "boolean"),
            7: _array([m.tool_name for m in messages], "text"),
            # Version 3's session info for a session that has none yet: none given.
            8: "NULL",
            9: "NULL",
            10: "NULL",
        },
    )
    usage = usage_from_result(run_result(1))
    assert usage is not None
    store_usage = _with_arguments(
        routines.usage_call,
        {
            1: SESSION,
            2: "'main'",
            3: "0",
            4: str(usage.requests),
            5: str(usage.input_tokens),
            6: str(usage.output_tokens),
            7: str(usage.total_tokens),
            8: _literal(server_routines.json_argument(usage.input_tokens_details)),
            9: _literal(server_routines.json_argument(usage.output_tokens_details)),
            10: "NULL",
            11: "NULL",
            12: "NULL",
            # Version 4's model rows: the turn's models and their shares, as arrays.
            13: _array(["gpt-4o"], "text"),
            **{
                14 + index: _array([count], "integer")
                for index, count in enumerate(
                    (
                        usage.requests,
                        usage.input_tokens,
                        0,
                        usage.output_tokens,
                        0,
                        usage.total_tokens,
                    )
                )
            },
        },
    )
    # pgbench takes one statement per line.
    return "\n".join(" ".join(sql.split()) + ";" for sql in (read, append, store_usage)) + "\n"


def _busy_and_total_ticks() -> tuple[int, int]:
    """Busy and total CPU ticks of the whole machine so far (Linux /proc/stat)."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


async def _administer(admin_url: str, statement: str) -> None:
    """Run one statement (CREATE or DROP DATABASE) outside any transaction."""
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        async with admin.connect() as conn:
            await conn.exec_driver_sql(statement)
    finally:
        await admin.dispose()


def _pgbench_command(
    url: URL, script: Path, clients: int, seconds: int, rate: float | None
) -> list[str]:
    command = ["pgbench", "--no-vacuum", "--protocol=prepared", f"--file={script}"]
    command += [f"--client={clients}", "--jobs=2", f"--time={seconds}"]
    command += ["--log", f"--log-prefix={script.parent / 'turns'}"]
    if rate is not None:
        command.append(f"--rate={rate}")
    command += ["--host", url.host or "127.0.0.1", "--port", str(url.port or 5432)]
    command += ["--username", url.username or "postgres", str(url.database)]
    return command


async def _watch_server(url: str, database: str, process: subprocess.Popen[str]) -> int:
    """CPU ticks the server's backends for ``database`` used while ``process`` ran.

    Reads each backend's own counters (/proc/PID/stat) several times a second and keeps the
    last reading per backend, so other work on the machine is not counted; what a backend
    used after the last reading before it exited (a fraction of a second) is missed.
    """
    watcher = create_async_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    used: dict[int, int] = {}
    try:
        async with watcher.connect() as conn:
            while process.poll() is None:
                found = await conn.exec_driver_sql(
                    "SELECT pid FROM pg_stat_activity WHERE datname = $1", (database,)
                )
                for (pid,) in found.all():
                    ticks = _process_ticks(pid)
                    if ticks is not None:
                        used[pid] = ticks
                await asyncio.sleep(0.1)
    finally:
        await watcher.dispose()
    return sum(used.values())


def _process_ticks(pid: int) -> int | None:
    """User and system CPU ticks of a process so far; ``None`` once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime


def _latencies_ms(directory: Path) -> list[float]:
    """Each turn's latency from pgbench's per-transaction logs, schedule lag included."""
    latencies = []
    for log in directory.glob("turns*"):
        for line in log.read_text().splitlines():
            fields = line.split()
            # client, transaction, elapsed us, script, epoch s, epoch us[, schedule lag us]
            lag = int(fields[6]) if len(fields) > 6 else 0
            latencies.append((int(fields[2]) + lag) / 1000)
    return sorted(latencies)


def measure(url: str, clients: int, seconds: int, rate: float | None) -> dict[str, float]:
    """Run pgbench on a fresh database; turns/s, latency and CPU per turn."""
    base = make_url(url)
    name = f"floor_{uuid.uuid4().hex[:12]}"
    target = base.set(database=name)
    asyncio.run(_administer(url, f"CREATE DATABASE {name}"))
    try:
        asyncio.run(migrate.upgrade(target.render_as_string(hide_password=False)))
        with tempfile.TemporaryDirectory(prefix="turnstore-floor-") as directory:
            script = Path(directory) / "turn.sql"
            script.write_text(turn_script())
            environment = dict(os.environ)
            if base.password:
                environment["PGPASSWORD"] = base.password
            busy, total = _busy_and_total_ticks()
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            process = subprocess.Popen(  # noqa: S603  # a fixed command of our own
                _pgbench_command(target, script, clients, seconds, rate),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=environment,
                cwd=directory,
            )
            server_ticks = asyncio.run(_watch_server(url, name, process))
            stdout, stderr = process.communicate()
            if process.returncode != 0:
                raise RuntimeError(f"pgbench failed: {stderr.strip()}")
            busy, total = (
                a - b for a, b in zip(_busy_and_total_ticks(), (busy, total), strict=True)
            )
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            latencies = _latencies_ms(Path(directory))
    finally:
        asyncio.run(_administer(url, f"DROP DATABASE {name} WITH (FORCE)"))
    output = stdout
    turns = int(re.search(r"actually processed: (\d+)", output)[1])  # type: ignore[index]
    achieved = float(re.search(r"tps = ([\d.]+)", output)[1])  # type: ignore[index]
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    pgbench_cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    return {
        "turns_per_s": achieved,
        "p50_ms": latencies[len(latencies) // 2],
        "p95_ms": latencies[int(len(latencies) * 0.95)],
        "machine_cpu_ms_per_turn": busy / ticks_per_second / turns * 1000,
        "pgbench_cpu_ms_per_turn": pgbench_cpu / turns * 1000,
        "server_cpu_ms_per_turn": server_ticks / ticks_per_second / turns * 1000,
        "machine_busy_share": busy / total,
        "cpus": float(os.cpu_count() or 0),
    }


def main() -> int:
    """Parse arguments, measure, print the figures and a JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", default=DEFAULT_URL, help="a server URL whose user may create databases"
    )
    parser.add_argument("--clients", type=int, default=50, help="concurrent sessions")
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rate", type=float, help="offer this many turns/s (open loop)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat on a fresh database")
    parser.add_argument("--print-script", action="store_true", help="show the pgbench script")
    args = parser.parse_args()
    if shutil.which("pgbench") is None:
        print("pgbench is not on the PATH (Debian: apt install postgresql-client)")
        return 2
    if args.print_script:
        print(turn_script())
    for round_number in range(1, args.rounds + 1):
        figures = measure(args.url, args.clients, args.seconds, args.rate)
        offered = "closed loop" if args.rate is None else f"{args.rate:,.0f} turns/s offered"
        print(
            f"round {round_number} ({offered}): {figures['turns_per_s']:,.0f} turns/s with "
            f"{args.clients} clients, p50 {figures['p50_ms']:.1f} ms, p95 "
            f"{figures['p95_ms']:.1f} ms; CPU per turn "
            f"{figures['machine_cpu_ms_per_turn']:.2f} ms on the machine "
            f"({figures['machine_busy_share']:.0%} of {figures['cpus']:.0f} cores busy), "
            f"of which pgbench {figures['pgbench_cpu_ms_per_turn']:.2f} ms; "
            f"server backends {figures['server_cpu_ms_per_turn']:.2f} ms"
        )
        print(JSON_PREFIX + json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
