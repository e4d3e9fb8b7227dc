r"""Many OS processes on one store: a mixed workload, then an audit of the database in SQL.

Run it by hand (the run's sessions get a unique prefix, so other data in the database is
neither audited nor touched, and the run's own rows are deleted afterwards unless ``--keep``)::

    python scripts/stress.py --backend sqlite --processes 8 --ops 200
    python scripts/stress.py --backend postgres --processes 8 --ops 200 \\
        --url postgresql+asyncpg://postgres@127.0.0.1:5432/test

Each worker process mixes reads, appends, branch creation/switching/deletion, pops, clears and
usage on three kinds of session:

* its own session, which only it writes: the worker keeps an exact model of every branch and
  the audit compares the stored items, in order, with that model;
* a shared session without pops or clears: every acknowledged append must be stored exactly
  once, on the branch it went to, in the order its worker appended, unless a logged branch
  deletion removed it;
* a shared session with everything: no item stored twice, none that was not acknowledged,
  none that was acknowledged as popped.

Then, for all of them: every structure row points at a message of the same session, no
message or usage row is orphaned, sequence numbers are unique per session, and user turns run
1..N along each branch (plus ``PRAGMA integrity_check``/``foreign_key_check`` on SQLite). Any
exception a worker met that the API does not document for the situation is a failure too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.context import ForkServerContext, SpawnContext
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from turnstore import (
    AdvancedSession,
    BranchNotFoundError,
    TurnNotFoundError,
)
from turnstore.persistence.models import DEFAULT_TABLES

# What a worker may meet when another process changed the session under it: the branch it
# wanted to switch to or delete is gone, or the turn it wanted to fork at was popped/cleared.
DOCUMENTED_RACE_ERRORS: tuple[type[Exception], ...] = (BranchNotFoundError, TurnNotFoundError)

BACKEND_URL_VARIABLES = {
    "postgres": "TURNSTORE_TEST_POSTGRES_URL",
    "mysql": "TURNSTORE_TEST_MYSQL_URL",
}
BACKEND_DIALECTS = {"sqlite": "sqlite", "postgres": "postgresql", "mysql": ("mysql", "mariadb")}


def own_session(prefix: str, worker: int) -> str:
    return f"{prefix}-own-{worker}"


def shared_session(prefix: str) -> str:
    """Shared by every worker; appends, reads, branches and usage, but no pops or clears."""
    return f"{prefix}-shared"


def wild_session(prefix: str) -> str:
    """Shared by every worker; every operation, pops and clears included."""
    return f"{prefix}-wild"


def item(marker: str, role: str) -> dict[str, Any]:
    return {"role": role, "content": marker}


def marker_of(message_data: str) -> str:
    return str(json.loads(message_data)["content"])


@dataclass
class Acked:
    """An append the API acknowledged: its markers and the branch the worker believes it hit."""

    session_id: str
    branch_id: str
    markers: list[str]


@dataclass
class WorkerLog:
    """What one worker did and saw; returned to the parent for the audit."""

    worker: int
    appends: list[Acked] = field(default_factory=list)
    popped: list[tuple[str, str]] = field(default_factory=list)  # (session, marker)
    deleted: list[tuple[str, str]] = field(default_factory=list)  # (session, branch)
    cleared: list[str] = field(default_factory=list)
    # The own session's final state according to the worker's model: branch -> markers.
    own_model: dict[str, list[str]] = field(default_factory=dict)
    operations: Counter[str] = field(default_factory=Counter)
    documented_errors: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)


class OwnModel:
    """The exact expected content of a session only one worker writes."""

    def __init__(self) -> None:
        self.branches: dict[str, list[tuple[str, bool]]] = {"main": []}
        self.current = "main"

    def items(self, branch: str | None = None) -> list[str]:
        return [marker for marker, _ in self.branches.get(branch or self.current, [])]

    def user_turns(self) -> list[str]:
        return [marker for marker, is_user in self.branches[self.current] if is_user]


class Worker:
    """One process's workload (see the module docstring)."""

    def __init__(self, engine: AsyncEngine, prefix: str, worker: int, seed: int) -> None:
        self.rng = random.Random(seed * 1_000 + worker)
        self.log = WorkerLog(worker)
        self.worker = worker
        self.counter = 0
        self.own = AdvancedSession(session_id=own_session(prefix, worker), engine=engine)
        self.shared = AdvancedSession(session_id=shared_session(prefix), engine=engine)
        self.wild = AdvancedSession(session_id=wild_session(prefix), engine=engine)
        self.model = OwnModel()
        # Which branch this instance's pointer is on for the shared session (no clears there,
        # so the pointer is only ever changed by this worker).
        self.shared_branch = "main"

    def fresh_markers(self, count: int) -> list[str]:
        markers = [f"w{self.worker}-{self.counter}-{i}" for i in range(count)]
        self.counter += 1
        return markers

    def batch(self, markers: Sequence[str]) -> list[dict[str, Any]]:
        # The first item of a batch is a user message (a new turn) half of the time.
        opens_turn = self.rng.random() < 0.5
        return [
            item(marker, "user" if opens_turn and index == 0 else "assistant")
            for index, marker in enumerate(markers)
        ]

    async def run(self, ops: int) -> WorkerLog:
        for _ in range(ops):
            target = self.rng.random()
            if target < 0.4:
                await self.step_own()
            elif target < 0.7:
                await self.step_shared()
            else:
                await self.step_wild()
        self.log.own_model = {b: self.model.items(b) for b in self.model.branches}
        return self.log

    async def guarded(self, name: str, operation: Any) -> Any:
        """Run one API call; documented race errors are counted, anything else is a problem."""
        self.log.operations[name] += 1
        try:
            return await operation
        except DOCUMENTED_RACE_ERRORS as exc:
            self.log.documented_errors[f"{name}: {type(exc).__name__}"] += 1
        except Exception as exc:
            self.log.problems.append(f"worker {self.worker}: {name} raised {exc!r}")
        return None

    # -- the worker's own session: an exact model ------------------------------------------

    async def step_own(self) -> None:
        session, model = self.own, self.model
        choice = self.rng.random()
        if choice < 0.45:
            markers = self.fresh_markers(self.rng.randint(1, 3))
            batch = self.batch(markers)
            await self.guarded("own append", session.add_items(batch))
            model.branches[model.current].extend(
                (entry["content"], entry["role"] == "user") for entry in batch
            )
        elif choice < 0.6:
            stored = await self.guarded("own read", session.get_items())
            if stored is not None and [i["content"] for i in stored] != model.items():
                self.log.problems.append(
                    f"worker {self.worker}: own session branch {model.current!r} reads "
                    f"{[i['content'] for i in stored]}, expected {model.items()}"
                )
        elif choice < 0.7:
            popped = await self.guarded("own pop", session.pop_item())
            expected = model.branches[model.current].pop() if model.items() else None
            got = None if popped is None else popped["content"]
            if got != (None if expected is None else expected[0]):
                self.log.problems.append(
                    f"worker {self.worker}: own pop returned {got!r}, expected {expected!r}"
                )
        elif choice < 0.8:
            users = model.user_turns()
            if users:
                turn = self.rng.randint(1, len(users))
                name = await self.guarded("own branch", session.create_branch_from_turn(turn))
                if name is not None:
                    entries = model.branches[model.current]
                    cut = [m for m, _ in entries].index(users[turn - 1])
                    model.branches[name] = entries[:cut]
                    model.current = name
        elif choice < 0.88:
            # A branch without items does not exist for the API, so only those are chosen.
            existing = sorted(b for b, entries in model.branches.items() if entries)
            if existing:
                branch = self.rng.choice(existing)
                if await self.guarded("own switch", _completed(session.switch_to_branch(branch))):
                    model.current = branch
        elif choice < 0.95:
            others = sorted(b for b in model.branches if b not in ("main", model.current))
            if others:
                branch = self.rng.choice(others)
                if model.branches[branch]:
                    await self.guarded("own delete", session.delete_branch(branch))
                del model.branches[branch]
        elif choice < 0.97:
            await self.guarded("own clear", session.clear_session())
            model.branches, model.current = {"main": []}, "main"
        else:
            await self.guarded("own usage", session.store_run_usage(_run_result(self.rng)))
            await self.guarded("own usage read", session.get_session_usage())

    # -- the shared session without pops/clears: acknowledged appends are accounted -------

    async def step_shared(self) -> None:
        session = self.shared
        choice = self.rng.random()
        if choice < 0.5:
            markers = self.fresh_markers(self.rng.randint(1, 3))
            branch = self.shared_branch
            if await self.guarded("shared append", session.add_items(self.batch(markers))) is None:
                self.log.appends.append(Acked(session.session_id, branch, markers))
        elif choice < 0.65:
            await self.guarded("shared read", session.get_items())
        elif choice < 0.75:
            turns = await self.guarded("shared turns", session.get_conversation_turns())
            if turns:
                turn = self.rng.choice(turns)["turn"]
                name = await self.guarded("shared branch", session.create_branch_from_turn(turn))
                if name is not None:
                    self.shared_branch = name
        elif choice < 0.85:
            branches = await self.guarded("shared list", session.list_branches())
            if branches:
                branch = self.rng.choice(branches)["branch_id"]
                if await self.guarded(
                    "shared switch", _completed(session.switch_to_branch(branch))
                ):
                    self.shared_branch = branch
        elif choice < 0.92:
            branches = await self.guarded("shared list", session.list_branches())
            candidates = [
                b["branch_id"]
                for b in branches or []
                if b["branch_id"] not in ("main", self.shared_branch)
            ]
            if candidates:
                branch = self.rng.choice(candidates)
                deleting = session.delete_branch(branch)
                if await self.guarded("shared delete", _completed(deleting)):
                    self.log.deleted.append((session.session_id, branch))
        else:
            await self.guarded("shared usage", session.store_run_usage(_run_result(self.rng)))
            await self.guarded("shared usage read", session.get_turn_usage())

    # -- the wild session: everything, invariants only ------------------------------------

    async def step_wild(self) -> None:
        session = self.wild
        choice = self.rng.random()
        if choice < 0.4:
            markers = self.fresh_markers(self.rng.randint(1, 3))
            if await self.guarded("wild append", session.add_items(self.batch(markers))) is None:
                self.log.appends.append(Acked(session.session_id, "?", markers))
        elif choice < 0.5:
            await self.guarded("wild read", session.get_items())
        elif choice < 0.62:
            popped = await self.guarded("wild pop", session.pop_item())
            if popped is not None:
                self.log.popped.append((session.session_id, str(popped["content"])))
        elif choice < 0.72:
            turns = await self.guarded("wild turns", session.get_conversation_turns())
            if turns:
                turn = self.rng.choice(turns)["turn"]
                await self.guarded("wild branch", session.create_branch_from_turn(turn))
        elif choice < 0.8:
            branches = await self.guarded("wild list", session.list_branches()) or []
            if branches:
                branch = self.rng.choice(branches)["branch_id"]
                await self.guarded("wild switch", session.switch_to_branch(branch))
        elif choice < 0.87:
            branches = await self.guarded("wild list", session.list_branches()) or []
            candidates = [
                b["branch_id"] for b in branches if b["branch_id"] != "main" and not b["is_current"]
            ]
            if candidates:
                branch = self.rng.choice(candidates)
                if await self.guarded("wild delete", _completed(session.delete_branch(branch))):
                    self.log.deleted.append((session.session_id, branch))
        elif choice < 0.9:
            if await self.guarded("wild clear", _completed(session.clear_session())):
                self.log.cleared.append(session.session_id)
        else:
            await self.guarded("wild usage", session.store_run_usage(_run_result(self.rng)))
            await self.guarded("wild usage read", session.get_session_usage())


