"""Group commit on SQLite: writes queued behind a busy writer thread share one transaction.

Each unit keeps its own outcome: a failing unit is rolled back alone (savepoint), the others
commit; a caller is answered only after the group has committed.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from pathlib import Path

import pytest
from sqlalchemy.engine import Connection

from tests.helpers import turn
from turnstore import AdvancedSQLiteSession, BranchNameTakenError
from turnstore.persistence.batching import GroupRunner, Job, Outcome
from turnstore.persistence.engines import ThreadedEngineHandle


class _RecordingGroups:
    """A group function that records group sizes and can hold the first group."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.release_first = threading.Event()
        self.first_started = threading.Event()

    def __call__(self, jobs: list[Job]) -> list[Outcome]:
        self.sizes.append(len(jobs))
        if len(self.sizes) == 1:
            self.first_started.set()
            self.release_first.wait(timeout=10)
        return [Outcome.of(job, None) for job in jobs]  # type: ignore[arg-type]


async def _wait_for(event: threading.Event) -> None:
    await asyncio.get_running_loop().run_in_executor(None, event.wait, 10)


async def test_jobs_queued_while_busy_run_as_one_group() -> None:
    groups = _RecordingGroups()
    runner = GroupRunner(groups, "test-runner")
    first = asyncio.ensure_future(runner.run(lambda _conn: "first"))
    await _wait_for(groups.first_started)

    def job(n: int) -> Job:
        return lambda _conn: n

    rest = [asyncio.ensure_future(runner.run(job(n))) for n in range(5)]
    await asyncio.sleep(0)
    groups.release_first.set()
    assert await first == "first"
    assert await asyncio.gather(*rest) == [0, 1, 2, 3, 4]
    assert groups.sizes == [1, 5]
    runner.shutdown()


async def test_a_failing_job_fails_alone_and_a_failing_group_fails_everyone() -> None:
    def fail(_conn: Connection) -> None:
        raise ValueError("this job fails")

    groups = _RecordingGroups()
    groups.release_first.set()
    runner = GroupRunner(groups, "test-runner")
    outcomes = await asyncio.gather(
        runner.run(lambda _conn: 1),
        runner.run(fail),
        runner.run(lambda _conn: 3),
        return_exceptions=True,
    )
    assert outcomes[0] == 1
    assert outcomes[2] == 3
    assert isinstance(outcomes[1], ValueError)
    runner.shutdown()

    def broken_commit(jobs: list[Job]) -> list[Outcome]:
        raise OSError("disk full")

    broken = GroupRunner(broken_commit, "test-broken")
    results = await asyncio.gather(
        broken.run(lambda _conn: 1), broken.run(lambda _conn: 2), return_exceptions=True
    )
    assert all(isinstance(result, OSError) for result in results)
    broken.shutdown()


