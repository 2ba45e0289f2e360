"""Dead-letter delivery: letters wait here until their sink has stored them.

A message whose letter is not yet stored is still unfinished: it counts as pending and holds its
place under max_pending, so a sink that is down slows producers instead of losing letters.
Failed writes are retried with capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from batchpunk._jobs import Tracker, Trackers
from batchpunk.deadletter import DeadLetter
from batchpunk.retry import backoff_delay, retry_after

__all__ = ["Outbox", "as_put", "build_letter"]

log = logging.getLogger("batchpunk")

Entry = tuple[DeadLetter, Tracker | None]
Put = Callable[[list[DeadLetter]], Awaitable[None]]

#: Letters handed to the sink per write.
CHUNK = 1000
#: The shortest pause between two failed writes, so a zero retry_delay cannot spin.
MIN_PAUSE = 0.01


def build_letter(
    message: Any,
    key: Any,
    priority: int,
    reason: str,
    error: BaseException | None,
    *,
    attempts: int = 0,
    first_seen: float | None = None,
    headers: dict[str, Any] | None = None,
) -> DeadLetter:
    """The one place the engine builds a DeadLetter (failed, dropped, shutdown, rejected...).

    ``first_seen`` is the wall-clock time the message's lane started waiting (now when unknown).
    """
    return DeadLetter(
        message=message,
        key=key,
        priority=priority,
        reason=reason,
        error=error,
        attempts=attempts,
        first_seen=time.time() if first_seen is None else first_seen,
        headers=dict(headers) if headers else {},
    )


def shutdown_entries(
    batch: Sequence[Any],
    key: Any,
    priority: int,
    trackers: Trackers | None,
    first_wall: float,
    error: BaseException,
) -> list[Entry]:
    """Letters with reason "shutdown" for messages stop() left unprocessed, with trackers."""
    marks = trackers or {}
    return [
        (
            build_letter(message, key, priority, "shutdown", error, first_seen=first_wall),
            marks.get(index),
        )
        for index, message in enumerate(batch)
    ]


def as_put(target: Any) -> Put:
    """Adapt a dead-letter target (``put`` method, or sync/async callable) to one async put."""
    put = getattr(target, "put", None)
    fn = put if callable(put) else target
    if not callable(fn):
        raise ValueError(
            f"dead_letter: expected a callable or an object with async put(letters), got {target!r}"
        )

    async def call(letters: list[DeadLetter]) -> None:
        result = fn(letters)
        if inspect.isawaitable(result):
            await result

    return call


class Outbox:
    """Delivers dead letters to one sink in order, retrying until it accepts them.

    ``delivered`` is called with each chunk once stored: that is when the engine counts the
    messages as dead-lettered and fails their futures.
    """

    def __init__(
        self,
        put: Put,
        delivered: Callable[[Sequence[Entry]], None],
        *,
        retry_delay: float,
        retry_max_delay: float,
    ) -> None:
        self._put = put
        self._delivered = delivered
        self._retry_delay = retry_delay
        self._retry_max_delay = retry_max_delay
        self._queue: list[Entry] = []
        self._wake: asyncio.Future[None] | None = None
        self._idle: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None
        self.failed_writes = 0
        # A failed write until the next one succeeds; a write under way.
        self._failed = False
        self._writing = False

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def behind(self) -> bool:
        """Letters added now wait for the sink: its last write failed, or one is under way (a
        sink that hangs never fails). Not while a burst of letters waits for a sink that simply
        has not been given them yet."""
        return self._failed or self._writing

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batchpunk-dlq")

    def add(self, entries: Sequence[Entry]) -> None:
        self._queue.extend(entries)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def wait_idle(self) -> None:
        """Return once every letter added so far has been stored."""
        if self._queue:
            future = asyncio.get_running_loop().create_future()
            self._idle.append(future)
            await future

    async def close(self) -> list[Entry]:
        """Stop delivering; return the letters that were never stored."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        left, self._queue = self._queue, []
        for future in self._idle:
            if not future.done():
                future.set_result(None)
        self._idle.clear()
        return left

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            if not self._queue:
                for future in self._idle:
                    if not future.done():
                        future.set_result(None)
                self._idle.clear()
                self._wake = loop.create_future()
                await self._wake
                continue
            chunk = self._queue[:CHUNK]
            self._writing = True
            try:
                await self._put([letter for letter, _ in chunk])
            except (Exception, asyncio.CancelledError) as caught:
                exc: BaseException = caught
                if isinstance(caught, asyncio.CancelledError):
                    task = asyncio.current_task()
                    if task is None or task.cancelling():
                        raise  # close() cancelled this task
                    # Nobody cancelled the outbox: the sink's library leaked a cancel. Ending
                    # the task here left every later letter unstored, silently.
                    exc = RuntimeError("the dead-letter sink raised CancelledError")
                    exc.__cause__ = caught
                failures += 1
                self.failed_writes += 1
                self._failed = True
                delay = max(
                    MIN_PAUSE,
                    retry_after(
                        exc,
                        backoff_delay(
                            failures,
                            base=self._retry_delay,
                            cap=self._retry_max_delay,
                            jitter=False,
                        ),
                        self._retry_max_delay,
                    ),
                )
                log.error(
                    "dead-letter sink failed to store %d letters (%s: %s); retry %d in %.2fs",
                    len(chunk),
                    type(exc).__name__,
                    exc,
                    failures,
                    delay,
                    extra={"size": len(chunk), "attempt": failures},
                )
                await asyncio.sleep(delay)
                continue
            finally:
                self._writing = False
            failures = 0
            self._failed = False
            del self._queue[: len(chunk)]
            self._delivered(chunk)