async def _completed(operation: Any) -> bool:
    """True once ``operation`` returned; lets ``guarded`` tell success from a counted error."""
    await operation
    return True


def _run_result(rng: random.Random) -> Any:
    """An object shaped like the SDK's RunResult, carrying only what store_run_usage reads."""
    from types import SimpleNamespace

    tokens = rng.randint(1, 100)
    usage = SimpleNamespace(
        requests=1,
        input_tokens=tokens,
        output_tokens=tokens,
        total_tokens=2 * tokens,
        input_tokens_details=None,
        output_tokens_details=None,
    )
    return SimpleNamespace(context_wrapper=SimpleNamespace(usage=usage))


async def _work(
    url: str, engine_options: dict[str, Any], prefix: str, worker: int, ops: int, seed: int
) -> WorkerLog:
    engine = create_async_engine(url, **engine_options)
    try:
        return await Worker(engine, prefix, worker, seed).run(ops)
    finally:
        await engine.dispose()


def work(
    url: str, engine_options: dict[str, Any], prefix: str, worker: int, ops: int, seed: int
) -> WorkerLog:
    """Process entry point: run one worker's operations and return its log."""
    return asyncio.run(_work(url, engine_options, prefix, worker, ops, seed))


# -- the audit -----------------------------------------------------------------------------


