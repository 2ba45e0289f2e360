"""Executing: one batch's life from its first call to the last message settled.

A failure is one of two kinds, and each gets its own treatment:

- **An outage** (``retry.is_outage``: the downstream refused, dropped or timed out the call, with
  no answer from it since this batch first failed): the batch is *held*. It keeps its messages
  and is retried whole with capped, jittered backoff (behind the circuit breaker, when there is
  one), waking early when any call gets through, until the downstream answers, or until
  ``delivery_timeout`` after acceptance, when its messages are dead-lettered as "expired".
  Bisecting cannot isolate an outage: it only turns one into dead letters.
- **Possibly poison** (any other error, or an outage error while the downstream is seen to
  answer): retry, then bisect depth-first so that good messages complete and each poison message
  ends alone in a dead letter. Splitting happens inside the batch's slot: once a batch is split,
  halves are tried at once (no backoff), so a poison message costs about two calls per halving
  level and no good message sleeps.

A batch held with no other evidence (nothing else running, circuit closed) is halved as a probe,
at most three levels deep and never into parts under four messages: once a part succeeds the
downstream answers and bisection goes on; if every part fails, the parts are held whole. A held
part that fails again after others got answers is bisected as possible poison.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

from batchpunk._downstream import Downstream
from batchpunk._jobs import Job, Tracker, Trackers, pick
from batchpunk._outbox import build_letter
from batchpunk.batch import Batch, as_results
from batchpunk.config import BatchConfig
from batchpunk.deadletter import DeadLetter
from batchpunk.errors import (
    BatchTimeout,
    CallCancelled,
    DownstreamUnavailable,
    MessageExpired,
    PartialFailure,
    ProcessorClosed,
    ResultMismatch,
)
from batchpunk.metrics import Observer
from batchpunk.retry import CircuitBreaker, backoff_delay, is_outage, is_retryable, retry_after

__all__ = ["Execution", "is_async_callable"]

log = logging.getLogger("batchpunk")

Entry = tuple[DeadLetter, Tracker | None]

#: Levels of probe splits of a held batch (parts of 1/8 at most): enough to find a clean part when
#: a few messages raise connection-looking errors in an idle processor, never singles.
_PROBE_LEVELS = 3
#: Smallest part a probe split makes: probing never shreds a batch into single messages.
_MIN_PROBE_PART = 4
#: Shortest wait between two calls of a held batch, so retry_delay=0 never spins on an outage.
_MIN_HOLD = 0.05


def is_async_callable(fn: Any) -> bool:
    """A coroutine function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - we ask about __call__ itself
    )


class _Node:
    """Messages that have been in every call together so far (a batch, or part of one)."""

    __slots__ = (
        "batch",
        "calls",
        "error",
        "errors",
        "held",
        "last",
        "mark",
        "probes",
        "root",
        "trackers",
        "waits",
    )

    def __init__(
        self,
        batch: Batch[Any],
        trackers: Trackers | None,
        calls: int,
        root: bool,
        mark: int | None = None,
        probes: int = 0,
    ) -> None:
        self.batch = batch
        self.trackers = trackers
        self.calls = calls
        self.root = root
        # Set after a PartialFailure: the error of each message still in the node.
        self.errors: list[BaseException] | None = None
        # The downstream's answer count when this node's lineage first failed by an outage
        # (inherited by halves): an answer since then shows the downstream is there.
        self.mark = mark
        # The answer count when this node's last failed call began.
        self.last = 0
        # Probe splits left: with no other evidence, a held node is halved to see whether a
        # part gets an answer, at most this many levels deep; then its parts are held whole.
        self.probes = probes
        # Messages counted in Downstream.held for this node (0 when not held).
        self.held = 0
        self.waits = 0
        self.error: BaseException | None = None

    def take(self, keep: list[int]) -> None:
        """Keep only the messages at these indices."""
        self.batch = self.batch.derive([self.batch[i] for i in keep])
        self.trackers = pick(self.trackers, keep)


class _PastDeadline(Exception):
    """The circuit breaker held a batch's call past its delivery_timeout."""


