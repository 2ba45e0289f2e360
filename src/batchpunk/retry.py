"""Retry arithmetic, error classification and the circuit breaker: small pure policies.

Kept apart from the execution engine so each rule can be tested as a function with injected
time and randomness.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import random
from collections.abc import Callable
from typing import Literal

from batchpunk.config import RetryOn
from batchpunk.errors import BatchTimeout

__all__ = [
    "CircuitBreaker",
    "CircuitState",
    "backoff_delay",
    "is_outage",
    "is_retryable",
    "retry_after",
]

#: OSError numbers that say the network or the host is unreachable, not that a message is bad.
_NETWORK_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNREFUSED",
        "ECONNRESET",
        "ECONNABORTED",
        "EPIPE",
        "ETIMEDOUT",
        "EHOSTUNREACH",
        "EHOSTDOWN",
        "ENETUNREACH",
        "ENETDOWN",
        "ENETRESET",
        "ENOTCONN",
        "ESHUTDOWN",
    )
    if hasattr(errno, name)
)

#: Drivers' connection-level exceptions that do not derive from the builtin ConnectionError or
#: TimeoutError, as (module, class name): matched by name so that no driver is imported.
_DRIVER_OUTAGES = frozenset(
    {
        ("redis.exceptions", "ConnectionError"),  # BusyLoadingError derives from it
        ("redis.exceptions", "TimeoutError"),
        ("nats.errors", "ConnectionClosedError"),
        ("nats.errors", "NoServersError"),
        ("nats.errors", "StaleConnectionError"),
        ("nats.errors", "ConnectionReconnectingError"),
        # Publishing while disconnected once the reconnect buffer is full, or while the
        # connection drains on its way to closed: no message is at fault.
        ("nats.errors", "OutboundBufferLimitError"),
        ("nats.errors", "ConnectionDrainingError"),
        ("nats.js.errors", "ServiceUnavailableError"),
        ("asyncpg.exceptions", "CannotConnectNowError"),
        ("asyncpg.exceptions", "ConnectionDoesNotExistError"),
    }
)

CircuitState = Literal["closed", "open", "half_open"]


def backoff_delay(
    retry: int,
    *,
    base: float,
    cap: float,
    jitter: bool,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to sleep before the ``retry``-th retry (1-based): capped exponential backoff.

    ``min(cap, base * 2**(retry-1))``; with ``jitter`` a uniform draw in [0, that] ("full
    jitter"), which spreads the retries of many failing batches instead of synchronising them
    against a recovering downstream.
    """
    if retry < 1:
        raise ValueError(f"retry: expected a retry number >= 1, got {retry}")
    delay: float = min(cap, base * 2.0 ** min(retry - 1, 64))
    return delay * rand() if jitter else delay


def retry_after(error: BaseException, delay: float, cap: float) -> float:
    """``delay``, or longer when the error carries the downstream's own ``retry_after`` hint.

    A downstream that says when to come back (HTTP's Retry-After on 429 and 503) knows its
    limits better than our backoff does: retrying sooner only earns another refusal. The hint is
    an attribute ``retry_after`` in seconds (HttpStatusError sets it; any exception may), still
    capped at ``cap`` (retry_max_delay): the user's bound on one wait holds against a server
    asking for an hour. A missing, negative or non-finite hint leaves ``delay`` as it was.
    """
    hint = getattr(error, "retry_after", None)
    if type(hint) is not int and type(hint) is not float:  # bool is no number of seconds
        return delay
    seconds = float(hint)
    if not math.isfinite(seconds) or seconds <= delay:
        return delay
    return max(delay, min(seconds, cap))


def is_retryable(error: BaseException, retry_on: RetryOn) -> bool:
    """Whether a failure deserves another attempt.

    A timeout is always retryable. An exception whose class sets ``retryable`` (as connector
    errors do) decides for itself unless ``retry_on`` is a predicate. Otherwise ``retry_on``
    decides: a tuple of types, or a predicate.
    """
    if isinstance(error, BatchTimeout):
        return True
    if isinstance(retry_on, tuple):
        own = getattr(error, "retryable", None)
        if isinstance(own, bool):
            return own
        return isinstance(error, retry_on)
    return bool(retry_on(error))