async def integrity_problems(conn: AsyncConnection, session_prefix: str) -> list[str]:
    """Referential and numbering invariants of every session whose id starts with a prefix.

    On SQLite the file's own integrity and foreign-key checks run as well.
    """
    t = DEFAULT_TABLES
    s, m, u, sessions = t.structure, t.messages, t.usage, t.sessions
    problems: list[str] = []
    if conn.dialect.name == "sqlite":
        verdict = (await conn.exec_driver_sql("PRAGMA integrity_check")).scalars().all()
        if verdict != ["ok"]:
            problems.append(f"PRAGMA integrity_check: {verdict}")
        broken = (await conn.exec_driver_sql("PRAGMA foreign_key_check")).all()
        if broken:
            problems.append(f"PRAGMA foreign_key_check: {broken[:10]}")

    def ours(column: Any) -> Any:
        return column.startswith(session_prefix, autoescape=True)

    async def report(what: str, query: Any) -> None:
        rows = (await conn.execute(query.limit(10))).all()
        if rows:
            problems.append(f"{what}: {[tuple(row) for row in rows]}")

    await report(
        "structure rows pointing at no message of their session",
        select(s.c.session_id, s.c.id, s.c.message_id)
        .outerjoin(m, and_(m.c.id == s.c.message_id, m.c.session_id == s.c.session_id))
        .where(ours(s.c.session_id), m.c.id.is_(None)),
    )
    for table in (m, s, u):
        await report(
            f"{table.name} rows without a session row",
            select(table.c.session_id, table.c.id)
            .outerjoin(sessions, sessions.c.session_id == table.c.session_id)
            .where(ours(table.c.session_id), sessions.c.session_id.is_(None)),
        )
    await report(
        "messages no branch refers to",
        select(m.c.session_id, m.c.id)
        .outerjoin(s, and_(s.c.message_id == m.c.id, s.c.session_id == m.c.session_id))
        .where(ours(m.c.session_id), s.c.id.is_(None)),
    )
    await report(
        "usage rows for a turn that has no items",
        select(u.c.session_id, u.c.branch_id, u.c.user_turn_number)
        .outerjoin(
            s,
            and_(
                s.c.session_id == u.c.session_id,
                s.c.branch_id == u.c.branch_id,
                s.c.user_turn_number == u.c.user_turn_number,
            ),
        )
        .where(ours(u.c.session_id), s.c.id.is_(None)),
    )
    await report(
        "sequence numbers used twice in a session",
        select(s.c.session_id, s.c.sequence_number, func.count())
        .where(ours(s.c.session_id))
        .group_by(s.c.session_id, s.c.sequence_number)
        .having(func.count() > 1),
    )
    rows = (
        await conn.execute(
            select(s.c.session_id, s.c.branch_id, s.c.message_type, s.c.user_turn_number)
            .where(ours(s.c.session_id))
            .order_by(s.c.session_id, s.c.branch_id, s.c.sequence_number)
        )
    ).all()
    user_turns: dict[tuple[str, str], list[int]] = defaultdict(list)
    for session_id, branch_id, message_type, turn in rows:
        if message_type == "user":
            user_turns[session_id, branch_id].append(turn)
    for (session_id, branch_id), turns in user_turns.items():
        if turns != list(range(1, len(turns) + 1)):
            problems.append(f"user turns of {session_id}/{branch_id} run {turns}, not 1..N")
    return problems


