"""Completion: running the scheduled jobs and settling what became of their messages.

The last stretch of a message's journey. The accumulator hands each cut batch here (``_emit``),
which counts it and queues it with the scheduler; the scheduler starts it (``_start_job``) as a
task on the processor's loop that runs it through ``_execution`` (``_run``). Execution reports
each outcome back: processed (``_succeeded``) or dead (``_dead_in_flight``), and dead letters go
to the outbox (``_send_dead``) and count only once stored (``_delivered``). Either way the
message is finished and its room given back to admission (``_release``). ``_job_done`` wakes
whoever waits for jobs (flush, stop) and producers left waiting with nothing running.

Like ``_admission``, this is a base class of BatchProcessor rather than an object it holds: the
counts settled here are the ones its stats and inline add paths read, and the callbacks passed
to the accumulator, scheduler, execution and outbox are bound once in the processor's
constructor, so the engine pays no extra lookup per batch. The processor owns the instance and
creates the state in its ``__init__``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from batchpunk._admission import Admission
from batchpunk._execution import Execution
from batchpunk._jobs import Job
from batchpunk._outbox import Entry, Outbox, shutdown_entries
from batchpunk.deadletter import DeadLetter
from batchpunk.errors import BatchpunkError, ProcessorClosed

__all__ = ["Completion"]

log = logging.getLogger("batchpunk")


class Completion(Admission):
    """The completion half of BatchProcessor: jobs run, outcomes settled, counts kept."""

    # State the processor creates in __init__ (see there); declared here for the type checker.
    dead_letters: list[DeadLetter]
    _loop: asyncio.AbstractEventLoop | None
    _tasks: set[asyncio.Task[None]]
    _exec: Execution
    _outbox: Outbox | None
    _finished: int
    _processed: int
    _in_flight: int
    _dead_count: int
    _dead_reasons: dict[str, int]
    _job_waiters: list[list[Any]]

    if TYPE_CHECKING:
        # The processor's stats, read for the gauges after each job.
        @property
        def pending(self) -> int: ...

        @property
        def circuit(self) -> str: ...

    # -- jobs ------------------------------------------------------------------------------
    def _emit(self, job: Job) -> None:
        self._unfinished_jobs += 1
        size = len(job.batch)
        self._observer.received(size)
        self._observer.batch_cut(size, job.nbytes, job.batch.flush_reason)
        self._sched.push(job)

    def _start_job(self, job: Job) -> None:
        # The processor's own loop, not the running one: a nowait add between two
        # run_until_complete calls schedules the batch for when that loop runs again.
        assert self._loop is not None
        task = self._loop.create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(partial(self._run_ended, job))

    def _run_ended(self, job: Job, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if job.running:
            # Cancelled (stop() past drain_timeout) before its first step: _run never ran, so
            # neither its dead letters nor its release did.
            self._sched.release(job)
            self._shut_out(job, ProcessorClosed("the processor stopped before this batch ran"))

    def _shut_out(self, job: Job, error: BaseException) -> None:
        """Dead-letter a job stop() left unprocessed (reason "shutdown"); it is done."""
        batch = job.batch
        self._send_dead(
            shutdown_entries(batch, batch.key, batch.priority, job.trackers, job.first_wall, error)
        )
        self._job_done(job)

    async def _run(self, job: Job) -> None:
        self._in_flight += len(job.batch)
        try:
            await self._exec.run(job)
        except asyncio.CancelledError:
            pass  # stop() cancelled it; its messages were dead-lettered as "shutdown"
        finally:
            self._sched.release(job)
            self._job_done(job)

    def _job_done(self, job: Job) -> None:
        self._unfinished_jobs -= 1
        if self._unfinished_jobs == 0 and self._room_waiters:
            # Producers still wait and nothing will finish to wake them: cut for them.
            self._relieve_pressure()
        if self._job_waiters:
            for waiter in self._job_waiters:
                if job.seq <= waiter[0]:
                    waiter[1] -= 1
                    if waiter[1] == 0 and not waiter[2].done():
                        waiter[2].set_result(None)
            self._job_waiters = [w for w in self._job_waiters if w[1] > 0]
        self._observer.gauges(self.pending, self._in_flight, self.circuit)

    async def _wait_jobs(self, seconds: float | None) -> bool:
        """Wait until every job cut so far finished; False on timeout."""
        if self._unfinished_jobs == 0:
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._job_waiters.append([self._acc.seq, self._unfinished_jobs, future])
        try:
            await asyncio.wait_for(asyncio.shield(future), seconds)
        except TimeoutError:
            return False
        return True

    # -- outcomes --------------------------------------------------------------------------
    def _succeeded(self, count: int, latency: float) -> None:
        self._in_flight -= count
        self._processed += count
        self._observer.processed(count, latency)
        self._release(count)

    def _dead_in_flight(self, entries: list[Entry]) -> None:
        self._in_flight -= len(entries)
        self._send_dead(entries)

    def _send_dead(self, entries: Sequence[Entry]) -> None:
        if self._outbox is not None:
            self._outbox.add(entries)
            return
        self.dead_letters.extend(letter for letter, _ in entries)
        self._delivered(entries)
        reasons = sorted({letter.reason for letter, _ in entries})
        log.warning(
            "%d message(s) dead-lettered (reason: %s); kept in processor.dead_letters, "
            "pass dead_letter= to store them",
            len(entries),
            ", ".join(reasons),
            extra={"size": len(entries), "reason": reasons[0]},
        )

    def _delivered(self, entries: Sequence[Entry]) -> None:
        """Letters are stored: the messages are finished, their futures fail now."""
        counts: dict[str, int] = {}
        for letter, tracker in entries:
            counts[letter.reason] = counts.get(letter.reason, 0) + 1
            if tracker is not None and not tracker.done():
                error = letter.error
                if error is None:
                    error = BatchpunkError(f"message dead-lettered ({letter.reason})")
                tracker.set_exception(error)
        for reason, count in counts.items():
            self._dead_reasons[reason] = self._dead_reasons.get(reason, 0) + count
            self._observer.dead_lettered(count, reason)
        self._dead_count += len(entries)
        self._release(len(entries))

    def _release(self, count: int) -> None:
        self._finished += count
        self._give_room(count)