def is_outage(error: BaseException, unavailable_on: RetryOn | None) -> bool:
    """Whether a failure says the downstream is unavailable rather than a message being bad.

    An outage is held and retried whole until the downstream answers (bounded by
    delivery_timeout); anything else may be poison and is isolated by bisection. A predicate in
    ``unavailable_on`` decides alone. Otherwise an exception class's own ``unavailable``
    attribute decides, then ``retryable = False`` (a message's fault) rules an outage out, then
    the types: ``unavailable_on`` when given, else the built-in rule: ConnectionError (refused,
    reset, aborted, broken pipe), TimeoutError (BatchTimeout included), OSErrors whose errno
    says the network or host is unreachable, and the drivers' connection errors that derive
    from neither (redis, nats, asyncpg; listed in ``_DRIVER_OUTAGES``).
    """
    if unavailable_on is not None and not isinstance(unavailable_on, tuple):
        return bool(unavailable_on(error))
    own = getattr(error, "unavailable", None)
    if isinstance(own, bool):
        return own
    if getattr(error, "retryable", None) is False:
        return False
    if unavailable_on is not None:
        return isinstance(error, unavailable_on)
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    if isinstance(error, OSError) and error.errno in _NETWORK_ERRNOS:
        return True
    return any((k.__module__, k.__qualname__) in _DRIVER_OUTAGES for k in type(error).__mro__)


class CircuitBreaker:
    """Stops calling a downstream that keeps failing, then probes it with one trial call.

    closed: calls flow. After ``threshold`` consecutive calls failed by an outage it opens: no
    call starts for ``cooldown`` seconds (waiting batches keep their slots, so backpressure builds
    upstream). Then half_open: one trial call goes through; success closes the circuit, failure
    reopens it. Waiting is on timers and futures, never polling.
    """

    def __init__(
        self,
        threshold: int,
        cooldown: float,
        clock: Callable[[], float] | None = None,
        on_change: Callable[[CircuitState], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        #: Told each new state: while the circuit is open no batch finishes, so a gauge set
        #: only when one does showed "closed" for the whole outage.
        self._on_change = on_change
        self.state: CircuitState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._trial_running = False
        self._epoch = 0
        self._changed: asyncio.Future[None] | None = None

    def _now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    async def acquire(self) -> int:
        """Wait until a call may start; return its ticket for ``record`` or ``abandon``.

        The ticket is the circuit's epoch, which advances each time the circuit opens: an
        outcome from a call that began before the last opening is stale and changes nothing.
        """
        while True:
            if self.state == "closed":
                return self._epoch
            if self.state == "open":
                wait = self._opened_at + self.cooldown - self._now()
                if wait > 0:
                    await self._wait(wait)
                    continue
                self._set("half_open")
            if not self._trial_running:
                self._trial_running = True
                return self._epoch
            await self._wait(None)

    def record(self, ok: bool, ticket: int | None = None) -> None:
        """Count the outcome of a call that ``acquire`` let through with this ticket.

        Without a ticket the outcome counts as current (for callers that never overlap calls).
        """
        if ticket is not None and ticket != self._epoch:
            return  # began before the circuit last opened
        if self.state == "half_open":
            self._trial_running = False
        if ok:
            self._failures = 0
            if self.state != "closed":
                self._set("closed")
            return
        self._failures += 1
        if self.state == "half_open" or self._failures >= self.threshold:
            self._opened_at = self._now()
            self._epoch += 1
            self._set("open")

    def abandon(self, ticket: int | None = None) -> None:
        """A let-through call ended without an outcome (cancelled): free the trial slot."""
        current = ticket is None or ticket == self._epoch
        if current and self.state == "half_open" and self._trial_running:
            self._trial_running = False
            self._set(self.state)

    def _set(self, state: CircuitState) -> None:
        changed = state != self.state
        self.state = state
        if changed and self._on_change is not None:
            self._on_change(state)
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None

    async def _wait(self, seconds: float | None) -> None:
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        changed = self._changed
        if seconds is None:
            await asyncio.shield(changed)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(changed), seconds)