async def stored_markers(
    conn: AsyncConnection, session_prefix: str
) -> dict[str, dict[str, list[str]]]:
    """Markers of the run's items: session -> branch -> markers in sequence order."""
    s, m = DEFAULT_TABLES.structure, DEFAULT_TABLES.messages
    rows = await conn.execute(
        select(s.c.session_id, s.c.branch_id, m.c.message_data)
        .join(m, and_(m.c.id == s.c.message_id, m.c.session_id == s.c.session_id))
        .where(s.c.session_id.startswith(session_prefix, autoescape=True))
        .order_by(s.c.session_id, s.c.branch_id, s.c.sequence_number)
    )
    stored: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for session_id, branch_id, data in rows:
        stored[session_id][branch_id].append(marker_of(data))
    return stored


def accounting_problems(
    prefix: str, logs: Sequence[WorkerLog], stored: dict[str, dict[str, list[str]]]
) -> list[str]:
    """Compare what the workers were told with what the database holds."""
    problems: list[str] = []
    for log in logs:
        session_id = own_session(prefix, log.worker)
        actual = dict(stored.get(session_id, {}))
        expected = {b: markers for b, markers in log.own_model.items() if markers}
        if actual != expected:
            problems.append(f"{session_id} holds {actual}, its worker expected {expected}")

    for session_id in (shared_session(prefix), wild_session(prefix)):
        for branch, markers in stored.get(session_id, {}).items():
            doubled = [marker for marker, n in Counter(markers).items() if n > 1]
            if doubled:
                problems.append(f"{session_id}/{branch} stores {doubled} more than once")

    acked = {m for log in logs for append in log.appends for m in append.markers}
    for session_id in (shared_session(prefix), wild_session(prefix)):
        present = {m for markers in stored.get(session_id, {}).values() for m in markers}
        unacked = sorted(present - acked)
        if unacked:
            problems.append(f"{session_id} stores markers no call acknowledged: {unacked[:10]}")

    shared = shared_session(prefix)
    deleted = {branch for log in logs for session, branch in log.deleted if session == shared}
    on_branch = stored.get(shared, {})
    for log in logs:
        order: dict[str, list[str]] = defaultdict(list)
        for append in log.appends:
            if append.session_id != shared:
                continue
            order[append.branch_id].extend(append.markers)
        for branch, markers in order.items():
            stored_here = [m for m in on_branch.get(branch, []) if m.startswith(f"w{log.worker}-")]
            if branch in deleted:
                # A deletion removed some prefix of them; what remains keeps its order.
                if stored_here != [m for m in markers if m in set(stored_here)]:
                    problems.append(f"{shared}/{branch}: worker {log.worker}'s items reordered")
                continue
            # Earlier appends may also be here, copied in when the branch was forked.
            appended_here = [m for m in stored_here if m in set(markers)]
            if appended_here != markers:
                problems.append(
                    f"{shared}/{branch}: worker {log.worker} appended {markers}, "
                    f"stored {appended_here}"
                )
    return problems


