"""The downstream's health as the engine sees it: available, or out since when, holding what.

One object per processor, shared by every batch. A call that gets an answer (a success, a
PartialFailure, an error that belongs to a message) advances ``answered`` and ends an outage.
An outage starts when a batch used up its retries on outage errors with no answer from the
downstream since it first failed, or when the circuit breaker opens. Batches held by an outage
wait on ``wait_answer`` (a future with a deadline, never polling), so they retry as soon as any
call gets through instead of sleeping out their backoff.

Logs one warning when an outage starts and one when it ends (its length, the most messages held
at once, the probe calls), never one per failed call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from batchpunk.metrics import Observer

__all__ = ["Downstream"]

log = logging.getLogger("batchpunk")


class Downstream:
    """Counts answers, held messages, probes and outages; see the module docstring."""

    def __init__(self, observer: Observer | None = None) -> None:
        self._observer = observer
        #: Calls that got an answer from the downstream so far (a health clock for bisection).
        self.answered = 0
        self.available = True
        #: time.time() when the current outage began, None while available.
        self.since: float | None = None
        #: Messages of batches whose last call failed by an outage and that wait to retry.
        self.held = 0
        #: Calls started while unavailable, in the current or last outage.
        self.probes = 0
        self.outages = 0
        self._peak = 0
        self._began = 0.0
        self._answer: asyncio.Future[None] | None = None

    def answer(self) -> None:
        """A call got an answer: the downstream is there; wake the held batches."""
        self.answered += 1
        if not self.available:
            self.available = True
            self.since = None
            log.warning(
                "downstream available again after %.1f s; %d message(s) were held, "
                "%d probe call(s) made",
                time.monotonic() - self._began,
                self._peak,
                self.probes,
                extra={"reason": "recovered", "size": self._peak},
            )
            self._report()
        answer, self._answer = self._answer, None
        if answer is not None and not answer.done():
            answer.set_result(None)

    def unavailable(self, error: BaseException) -> None:
        """Start an outage unless one is already on (one warning per outage)."""
        if not self.available:
            return
        self.available = False
        self.since = time.time()
        self._began = time.monotonic()
        self.probes = 0
        self.outages += 1
        self._peak = self.held
        log.warning(
            "downstream unavailable (%s): holding batches and retrying them whole until it "
            "answers; nothing is dead-lettered before delivery_timeout",
            error,
            extra={"reason": "unavailable", "size": self.held},
        )
        if self._observer is not None:
            self._observer.outage()
        self._report()

    def hold(self, count: int) -> None:
        self.held += count
        if self.held > self._peak:
            self._peak = self.held
        self._report()

    def release(self, count: int) -> None:
        self.held -= count
        self._report()

    def probe(self) -> None:
        """A call starts: while unavailable it is a probe of the downstream."""
        if not self.available:
            self.probes += 1
            if self._observer is not None:
                self._observer.probed()

    def _report(self) -> None:
        if self._observer is not None:
            self._observer.downstream(not self.available, self.held)

    async def wait_answer(self, seconds: float) -> None:
        """Sleep up to ``seconds``, returning early once any call gets an answer."""
        if seconds <= 0:
            return
        if self._answer is None or self._answer.done():
            self._answer = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._answer), seconds)

    def stats(self) -> dict[str, Any]:
        """The "downstream" section of get_stats()."""
        return {
            "state": "available" if self.available else "unavailable",
            "since": self.since,
            "held": self.held,
            "probes": self.probes,
            "outages": self.outages,
        }