async def test_failing_unit_in_a_group_is_rolled_back_alone(
    sqlite_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    group_sizes: list[int] = []
    write_group = ThreadedEngineHandle._write_group

    def recording_write_group(self: ThreadedEngineHandle, jobs: list[Job]) -> list[Outcome]:
        group_sizes.append(len(jobs))
        return write_group(self, jobs)

    monkeypatch.setattr(ThreadedEngineHandle, "_write_group", recording_write_group)
    sessions = [
        AdvancedSQLiteSession(session_id=f"s{n}", db_path=sqlite_path, create_tables=True)
        for n in range(12)
    ]
    for session in sessions:
        await session.add_items(turn(f"opening {session.session_id}"))
    await sessions[0].add_items(turn("second s0"))
    await sessions[0].create_branch_from_turn(2, "taken")
    await sessions[0].switch_to_branch("main")

    # Many writers at once while the writer thread is held busy: all twelve queue behind it
    # and run as one group, with one unit that must fail (the branch name is taken) in the
    # middle.
    held, holding_started = threading.Event(), threading.Event()

    def hold(_conn: Connection) -> bool:
        holding_started.set()
        return held.wait(10)

    handle = sessions[0]._binding().handle
    assert isinstance(handle, ThreadedEngineHandle)
    holding = asyncio.ensure_future(handle.write(hold))
    await _wait_for(holding_started)
    writes = asyncio.gather(
        *(session.add_items(turn(f"second {session.session_id}")) for session in sessions[1:6]),
        sessions[0].create_branch_from_turn(2, "taken"),
        *(session.add_items(turn(f"second {session.session_id}")) for session in sessions[6:]),
        return_exceptions=True,
    )
    # Nothing signals "queued"; poll until every write waits behind the held one.
    while len(handle._writer._queue.queued) < 12:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    held.set()
    outcomes = await writes
    assert await holding
    assert group_sizes[-2:] == [1, 12]
    failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert len(failures) == 1
    assert isinstance(failures[0], BranchNameTakenError)
    for session in sessions[1:]:
        assert await session.get_items() == turn(f"opening {session.session_id}") + turn(
            f"second {session.session_id}"
        )
    assert [branch["branch_id"] for branch in await sessions[0].list_branches()] == [
        "main",
        "taken",
    ]
    assert await sessions[0].get_items() == turn("opening s0") + turn("second s0")
    for session in sessions:
        await session.aclose()


async def test_jobs_submitted_after_shutdown_fail_instead_of_waiting_forever() -> None:
    groups = _RecordingGroups()
    groups.release_first.set()
    runner = GroupRunner(groups, "test-runner")
    assert await runner.run(lambda _conn: "before") == "before"
    runner.shutdown()
    for _ in range(2):  # the runner must not be left thinking a group is running
        with pytest.raises(RuntimeError, match="shutdown"):
            await asyncio.wait_for(runner.run(lambda _conn: "after"), timeout=10)


async def test_work_runs_in_submission_order_with_lone_functions_between_groups() -> None:
    groups = _RecordingGroups()
    runner = GroupRunner(groups, "test-runner")
    order: list[str] = []
    first = asyncio.ensure_future(runner.run(lambda _conn: order.append("held")))
    await _wait_for(groups.first_started)

    def job(name: str) -> Job:
        return lambda _conn: order.append(name)

    queued = [
        asyncio.ensure_future(runner.run(job("a"))),
        asyncio.ensure_future(runner.run(job("b"))),
        asyncio.ensure_future(runner.call(lambda: order.append("alone"))),
        asyncio.ensure_future(runner.run(job("c"))),
    ]
    await asyncio.sleep(0)
    groups.release_first.set()
    await asyncio.gather(first, *queued)
    assert order == ["held", "a", "b", "alone", "c"]
    assert groups.sizes == [1, 2, 1]
    runner.shutdown()


async def test_a_function_that_raises_fails_its_caller_only() -> None:
    groups = _RecordingGroups()
    groups.release_first.set()
    runner = GroupRunner(groups, "test-runner")

    def fail() -> None:
        raise LookupError("from the worker")

    with pytest.raises(LookupError, match="from the worker"):
        await runner.call(fail)
    assert await runner.run(lambda _conn: "still working") == "still working"
    runner.shutdown()


def test_a_discarded_runner_stops_its_thread() -> None:
    async def use_and_drop() -> threading.Thread:
        groups = _RecordingGroups()
        groups.release_first.set()
        runner = GroupRunner(groups, "test-discarded-runner")
        assert await runner.run(lambda _conn: 1) == 1
        thread = runner._thread
        assert thread is not None
        return thread

    thread = asyncio.run(use_and_drop())
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


async def test_shutdown_lets_queued_work_finish_then_ends_the_thread() -> None:
    groups = _RecordingGroups()
    runner = GroupRunner(groups, "test-runner")
    first = asyncio.ensure_future(runner.run(lambda _conn: "first"))
    await _wait_for(groups.first_started)
    second = asyncio.ensure_future(runner.run(lambda _conn: "second"))
    await asyncio.sleep(0)
    runner.shutdown()
    groups.release_first.set()
    assert list(await asyncio.gather(first, second)) == ["first", "second"]
    thread = runner._thread
    assert thread is not None
    await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)
    assert not thread.is_alive()
