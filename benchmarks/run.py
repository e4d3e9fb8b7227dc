"""Benchmarks for turnstore sessions, beside the Agents SDK's ``AdvancedSQLiteSession``.

Run from a checkout after ``pip install -e .[test]`` (or through ``nox -s bench -- ...``)::

    python benchmarks/run.py --backend sqlite
    python benchmarks/run.py --backend postgres [--url postgresql+asyncpg://...] [--rate 1000]
    python benchmarks/run.py --backend mysql --only turn_cycle,concurrency --rounds 3
    python benchmarks/run.py --quick            # tiny sizes, for the smoke test

Every workload runs on a fresh database: a temporary file for SQLite, a private database
created on the server (and dropped afterwards) for Postgres and MySQL. On SQLite, when
``openai-agents`` is installed, each workload also runs against the SDK's class in the same
process, and the table shows the ratio turnstore/SDK. The last line of output is
``BENCH_JSON {...}`` holding every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

# Measure the checkout this script lives in, even where another copy of turnstore is installed.
SCRIPT = Path(__file__).resolve()
_CHECKOUT_SOURCE = SCRIPT.parents[1] / "src"
if (_CHECKOUT_SOURCE / "turnstore").is_dir():
    sys.path.insert(0, str(_CHECKOUT_SOURCE))

import turnstore  # noqa: E402
from turnstore.persistence.dialects import profile_for  # noqa: E402
from turnstore.persistence.engines import sqlite_url  # noqa: E402

try:
    from agents.extensions.memory import AdvancedSQLiteSession as SDKSession
    from agents.usage import Usage
except ImportError:  # the comparison is optional; turnstore runs alone then
    HAVE_SDK = False
else:
    HAVE_SDK = True

WORKLOADS = ("turn_cycle", "growth", "full_read", "analytics", "concurrency", "memory")
TURNSTORE, SDK = "turnstore", "sdk"
ITEMS_PER_TURN = 4
DEFAULT_URLS = {
    "postgres": "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
    "citus": "postgresql+asyncpg://postgres@127.0.0.1:9700/turnstore",
    "mysql": "mysql+asyncmy://root@127.0.0.1:3306/test",
}
SEARCH_TERM = "invoice"
JSON_PREFIX = "BENCH_JSON "
MEMORY_PREFIX = "MEMORY_RUNS "


# -- sizes and configuration ------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How big each workload is and how often it measures."""

    turns: int = 500
    cycles: int = 50
    warmup: int = 5
    reps: int = 30
    growth_items: tuple[int, ...] = (100, 1_000, 10_000)
    branch_turns: tuple[int, ...] = (500, 2_000)
    branch_reps: int = 7
    full_read_items: int = 8_000
    full_read_reps: int = 10
    analytics_turns: int = 2_000
    analytics_others: int = 1_000
    analytics_other_turns: int = 5
    analytics_reps: int = 10
    sessions: int = 50
    concurrent_turns: int = 20
    memory_items: int = 10_000
    memory_batch: int = 500


QUICK = Sizes(
    turns=10,
    cycles=5,
    warmup=1,
    reps=5,
    growth_items=(20, 40, 80),
    branch_turns=(10, 20),
    branch_reps=2,
    full_read_items=80,
    full_read_reps=3,
    analytics_turns=20,
    analytics_others=5,
    analytics_other_turns=2,
    analytics_reps=3,
    sessions=4,
    concurrent_turns=3,
    memory_items=400,
    memory_batch=50,
)


@dataclass(frozen=True)
class Config:
    """What to run, parsed from the command line."""

    backend: str
    url: str | None
    sizes: Sizes
    workloads: tuple[str, ...]
    rounds: int
    rate: float
    compare_sdk: bool
    # --quick on a server: one private database for the whole round (distinct session ids per
    # workload) instead of one per workload, because creating databases dominates tiny runs.
    share_database: bool = False


# -- sessions and databases ---------------------------------------------------------------


class BenchSession(Protocol):
    """The part of the session API the workloads call (turnstore's and the SDK's alike)."""

    async def get_items(self, limit: int | None = None) -> list[Any]: ...  # noqa: D102
    async def add_items(self, items: list[Any]) -> None: ...  # noqa: D102
    async def pop_item(self) -> Any: ...  # noqa: D102
    async def store_run_usage(self, result: Any) -> None: ...  # noqa: D102
    async def create_branch_from_turn(self, turn: int, name: str | None = None) -> str: ...  # noqa: D102
    async def switch_to_branch(self, branch_id: str) -> None: ...  # noqa: D102
    async def delete_branch(self, branch_id: str, force: bool = False) -> None: ...  # noqa: D102
    async def list_branches(self) -> list[dict[str, Any]]: ...  # noqa: D102
    async def get_session_usage(self) -> dict[str, int] | None: ...  # noqa: D102
    async def get_turn_usage(self) -> Any: ...  # noqa: D102
    async def get_conversation_turns(self) -> list[dict[str, Any]]: ...  # noqa: D102
    async def get_tool_usage(self) -> list[tuple[str, int, int]]: ...  # noqa: D102
    async def find_turns_by_content(self, search_term: str) -> list[dict[str, Any]]: ...  # noqa: D102