class _CircuitOpen(DownstreamUnavailable):
    """The error of a batch that never got a call: the circuit stayed open."""

    def __init__(self, timeout: float | None) -> None:
        super().__init__(
            f"the circuit breaker stayed open (other calls kept failing by an outage) for the "
            f"whole delivery_timeout={timeout}s"
        )


class Execution:
    """Runs jobs for one processor; ``succeeded`` and ``dead`` report what became of messages."""

    def __init__(
        self,
        config: BatchConfig,
        fn: Callable[..., Any],
        *,
        observer: Observer,
        breaker: CircuitBreaker | None,
        succeeded: Callable[[int, float], None],
        dead: Callable[[list[Entry]], None],
        downstream: Downstream | None = None,
    ) -> None:
        self.config = config
        self.fn = fn
        self.observer = observer
        self.breaker = breaker
        self.downstream = downstream if downstream is not None else Downstream(observer)
        self._succeeded = succeeded
        self._dead = dead
        self._is_async = is_async_callable(fn)
        self._threads = _DaemonThreads()
        self.retries = 0
        self.splits = 0
        self.calls = 0

    def close(self) -> None:
        """End the idle worker threads of a sync processor (a hung call is abandoned)."""
        self._threads.close()

    # -- a job's life ----------------------------------------------------------------------
    async def run(self, job: Job) -> None:
        """Process a job until every one of its messages succeeded or was dead-lettered."""
        todo = [_Node(job.batch, job.trackers, 0, root=True, probes=_PROBE_LEVELS)]
        held: list[_Node] = []
        current: _Node | None = None
        timeout = self.config.delivery_timeout
        deadline = job.first_seen + timeout if timeout is not None else None
        try:
            if self.config.message_ttl is not None and job.times:
                self._expire(job, todo[0])
            while todo or held:
                if todo:
                    current = todo.pop()
                    if current.batch and await self._process(job, current, todo, deadline):
                        held.append(current)
                else:
                    # Only held nodes are left: retry the one that waited longest.
                    current = held.pop(0)
                    if await self._retry_held(job, current, todo, deadline):
                        held.append(current)
                current = None
        except BaseException as exc:
            # Cancelled by stop() past drain_timeout, or a BaseException from the processor:
            # whatever has not finished becomes a dead letter, never a silent loss.
            left = ([current] if current is not None else []) + todo[::-1] + held
            reason, error = "failed", exc
            if isinstance(exc, asyncio.CancelledError):
                reason = "shutdown"
                error = ProcessorClosed(
                    "the processor stopped before this batch finished (drain_timeout)"
                )
            for node in left:
                self._unhold(node)
                if node.batch:
                    self._dead_letter(job, node, reason, error)
            raise

    def _expire(self, job: Job, node: _Node) -> None:
        ttl = self.config.message_ttl
        assert ttl is not None and job.times is not None
        now = asyncio.get_running_loop().time()
        times = job.times
        old = [i for i, t in enumerate(times) if now - t > ttl]
        if not old:
            return
        expired = _Node(
            node.batch.derive([node.batch[i] for i in old]), pick(node.trackers, old), 0, True
        )
        expired.errors = [
            MessageExpired(
                f"waited {now - times[i]:.3f}s before its first attempt; message_ttl is {ttl}s"
            )
            for i in old
        ]
        self._dead_letter(job, expired, "expired", None)
        gone = set(old)
        node.take([i for i in range(len(node.batch)) if i not in gone])

    def _outage(self, error: BaseException) -> bool:
        cfg = self.config
        return is_retryable(error, cfg.retry_on) and is_outage(error, cfg.unavailable_on)

    async def _process(
        self, job: Job, node: _Node, todo: list[_Node], deadline: float | None
    ) -> bool:
        """Call with retries, then settle the node; True when an outage holds it instead."""
        cfg = self.config
        extra = cfg.max_retries if node.root else cfg.split_retries
        allowed = 1 + (extra if cfg.retry_failed else 0)
        tries = 0
        while True:
            tries += 1
            try:
                error = await self._call(job, node, deadline=deadline)
            except _PastDeadline:
                # An open circuit kept this batch from its call until delivery_timeout: the
                # trials are shared one per cooldown, so waiting on went far past the bound.
                self._unhold(node)
                self._expire_held(job, node, node.error or _CircuitOpen(cfg.delivery_timeout))
                return False
            if error is None:
                return False
            if is_retryable(error, cfg.retry_on) and tries < allowed:
                self.retries += 1
                self.observer.retried()
                delay = retry_after(
                    error,
                    backoff_delay(
                        tries,
                        base=cfg.retry_delay,
                        cap=cfg.retry_max_delay,
                        jitter=cfg.retry_jitter,
                    ),
                    cfg.retry_max_delay,
                )
                log.debug(
                    "batch failed (%s); retry %d in %.3fs",
                    error,
                    tries,
                    delay,
                    extra=_extra(job, node, "retry"),
                )
                if delay > 0:
                    await asyncio.sleep(delay)
                continue
            break
        down = self.downstream
        if node.held and not (
            down.available and node.mark is not None and down.answered > node.mark
        ):
            # Every call failed by an outage and nothing answered since this batch first
            # failed: nothing shows a bad message, so hold the batch instead of splitting it.
            down.unavailable(error)
            return True
        self._unhold(node)  # evidence of a bad message: split or dead-lettered, not held
        self._settle_failure(job, node, todo, error)
        return False

    async def _retry_held(
        self, job: Job, node: _Node, todo: list[_Node], deadline: float | None
    ) -> bool:
        """One step of a held node: wait, then retry it whole; True while it stays held."""
        cfg, down, breaker = self.config, self.downstream, self.breaker
        error = node.error
        assert error is not None
        if (
            node.probes > 0
            and cfg.enable_partial_batches
            and len(node.batch) >= 2 * _MIN_PROBE_PART
            and (breaker is None or breaker.state == "closed")
        ):
            # Nothing else tells whether the downstream answers: try each half once. An
            # answer to one means bisection may go on; two outage failures hold both halves.
            self._unhold(node)
            self._split(node, todo, probes=node.probes - 1)
            return False
        loop = asyncio.get_running_loop()
        node.waits += 1
        # With a circuit breaker the wait is at most its cooldown: the breaker then lets one
        # trial call through per cooldown and the other held batches wait on it, so the
        # downstream's return is noticed within a cooldown, not a long backoff.
        cap = cfg.retry_max_delay if breaker is None else min(cfg.retry_max_delay, breaker.cooldown)
        delay = max(
            _MIN_HOLD,
            retry_after(
                error,
                backoff_delay(node.waits, base=cfg.retry_delay, cap=cap, jitter=cfg.retry_jitter),
                cap,
            ),
        )
        if down.answered > node.last:
            delay = 0.0  # something got an answer since this node failed: try again now
        elif deadline is not None:
            delay = min(delay, deadline - loop.time())
        await down.wait_answer(delay)
        ticket: int | None = None
        try:
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError
            if breaker is not None:
                # An open circuit makes this wait for its trial: still bounded by the deadline.
                async with asyncio.timeout_at(deadline):
                    ticket = await breaker.acquire()
        except TimeoutError:
            self._unhold(node)
            self._expire_held(job, node, error)
            return False
        previous = node.last
        error = await self._call(job, node, ticket)
        if error is None:
            return False
        if node.held and not (down.available and down.answered > previous):
            # Still nothing answered since this node last failed: still an outage.
            return True
        # Others got answers between this node's failures, or it failed otherwise: the failure
        # is its own, so bisect it (or dead-letter a single message).
        self._unhold(node)
        self._settle_failure(job, node, todo, error)
        return False

    def _settle_failure(
        self, job: Job, node: _Node, todo: list[_Node], error: BaseException
    ) -> None:
        """Bisect a failed node (the halves go next), or dead-letter a single message."""
        if node.errors is None and len(node.batch) > 1 and self.config.enable_partial_batches:
            self._split(node, todo, probes=node.probes)
            return
        self._dead_letter(job, node, "failed", error)

    def _split(self, node: _Node, todo: list[_Node], *, probes: int) -> None:
        # Both halves go next (left first), each a fresh node with no backoff.
        self.splits += 1
        self.observer.split()
        mid = len(node.batch) // 2
        for lo, hi in ((mid, len(node.batch)), (0, mid)):
            half = _Node(
                node.batch.derive(node.batch[lo:hi]),
                pick(node.trackers, range(lo, hi)),
                node.calls,
                root=False,
                mark=node.mark,
                probes=probes,
            )
            todo.append(half)

    def _expire_held(self, job: Job, node: _Node, error: BaseException) -> None:
        timeout = self.config.delivery_timeout
        expired = MessageExpired(
            f"the downstream stayed unavailable past delivery_timeout={timeout}s "
            f"after {node.calls} call(s); last error: {error!r}"
        )
        expired.__cause__ = error
        node.errors = None
        self._dead_letter(job, node, "expired", expired)

    def _unhold(self, node: _Node) -> None:
        if node.held:
            self.downstream.release(node.held)
            node.held = 0

    async def _call(
        self,
        job: Job,
        node: _Node,
        ticket: int | None = None,
        *,
        deadline: float | None = None,
    ) -> BaseException | None:
        """One processor call (past the circuit breaker, unless it gave ``ticket`` already).

        Returns None when every message of the node is settled, else the error to act on.
        Raises _PastDeadline when the circuit stays open past ``deadline`` (delivery_timeout).
        """
        batch = node.batch
        batch.attempt = node.calls + 1
        breaker = self.breaker
        down = self.downstream
        if ticket is None:
            if breaker is None:
                ticket = 0
            else:
                try:
                    async with asyncio.timeout_at(deadline):  # None: no deadline
                        ticket = await breaker.acquire()
                except TimeoutError:
                    raise _PastDeadline from None
        loop = asyncio.get_running_loop()
        started = loop.time()
        down.probe()
        self.calls += 1
        node.calls += 1
        try:
            # The processor gets its own copy: it may consume or reorder the list, while the
            # engine keeps the messages for results, retries and dead letters.
            results = as_results(await self._invoke(batch.derive(batch)))
            if results is not None and len(results) != len(batch):
                raise ResultMismatch(
                    f"processor returned {len(results)} results for a batch of "
                    f"{len(batch)} messages; expected one per message, or None"
                )
        except PartialFailure as partial:
            failures = partial.failures
            if (
                len(failures) == len(batch)
                and partial.fits(len(batch))
                and all(map(self._outage, failures.values()))
            ):
                # Nothing got through, and every message failed by an outage: no answer at
                # all, so the same as a call that raised one (counting it as an answer made
                # each retry look like evidence, and bisection dead-lettered good messages).
                return self._failed(node, failures[min(failures)], started, ticket)
            elapsed = loop.time() - started
            self.observer.call_finished(len(batch), elapsed, False)
            self._unhold(node)
            error = self._partial(job, node, partial)
            # Some messages of the batch got an answer: the downstream is there.
            down.answer()
            if error is not None and node.errors and all(map(self._outage, node.errors)):
                # ...and then it went away (a connection lost mid-batch): the rest of the
                # batch is held as an outage, measured from after that answer.
                node.errors = None
                self._mark_outage(node, error, down.answered)
                if breaker is not None:
                    breaker.record(False, ticket)
                    if breaker.state == "open":
                        down.unavailable(error)
                return error
            if breaker is not None:
                breaker.record(True, ticket)
            return error
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                if breaker is not None:
                    breaker.abandon(ticket)
                raise
            # Nobody cancelled this batch: a library inside the processor leaked a cancel.
            error = CallCancelled(
                "the processor call raised CancelledError although the batch was not cancelled"
            )
            error.__cause__ = exc
            return self._failed(node, error, started, ticket)
        except Exception as exc:
            return self._failed(node, exc, started, ticket)
        except BaseException:
            if breaker is not None:
                breaker.abandon(ticket)
            raise
        elapsed = loop.time() - started
        self.observer.call_finished(len(batch), elapsed, True)
        self._unhold(node)
        down.answer()
        if breaker is not None:
            breaker.record(True, ticket)
        self._complete(job, node, results)
        return None

    def _mark_outage(self, node: _Node, error: BaseException, answered: int) -> None:
        """The node's last call failed by an outage; ``answered`` is the count when it failed.

        Not the count before the call: an answer another batch got while this call was in
        flight came before this failure, and says nothing against this batch being held.
        """
        node.error = error
        node.last = answered
        if node.mark is None:
            node.mark = answered
        if not node.held:
            node.held = len(node.batch)
            self.downstream.hold(node.held)

    def _failed(
        self, node: _Node, exc: BaseException, started: float, ticket: int
    ) -> BaseException:
        """Account for a call that raised: an outage holds the node, anything else answered."""
        elapsed = asyncio.get_running_loop().time() - started
        self.observer.call_finished(len(node.batch), elapsed, False)
        node.errors = None
        node.error = exc
        down, breaker = self.downstream, self.breaker
        outage = self._outage(exc)
        if outage:
            self._mark_outage(node, exc, down.answered)
        else:
            # A message's own error proves the downstream answers.
            self._unhold(node)
            down.answer()
        if breaker is not None:
            breaker.record(not outage, ticket)
            if breaker.state == "open":
                down.unavailable(exc)
        return exc

    async def _invoke(self, batch: Batch[Any]) -> Any:
        timeout = self.config.batch_timeout
        if self._is_async:
            if timeout is None:
                return await self.fn(batch)
            return await self._within(self.fn(batch), timeout)
        loop = asyncio.get_running_loop()
        began = loop.time()
        future = self._threads.run(self.fn, batch)
        if timeout is None:
            result = await future
        else:
            done, _ = await asyncio.wait({future}, timeout=timeout)
            if not done:
                # The hung thread runs on; it is a daemon, so it never holds up the exit of
                # the process, and the next call gets a thread of its own.
                log.warning(
                    "sync processor call ran past batch_timeout=%ss; its thread is abandoned",
                    timeout,
                    extra={"size": len(batch), "attempt": batch.attempt},
                )
                raise BatchTimeout(
                    f"processor call ran past batch_timeout={timeout}s (sync call abandoned)"
                )
            result = future.result()
        if inspect.isawaitable(result):
            # A plain callable that returned an awaitable (a lambda around a coroutine
            # function): batch_timeout bounds the whole call, this part too.
            if timeout is None:
                return await result
            return await self._within(result, max(0.0, timeout - (loop.time() - began)))
        return result

    async def _within(self, awaitable: Any, seconds: float) -> Any:
        """Await the processor's awaitable for at most ``seconds``: BatchTimeout past them."""
        try:
            async with asyncio.timeout(seconds) as scope:
                return await awaitable
        except TimeoutError as exc:
            if scope.expired():
                raise BatchTimeout(
                    f"processor call ran past batch_timeout={self.config.batch_timeout}s and "
                    "was cancelled"
                ) from exc
            raise

    def _partial(self, job: Job, node: _Node, partial: PartialFailure) -> BaseException | None:
        """Settle the messages a PartialFailure did not name; keep the failed ones in the node."""
        batch = node.batch
        size = len(batch)
        results = partial.results
        if not partial.fits(size):
            bad = [i for i in partial.failures if not 0 <= i < size]
            node.errors = None
            problem = (
                f"failure indices {bad} outside the batch of {size}"
                if bad
                else f"{len(results or ())} results for a batch of {size}"
            )
            return ResultMismatch(f"PartialFailure: {problem}")
        failed = sorted(partial.failures)
        gone = set(failed)
        good = [i for i in range(size) if i not in gone]
        if good:
            done = _Node(batch.derive([batch[i] for i in good]), pick(node.trackers, good), 0, True)
            self._complete(job, done, [results[i] for i in good] if results is not None else None)
        retry_on = self.config.retry_on
        final = [i for i in failed if not is_retryable(partial.failures[i], retry_on)]
        if final:
            # The processor named these messages and their errors cannot improve: no split needed.
            dead = _Node(
                batch.derive([batch[i] for i in final]),
                pick(node.trackers, final),
                node.calls,
                True,
            )
            dead.errors = [partial.failures[i] for i in final]
            self._dead_letter(job, dead, "failed", None)
        keep = [i for i in failed if is_retryable(partial.failures[i], retry_on)]
        node.take(keep)
        node.errors = [partial.failures[i] for i in keep]
        return node.errors[0] if keep else None

    # -- settling --------------------------------------------------------------------------
    def _complete(self, job: Job, node: _Node, results: Sequence[Any] | None) -> None:
        if node.trackers:
            _resolve(node.trackers, results)
        latency = asyncio.get_running_loop().time() - job.first_seen
        self._succeeded(len(node.batch), latency)

    def _dead_letter(self, job: Job, node: _Node, reason: str, error: BaseException | None) -> None:
        batch = node.batch
        errors: list[BaseException | None] = (
            list(node.errors) if node.errors else [error] * len(batch)
        )
        trackers = node.trackers or {}
        entries: list[Entry] = [
            (
                build_letter(
                    message,
                    batch.key,
                    batch.priority,
                    reason,
                    err,
                    attempts=node.calls,
                    first_seen=job.first_wall,
                ),
                trackers.get(index),
            )
            for index, (message, err) in enumerate(zip(batch, errors, strict=True))
        ]
        if reason == "failed":
            log.info(
                "dead-lettering %d message(s) after %d call(s): %s",
                len(entries),
                node.calls,
                errors[0],
                extra=_extra(job, node, reason),
            )
        self._dead(entries)


