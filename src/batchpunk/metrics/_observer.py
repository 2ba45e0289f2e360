"""The engine's single seam to metrics: one call per event, fixed memory, a user collector fed.

The engine calls an :class:`Observer` once per batch or per event (never per message), and the
observer does two things with each call: it updates its own fixed-memory recorder (histograms
for percentiles, a bounded ring of per-interval records for history and throughput), and it
forwards the event to the user's :class:`MetricsCollector` under the names documented in
docs/observability.md. Rolling intervals advance lazily from the clock on the next call, so no
timer task runs and an idle processor costs nothing.

A collector is user code: whatever it raises is caught and logged on the "batchpunk" logger at
most once per minute, and processing goes on. An async collector method's coroutine is scheduled
on the running loop and never awaited by the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from batchpunk.metrics._histogram import LogHistogram

__all__ = ["CIRCUIT_STATES", "MetricsCollector", "Observer"]

logger = logging.getLogger("batchpunk")

#: Numeric value of the ``circuit_state`` gauge for each circuit breaker state.
CIRCUIT_STATES: Mapping[str, int] = {"closed": 0, "half_open": 1, "open": 2}

#: Seconds between two log records about the same collector's errors.
_ERROR_LOG_EVERY = 60.0

#: Relative error of every percentile the observer reports (see LogHistogram).
RELATIVE_ERROR = 0.01

_QUANTILES = (0.5, 0.9, 0.99)
_WINDOWS = (("1m", 60.0), ("5m", 300.0), ("15m", 900.0))


@runtime_checkable
class MetricsCollector(Protocol):
    """What a ``metrics_collector`` provides: three methods, each plain or async.

    Names and tags are listed in docs/observability.md. ``tags`` is None or a small dict of
    strings; a collector must not keep or mutate it. An async method's coroutine is scheduled on
    the running loop without being awaited, so a slow exporter never slows the engine; a method
    that raises is logged (once a minute at most) and otherwise ignored.
    """

    def increment(self, name: str, value: int = 1, tags: Mapping[str, str] | None = None) -> object:
        """Add ``value`` to the counter ``name``."""

    def timing(self, name: str, seconds: float, tags: Mapping[str, str] | None = None) -> object:
        """Record one sample of the distribution ``name`` (seconds, messages or bytes)."""

    def gauge(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> object:
        """Set the gauge ``name`` to ``value``."""


class _Interval:
    """Counts of the interval being filled; closed into a history record when time moves on."""

    __slots__ = ("batched", "batches", "dead_lettered", "latency", "processed", "received")

    def __init__(self) -> None:
        self.received = 0
        self.processed = 0
        self.dead_lettered = 0
        self.batches = 0
        self.batched = 0
        self.latency = LogHistogram(RELATIVE_ERROR)

    def reset(self) -> None:
        self.received = self.processed = self.dead_lettered = self.batches = self.batched = 0
        self.latency.clear()


#: A closed interval: start, received, processed, dead_lettered, batches, mean batch size,
#: latency p50, p90, p99.
_Record = tuple[float, int, int, int, int, float | None, float | None, float | None, float | None]


class Observer:
    """Engine-facing: one call per event; feeds the fixed-memory recorder and the user's collector.

    Args:
        collector: a MetricsCollector, or None to record only.
        interval: seconds per history record (and the resolution of throughput windows).
        keep: history records kept; with the defaults, 15 minutes at one record per second.
        clock: monotonic seconds; tests inject a fake one.

    Latency percentiles are over messages: each group of ``n`` messages finished together is
    counted ``n`` times with the age of its oldest message, an upper bound for each of them.
    Summary percentiles (``latency``, ``call_latency``, ``batch_size``) cover the observer's whole
    life; per-interval ones are in ``history``. Every percentile is within 1 % of the exact one.
    """

    def __init__(
        self,
        collector: object | None = None,
        *,
        interval: float = 1.0,
        keep: int = 900,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (isinstance(interval, int | float) and interval > 0):
            raise ValueError(f"interval: expected a positive number of seconds, got {interval!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep: expected a positive int, got {keep!r}")
        if collector is not None:
            for method in ("increment", "timing", "gauge"):
                if not callable(getattr(collector, method, None)):
                    raise TypeError(
                        f"metrics_collector: {type(collector).__name__} has no callable "
                        f"{method}(); expected increment, timing and gauge methods"
                    )
        self._collector = collector
        self._interval = float(interval)
        self._clock = clock
        self._start = clock()
        self._wall_offset = time.time() - self._start
        self._interval_start = self._start
        self._interval_end = self._start + self._interval
        self._current = _Interval()
        self._history: deque[_Record] = deque(maxlen=keep)
        self._latency = LogHistogram(RELATIVE_ERROR)
        self._call_latency = LogHistogram(RELATIVE_ERROR)
        self._batch_size = LogHistogram(RELATIVE_ERROR, min_value=1.0, max_value=1e9)
        self._batches = 0
        self._batched = 0
        self._collector_errors = 0
        self._suppressed_errors = 0
        self._last_error_log = -float("inf")
        self._tasks: set[asyncio.Future[Any]] = set()

    # -- events ---------------------------------------------------------------------------------

    def received(self, n: int) -> None:
        """``n`` messages were accepted."""
        self._tick().received += n
        if self._collector is not None:
            self._send("increment", "messages_received", n, None)

    def batch_cut(self, size: int, nbytes: int | None, reason: str) -> None:
        """A batch of ``size`` messages (``nbytes`` bytes, if known) was cut for ``reason``."""
        current = self._tick()
        current.batches += 1
        current.batched += size
        self._batches += 1
        self._batched += size
        self._batch_size.add(size)
        if self._collector is not None:
            self._send("increment", "batches", 1, {"reason": reason})
            self._send("timing", "batch_size", size, None)
            if nbytes is not None:
                self._send("timing", "batch_bytes", nbytes, None)

    def call_finished(self, size: int, seconds: float, ok: bool) -> None:
        """One processor call on ``size`` messages took ``seconds`` and succeeded or not."""
        self._tick()
        self._call_latency.add(seconds)
        if self._collector is not None:
            self._send("timing", "call_duration", seconds, {"outcome": "ok" if ok else "error"})

    def retried(self) -> None:
        """One retry call was scheduled."""
        if self._collector is not None:
            self._send("increment", "retries", 1, None)

    def split(self) -> None:
        """One batch was split in halves."""
        if self._collector is not None:
            self._send("increment", "splits", 1, None)

    def processed(self, n: int, latency: float) -> None:
        """``n`` messages succeeded; ``latency`` is the age of the oldest of them, in seconds."""
        current = self._tick()
        current.processed += n
        current.latency.add(latency, n)
        self._latency.add(latency, n)
        if self._collector is not None:
            self._send("increment", "messages_processed", n, None)
            self._send("timing", "latency", latency, None)

    def dead_lettered(self, n: int, reason: str) -> None:
        """``n`` messages were dead-lettered for ``reason`` (failed, dropped, expired, ...)."""
        self._tick().dead_lettered += n
        if self._collector is not None:
            self._send("increment", "messages_dead_lettered", n, {"reason": reason})
            if reason == "failed":
                self._send("increment", "messages_failed", n, None)
            elif reason == "dropped":
                self._send("increment", "messages_dropped", n, None)

    def gauges(self, pending: int, in_flight: int, circuit: str) -> None:
        """The current pending and in-flight message counts and circuit breaker state."""
        if self._collector is not None:
            self._send("gauge", "pending", pending, None)
            self._send("gauge", "in_flight", in_flight, None)
            self._send("gauge", "circuit_state", CIRCUIT_STATES.get(circuit, -1), None)

    def circuit(self, state: str) -> None:
        """The circuit breaker changed state (0 closed, 1 half_open, 2 open)."""
        if self._collector is not None:
            self._send("gauge", "circuit_state", CIRCUIT_STATES.get(state, -1), None)

    def downstream(self, unavailable: bool, held: int) -> None:
        """The downstream's state changed (1 while unavailable) or the messages it holds."""
        if self._collector is not None:
            self._send("gauge", "downstream_unavailable", 1 if unavailable else 0, None)
            self._send("gauge", "downstream_held", held, None)

    def probed(self) -> None:
        """A call started while the downstream was unavailable."""
        if self._collector is not None:
            self._send("increment", "downstream_probes", 1, None)

    def outage(self) -> None:
        """An outage began."""
        if self._collector is not None:
            self._send("increment", "downstream_outages", 1, None)

    # -- reading --------------------------------------------------------------------------------

    def snapshot(self, history: bool = False) -> dict[str, Any]:
        """Percentiles, mean batch size and throughput, plus the history ring when asked.

        Percentiles are in seconds (batch sizes in messages) and None before the first sample;
        throughput is messages processed per second over the last 1, 5 and 15 minutes (or since
        the observer started, when that is shorter).
        """
        now = self._clock()
        self._advance(now)
        out: dict[str, Any] = {
            "latency": _summary(self._latency),
            "call_latency": _summary(self._call_latency),
            "batch_size": _summary(self._batch_size),
            "mean_batch_size": self._batched / self._batches if self._batches else 0.0,
            "throughput": self._throughput(now),
            "collector_errors": self._collector_errors,
        }
        if history:
            wall = self._wall_offset
            out["history"] = [
                {
                    "start": r[0],
                    "time": r[0] + wall,
                    "received": r[1],
                    "processed": r[2],
                    "dead_lettered": r[3],
                    "batches": r[4],
                    "mean_batch_size": r[5],
                    "latency_p50": r[6],
                    "latency_p90": r[7],
                    "latency_p99": r[8],
                }
                for r in self._history
            ]
        return out

    async def drain(self) -> None:
        """Wait for the async collector calls still running; the engine calls it on stop()."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- internals ------------------------------------------------------------------------------

    def _tick(self) -> _Interval:
        now = self._clock()
        if now >= self._interval_end:
            self._advance(now)
        return self._current

    def _advance(self, now: float) -> None:
        """Close the current interval, and the empty ones skipped since, if time moved past it."""
        if now < self._interval_end:
            return
        c = self._current
        p50, p90, p99 = c.latency.quantiles(_QUANTILES)
        mean = c.batched / c.batches if c.batches else None
        history = self._history
        start = self._interval_start
        history.append(
            (start, c.received, c.processed, c.dead_lettered, c.batches, mean, p50, p90, p99)
        )
        c.reset()
        skipped = int((now - self._interval_end) // self._interval)
        assert history.maxlen is not None
        first_empty = max(0, skipped - history.maxlen)
        for k in range(first_empty, skipped):
            history.append((start + (k + 1) * self._interval, 0, 0, 0, 0, None, None, None, None))
        self._interval_start = start + (skipped + 1) * self._interval
        self._interval_end = self._interval_start + self._interval

    def _throughput(self, now: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for label, window in _WINDOWS:
            cutoff = now - window
            count = self._current.processed
            earliest = self._interval_start
            for record in reversed(self._history):
                if record[0] < cutoff:
                    break
                count += record[2]
                earliest = record[0]
            span = now - earliest
            out[label] = count / span if span > 0 else 0.0
        return out

    def _send(self, method: str, name: str, value: float, tags: dict[str, str] | None) -> None:
        try:
            result = getattr(self._collector, method)(name, value, tags)
            if result is not None and isinstance(result, Awaitable):
                self._schedule(result)
        except Exception as exc:  # a collector never breaks processing
            self._collector_failed(exc)

    def _schedule(self, awaitable: Awaitable[Any]) -> None:
        try:
            future = asyncio.ensure_future(awaitable)
        except RuntimeError:  # no running loop: the call cannot happen
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise
        self._tasks.add(future)
        future.add_done_callback(self._collector_done)

    def _collector_done(self, future: asyncio.Future[Any]) -> None:
        self._tasks.discard(future)
        if not future.cancelled() and (exc := future.exception()) is not None:
            self._collector_failed(exc)

    def _collector_failed(self, exc: BaseException) -> None:
        self._collector_errors += 1
        now = self._clock()
        if now - self._last_error_log < _ERROR_LOG_EVERY:
            self._suppressed_errors += 1
            return
        suppressed, self._suppressed_errors = self._suppressed_errors, 0
        self._last_error_log = now
        logger.error(
            "metrics collector %s raised %s: %s (%d more errors since the last report; "
            "processing goes on, next report in %.0f s at the earliest)",
            type(self._collector).__name__,
            type(exc).__name__,
            exc,
            suppressed,
            _ERROR_LOG_EVERY,
            exc_info=exc,
            extra={"reason": "collector_error"},
        )

    def __repr__(self) -> str:
        return (
            f"Observer(collector={type(self._collector).__name__ if self._collector else None}, "
            f"interval={self._interval}, keep={self._history.maxlen})"
        )


def _summary(histogram: LogHistogram) -> dict[str, float | None]:
    p50, p90, p99 = histogram.quantiles(_QUANTILES)
    return {"p50": p50, "p90": p90, "p99": p99, "max": histogram.max}
