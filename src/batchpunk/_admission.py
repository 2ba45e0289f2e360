"""Admission: room under max_pending, producers waiting for it, and what overflow does.

A message is admitted before it reaches its lane. Room is one integer, ``_room``: it starts at 0
(not yet started), loses one per admitted message, gains one per finished message, and drops far
below 0 once stop() begins, so the add paths test one compare for "running and not full". When
there is no room, the overflow policy decides: BLOCK waits for room (``_accept``), RAISE refuses,
DROP_NEW dead-letters the new message, DROP_OLDEST dead-letters the oldest message not yet
running (which the accumulator picks, ``Accumulator.take_oldest``) and admits the new one.

BatchProcessor inherits this class rather than holding one: its inline add paths (the hot path of
add_message_nowait, add_message and submit) read and write ``_room`` at the cost of one attribute,
where a separate object would add a lookup per message (a measurable share of bench/core.py). So
this module holds the code and documents the state; the processor owns the instance.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any

from batchpunk._accumulator import Accumulator, Lane
from batchpunk._jobs import Job, Tracker
from batchpunk._outbox import Entry, Outbox, build_letter
from batchpunk._scheduler import Scheduler
from batchpunk.config import BatchConfig, OverflowPolicy
from batchpunk.deadletter import DeadLetter
from batchpunk.errors import BufferFull, ProcessorClosed
from batchpunk.metrics import Observer

__all__ = ["Admission", "check_key"]


def check_key(key: Any, priority: Any) -> None:
    """ValueError unless the key is hashable and the priority an int (what a lane needs)."""
    if type(priority) is not int:
        raise ValueError(f"priority: expected an int, got {priority!r}")
    try:
        hash(key)
    except TypeError:
        raise ValueError(f"key: expected a hashable value, got {key!r}") from None


class Admission:
    """The admission half of BatchProcessor: room, waiting producers, overflow policies."""

    # State the processor creates in __init__ (see there); declared here for the type checker.
    config: BatchConfig
    _room: int
    _open: bool
    _started: bool
    _plain: bool
    _cut_at: int
    _acc: Accumulator
    _default: Lane
    _items: list[Any]
    _sched: Scheduler
    _observer: Observer
    _unfinished_jobs: int
    _capacity: int
    _outbox: Outbox | None
    _room_waiters: deque[asyncio.Future[None]]

    # What admission hands on to completion (_completion.Completion overrides these): dead
    # letters and jobs emptied by a drop.
    def _send_dead(self, entries: Sequence[Entry]) -> None:
        raise NotImplementedError

    def _job_done(self, job: Job) -> None:
        raise NotImplementedError

    # -- admitting -------------------------------------------------------------------------
    async def _accept(self, message: Any, key: Any, priority: int, tracker: Tracker) -> None:
        """Accept with a completion tracker, waiting for room under BLOCK (pipelines use it)."""
        while True:
            if not self._open:
                raise self._closed_error()
            if self._room > 0:
                self._track(message, key, priority, tracker)
                return
            if self.config.overflow is not OverflowPolicy.BLOCK and not self._letters_fill():
                self._refuse(message, key, priority, tracker)
                return
            # BLOCK, or a drop policy whose letters wait for a dead-letter sink that does not
            # store them: wait for room.
            await self._wait_for_room()

    async def _wait_for_room(self) -> None:
        """Wait in line until room returns (or stop() wakes every waiter); check again after."""
        self._relieve_pressure()
        waiter = asyncio.get_running_loop().create_future()
        self._room_waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            self._leave_queue(waiter)
            raise

    def _offer(self, message: Any, key: Any, priority: int, tracker: Tracker) -> bool:
        """Accept with a tracker if there is room now; False means: await ``_accept`` instead.

        Lets a caller skip a coroutine per message while the buffer has room.
        """
        if self._room > 0:
            self._track(message, key, priority, tracker)
            return True
        return False

    def _track(self, message: Any, key: Any, priority: int, tracker: Tracker) -> None:
        """Accept a message, with a completion tracker or None; the caller checked for room."""
        if key is None and priority == 0 and self._plain:
            lane = self._default
            items = self._items
            if tracker is not None:
                trackers = lane.trackers
                if trackers is None:
                    trackers = lane.trackers = {}
                trackers[len(items)] = tracker
            items.append(message)
            self._room -= 1
            size = len(items)
            if size == 1:
                self._acc.arm(lane)
            if size >= self._cut_at:
                self._acc.cut(lane, "size")
        else:
            self._add(message, key, priority, tracker)

    def _add(self, message: Any, key: Any, priority: int, tracker: Tracker) -> None:
        check_key(key, priority)
        self._acc.add(message, key, priority, tracker)
        self._room -= 1

    def _closed_error(self) -> ProcessorClosed:
        if not self._started:
            return ProcessorClosed("the processor is not running: await start() first")
        return ProcessorClosed("the processor is stopping or stopped: no new messages")

    # -- overflow --------------------------------------------------------------------------
    def _refuse(self, message: Any, key: Any, priority: int, tracker: Tracker) -> None:
        """The slow path: closed, or full under the overflow policy."""
        if not self._open:
            raise self._closed_error()
        check_key(key, priority)  # before a drop policy acts: a bad key changes nothing
        self._relieve_pressure()
        policy = self.config.overflow
        if policy is OverflowPolicy.BLOCK or policy is OverflowPolicy.RAISE:
            raise BufferFull(
                f"max_pending={self.config.max_pending} messages are unfinished "
                f"(overflow={policy.value}); retry later or use await add_message()"
            )
        if self._letters_fill():
            raise BufferFull(
                f"max_pending={self.config.max_pending} dead letters wait for the dead-letter "
                f"sink, which is not storing them (overflow={policy.value} drops no more); "
                "retry later or use await add_message()"
            )
        if policy is OverflowPolicy.DROP_OLDEST and self._drop_oldest():
            self._add(message, key, priority, tracker)
            return
        self._room -= 1  # accepted, and unfinished until its letter is stored
        self._observer.received(1)  # never cut, so _emit() does not count it
        self._send_dead([(self._dropped_letter(message, key, priority), tracker)])

    def _letters_fill(self) -> bool:
        """Letters waiting for a dead-letter sink that is behind (failing, or busy with a write)
        fill max_pending: a drop policy must not add more (memory would grow without bound while
        the sink is down or hangs). A burst for a sink not yet given its letters does not count."""
        outbox = self._outbox
        return outbox is not None and outbox.behind and len(outbox) >= self._capacity

    def _dropped_letter(self, message: Any, key: Any, priority: int) -> DeadLetter:
        error = BufferFull(
            f"dropped by overflow={self.config.overflow.value}: "
            f"max_pending={self.config.max_pending} messages were unfinished"
        )
        return build_letter(message, key, priority, "dropped", error)

    def _drop_oldest(self) -> bool:
        """Dead-letter the oldest message not yet running; False when all are running."""
        taken = self._acc.take_oldest(self._sched.waiting())
        if taken is None:
            return False
        message, key, priority, tracker, job = taken
        if job is None:
            self._observer.received(1)  # left its lane uncut: _emit() does not count it
        elif not job.batch:
            self._sched.remove(job)
            self._job_done(job)
        self._send_dead([(self._dropped_letter(message, key, priority), tracker)])
        return True

    def _relieve_pressure(self) -> None:
        """Full with nothing running or queued: cut the oldest lane, or nobody ever makes room."""
        if self._unfinished_jobs == 0:
            lane = self._acc.oldest()
            if lane is not None:
                self._acc.cut(lane, "pressure")

    # -- room coming back ------------------------------------------------------------------
    def _give_room(self, count: int, wake: int | None = None) -> None:
        """``count`` messages finished: their room returns and as many waiting producers wake
        (or ``wake`` of them)."""
        self._room += count
        waiters = self._room_waiters
        left = count if wake is None else wake
        while left > 0 and waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                left -= 1

    def _leave_queue(self, waiter: asyncio.Future[None]) -> None:
        """A producer waiting for room leaves by an exception (a cancel, a timeout around it).

        Woken already, it took a wake-up that room gave: hand that on to the next producer,
        or the next one waits while there is room.
        """
        if not waiter.done():
            waiter.cancel()
            self._room_waiters.remove(waiter)
        elif self._room > 0 and self._open:
            self._give_room(0, wake=1)

    def _close_admission(self, closed: int) -> None:
        """stop() began: take ``closed`` from the room and wake every waiting producer.

        They wake to find the processor closed and raise ProcessorClosed.
        """
        self._open = False
        self._room -= closed
        while self._room_waiters:
            waiter = self._room_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