class _DaemonThreads:
    """Reusable worker threads for sync processor calls, all daemons.

    Not a ThreadPoolExecutor: the interpreter joins an executor's threads at exit, so one call
    hung past batch_timeout would keep the process alive forever. A thread starts when no idle
    one is waiting (the scheduler bounds the calls running at once, so the pool stays at
    ``concurrency`` plus the calls abandoned by a timeout) and ends after a minute idle.
    """

    _IDLE_SECONDS = 60.0

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._idle = 0
        self._lock = threading.Lock()

    def run(self, fn: Callable[..., Any], arg: Any) -> asyncio.Future[Any]:
        """Call ``fn(arg)`` on a worker thread; the future resolves on the running loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1  # reserved: that idle thread takes this job
        self._jobs.put((loop, future, fn, arg))
        if spawn:
            threading.Thread(target=self._work, name="batchpunk-call", daemon=True).start()
        return future

    def close(self) -> None:
        """Let the idle threads end now (busy or hung ones end when their call returns)."""
        with self._lock:
            idle, self._idle = self._idle, 0
        for _ in range(idle):
            self._jobs.put(None)

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self._IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # not reserved meanwhile: leave
                        self._idle -= 1
                        return
                continue  # reserved just as the wait ended: its job is on the queue
            if job is None:
                return
            loop, future, fn, arg = job
            try:
                value, error = fn(arg), None
            except BaseException as exc:  # handed to the loop, which raises it in the caller
                value, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop closed while the call hung
                loop.call_soon_threadsafe(_settle, future, value, error)
            with self._lock:
                self._idle += 1


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return  # abandoned after batch_timeout
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _extra(job: Job, node: _Node, reason: str) -> dict[str, Any]:
    batch = node.batch
    return {
        "batch_id": job.seq,
        "key": batch.key,
        "priority": batch.priority,
        "size": len(batch),
        "attempt": batch.attempt,
        "reason": reason,
    }


def _resolve(trackers: Trackers, results: Sequence[Any] | None) -> None:
    """Give each tracked caller its result (None when the handler returned none).

    A tracker is done already only when its caller gave up (cancelled): rare, so it is caught
    rather than asked for (a done() call per message less; a try costs nothing until it raises,
    unlike contextlib.suppress, which enters a context manager per message).
    """
    for index, tracker in trackers.items():
        try:  # noqa: SIM105 - see the docstring
            tracker.set_result(None if results is None else results[index])
        except asyncio.InvalidStateError:
            pass