@dataclass
class StressReport:
    """Outcome of a run: what ran, and every violated invariant (empty if none)."""

    prefix: str
    seconds: float
    operations: Counter[str]
    documented_errors: Counter[str]
    problems: list[str]

    def summary(self) -> str:
        lines = [
            f"run {self.prefix}: {sum(self.operations.values())} operations in {self.seconds:.1f}s",
            "operations: " + ", ".join(f"{k}={v}" for k, v in sorted(self.operations.items())),
            "documented errors: "
            + (", ".join(f"{k}={v}" for k, v in sorted(self.documented_errors.items())) or "none"),
        ]
        lines += [f"PROBLEM: {p}" for p in self.problems] or ["no problems found"]
        return "\n".join(lines)


async def run_stress(
    url: str,
    *,
    processes: int,
    ops: int,
    seed: int,
    engine_options: dict[str, Any] | None = None,
    keep: bool = True,
) -> StressReport:
    """Run ``processes`` worker processes of ``ops`` operations each, then audit the store.

    With ``keep=False`` the run's rows are deleted after the audit.
    """
    options = engine_options or {}
    prefix = f"stress-{uuid.uuid4().hex[:8]}"
    engine = create_async_engine(url, **options)
    try:
        # Create the schema once, before the race (as a deployment's migration step would).
        await AdvancedSession(session_id=prefix, engine=engine, create_tables=True).get_items()
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(processes, mp_context=process_context()) as pool:
            logs: list[WorkerLog] = await asyncio.gather(
                *(
                    loop.run_in_executor(pool, work, url, options, prefix, worker, ops, seed)
                    for worker in range(processes)
                )
            )
        seconds = time.monotonic() - started
        async with engine.connect() as conn:
            problems = [p for log in logs for p in log.problems]
            problems += await integrity_problems(conn, prefix)
            problems += accounting_problems(prefix, logs, await stored_markers(conn, prefix))
        if not keep:
            async with engine.begin() as conn:
                for table in reversed(DEFAULT_TABLES.metadata.sorted_tables):
                    if "session_id" in table.c:
                        await conn.execute(
                            delete(table).where(table.c.session_id.startswith(prefix))
                        )
    finally:
        await engine.dispose()
    return StressReport(
        prefix,
        seconds,
        _sum(log.operations for log in logs),
        _sum(log.documented_errors for log in logs),
        problems,
    )


