"""Run queued synchronous jobs on one worker thread, in groups.

A :class:`GroupRunner` owns one thread. Jobs submitted from an event loop queue up; while the
thread is busy, newcomers wait, and the thread then takes all of them at once and hands them
to a *group function* that runs them together (in one transaction, or on one connection). A
caller is answered when its group finishes. Grouping costs nothing when there is no
contention (a job alone is a group of one) and turns many thread hops and transaction
boundaries into few when there is.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy.engine import Connection

T = TypeVar("T")

#: A job: a synchronous function of a connection.
Job = Callable[[Connection], Any]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one job of a group returned or raised."""

    value: Any = None
    error: BaseException | None = None

    def unwrap(self) -> Any:
        """The value, or raise the error."""
        if self.error is not None:
            raise self.error
        return self.value

    @staticmethod
    def of(job: Job, conn: Connection) -> Outcome:
        """Run ``job`` and capture its result or its exception."""
        try:
            return Outcome(value=job(conn))
        except Exception as exc:
            return Outcome(error=exc)


#: Runs a group of jobs and returns one outcome per job, in order. If it raises, every job of
#: the group fails with that exception.
GroupFunction = Callable[[list[Job]], list[Outcome]]


@dataclass(slots=True)
class _Queued(Generic[T]):
    job: Job
    answer: asyncio.Future[T]


class GroupRunner:
    """One worker thread that runs the jobs queued while it was busy as one group.

    All submissions must come from one event loop (turnstore keeps a runner per loop).

    Args:
        run_group: Runs a group of jobs on the worker thread.
        name: Thread name prefix, for debuggers and profilers.
    """

    def __init__(self, run_group: GroupFunction, name: str) -> None:
        self._run_group = run_group
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._queued: list[_Queued[Any]] = []
        self._busy = False

    async def run(self, job: Callable[[Connection], T]) -> T:
        """Queue ``job`` and return its result once its group has finished.

        If the caller is cancelled, the job still runs (it may already have); only the answer
        is dropped.
        """
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[T] = loop.create_future()
        self._queued.append(_Queued(job, answer))
        if not self._busy:
            self._start(loop)
        return await answer

    async def call(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the worker thread on its own, after the running group."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, function)

    def shutdown(self) -> None:
        """Let the thread finish queued work and exit; no new jobs may be submitted."""
        self._thread.shutdown(wait=False)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        group, self._queued = self._queued, []
        try:
            running = self._thread.submit(self._run_group, [queued.job for queued in group])
        except RuntimeError as exc:  # shut down: nothing will run these
            for queued in group:
                if not queued.answer.done():
                    queued.answer.set_exception(exc)
            return
        self._busy = True
        running.add_done_callback(lambda finished: self._report(loop, group, finished))

    def _report(
        self,
        loop: asyncio.AbstractEventLoop,
        group: list[_Queued[Any]],
        finished: concurrent.futures.Future[list[Outcome]],
    ) -> None:
        """Hand a finished group back to its loop (runs on the worker thread)."""
        # A loop that closed meanwhile has no one left to answer.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._finish, loop, group, finished)

    def _finish(
        self,
        loop: asyncio.AbstractEventLoop,
        group: list[_Queued[Any]],
        finished: concurrent.futures.Future[list[Outcome]],
    ) -> None:
        try:
            outcomes = finished.result()
        except BaseException as exc:
            outcomes = [Outcome(error=exc)] * len(group)
        for queued, outcome in zip(group, outcomes, strict=True):
            if queued.answer.done():  # its caller was cancelled
                continue
            if outcome.error is not None:
                queued.answer.set_exception(outcome.error)
            else:
                queued.answer.set_result(outcome.value)
        self._busy = False
        if self._queued:
            self._start(loop)