@dataclass(frozen=True)
class Database:
    """One fresh database: a SQLite file path or a server URL."""

    backend: str
    location: str

    def open(self, impl: str, session_id: str) -> BenchSession:
        """A new session of implementation ``impl`` on this database."""
        if impl == SDK:
            session: Any = SDKSession(
                session_id=session_id, db_path=self.location, create_tables=True
            )
        elif self.backend == "sqlite":
            session = turnstore.AdvancedSQLiteSession(
                session_id=session_id, db_path=self.location, create_tables=True
            )
        else:
            session = turnstore.AdvancedSession(
                session_id=session_id, url=self.location, create_tables=True
            )
        return session  # type: ignore[no-any-return]


async def close(session: BenchSession) -> None:
    """Close a session, waiting for turnstore's connections to go."""
    aclose = getattr(session, "aclose", None)
    if aclose is not None:
        await aclose()
    else:
        getattr(session, "close")()  # noqa: B009  # the SDK's close is synchronous


async def analyze(db: Database) -> None:
    """Refresh a server database's planner statistics after a history was built.

    A server with autovacuum on does this by itself within a minute; without statistics
    Postgres may pick plans that are quadratic in the session's size, which is not the
    steady state a benchmark should describe. SQLite keeps no statistics unless asked, as in
    production, so it is left alone.
    """
    if db.backend == "sqlite":
        return
    engine = create_async_engine(db.location, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            if db.backend in ("postgres", "citus"):
                await conn.exec_driver_sql("ANALYZE")
            else:
                tables = (await conn.exec_driver_sql("SHOW TABLES")).scalars().all()
                await conn.exec_driver_sql(f"ANALYZE TABLE {', '.join(tables)}")
    finally:
        await engine.dispose()


Fresh = Callable[[], AbstractAsyncContextManager[Database]]


def database_factory(config: Config) -> Fresh:
    """A factory of fresh, private databases for ``config.backend``, removed after use."""

    @asynccontextmanager
    async def fresh() -> AsyncIterator[Database]:
        if config.backend == "sqlite":
            with tempfile.TemporaryDirectory(prefix="turnstore-bench-") as directory:
                try:
                    yield Database("sqlite", str(Path(directory) / "bench.db"))
                finally:
                    await turnstore.dispose_engines()
            return
        assert config.url is not None
        if config.backend == "citus":
            # A database of its own would need the extension and the workers registered in
            # it; a schema does, with a role whose search_path leads there (URLs carry no
            # search_path).
            async with citus_schema(config.url) as url:
                yield Database("citus", url)
            return
        name = f"bench_{uuid.uuid4().hex[:12]}"
        # No pooling: the drop must still work if the server closed connections meanwhile.
        admin = create_async_engine(config.url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        try:
            async with admin.connect() as conn:
                await conn.exec_driver_sql(f"CREATE DATABASE {name}")
            url = make_url(config.url).set(database=name).render_as_string(hide_password=False)
            try:
                yield Database(config.backend, url)
            finally:
                await turnstore.dispose_engines(url)
                # Postgres refuses to drop a database someone is connected to; FORCE ends
                # connections a failed workload may have left behind.
                force = " WITH (FORCE)" if config.backend == "postgres" else ""
                async with admin.connect() as conn:
                    await conn.exec_driver_sql(f"DROP DATABASE {name}{force}")
        finally:
            await admin.dispose()

    return fresh


@asynccontextmanager
async def citus_schema(url: str) -> AsyncIterator[str]:
    """A URL on a Citus coordinator whose role's default schema is a fresh one; both dropped."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f"CREATE SCHEMA {name}")
            await conn.exec_driver_sql(f"CREATE ROLE {name} LOGIN SUPERUSER")
            await conn.exec_driver_sql(f"ALTER ROLE {name} SET search_path = {name}")
        private = make_url(url).set(username=name).render_as_string(hide_password=False)
        try:
            yield private
        finally:
            await turnstore.dispose_engines(private)
            async with admin.connect() as conn:
                await conn.exec_driver_sql(f"DROP SCHEMA {name} CASCADE")
                await conn.exec_driver_sql(f"DROP OWNED BY {name} CASCADE")
                await conn.exec_driver_sql(f"DROP ROLE {name}")
    finally:
        await admin.dispose()


def reuse(db: Database) -> Fresh:
    """A factory that hands out the same database every time (and leaves it in place)."""

    @asynccontextmanager
    async def same() -> AsyncIterator[Database]:
        yield db

    return same


async def pool_description(config: Config) -> str:
    """The engine options turnstore uses for this backend, and the pool they produce."""
    if config.backend == "sqlite":
        url = sqlite_url(Path(tempfile.gettempdir()) / "pool-probe.db")
    else:
        assert config.url is not None
        url = make_url(config.url)
    profile = profile_for(url.get_backend_name())
    threaded = profile.threaded_engine(url)
    if threaded is not None:
        return (
            f"{threaded.url.drivername} on worker threads (one writer with group commit, "
            f"{'one reader' if threaded.separate_reader else 'no separate reader'}); "
            f"engine options {threaded.engine_options}"
        )
    options = profile.engine_options(url)
    engine = create_async_engine(url, **options)
    try:
        return f"{type(engine.pool).__name__} ({engine.pool.status()}); engine options {options}"
    finally:
        await engine.dispose()


# -- items shaped like the SDK's ------------------------------------------------------------

_PROSE = (
    "The quarterly figures show steady growth in the northern region while shipping costs "
    "fell after the new carrier contract took effect; the team expects the trend to hold "
    "through the winter, although two large customers have asked to renegotiate terms and "
    "the warehouse in the east is running close to capacity for the third month in a row. "
)
_TOPICS = ("my order", "the weather in Oslo", "our travel policy", "a refund", "the roadmap")
_TOOLS = ("lookup_order", "get_weather", "search_docs", "issue_refund")


def _prose(turn: int, length: int) -> str:
    start = (turn * 37) % len(_PROSE)
    text = (_PROSE[start:] + _PROSE) * (length // len(_PROSE) + 2)
    return text[:length]


def turn_items(turn: int) -> list[dict[str, Any]]:
    """One turn as the Runner stores it: user message, tool call, its output, the reply."""
    topic = SEARCH_TERM if turn % 50 == 7 else _TOPICS[turn % len(_TOPICS)]
    tool = _TOOLS[turn % len(_TOOLS)]
    call_id = f"call_{turn:06d}_{tool}"
    return [
        {"role": "user", "content": f"Turn {turn}: question about {topic}. {_prose(turn, 180)}"},
        {
            "type": "function_call",
            "id": f"fc_{turn:06d}",
            "call_id": call_id,
            "name": tool,
            "arguments": json.dumps({"query": topic, "limit": 5, "turn": turn}),
            "status": "completed",
        },
        {
            "type": "function_call_output",
            "call_id": call_id,
            "output": json.dumps({"status": "ok", "result": _prose(turn + 1, 300)}),
        },
        {
            "id": f"msg_{turn:06d}",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": _prose(turn + 2, 450), "annotations": []}],
        },
    ]


def run_result(turn: int) -> Any:
    """An object carrying ``context_wrapper.usage``, all that ``store_run_usage`` reads."""
    requests, input_tokens, output_tokens = 1 + turn % 3, 1_200 + turn, 150 + turn % 97
    total_tokens = input_tokens + output_tokens
    if HAVE_SDK:
        usage: Any = Usage(
            requests=requests,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            total_tokens=total_tokens,
        )
    else:
        usage = SimpleNamespace(
            requests=requests,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            total_tokens=total_tokens,
            input_tokens_details=None,
            output_tokens_details=None,
        )
    return SimpleNamespace(context_wrapper=SimpleNamespace(usage=usage))


async def fill(session: BenchSession, first_turn: int, turns: int, chunk: int = 50) -> int:
    """Append ``turns`` whole turns in batches of ``chunk`` turns; the next turn's number."""
    turn = first_turn
    end = first_turn + turns
    while turn < end:
        batch_end = min(end, turn + chunk)
        await session.add_items([item for n in range(turn, batch_end) for item in turn_items(n)])
        turn = batch_end
    if turns:
        await session.store_run_usage(run_result(turn - 1))
    return turn


async def play_turn(session: BenchSession, turn: int, *, limit: int | None = 20) -> None:
    """One conversational turn: read history, append the turn's items, store its usage."""
    await session.get_items(limit=limit)
    await session.add_items(turn_items(turn))
    await session.store_run_usage(run_result(turn))


# -- measuring ------------------------------------------------------------------------------


def elapsed_ms(start: float) -> float:
    """Milliseconds since ``start`` (a ``time.perf_counter()`` reading)."""
    return (time.perf_counter() - start) * 1000


async def median_ms(op: Callable[[], Awaitable[object]], reps: int, warmup: int) -> float:
    """Median wall time of ``op`` over ``reps`` calls after ``warmup`` unmeasured ones."""
    for _ in range(warmup):
        await op()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        await op()
        times.append(elapsed_ms(start))
    return statistics.median(times)


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of ``values``."""
    ordered = sorted(values)
    rank = max(1, round(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class ErrorLog(logging.Handler):
    """Collects error records; store_run_usage logs its failures instead of raising them."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the record."""
        self.records.append(record)

    def by_logger(self) -> dict[str, int]:
        """How many records each logger emitted (``turnstore``, ``openai.agents``, ...)."""
        counts: dict[str, int] = {}
        for record in self.records:
            counts[record.name] = counts.get(record.name, 0) + 1
        return counts


ERRORS = ErrorLog()


def _record_text(record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        text += f" {record.exc_info[1]}"
    return text


@dataclass
class Outcome:
    """What one workload measured for one implementation."""

    figures: dict[str, float] = field(default_factory=dict)
    errors: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: dict[str, float | str] = field(default_factory=dict)


Workload = Callable[[Fresh, Sequence[str], Config], Awaitable[dict[str, Outcome]]]


def each(measure: Callable[[Fresh, str, Config], Awaitable[Outcome]]) -> Workload:
    """A workload that runs ``measure`` for one implementation after the other."""

    async def run_each(fresh: Fresh, impls: Sequence[str], config: Config) -> dict[str, Outcome]:
        return {impl: await measure(fresh, impl, config) for impl in impls}

    return run_each


# -- workloads ------------------------------------------------------------------------------


async def turn_cycle(fresh: Fresh, impl: str, config: Config) -> Outcome:
    """Full ``get_items`` + ``add_items`` of a turn + ``store_run_usage``, on a long session."""
    sizes = config.sizes
    parts: dict[str, list[float]] = {
        "cycle_ms": [],
        "get_items_ms": [],
        "add_items_ms": [],
        "store_run_usage_ms": [],
    }
    async with fresh() as db:
        session = db.open(impl, "cycle")
        try:
            turn = await fill(session, 1, sizes.turns)
            await analyze(db)
            for cycle in range(sizes.warmup + sizes.cycles):
                start = time.perf_counter()
                await session.get_items()
                read = time.perf_counter()
                await session.add_items(turn_items(turn))
                added = time.perf_counter()
                await session.store_run_usage(run_result(turn))
                done = time.perf_counter()
                turn += 1
                if cycle >= sizes.warmup:
                    parts["cycle_ms"].append((done - start) * 1000)
                    parts["get_items_ms"].append((read - start) * 1000)
                    parts["add_items_ms"].append((added - read) * 1000)
                    parts["store_run_usage_ms"].append((done - added) * 1000)
        finally:
            await close(session)
    return Outcome({name: statistics.median(times) for name, times in parts.items()})


async def _add_cost(session: BenchSession, next_turn: int, sizes: Sizes) -> float:
    """Median cost of appending one turn; each is popped again so the size stays put."""
    times = []
    for rep in range(sizes.warmup + sizes.reps):
        start = time.perf_counter()
        await session.add_items(turn_items(next_turn))
        if rep >= sizes.warmup:
            times.append(elapsed_ms(start))
        for _ in range(ITEMS_PER_TURN):
            await session.pop_item()
    return statistics.median(times)


async def _branch_cost(session: BenchSession, turns: int, tag: str, sizes: Sizes) -> float:
    """Median cost of forking from the middle turn; each fork is deleted again."""
    times = []
    for rep in range(1 + sizes.branch_reps):
        name = f"{tag}_{rep}"
        start = time.perf_counter()
        await session.create_branch_from_turn(max(1, turns // 2), name)
        if rep >= 1:
            times.append(elapsed_ms(start))
        await session.switch_to_branch("main")
        await session.delete_branch(name)
    return statistics.median(times)


async def growth(fresh: Fresh, impl: str, config: Config) -> Outcome:
    """How appending, a short read and branching cost as one session grows."""
    sizes = config.sizes
    # items -> (measure add/get/branch labelled by items, label the branch by turns)
    checkpoints: dict[int, tuple[bool, bool]] = {}
    for items in sizes.growth_items:
        checkpoints[items] = (True, False)
    for turns in sizes.branch_turns:
        by_items = checkpoints.get(turns * ITEMS_PER_TURN, (False, False))[0]
        checkpoints[turns * ITEMS_PER_TURN] = (by_items, True)
    figures: dict[str, float] = {}
    async with fresh() as db:
        session = db.open(impl, "growth")
        try:
            turns = 0
            for items in sorted(checkpoints):
                by_items, by_turns = checkpoints[items]
                wanted = max(1, items // ITEMS_PER_TURN)
                await fill(session, turns + 1, wanted - turns)
                await analyze(db)
                turns = wanted
                branch_ms = await _branch_cost(session, turns, f"b{items}", sizes)
                if by_items:
                    figures[f"add_items_ms@{items}_items"] = await _add_cost(
                        session, turns + 1, sizes
                    )
                    figures[f"get_items_20_ms@{items}_items"] = await median_ms(
                        lambda: session.get_items(limit=20), sizes.reps, sizes.warmup
                    )
                    figures[f"branch_ms@{items}_items"] = branch_ms
                if by_turns:
                    figures[f"branch_ms@{turns}_turns"] = branch_ms
        finally:
            await close(session)
    return Outcome(figures)


async def full_read(fresh: Fresh, impl: str, config: Config) -> Outcome:
    """``get_items()`` of a long history."""
    sizes = config.sizes
    async with fresh() as db:
        session = db.open(impl, "full-read")
        try:
            await fill(session, 1, sizes.full_read_items // ITEMS_PER_TURN)
            await analyze(db)
            figure = await median_ms(session.get_items, sizes.full_read_reps, 1)
        finally:
            await close(session)
    return Outcome({f"get_items_ms@{sizes.full_read_items}_items": figure})


async def analytics(fresh: Fresh, impl: str, config: Config) -> Outcome:
    """Usage and structure queries on a long session among many short ones."""
    sizes = config.sizes
    others_every = max(1, sizes.analytics_turns // max(1, sizes.analytics_others))
    async with fresh() as db:
        session = db.open(impl, "analytics")
        try:
            others = 0
            for turn in range(1, sizes.analytics_turns + 1):
                await session.add_items(turn_items(turn))
                await session.store_run_usage(run_result(turn))
                # Interleave the other conversations, as they would arrive in a service.
                if turn % others_every == 0 and others < sizes.analytics_others:
                    await _short_session(db, impl, f"other-{others}", sizes)
                    others += 1
            while others < sizes.analytics_others:
                await _short_session(db, impl, f"other-{others}", sizes)
                others += 1
            for fork in (2, 3):
                await session.create_branch_from_turn(
                    max(1, sizes.analytics_turns * fork // 4), f"alt{fork}"
                )
                await session.switch_to_branch("main")
            await analyze(db)
            queries: dict[str, Callable[[], Awaitable[object]]] = {
                "get_session_usage_ms": session.get_session_usage,
                "get_turn_usage_ms": session.get_turn_usage,
                "get_conversation_turns_ms": session.get_conversation_turns,
                "get_tool_usage_ms": session.get_tool_usage,
                "find_turns_by_content_ms": lambda: session.find_turns_by_content(SEARCH_TERM),
                "list_branches_ms": session.list_branches,
            }
            figures = {
                name: await median_ms(query, sizes.analytics_reps, 1)
                for name, query in queries.items()
            }
        finally:
            await close(session)
    return Outcome(figures)


async def _short_session(db: Database, impl: str, session_id: str, sizes: Sizes) -> None:
    other = db.open(impl, session_id)
    try:
        await fill(other, 1, sizes.analytics_other_turns)
    finally:
        await close(other)


@dataclass
class Load:
    """Per-turn latencies and failures of a concurrent run."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    locked: int = 0
    wall_s: float = 0.0

    def fail(self, text: str) -> None:
        """Count a failure, and whether SQLite's lock timeout caused it."""
        self.errors += 1
        if "database is locked" in text:
            self.locked += 1

    def report(self, prefix: str, outcome: Outcome) -> None:
        """Add this run's figures to ``outcome`` under ``prefix``."""
        if self.latencies:
            outcome.figures[f"{prefix}_turns_per_s"] = len(self.latencies) / self.wall_s
            outcome.figures[f"{prefix}_p50_ms"] = percentile(self.latencies, 0.50)
            outcome.figures[f"{prefix}_p95_ms"] = percentile(self.latencies, 0.95)
        outcome.errors[prefix] = {"errors": self.errors, "locked": self.locked}


async def _timed_turn(session: BenchSession, turn: int, started: float, load: Load) -> None:
    try:
        await play_turn(session, turn)
    except Exception as exc:
        load.fail(str(exc))
    else:
        load.latencies.append(elapsed_ms(started))


async def _opened(db: Database, impl: str, count: int, tag: str) -> list[BenchSession]:
    """``count`` sessions, each having touched the database once (connections, schema)."""
    sessions = [db.open(impl, f"{tag}-{k}") for k in range(count)]
    for session in sessions:
        await session.get_items(limit=20)
    return sessions


async def closed_loop(db: Database, impl: str, count: int, in_flight: int, turns: int) -> Load:
    """``count`` sessions each playing ``turns`` turns back to back, ``in_flight`` at a time.

    Latency is measured from the moment a turn may start (it holds a slot), so it is the
    service time under that much concurrency, not time spent queueing for a slot.
    """
    sessions = await _opened(db, impl, count, f"closed{count}")
    load = Load()
    slots = asyncio.Semaphore(in_flight)

    async def converse(session: BenchSession) -> None:
        for turn in range(1, turns + 1):
            async with slots:
                await _timed_turn(session, turn, time.perf_counter(), load)

    async with _measured_run(sessions, load):
        await asyncio.gather(*(converse(session) for session in sessions))
    return load


async def open_loop(db: Database, impl: str, count: int, turns: int, rate: float) -> Load:
    """Turns offered at ``rate`` per second, round-robin over ``count`` sessions.

    Latency runs from a turn's scheduled arrival, so time waiting behind the same session's
    previous turn (or for a connection) counts, as it would for a user.
    """
    sessions = await _opened(db, impl, count, f"open{count}")
    locks = [asyncio.Lock() for _ in sessions]
    next_turn = [1] * count
    load = Load()

    async def arrive(k: int, scheduled: float) -> None:
        async with locks[k]:
            turn = next_turn[k]
            next_turn[k] += 1
            await _timed_turn(sessions[k], turn, scheduled, load)

    tasks = []
    async with _measured_run(sessions, load) as start:
        for index in range(count * turns):
            scheduled = start + index / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(arrive(index % count, scheduled)))
        await asyncio.gather(*tasks)
    return load


@asynccontextmanager
async def _measured_run(sessions: Sequence[BenchSession], load: Load) -> AsyncIterator[float]:
    """Times a concurrent run's block into ``load``, then closes ``sessions``.

    Yields the start time, from which an open loop schedules its arrivals. Once the block
    has ended normally, the usage failures logged meanwhile (``store_run_usage`` logs rather
    than raises them) count as errors too.
    """
    logged = len(ERRORS.records)
    start = time.perf_counter()
    try:
        yield start
        load.wall_s = time.perf_counter() - start
    finally:
        for session in sessions:
            await close(session)
    _count_logged_usage_failures(load, logged)


def _count_logged_usage_failures(load: Load, since: int) -> None:
    for record in ERRORS.records[since:]:
        text = _record_text(record)
        if "usage" in record.getMessage().lower():
            load.fail(text)


async def concurrency(fresh: Fresh, impl: str, config: Config) -> Outcome:
    """Many sessions on one database at once: closed loops, and an open loop on servers."""
    sizes = config.sizes
    outcome = Outcome()
    # One fresh database; each variant's sessions have ids of their own.
    async with fresh() as db:
        load = await closed_loop(db, impl, sizes.sessions, sizes.sessions, sizes.concurrent_turns)
        load.report("closed", outcome)
        load = await closed_loop(
            db, impl, 2 * sizes.sessions, sizes.sessions, sizes.concurrent_turns
        )
        load.report("wide", outcome)
        if config.backend != "sqlite":
            load = await open_loop(db, impl, sizes.sessions, sizes.concurrent_turns, config.rate)
            load.report("open", outcome)
    return outcome


async def memory(fresh: Fresh, impls: Sequence[str], config: Config) -> dict[str, Outcome]:
    """Peak RSS of reading (and of streaming) a long history, each in a fresh process.

    Every implementation's history is built first; then one new interpreter imports this
    module (and so turnstore, SQLAlchemy and the SDK) and forks one process per measurement:
    each starts from exactly that imported state, so the ``baseline`` process (open the
    session, read one item) differs from the others only by what reading the history costs.
    """
    sizes = config.sizes
    runs: list[dict[str, Any]] = []
    async with AsyncExitStack() as stack:
        for impl in impls:
            db = await stack.enter_async_context(fresh())
            session = db.open(impl, "memory")
            try:
                await fill(session, 1, sizes.memory_items // ITEMS_PER_TURN, chunk=250)
            finally:
                await close(session)
            await analyze(db)
            modes = ["baseline", "get_items"]
            if impl == TURNSTORE:
                modes.append("iter_items")
            runs += [
                {"backend": db.backend, "location": db.location, "impl": impl, "mode": mode}
                for mode in modes
            ]
        reports = await _measure_in_forks(runs, sizes.memory_batch)
    outcomes = {impl: Outcome() for impl in impls}
    baselines = {
        run["impl"]: report["peak_kb"]
        for run, report in zip(runs, reports, strict=True)
        if run["mode"] == "baseline"
    }
    for run, report in zip(runs, reports, strict=True):
        impl, mode = run["impl"], run["mode"]
        expected = 1 if mode == "baseline" else sizes.memory_items
        if report["items"] != expected:
            raise RuntimeError(f"memory run {impl}/{mode} read {report['items']} of {expected}")
        outcomes[impl].figures[f"{mode}_peak_mb"] = report["peak_kb"] / 1024
        if mode != "baseline":
            delta_kb = report["peak_kb"] - baselines[impl]
            outcomes[impl].notes[f"{mode}_delta_mb"] = delta_kb / 1024
    return outcomes


async def _measure_in_forks(runs: list[dict[str, Any]], batch: int) -> list[dict[str, int]]:
    """Run ``runs`` through ``--memory-runs`` in a new interpreter; one report per run."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        "--memory-runs",
        json.dumps(runs),
        "--batch-size",
        str(batch),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    lines = [line for line in stdout.decode().splitlines() if line.startswith(MEMORY_PREFIX)]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"memory measurement failed:\n{stderr.decode()}")
    reports: list[dict[str, int]] = json.loads(lines[-1].removeprefix(MEMORY_PREFIX))
    return reports


def measure_in_forks(runs: list[dict[str, Any]], batch: int) -> list[dict[str, int]]:
    """Fork one child per run, all at once; each child's peak RSS and items read.

    Called in a process that has only imported modules: no event loop, no thread, nothing
    buffered, so every child starts from the same state. ``wait4`` reports the child's own
    peak RSS (KiB on Linux).
    """
    children: dict[int, tuple[int, int]] = {}
    for index, run in enumerate(runs):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, report the item count, never return
            os.close(read_end)
            status = 1
            try:
                items = asyncio.run(read_history(batch=batch, **run))
                os.write(write_end, str(items).encode())
                status = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        os.close(write_end)
        children[pid] = (index, read_end)
    reports: list[dict[str, int]] = [{} for _ in runs]
    failed = []
    for pid, (index, read_end) in children.items():
        _, status, usage = os.wait4(pid, 0)
        with os.fdopen(read_end) as pipe:
            written = pipe.read()
        if status != 0:
            failed.append(runs[index])
            continue
        reports[index] = {"peak_kb": usage.ru_maxrss, "items": int(written)}
    if failed:
        raise RuntimeError(f"memory runs failed: {failed}")
    return reports


async def read_history(backend: str, location: str, impl: str, mode: str, batch: int) -> int:
    """Read a session's history one way and export it (serialize every item); items read."""
    session = Database(backend, location).open(impl, "memory")
    exported_items = exported_bytes = 0
    try:
        if mode == "iter_items":
            assert isinstance(session, turnstore.AdvancedSession)
            async for item in session.iter_items(batch_size=batch):
                exported_bytes += len(json.dumps(item))
                exported_items += 1
        else:
            for item in await session.get_items(limit=1 if mode == "baseline" else None):
                exported_bytes += len(json.dumps(item))
                exported_items += 1
    finally:
        await close(session)
        await turnstore.dispose_engines()
    assert exported_bytes > 0
    return exported_items


WORKLOAD_FUNCTIONS: dict[str, Workload] = {
    "turn_cycle": each(turn_cycle),
    "growth": each(growth),
    "full_read": each(full_read),
    "analytics": each(analytics),
    "concurrency": each(concurrency),
    "memory": memory,
}


# -- running and reporting ----------------------------------------------------------------

Results = dict[str, dict[str, Outcome]]  # workload -> implementation -> outcome


async def run_round(config: Config) -> Results:
    """Every selected workload once, for turnstore and (when compared) the SDK."""
    fresh = database_factory(config)
    impls = [TURNSTORE, SDK] if config.compare_sdk else [TURNSTORE]
    results: Results = {}
    async with AsyncExitStack() as stack:
        if config.share_database:
            fresh = reuse(await stack.enter_async_context(fresh()))
        for name in config.workloads:
            started = time.perf_counter()
            results[name] = await WORKLOAD_FUNCTIONS[name](fresh, impls, config)
            print(f"  {name:<12} {time.perf_counter() - started:6.1f} s", flush=True)
    return results


def _format(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    if metric.endswith("_per_s"):
        return f"{value:,.0f}"
    if "_mb" in metric:
        return f"{value:,.1f}"
    return f"{value:,.2f}"


def _note(metric: str, value: float | str | None) -> str:
    return value if isinstance(value, str) else _format(metric, value)


def table(results: Results) -> str:
    """A plain-text table: workload, metric, turnstore and, when compared, SDK and ratio."""
    compared = any(SDK in by_impl for by_impl in results.values())
    rows = [("workload", "metric", "turnstore", "SDK", "ts/SDK")]
    for workload, by_impl in results.items():
        ours = by_impl[TURNSTORE]
        theirs = by_impl.get(SDK)
        for metric, value in ours.figures.items():
            other = theirs.figures.get(metric) if theirs else None
            ratio = f"{value / other:.2f}" if other else ""
            rows.append((workload, metric, _format(metric, value), _format(metric, other), ratio))
        for variant, counts in ours.errors.items():
            other_counts = theirs.errors.get(variant) if theirs else None
            rows.append(
                (
                    workload,
                    f"{variant}_errors (locked)",
                    f"{counts['errors']} ({counts['locked']})",
                    f"{other_counts['errors']} ({other_counts['locked']})" if other_counts else "-",
                    "",
                )
            )
        for metric, note in ours.notes.items():
            other_note = theirs.notes.get(metric) if theirs else None
            rows.append((workload, metric, _note(metric, note), _note(metric, other_note), ""))
    columns = 5 if compared else 3
    widths = [max(len(row[i]) for row in rows) for i in range(columns)]
    lines = []
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=False)]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def combine(rounds: list[Results]) -> Results:
    """Medians of every figure over the rounds; error counts summed."""
    combined: Results = {}
    for workload, by_impl in rounds[0].items():
        for impl, first in by_impl.items():
            outcomes = [results[workload][impl] for results in rounds]
            merged = Outcome(notes=dict(outcomes[-1].notes))
            for metric in first.figures:
                values = [o.figures[metric] for o in outcomes if metric in o.figures]
                merged.figures[metric] = statistics.median(values)
            for variant in first.errors:
                merged.errors[variant] = {
                    key: sum(o.errors[variant][key] for o in outcomes)
                    for key in ("errors", "locked")
                }
            combined.setdefault(workload, {})[impl] = merged
    return combined


def as_json(results: Results) -> dict[str, Any]:
    """``{"figures": ..., "errors": ..., "notes": ...}``, each keyed workload -> impl."""
    out: dict[str, Any] = {"figures": {}, "errors": {}, "notes": {}}
    for workload, by_impl in results.items():
        for impl, outcome in by_impl.items():
            for part in ("figures", "errors", "notes"):
                value = getattr(outcome, part)
                if value:
                    out[part].setdefault(workload, {})[impl] = value
    return out


async def run(config: Config) -> dict[str, Any]:
    """Run every round, print the tables, and return the machine-readable report."""
    pool = await pool_description(config)
    print(f"backend: {config.backend}  url: {config.url or '(temporary SQLite files)'}")
    print(f"turnstore pool: {pool}")
    print(f"compared with the SDK: {'yes' if config.compare_sdk else 'no'}")
    databases = "one for the whole round" if config.share_database else "a fresh one per workload"
    print(f"databases: {databases}")
    print(f"sizes: {config.sizes}")
    rounds: list[Results] = []
    for number in range(1, config.rounds + 1):
        print(f"\nround {number} of {config.rounds}", flush=True)
        rounds.append(await run_round(config))
        print("\n" + table(rounds[-1]), flush=True)
    combined = combine(rounds)
    if config.rounds > 1:
        print(f"\nmedian over {config.rounds} rounds\n" + table(combined))
    if config.backend != "sqlite" and "concurrency" in config.workloads:
        print(
            "\nclosed/wide: every session starts its next turn as soon as the last one ends, so "
            "turns/s x latency = sessions in flight (Little's law);\nopen: turns arrive at "
            f"{config.rate:,.0f}/s shared by {config.sizes.sessions} sessions, latency from "
            "each turn's scheduled arrival."
        )
    if ERRORS.records:
        print(f"\n{len(ERRORS.records)} errors were logged during the run", file=sys.stderr)
    report = as_json(combined)
    report.update(
        backend=config.backend,
        url=config.url,
        pool=pool,
        sdk=config.compare_sdk,
        rounds=[as_json(results)["figures"] for results in rounds],
        sizes=vars(config.sizes),
        rate=config.rate,
        logged_errors=ERRORS.by_logger(),
    )
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--backend", choices=("sqlite", "postgres", "mysql", "citus"), default="sqlite"
    )
    parser.add_argument("--url", help="server database URL (defaults to the local services)")
    parser.add_argument("--turns", type=int, help="history size of the turn-cycle workload")
    parser.add_argument("--sessions", type=int, help="concurrent sessions (default 50)")
    parser.add_argument("--concurrent-turns", type=int, help="turns per concurrent session")
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop turns/s offered")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole set")
    parser.add_argument("--no-sdk", action="store_true", help="skip the SDK comparison")
    hidden = argparse.SUPPRESS
    parser.add_argument("--memory-runs", help=hidden)
    parser.add_argument("--batch-size", type=int, default=500, help=hidden)
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> Config:
    """Turn parsed arguments into a :class:`Config`."""
    sizes = QUICK if args.quick else Sizes()
    overrides = {
        "turns": args.turns,
        "sessions": args.sessions,
        "concurrent_turns": args.concurrent_turns,
    }
    sizes = replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    workloads = WORKLOADS
    if args.only:
        workloads = tuple(name.strip() for name in args.only.split(",") if name.strip())
        unknown = sorted(set(workloads) - set(WORKLOADS))
        if unknown:
            raise SystemExit(f"unknown workloads: {', '.join(unknown)}")
    url = None if args.backend == "sqlite" else args.url or DEFAULT_URLS[args.backend]
    return Config(
        backend=args.backend,
        url=url,
        sizes=sizes,
        workloads=workloads,
        rounds=max(1, args.rounds),
        rate=args.rate,
        compare_sdk=HAVE_SDK and args.backend == "sqlite" and not args.no_sdk,
        share_database=args.quick and args.backend != "sqlite",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the benchmark (or, internally, the memory measurements)."""
    args = parse_args(argv)
    logging.getLogger().addHandler(ERRORS)
    if args.memory_runs:
        reports = measure_in_forks(json.loads(args.memory_runs), args.batch_size)
        print(MEMORY_PREFIX + json.dumps(reports))
        return 0
    report = asyncio.run(run(config_from(args)))
    print(JSON_PREFIX + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
