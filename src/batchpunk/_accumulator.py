"""Accumulating: messages wait in lanes, one per (key, priority), until a trigger cuts a batch.

A lane holds its messages in a Batch that is handed over whole when cut, so cutting never copies.
Time triggers are loop deadlines (``call_at``), one timer per lane at a time: a cut leaves the
lane's timer running, and when it fires it cuts the lane only if the lane's current first message
has waited max_wait, else it re-arms for that message's deadline. A busy lane, cut on size many
times per max_wait, so costs one timer per max_wait rather than a TimerHandle created and
cancelled per batch (each also a heap push and a cancelled entry for the loop to sweep).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from batchpunk._jobs import Job, Tracker, Trackers, pick
from batchpunk.batch import Batch
from batchpunk.config import BatchConfig, BatchTrigger

__all__ = ["Accumulator", "Lane"]


class Lane:
    """Messages of one (key, priority) waiting to become a batch.

    ``items`` is one list for the lane's whole life (the processor's inline add path holds it);
    a cut copies it into a Batch, a cost of a few nanoseconds per message paid once per batch.
    ``trackers`` stays None until a message with a tracker (submit, pipelines) arrives, so the
    plain add path pays for nothing but the list slot. ``times`` is kept only with message_ttl.
    """

    __slots__ = (
        "first_seen",
        "first_wall",
        "items",
        "key",
        "nbytes",
        "priority",
        "timer",
        "times",
        "trackers",
    )

    def __init__(self, key: Any, priority: int, keep_times: bool) -> None:
        self.key = key
        self.priority = priority
        self.items: list[Any] = []
        self.trackers: Trackers | None = None
        self.times: list[float] | None = [] if keep_times else None
        self.nbytes = 0
        self.first_seen = 0.0
        self.first_wall = 0.0
        #: The lane's pending deadline callback, if any; it may belong to a message already cut
        #: (it then re-arms itself for the current first message, see _deadline).
        self.timer: asyncio.TimerHandle | None = None

    def stop_timer(self) -> None:
        """Cancel the pending deadline, if any (a forgotten keyed lane; the processor stopping)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Accumulator:
    """Owns the lanes and decides when each becomes one or more batches.

    ``emit`` receives every cut Job, in cut order; the scheduler takes it from there.
    """

    #: The event loop whose deadlines time the lanes; bound by ``bind`` when the processor starts.
    loop: asyncio.AbstractEventLoop

    def __init__(self, config: BatchConfig, emit: Callable[[Job], None]) -> None:
        self.config = config
        self.emit = emit
        trigger = config.trigger
        self.size_triggers = trigger in (BatchTrigger.SIZE, BatchTrigger.BOTH)
        #: The size at which a lane is cut on add (never, without a size trigger). The processor's
        #: inline add path compares against a copy of it; ``check`` does the same on other paths.
        self.cut_at = config.max_size if self.size_triggers else sys.maxsize
        self.timed = trigger is not BatchTrigger.SIZE
        self.all_mode = trigger is BatchTrigger.ALL
        self.keep_times = config.message_ttl is not None
        self.max_size = config.max_size
        self.max_bytes = config.max_bytes
        self.sizer: Callable[[Any], int] = config.sizer or _default_sizer
        self.lanes: dict[tuple[Any, int], Lane] = {}
        self.default = self.lane(None, 0)
        self.seq = 0
        self.flush_reasons: dict[str, int] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Use this loop's clock and timers from now on."""
        self.loop = loop

    # -- lanes -----------------------------------------------------------------------------
    def lane(self, key: Any, priority: int) -> Lane:
        """The lane for (key, priority), created on first use."""
        ident = (key, priority)
        lane = self.lanes.get(ident)
        if lane is None:
            lane = self.lanes[ident] = Lane(key, priority, self.keep_times)
        return lane

    def buffered(self) -> int:
        """Messages waiting in lanes."""
        return sum(len(lane.items) for lane in self.lanes.values())

    def oldest(self) -> Lane | None:
        """The non-empty lane whose first message has waited longest."""
        best: Lane | None = None
        for lane in self.lanes.values():
            if lane.items and (best is None or lane.first_seen < best.first_seen):
                best = lane
        return best

    # -- adding ----------------------------------------------------------------------------
    def add(self, message: Any, key: Any, priority: int, tracker: Tracker | None) -> None:
        """Put one message in its lane and cut the lane if a trigger fires (any path)."""
        lane = self.lane(key, priority)
        if self.max_bytes is not None:
            size = self.sizer(message)
            if not isinstance(size, int) or size < 0:
                raise ValueError(f"sizer: expected a byte count >= 0, got {size!r}")
            if lane.items and self.size_triggers and lane.nbytes + size > self.max_bytes:
                self.cut(lane, "bytes")
                lane = self.lane(key, priority)  # a cut keyed lane leaves the table
            lane.nbytes += size
        items = lane.items
        if tracker is not None:
            if lane.trackers is None:
                lane.trackers = {}
            lane.trackers[len(items)] = tracker
        items.append(message)
        if lane.times is not None:
            lane.times.append(self.loop.time())
        if len(items) == 1:
            self.arm(lane)
        self.check(lane)

    def check(self, lane: Lane) -> None:
        """Cut the lane if its size or byte trigger fired."""
        if self.size_triggers:
            if len(lane.items) >= self.max_size:
                self.cut(lane, "size")
            elif self.max_bytes is not None and lane.nbytes >= self.max_bytes:
                self.cut(lane, "bytes")
        elif self.all_mode and lane.timer is None and self.full(lane):
            # ALL: the deadline already passed while the lane was short; size completes it.
            self.cut(lane, "size" if len(lane.items) >= self.max_size else "bytes")

    def full(self, lane: Lane) -> bool:
        """Whether the lane meets the size condition (messages or bytes)."""
        if len(lane.items) >= self.max_size:
            return True
        return self.max_bytes is not None and lane.nbytes >= self.max_bytes

    def arm(self, lane: Lane) -> None:
        """Start the lane's clock: its first message just arrived."""
        lane.first_seen = now = self.loop.time()
        lane.first_wall = time.time()
        if self.timed and lane.timer is None:
            due = now + self.config.max_wait
            lane.timer = self.loop.call_at(due, self._deadline, lane, due)

    def _deadline(self, lane: Lane, due: float) -> None:
        lane.timer = None
        if not lane.items:
            return  # cut meanwhile and empty: the next first message arms a new timer
        current = lane.first_seen + self.config.max_wait
        if current > due:
            # Cut and refilled meanwhile: this was an earlier first message's deadline.
            lane.timer = self.loop.call_at(current, self._deadline, lane, current)
            return
        if self.all_mode and not self.full(lane):
            return  # ALL waits for size too; check() cuts when it arrives
        self.cut(lane, "timeout")

    # -- cutting ---------------------------------------------------------------------------
    def cut(self, lane: Lane, reason: str) -> None:
        """Turn the lane's messages into one batch (or chunks, under TIMEOUT/ALL) and emit them."""
        if not lane.items:
            return
        items: Batch[Any] = Batch(lane.items, key=lane.key, priority=lane.priority)
        trackers, times, nbytes = lane.trackers, lane.times, lane.nbytes
        first_seen, first_wall = lane.first_seen, lane.first_wall
        # Reset the lane before emitting: emit may run code that adds to this lane again.
        self.reset(lane)
        if lane is not self.default:
            # Keyed lanes come and go with traffic: forget empty ones so memory follows load.
            # The next message of this key gets a new lane and timer; this one's is of no use.
            self.lanes.pop((lane.key, lane.priority), None)
            lane.stop_timer()
        max_size = self.max_size
        if len(items) <= max_size or self.size_triggers:
            self._emit(items, trackers, times, first_seen, first_wall, nbytes, reason)
            return
        for start, stop in _chunks(len(items), max_size, merge_tail=self.all_mode):
            self._emit(
                items.derive(items[start:stop]),
                pick(trackers, range(start, stop)),
                times[start:stop] if times is not None else None,
                times[start] if times is not None else first_seen,
                first_wall,
                None,
                reason,
            )

    def _emit(
        self,
        batch: Batch[Any],
        trackers: Trackers | None,
        times: list[float] | None,
        first_seen: float,
        first_wall: float,
        nbytes: int | None,
        reason: str,
    ) -> None:
        batch.flush_reason = reason
        batch._config = self.config
        self.seq += 1
        self.flush_reasons[reason] = self.flush_reasons.get(reason, 0) + 1
        nb = nbytes if self.max_bytes is not None else None
        self.emit(Job(batch, trackers, times, first_seen, first_wall, nb, self.seq))

    def cut_all(self, reason: str) -> None:
        """Cut every non-empty lane (flush, shutdown)."""
        for lane in list(self.lanes.values()):
            self.cut(lane, reason)

    def disarm(self) -> None:
        """Cancel every lane's timer (on stop: a timer that outlived its batches would keep the
        accumulator, and with it the processor, alive until it fired)."""
        for lane in self.lanes.values():
            lane.stop_timer()

    def take_all(self) -> Iterator[Lane]:
        """Yield each non-empty lane for the caller to empty (stop without drain)."""
        for lane in list(self.lanes.values()):
            if lane.items:
                yield lane

    def reset(self, lane: Lane) -> None:
        """Empty a lane whose messages were cut or taken over (its timer runs on, harmless)."""
        lane.items.clear()
        lane.trackers = None
        lane.times = [] if lane.times is not None else None
        lane.nbytes = 0

    def take_oldest(
        self, waiting: Iterable[Job]
    ) -> tuple[Any, Any, int, Tracker | None, Job | None] | None:
        """Remove the oldest message not yet running, for DROP_OLDEST; None when all run.

        It is the first message of the oldest lane or of the oldest cut batch still waiting for
        a slot (``waiting``, the scheduler's queue), whichever arrived first. Returns (message,
        key, priority, tracker, job): ``job`` is the waiting job it came from (the caller drops
        a job left empty), None when it came from a lane.
        """
        lane = self.oldest()
        job: Job | None = None
        for candidate in waiting:
            if job is None or candidate.first_seen < job.first_seen:
                job = candidate
        if job is not None and (lane is None or job.first_seen <= lane.first_seen):
            batch = job.batch
            message = batch.pop(0)
            tracker = job.trackers.get(0) if job.trackers is not None else None
            job.trackers = pick(job.trackers, range(1, len(batch) + 1))
            if job.times is not None:
                job.times.pop(0)
            return message, batch.key, batch.priority, tracker, job
        if lane is not None:
            key, priority = lane.key, lane.priority
            message, tracker = self.pop_oldest_message(lane)
            return message, key, priority, tracker, None
        return None

    def pop_oldest_message(self, lane: Lane) -> tuple[Any, Tracker | None]:
        """Remove the first (oldest) message of a lane, for DROP_OLDEST."""
        message = lane.items.pop(0)
        tracker = lane.trackers.get(0) if lane.trackers is not None else None
        lane.trackers = pick(lane.trackers, range(1, len(lane.items) + 1))
        if lane.times is not None:
            lane.times.pop(0)
            if lane.times:
                lane.first_seen = lane.times[0]
        if self.max_bytes is not None:
            lane.nbytes = max(0, lane.nbytes - self.sizer(message))
        if not lane.items:
            self.reset(lane)
        return message, tracker


def _chunks(total: int, size: int, *, merge_tail: bool) -> Iterator[tuple[int, int]]:
    """Index ranges of ``size``; with ``merge_tail`` a short last chunk joins the one before."""
    starts = list(range(0, total, size))
    if merge_tail and len(starts) > 1 and total - starts[-1] < size:
        starts.pop()
    for i, start in enumerate(starts):
        yield start, starts[i + 1] if i + 1 < len(starts) else total


def _default_sizer(message: Any) -> int:
    if isinstance(message, bytes | bytearray | memoryview | str):
        return len(message)
    raise ValueError(
        f"sizer: max_bytes is set but a {type(message).__name__} message has no byte size; "
        "pass BatchConfig(sizer=...) to measure it"
    )
