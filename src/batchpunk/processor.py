"""BatchProcessor: the public face of the engine, and the owner of its life cycle.

A message travels admit (``_admission``) -> accumulate (``_accumulator``) -> schedule
(``_scheduler``) -> execute (``_execution``) -> settle (``_completion``): processed, or dead
letter (``_outbox``). This
module holds the public calls (their hot paths inline) and the stats, and starts and stops the
rest; room, waiting producers and the overflow policies are ``_admission``'s, running jobs and
settling their outcomes (the counts included) ``_completion``'s.

Conservation holds at every instant: received = processed + dead_lettered + pending + in_flight,
and after ``stop()`` returns, pending = in_flight = 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from batchpunk._accumulator import Accumulator, Lane
from batchpunk._completion import Completion
from batchpunk._execution import Execution
from batchpunk._outbox import Outbox, as_put, build_letter, shutdown_entries
from batchpunk._scheduler import Scheduler
from batchpunk.batch import Batch
from batchpunk.config import BatchConfig, BatchTrigger, OverflowPolicy
from batchpunk.deadletter import DeadLetter
from batchpunk.errors import BufferFull, ConfigError, ProcessorClosed
from batchpunk.metrics import Observer
from batchpunk.retry import CircuitBreaker

if TYPE_CHECKING:
    from batchpunk.spool import Spool

__all__ = ["BatchProcessor", "ReplayReport"]

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("batchpunk")

#: max_pending=None: room that never runs out.
_UNBOUNDED = 2**62
#: Taken from the room when stop() begins, so that no add path finds room again.
_CLOSED = 2**63

#: What a processor may be: sync or async, returning None or one result per message.
ProcessorFn = Callable[[Batch[Any]], Any]


class _State(Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass
class ReplayReport:
    """What became of replayed dead letters: each succeeded or failed again (with its error)."""

    succeeded: list[DeadLetter] = field(default_factory=list)
    failed: list[tuple[DeadLetter, BaseException]] = field(default_factory=list)


class BatchProcessor(Completion, Generic[T, R]):
    """Accumulates messages into batches and runs ``processor`` on them, losing none.

    Args:
        config: how to batch, flush, retry and encode; see BatchConfig.
        processor: sync or async callable taking a Batch and returning None or one result per
            message, in order. A sync one runs in a worker thread so the loop never blocks.
        metrics_collector: optional object with increment/timing/gauge (sync or async).
        dead_letter: where messages that end unprocessed go: a callable (sync or async) taking a
            list of DeadLetter, or an object with ``async put(letters)``. Without one they are
            kept in ``dead_letters`` and logged.

    Use ``async with BatchProcessor(config, handler) as p:`` or ``await p.start()`` /
    ``await p.stop()``.
    """

    # What the inline add paths touch, as slots: a slot is read and written through its
    # descriptor instead of the instance dict (over 30 attributes, so not a shared-key dict),
    # a few nanoseconds of the ~100 that add_message_nowait costs. The rest stay in __dict__.
    __slots__ = ("_acc", "_cut_before", "_default", "_fast", "_items", "_room")

    def __init__(
        self,
        config: BatchConfig | None = None,
        processor: ProcessorFn | None = None,
        metrics_collector: object | None = None,
        *,
        dead_letter: object | None = None,
        spool: Spool | None = None,
    ) -> None:
        if config is None:
            config = BatchConfig()
        if not isinstance(config, BatchConfig):
            raise ConfigError(f"config: expected a BatchConfig, got {config!r}")
        if processor is None or not callable(processor):
            raise ConfigError(f"processor: expected a callable taking a Batch, got {processor!r}")
        #: The durable spool (batchpunk.spool): the engine then carries its records.
        self.spool = spool
        if spool is not None:
            config, processor, dead_letter = spool.bind(self, config, processor, dead_letter)
        self.config = config
        self.processor = processor
        #: Dead letters kept in memory: all of them without a sink, else those never stored.
        self.dead_letters: list[DeadLetter] = []
        self._observer = Observer(metrics_collector)
        self._put = as_put(dead_letter) if dead_letter is not None else None
        self._state = _State.NEW
        self._open = self._started = False
        # Room left under max_pending. The add paths test only this: it starts at 0 (not yet
        # started) and drops far below 0 once stop() begins, so one compare rules out both.
        self._capacity = config.max_pending if config.max_pending is not None else _UNBOUNDED
        self._room = 0
        self._room_shift = self._capacity  # what _room lacks from capacity - outstanding
        trig = config.trigger
        # The inline add path handles the shared lane when nothing needs per-message work.
        self._plain = (
            config.max_bytes is None and config.message_ttl is None and trig is not BatchTrigger.ALL
        )
        # The public add methods' one test for that path: plain, and no spool to write first.
        self._fast = self._plain and spool is None
        # With a spool, a message the engine refuses under RAISE is refused before its write.
        self._refuses = config.overflow is OverflowPolicy.RAISE
        # Counts of messages.
        self._finished = 0
        self._processed = 0
        self._in_flight = 0
        self._dead_count = 0
        self._dead_reasons: dict[str, int] = {}
        # Jobs cut and not yet finished, and who waits for them.
        self._unfinished_jobs = 0
        self._job_waiters: list[list[Any]] = []  # [highest seq, jobs left, future]
        self._room_waiters: deque[asyncio.Future[None]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping: asyncio.Task[None] | None = None
        #: Set by stop(grace=0) while a stop runs: its waits end at once.
        self._hurry = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # The engine, in the order a message travels; start() binds it to the running loop.
        self._acc = Accumulator(config, self._emit)
        self._default: Lane = self._acc.default
        self._cut_at = self._acc.cut_at  # the accumulator's decision, copied for the hot path
        self._cut_before = self._cut_at - 1  # the same, against the size before an append
        self._new_future: Callable[[], asyncio.Future[Any]] = _not_started
        self._items: list[Any] = self._default.items
        self._sched = Scheduler(config.concurrency, config.preserve_order, self._start_job)
        self._breaker: CircuitBreaker | None = None
        if config.circuit_breaker_threshold is not None:
            self._breaker = CircuitBreaker(
                config.circuit_breaker_threshold,
                config.circuit_breaker_cooldown,
                on_change=self._observer.circuit,
            )
        self._exec = Execution(
            config,
            processor,
            observer=self._observer,
            breaker=self._breaker,
            succeeded=self._succeeded,
            dead=self._dead_in_flight,
        )
        self._outbox: Outbox | None = None
        if self._put is not None:
            self._outbox = Outbox(
                self._put,
                self._delivered,
                retry_delay=config.retry_delay,
                retry_max_delay=config.retry_max_delay,
            )

    def __repr__(self) -> str:
        return (
            f"BatchProcessor(state={self._state.value}, received={self.received}, "
            f"processed={self._processed}, dead_lettered={self._dead_count})"
        )

    # -- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Start accepting messages on the running event loop. Starting twice is a no-op."""
        if self._state is _State.RUNNING:
            return
        if self._state is not _State.NEW:
            raise ProcessorClosed("a stopped BatchProcessor cannot start again; create a new one")
        self._loop = asyncio.get_running_loop()
        self._new_future = _future_factory(self._loop)
        self._acc.bind(self._loop)
        if self._outbox is not None:
            self._outbox.start()
        self._state = _State.RUNNING
        if self.spool is not None:
            # Recovery and replay come first: until every unfinished message is in the engine,
            # the add paths stay closed as before start (a message added meanwhile was accepted
            # without being written: the spool was not open yet). Replay waits for room itself.
            await self.spool.open(self)
            if self._state is not _State.RUNNING:
                return  # stop() began during the replay
        self._open = self._started = True
        self._room += self._room_shift
        self._room_shift = 0

    async def stop(self, drain: bool = True, *, grace: float | None = None) -> None:
        """Stop accepting, finish or dead-letter every accepted message, then return.

        From the moment stop begins, every add and submit raises ProcessorClosed, including
        producers waiting for room. With ``drain`` every lane is flushed (reason "shutdown") and
        batches get up to ``grace`` seconds (default ``drain_timeout``) to finish; without it,
        messages not yet running are dead-lettered at once and running batches get that long.
        Calls still running then are cancelled and their messages dead-lettered with reason
        "shutdown". Dead letters then get up to ``grace`` to reach their sink; any left are
        kept in ``dead_letters``. Idempotent: a second call waits for the first, and a second
        call with ``grace=0`` hurries it (what is still running is cancelled at once, as a
        second Ctrl-C would).
        """
        if grace is not None and (
            not isinstance(grace, int | float) or isinstance(grace, bool) or not grace >= 0
        ):
            raise ValueError(f"grace: expected seconds >= 0 or None, got {grace!r}")
        if self._state is _State.NEW or (self._stopping is None and self.closed):
            self._state = _State.CLOSED
            return
        if self._stopping is None:
            seconds = self.config.drain_timeout if grace is None else float(grace)
            self._stopping = asyncio.get_running_loop().create_task(self._shutdown(drain, seconds))
        elif grace == 0:
            self._hurry.set()
        await asyncio.shield(self._stopping)
        if self.spool is not None:
            await self.spool.close()

    async def __aenter__(self) -> BatchProcessor[T, R]:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop(drain=True)

    @property
    def closed(self) -> bool:
        """True once stop() has begun."""
        return self._state in (_State.CLOSING, _State.CLOSED)

    # -- accepting -------------------------------------------------------------------------
    def add_message_nowait(self, message: T, *, key: Any = None, priority: int = 0) -> None:
        """Accept a message without ever waiting.

        Raises BufferFull when max_pending messages are unfinished under BLOCK or RAISE (the
        drop policies dead-letter instead), ProcessorClosed once stop() has begun. With a spool
        the message is durable by the next group commit, not when this returns.
        """
        # The hot path: shared lane, nothing per message but the list slot and one count.
        if self._room > 0 and self._fast and key is None and priority == 0:
            items = self._items
            size = len(items)  # before the append: one len() less per message
            items.append(message)
            self._room -= 1
            if not size:
                self._acc.arm(self._default)
            if size >= self._cut_before:
                self._acc.cut(self._default, "size")
            return
        if self.spool is not None:
            message = self.spool.admit_nowait(message, key, priority, self._room > 0)
            if message is None:
                return  # the spool is full and the drop policy dead-lettered it
        if self._room > 0:
            self._track(message, key, priority, None)
        else:
            self._refuse(message, key, priority, None)

    async def add_message(self, message: T, *, key: Any = None, priority: int = 0) -> None:
        """Accept a message, waiting for room under the BLOCK policy.

        Returns once the message is accepted, never after its batch ran: a producer waits for
        a processor only through the backpressure it configured with max_pending. With a
        spool it returns only once the message is durable in it.
        """
        # The hot path again, inline: a call less is a fifth of this method's cost.
        if self._room > 0 and self._fast and key is None and priority == 0:
            items = self._items
            size = len(items)
            items.append(message)
            self._room -= 1
            if not size:
                self._acc.arm(self._default)
            if size >= self._cut_before:
                self._acc.cut(self._default, "size")
            return
        spool = self.spool
        if spool is not None:
            if self._room <= 0 and self._refuses:
                self._refuse(message, key, priority, None)  # raises: nothing is written
            admitted = spool.admit_now(message, key, priority)
            if admitted is not None:
                message, commit = admitted
                admitted = None  # else the pair lives (and the GC scans it) until durable
                await commit  # durable once this returns (one commit future per group)
            else:
                message = await spool.admit(message, key, priority)
                if message is None:
                    return  # the spool is full and the drop policy dead-lettered it
            if self._room > 0:  # inline: a coroutine less per durable message
                self._track(message, key, priority, None)
            else:
                await self._accept_spooled(message, key, priority, None)
            return
        if self._room > 0:
            self._track(message, key, priority, None)
        else:
            await self._accept(message, key, priority, None)

    async def submit(self, message: T, *, key: Any = None, priority: int = 0) -> R:
        """Accept a message and return its own result once its batch ran.

        Raises the error that finally failed it (after its dead letter was stored). Waits for
        room under the BLOCK policy, like add_message.
        """
        if self._room > 0 and self._fast and key is None and priority == 0:
            # submit_nowait and _track written out: two Python calls are a fifth of the cost.
            # The loop's create_future is bound once at start: one lookup less per call.
            future: asyncio.Future[R] = self._new_future()
            items = self._items
            size = len(items)
            lane = self._default
            trackers = lane.trackers
            if trackers is None:
                lane.trackers = {size: future}
            else:
                trackers[size] = future
            items.append(message)
            self._room -= 1
            if not size:
                self._acc.arm(lane)
            if size >= self._cut_before:
                self._acc.cut(lane, "size")
            return await future
        future = asyncio.get_running_loop().create_future()
        if self.spool is not None:
            if self._room <= 0 and self._refuses:
                self._refuse(message, key, priority, future)  # raises: nothing is written
            message = await self.spool.admit(message, key, priority, submit=True)
            if self._room > 0:
                self._track(message, key, priority, future)
            else:
                await self._accept_spooled(message, key, priority, future)
            return await future
        if self._room > 0:
            self._track(message, key, priority, future)
        else:
            await self._accept(message, key, priority, future)
        return await future

    def submit_nowait(self, message: T, *, key: Any = None, priority: int = 0) -> asyncio.Future[R]:
        """Accept a message now and return the future of its own result.

        Never waits: raises BufferFull or ProcessorClosed like add_message_nowait (under the
        drop policies the future fails with BufferFull once the message's letter is stored).
        Choose it over ``submit`` for many results at once (``gather`` them): it costs one
        future per message and no coroutine.
        """
        if self.spool is not None:
            message = self.spool.admit_nowait(message, key, priority, self._room > 0)
            if message is None:
                return self.spool.dropped_future()
        if self._room <= 0:
            future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
            self._refuse(message, key, priority, future)
            return future
        future = self._loop.create_future()  # type: ignore[union-attr]
        self._track(message, key, priority, future)
        return future

    async def _accept_spooled(self, record: Any, key: Any, priority: int, tracker: Any) -> None:
        """``_accept`` for a record already in the spool: room can vanish while its producer
        awaits the commit, and a record the engine then refuses (BufferFull under RAISE) is
        finished, or it would stay in the spool and be processed after the next start."""
        try:
            await self._accept(record, key, priority, tracker)
        except BufferFull:
            assert self.spool is not None
            self.spool.refused(record)
            raise

    async def replay(
        self, letters: Iterable[DeadLetter] | AsyncIterable[DeadLetter]
    ) -> ReplayReport:
        """Submit dead letters' messages again, with their key and priority.

        Returns which letters now succeeded and which failed again; a letter that fails again
        is dead-lettered again like any message.
        """
        if isinstance(letters, AsyncIterable):
            items = [letter async for letter in letters]
        else:
            items = list(letters)

        async def one(letter: DeadLetter) -> BaseException | None:
            try:
                await self.submit(letter.message, key=letter.key, priority=letter.priority)
            except ProcessorClosed:
                raise
            except Exception as exc:
                return exc
            return None

        outcomes = await asyncio.gather(*(one(letter) for letter in items))
        report = ReplayReport()
        for letter, error in zip(items, outcomes, strict=True):
            if error is None:
                report.succeeded.append(letter)
            else:
                report.failed.append((letter, error))
        return report

    async def flush(self) -> None:
        """Cut every lane now (reason "manual"); return when every batch cut so far finished.

        Also waits until their dead letters are stored.
        """
        if self._state is _State.NEW:
            return
        self._acc.cut_all("manual")
        await self._wait_jobs(None)
        if self._outbox is not None:
            await self._outbox.wait_idle()

    def reject(
        self,
        message: Any,
        reason: str,
        error: BaseException,
        *,
        key: Any = None,
        priority: int = 0,
        headers: dict[str, Any] | None = None,
    ) -> asyncio.Future[None]:
        """Dead-letter a message that never reached a batch (malformed, delivered too often).

        The message counts as received and goes through the same outbox, counts and metrics
        as every other dead letter. The returned future resolves once the letter is stored by
        the dead-letter sink (at once without one: it is kept in ``dead_letters``), and fails
        with ProcessorClosed if it could not be stored before shutdown. Rejecting does not wait
        for room: a malformed message must not be held up behind the messages it displaced.

        Raises ProcessorClosed once stop() has begun, ValueError for an empty reason.
        """
        if not self._open:
            raise self._closed_error()
        if not isinstance(reason, str) or not reason:
            raise ValueError(f"reason: expected a non-empty str, got {reason!r}")
        return self._reject(message, reason, error, key, priority, headers)

    def _reject(
        self,
        message: Any,
        reason: str,
        error: BaseException,
        key: Any = None,
        priority: int = 0,
        headers: dict[str, Any] | None = None,
    ) -> asyncio.Future[None]:
        """``reject`` without its checks: the spool's recovery calls it before start opens."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        rejected = build_letter(message, key, priority, reason, error, headers=headers)
        self._room -= 1  # accepted, and unfinished until its letter is stored
        self._observer.received(1)  # never cut, so _emit() does not count it
        self._send_dead([(rejected, _Stored(future))])
        return future

    async def _replay_record(self, record: Any, key: Any, priority: int) -> bool:
        """Spool.open: hand a replayed record to the engine before start opens the add paths.

        It waits for room whatever the overflow policy: a replayed message was accepted and is
        durable, so it is never refused (RAISE raised BufferFull part-way through start) nor
        dropped. The room start will open counts (``_room_shift``). False once stop() began:
        the record stays in the spool for the next start.
        """
        while self._room + self._room_shift <= 0 and self._state is _State.RUNNING:
            await self._wait_for_room()
        if self._state is not _State.RUNNING:
            return False
        self._track(record, key, priority, None)
        return True

    # -- shutdown --------------------------------------------------------------------------
    async def _shutdown(self, drain: bool, grace: float | None) -> None:
        self._state = _State.CLOSING
        self._close_admission(_CLOSED)
        self._room_shift += _CLOSED
        closed = ProcessorClosed("the processor stopped before this message ran")
        if drain:
            self._acc.cut_all("shutdown")
        else:
            self._abandon_waiting(closed)
        began = asyncio.get_running_loop().time()
        if not await self._hurried(self._wait_jobs(None), grace):
            waited = asyncio.get_running_loop().time() - began
            if not grace or waited < 0.01:
                when = "at once"
            elif self._hurry.is_set():
                when = f"after {waited:.1f}s (stop hurried)"
            else:
                when = f"after {grace}s"
            log.error(
                'stop: %d batch(es) unfinished %s; ending them with reason "shutdown"',
                self._unfinished_jobs,
                when,
            )
            self._abandon_waiting(closed)
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._outbox is not None:
            await self._hurried(self._outbox.wait_idle(), grace)
            left = await self._outbox.close()
            if left:
                for _, tracker in left:
                    if isinstance(tracker, _Stored):
                        tracker.fail(ProcessorClosed("the dead letter was not stored before stop"))
                log.error(
                    "%d dead letter(s) could not be stored within %ss; "
                    "they are kept in processor.dead_letters",
                    len(left),
                    grace,
                )
                letters = [letter for letter, _ in left]
                if self.spool is not None:
                    letters = self.spool.unstored(letters)
                self.dead_letters.extend(letters)
                self._delivered(left)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._observer.drain(), grace)
        self._exec.close()
        self._acc.disarm()
        self._state = _State.CLOSED

    async def _hurried(self, waiting: Awaitable[Any], seconds: float | None) -> bool:
        """Await ``waiting`` for at most ``seconds``, or until stop(grace=0) hurries the stop;
        True when it finished."""
        task = asyncio.ensure_future(waiting)
        hurry = asyncio.ensure_future(self._hurry.wait())
        try:
            await asyncio.wait({task, hurry}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurry.cancel()
        if task.done():
            return True
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False

    def _abandon_waiting(self, error: BaseException) -> None:
        """Dead-letter every message not yet running (lanes and queued batches)."""
        for lane in self._acc.take_all():
            entries = shutdown_entries(
                lane.items, lane.key, lane.priority, lane.trackers, lane.first_wall, error
            )
            self._acc.reset(lane)
            self._observer.received(len(entries))  # never cut: _emit() does not count them
            self._send_dead(entries)
        for job in list(self._sched.waiting()):
            self._sched.remove(job)
            self._shut_out(job, error)

    # -- stats -----------------------------------------------------------------------------
    @property
    def received(self) -> int:
        """Messages accepted so far (dropped ones included)."""
        return self._finished + self._capacity - self._room - self._room_shift

    @property
    def pending(self) -> int:
        """Accepted messages not in a running batch (buffered, queued, or awaiting a letter)."""
        return self.received - self._finished - self._in_flight

    @property
    def in_flight(self) -> int:
        """Messages of batches holding a concurrency slot (running or waiting to retry)."""
        return self._in_flight

    @property
    def circuit(self) -> str:
        """The circuit breaker's state: closed, open or half_open."""
        return self._breaker.state if self._breaker is not None else "closed"

    async def get_stats(self, history: bool = False) -> dict[str, Any]:
        """A snapshot of counts, gauges and latency; with ``history`` per-interval records too.

        Message counts: received = processed + dead_lettered + pending + in_flight.
        """
        acc, sched, ex, outbox = self._acc, self._sched, self._exec, self._outbox
        now = self._loop.time() if self._loop is not None else 0.0
        oldest = acc.oldest()
        stats: dict[str, Any] = {
            "current_batch_size": acc.buffered(),
            "batch_age": now - oldest.first_seen if oldest is not None else 0.0,
            "is_processing": sched.running > 0,
            "config": self.config.to_dict(),
            "state": self._state.value,
            "received": self.received,
            "processed": self._processed,
            "failed": self._dead_reasons.get("failed", 0),
            "dead_lettered": self._dead_count,
            "dropped": self._dead_reasons.get("dropped", 0),
            "dead_letter_reasons": dict(self._dead_reasons),
            "dead_letter_backlog": len(outbox) if outbox is not None else 0,
            "dead_letter_write_failures": outbox.failed_writes if outbox is not None else 0,
            "batches": acc.seq,
            "batches_waiting": len(sched),
            "batches_running": sched.running,
            "calls": ex.calls,
            "retries": ex.retries,
            "splits": ex.splits,
            "pending": self.pending,
            "in_flight": self._in_flight,
            "flush_reasons": dict(acc.flush_reasons),
            "circuit": self.circuit,
            "downstream": ex.downstream.stats(),
        }
        stats.update(self._observer.snapshot(history))
        return stats


def _not_started() -> asyncio.Future[Any]:
    """Never called: submit reaches it only with room, which exists once start() bound the loop."""
    raise ProcessorClosed("the processor is not running: await start() first")


class _Stored:
    """The tracker of a rejected message: its future resolves (not fails) once it is stored."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future

    def done(self) -> bool:
        return self.future.done()

    def set_result(self, value: Any) -> None:
        if not self.future.done():
            self.future.set_result(None)

    def set_exception(self, error: BaseException) -> None:
        self.set_result(None)  # the engine's "dead-lettered": for a rejection, success

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


def _future_factory(loop: asyncio.AbstractEventLoop) -> Callable[[], asyncio.Future[Any]]:
    """What submit calls for a message's future: ``loop.create_future`` without its frame.

    asyncio's own loops create a plain ``asyncio.Future(loop=loop)``; calling that class through
    a ``partial`` (C code end to end) saves the Python method's frame (8% of the samples in a
    profile of bench/core.py's submit row). A loop that overrides create_future (its own future
    type) keeps its method.
    """
    if type(loop).create_future is asyncio.BaseEventLoop.create_future:
        return partial(asyncio.Future, loop=loop)
    return loop.create_future