# Imported once by the fork server, so that each worker starts in milliseconds rather than
# importing the Agents SDK (seconds on a loaded machine) again. Missing modules are skipped.
PRELOADED_MODULES = [
    "agents",
    "aiosqlite",
    "asyncmy",
    "asyncpg",
    "sqlalchemy.ext.asyncio",
    "turnstore.session",
    "scripts.stress",
    "tests.crash_worker",
]


def process_context() -> SpawnContext | ForkServerContext:
    """Where available, a fork server with the heavy imports done; spawn elsewhere."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Only takes effect before the server first starts; every caller asks for the same list.
    context.set_forkserver_preload(PRELOADED_MODULES)
    return context


def _sum(counters: Iterable[Counter[str]]) -> Counter[str]:
    total: Counter[str] = Counter()
    for counter in counters:
        total.update(counter)
    return total


def _resolve_url(backend: str, url: str | None) -> str:
    if url is None and backend == "sqlite":
        directory = Path(tempfile.mkdtemp(prefix="turnstore-stress-"))
        return f"sqlite+aiosqlite:///{directory / 'stress.db'}"
    url = url or os.environ.get(BACKEND_URL_VARIABLES.get(backend, ""), "")
    if not url:
        raise SystemExit(f"--url is required for {backend} (or {BACKEND_URL_VARIABLES[backend]})")
    dialect = make_url(url).get_backend_name()
    wanted = BACKEND_DIALECTS[backend]
    if dialect not in (wanted if isinstance(wanted, tuple) else (wanted,)):
        raise SystemExit(f"--url is a {dialect} URL, not {backend}")
    return url


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the stress workload and print the audit; exit 1 on any problem."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--backend", choices=sorted(BACKEND_DIALECTS), required=True)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--ops", type=int, default=100, help="operations per process")
    parser.add_argument("--url", help="database URL (SQLite: a temporary file by default)")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--keep", action="store_true", help="keep the run's rows afterwards")
    args = parser.parse_args(argv)
    url = _resolve_url(args.backend, args.url)
    print(f"{args.backend}: {args.processes} processes x {args.ops} ops, seed {args.seed}")
    report = asyncio.run(run_stress(url, processes=args.processes, ops=args.ops, seed=args.seed))
    print(report.summary())
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
