"""Executing: one batch's life from its first call to the last message settled.

Call the processor, retry with backoff, and when the batch keeps failing, bisect it depth-first
so that good messages complete and each poison message ends alone in a dead letter. Splitting
happens inside the batch's slot: once a batch is split, halves are tried at once (no backoff),
so a poison message costs about two calls per halving level and no good message sleeps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

from batchpunk._accumulator import Job, Tracker, Trackers, pick
from batchpunk._outbox import build_letter
from batchpunk.batch import Batch
from batchpunk.config import BatchConfig
from batchpunk.deadletter import DeadLetter
from batchpunk.errors import (
    BatchTimeout,
    MessageExpired,
    PartialFailure,
    ProcessorClosed,
    ResultMismatch,
)
from batchpunk.metrics import Observer
from batchpunk.retry import CircuitBreaker, backoff_delay, is_retryable

__all__ = ["Execution", "is_async_callable"]

log = logging.getLogger("batchpunk")

Entry = tuple[DeadLetter, Tracker | None]


def is_async_callable(fn: Any) -> bool:
    """A coroutine function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - we ask about __call__ itself
    )


class _Node:
    """Messages that have been in every call together so far (a batch, or part of one)."""

    __slots__ = ("batch", "calls", "errors", "root", "trackers")

    def __init__(
        self,
        batch: Batch[Any],
        trackers: Trackers | None,
        calls: int,
        root: bool,
    ) -> None:
        self.batch = batch
        self.trackers = trackers
        self.calls = calls
        self.root = root
        # Set after a PartialFailure: the error of each message still in the node.
        self.errors: list[BaseException] | None = None

    def take(self, keep: list[int]) -> None:
        """Keep only the messages at these indices."""
        self.batch = self.batch.derive([self.batch[i] for i in keep])
        self.trackers = pick(self.trackers, keep)


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
    ) -> None:
        self.config = config
        self.fn = fn
        self.observer = observer
        self.breaker = breaker
        self._succeeded = succeeded
        self._dead = dead
        self._is_async = is_async_callable(fn)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.retries = 0
        self.splits = 0
        self.calls = 0

    def close(self) -> None:
        """Release the worker threads of a sync processor (a hung call is abandoned)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # -- a job's life ----------------------------------------------------------------------
    async def run(self, job: Job) -> None:
        """Process a job until every one of its messages succeeded or was dead-lettered."""
        todo = [_Node(job.batch, job.trackers, 0, root=True)]
        current: _Node | None = None
        try:
            if self.config.message_ttl is not None and job.times:
                self._expire(job, todo[0])
            while todo:
                current = todo.pop()
                if current.batch:
                    await self._process(job, current, todo)
                current = None
        except BaseException as exc:
            # Cancelled by stop() past drain_timeout, or a BaseException from the processor:
            # whatever has not finished becomes a dead letter, never a silent loss.
            left = ([current] if current is not None else []) + todo[::-1]
            reason, error = "failed", exc
            if isinstance(exc, asyncio.CancelledError):
                reason = "shutdown"
                error = ProcessorClosed(
                    "the processor stopped before this batch finished (drain_timeout)"
                )
            for node in left:
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

    async def _process(self, job: Job, node: _Node, todo: list[_Node]) -> None:
        cfg = self.config
        extra = cfg.max_retries if node.root else cfg.split_retries
        allowed = 1 + (extra if cfg.retry_failed else 0)
        tries = 0
        while True:
            tries += 1
            error = await self._call(job, node)
            if error is None:
                return
            if is_retryable(error, cfg.retry_on) and tries < allowed:
                self.retries += 1
                self.observer.retried()
                delay = backoff_delay(
                    tries, base=cfg.retry_delay, cap=cfg.retry_max_delay, jitter=cfg.retry_jitter
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
        if node.errors is None and len(node.batch) > 1 and cfg.enable_partial_batches:
            # Bisect: both halves go next (left first), each a fresh node with no backoff.
            self.splits += 1
            self.observer.split()
            mid = len(node.batch) // 2
            for lo, hi in ((mid, len(node.batch)), (0, mid)):
                half = _Node(
                    node.batch.derive(node.batch[lo:hi]),
                    pick(node.trackers, range(lo, hi)),
                    node.calls,
                    root=False,
                )
                todo.append(half)
            return
        self._dead_letter(job, node, "failed", error)

    async def _call(self, job: Job, node: _Node) -> BaseException | None:
        """One processor call; None when every message of the node is settled."""
        batch = node.batch
        batch.attempt = node.calls + 1
        breaker = self.breaker
        ticket = await breaker.acquire() if breaker is not None else 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.calls += 1
        node.calls += 1
        try:
            # The processor gets its own copy: it may consume or reorder the list, while the
            # engine keeps the messages for results, retries and dead letters.
            results = await self._invoke(batch.derive(batch))
            if results is not None:
                if not isinstance(results, Sequence) or isinstance(results, str | bytes):
                    results = list(results)
                if len(results) != len(batch):
                    raise ResultMismatch(
                        f"processor returned {len(results)} results for a batch of "
                        f"{len(batch)} messages; expected one per message, or None"
                    )
        except PartialFailure as partial:
            elapsed = loop.time() - started
            self.observer.call_finished(len(batch), elapsed, False)
            error = self._partial(job, node, partial)
            if breaker is not None:
                breaker.record(
                    error is None or not is_retryable(error, self.config.retry_on), ticket
                )
            return error
        except Exception as exc:
            elapsed = loop.time() - started
            self.observer.call_finished(len(batch), elapsed, False)
            node.errors = None
            if breaker is not None:
                # A poison message proves the downstream answers: only retryable errors count.
                breaker.record(not is_retryable(exc, self.config.retry_on), ticket)
            return exc
        except BaseException:
            if breaker is not None:
                breaker.abandon(ticket)
            raise
        elapsed = loop.time() - started
        self.observer.call_finished(len(batch), elapsed, True)
        if breaker is not None:
            breaker.record(True, ticket)
        self._complete(job, node, results)
        return None

    async def _invoke(self, batch: Batch[Any]) -> Any:
        timeout = self.config.batch_timeout
        if self._is_async:
            if timeout is None:
                return await self.fn(batch)
            try:
                async with asyncio.timeout(timeout) as scope:
                    return await self.fn(batch)
            except TimeoutError as exc:
                if scope.expired():
                    raise BatchTimeout(
                        f"processor call ran past batch_timeout={timeout}s and was cancelled"
                    ) from exc
                raise
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.config.concurrency, thread_name_prefix="batchpunk"
            )
        future = asyncio.get_running_loop().run_in_executor(self._executor, self.fn, batch)
        if timeout is None:
            result = await future
        else:
            done, _ = await asyncio.wait({future}, timeout=timeout)
            if not done:
                # The hung thread keeps running; later calls get a fresh pool, so a pool of
                # one thread is never blocked behind it.
                self.close()
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
            result = await result
        return result

    def _partial(self, job: Job, node: _Node, partial: PartialFailure) -> BaseException | None:
        """Settle the messages a PartialFailure did not name; keep the failed ones in the node."""
        batch = node.batch
        size = len(batch)
        bad = [i for i in partial.failures if not 0 <= i < size]
        results = partial.results
        if bad or (results is not None and len(results) != size):
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
        trackers = node.trackers
        if trackers and results is None:
            for tracker in trackers.values():
                if not tracker.done():
                    tracker.set_result(None)
        elif trackers and results is not None:
            for index, tracker in trackers.items():
                if not tracker.done():
                    tracker.set_result(results[index])
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
