"""What every broker source shares, written once: payload decoding, parts, limits, backoff.

A broker source supplies its read, settle and connect primitives; the ideas they share live
here (the kombu pattern, docs/ARCHITECTURE.md):

- ``payload_decoder``: json, bytes, text or frame, with the frame's HMAC checked wherever a frame
  can arrive, so no source can forget it;
- ``hmac_key_option``: one way to read and validate an HMAC key setting;
- ``int_option`` and ``choice_option``: one check, with one wording, for every integer
  setting and every setting that names one of a few choices (decode, encode, batch_key);
- ``Parts``: the ledger of a delivery that holds a frame of many messages, settled once every
  part is, with one rule for mixed outcomes;
- ``REDELIVERED`` (re-exported from ``batchpunk.envelope``) and ``delivery_limit_error``: the one
  flag and the one error for a message delivered past its limit;
- ``reconnect_delay``: reconnect backoff on ``retry.backoff_delay`` (capped, jittered), so that
  workers of a restarted broker do not reconnect in lockstep;
- ``BufferedSource``: the read-ahead buffer of a source whose tasks poll the broker (Redis
  Streams, Kafka, SQS): starting once, handing out in order, backpressure on the readers, a
  reader's fatal error, and the end of iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Self

from batchpunk.envelope import REDELIVERED, Envelope
from batchpunk.errors import ConfigError, DeliveryLimitExceeded
from batchpunk.retry import backoff_delay

if TYPE_CHECKING:
    from batchpunk.config import BatchConfig

__all__ = [
    "ACK",
    "DECODINGS",
    "ENCODINGS",
    "REDELIVERED",
    "REJECT",
    "REQUEUE",
    "BufferedSource",
    "Parts",
    "delivery_limit_error",
    "choice_option",
    "hmac_key_option",
    "int_option",
    "payload_decoder",
    "reconnect_delay",
]

#: How a source turns message bytes into payloads.
DECODINGS = ("json", "bytes", "text", "frame")

#: How a sink of a broker that carries bytes (Redis Streams, NATS) turns payloads into them:
#: the same names, so what such a sink writes, a source of either broker reads.
ENCODINGS = DECODINGS

#: Outcomes of one message, in the order ``Parts`` ranks them (see there).
REJECT, ACK, REQUEUE = 1, 2, 3


def hmac_key_option(owner: str, value: Any) -> bytes | None:
    """An ``hmac_key`` setting as bytes (a str is UTF-8 encoded); None for no key.

    The error never echoes the value: it is a secret.
    """
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and value:
        return value.encode()
    raise ConfigError(f"{owner}.hmac_key: expected bytes or a non-empty string")


def int_option(owner: str, field: str, value: Any, low: int = 1, high: int | None = None) -> int:
    """An integer setting from ``low`` to ``high`` (None: no upper bound); a bool is refused
    (True is an int to Python, never a count to a user)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        span = f">= {low}" if high is None else f"from {low} to {high}"
        raise ConfigError(f"{owner}.{field}: expected an integer {span}, got {value!r}")
    return value


def choice_option(owner: str, field: str, value: Any, choices: tuple[str, ...]) -> str:
    """A setting that must be one of ``choices``; the error lists them all."""
    if value not in choices:
        raise ConfigError(f"{owner}.{field}: expected one of {choices}, got {value!r}")
    return str(value)


def payload_decoder(
    owner: str, decode: str, hmac_key: bytes | None = None
) -> Callable[[bytes], list[Any]]:
    """A function from message bytes to its payloads (one, or every message of a frame).

    It raises on undecodable bytes (the source then yields a malformed envelope). For "frame",
    a frame is checked against ``hmac_key`` when one is set, and a signed frame is refused
    without one: the check cannot be skipped by the sender.
    """
    if decode == "json":
        # The codec's json: the standard library's meaning at orjson's speed (a fifth of the
        # per-message cost with json.loads), falling back to json where orjson would differ.
        from batchpunk.codec.serializers import deserialize

        return lambda raw: [deserialize(raw, "json")]
    if decode == "bytes":
        return lambda raw: [bytes(raw)]
    if decode == "text":
        return lambda raw: [bytes(raw).decode("utf-8")]
    if decode == "frame":
        from batchpunk.codec import decode_batch

        return lambda raw: list(decode_batch(raw, hmac_key=hmac_key))
    raise ConfigError(f"{owner}.decode: expected one of {', '.join(DECODINGS)}, got {decode!r}")


class Parts:
    """The ledger of one delivery that holds a frame of several messages.

    The envelopes of the frame share it (as their receipt, or inside it); the delivery is
    settled once every part is, with the outcome that loses nothing: requeue if any part asked
    for it, else ack if any part was acked (the frame was at least partly processed, so it must
    not go to a dead-letter exchange again), reject only when every part was rejected.
    """

    __slots__ = ("key", "left", "outcome")

    def __init__(self, key: Any, parts: int) -> None:
        self.key = key
        self.left = parts
        self.outcome = REJECT

    def settle(self, outcome: int) -> int | None:
        """Record one part's outcome; the delivery's outcome once it is the last, else None."""
        if outcome > self.outcome:
            self.outcome = outcome
        self.left -= 1
        return self.outcome if self.left == 0 else None


def delivery_limit_error(what: str, count: int, limit: int, setting: str) -> DeliveryLimitExceeded:
    """The error of a message flagged ``REDELIVERED``: which one, how often, and the limit."""
    return DeliveryLimitExceeded(f"{what} was delivered {count} times ({setting}={limit})")


def reconnect_delay(failures: int, *, base: float = 0.1, cap: float = 5.0) -> float:
    """Seconds to wait before reconnect attempt ``failures`` (1-based): capped, fully jittered.

    Jitter spreads the workers of a broker that just restarted; the cap bounds how long a worker
    stays away once the broker is back.
    """
    return backoff_delay(max(1, failures), base=base, cap=cap, jitter=True)


class BufferedSource:
    """The read-ahead half of a source whose own tasks poll the broker, written once.

    Redis Streams, Kafka and SQS are read by background tasks (XREADGROUP, getmany,
    ReceiveMessage) into a buffer that ``__anext__`` drains, so that cancelling a caller never
    loses what the broker already delivered. The buffer's rules are one contract:

    - the first ``__anext__`` starts the source once (``_open``), however many callers race;
    - envelopes come out in the order the readers pushed them;
    - a reader (``_read_loop``, one task or several) that finds the buffer full (``_full``)
      waits until the pipeline drained it below ``count``, so a slow downstream holds messages
      in the broker, not in memory; ``__anext__`` wakes it only then, so handing out costs no
      wake-up;
    - a failed read is either an outage, retried after a capped, jittered ``_backoff``, or
      fatal: ``__anext__`` raises it once what was read before it has been handed out;
    - ``stop_consuming()`` ends the iteration at once, stops new reads (the one in flight
      completes), and cuts a backoff short; settling keeps working until the subclass's
      ``close()``.

    A subclass supplies the primitives: ``_open()`` (connect and start ``_read_loop`` tasks;
    on failure close what it opened and raise), ``_read()`` (one read: the envelopes to hand
    out) and ``_read_failed()`` (outage or fatal). ``_full``, ``_pause_reading``,
    ``_resume_reading`` and ``_reading_ended`` are there to override where the broker can do
    better (Kafka pauses its partitions; Redis gives back unhanded entries at once).
    """

    def __init__(self, owner: str, count: int | None, default_count: int) -> None:
        self._count_given = None if count is None else int_option(owner, "count", count)
        #: Envelopes per read, and the level the buffer is drained to before readers resume.
        self.count = self._count_given or default_count
        self._buffer: deque[Envelope] = deque()
        self._ready = asyncio.Event()  # set when the buffer got envelopes, a failure or a stop
        self._demand = asyncio.Event()  # set when a waiting reader may read again
        self._paused = False  # a reader waits in _wait_for_room
        self._started = False
        self._start_lock = asyncio.Lock()
        self._consuming = True  # until stop_consuming() (close() calls it)
        self._stop_reading = asyncio.Event()  # set by stop_consuming()
        self._failure: BaseException | None = None

    async def prepare(self, config: BatchConfig) -> None:
        """Size each read to the pipeline's batches (count = config.max_size unless given),
        so that one read fills about one batch."""
        if self._count_given is None:
            self.count = config.max_size

    # -- iteration (the pipeline's side) ---------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Envelope:
        """The next envelope; ends once stop_consuming() or close() was called.

        Cancelling a caller here is safe: it only waits on the buffer the readers fill.
        """
        if not self._started:
            await self._start()
        buffer = self._buffer
        while True:
            if not self._consuming:
                raise StopAsyncIteration
            if buffer:
                envelope = buffer.popleft()
                if self._paused and len(buffer) < self.count:
                    self._paused = False
                    self._demand.set()
                return envelope
            if self._failure is not None:
                raise self._failure
            self._ready.clear()
            self._demand.set()  # an emptied buffer (Kafka drops a revoked partition's) wakes them
            await self._ready.wait()

    async def _start(self) -> None:
        async with self._start_lock:
            if self._started or not self._consuming:
                return
            await self._open()
            self._started = True

    async def _open(self) -> None:
        """Connect and start the reader tasks; on failure close what was opened and raise."""
        raise NotImplementedError

    def stop_consuming(self) -> None:
        """End the iteration soon, while acknowledgements keep working until close().

        For a pipeline that drains: a waiting ``__anext__`` ends, readers start no new read
        (the one in flight returns normally) and leave their backoff.
        """
        self._consuming = False
        self._stop_reading.set()
        self._ready.set()
        self._demand.set()

    # -- the readers' side -----------------------------------------------------------------

    async def _read_loop(self) -> None:
        """One reader task: read while iterating, wait for room, back off from outages."""
        failures = 0
        while self._consuming:
            if self._full():
                await self._wait_for_room()
                continue
            try:
                envelopes = await self._read()
            except Exception as exc:
                error = self._read_failed(exc)
                if error is not None:
                    self._fail(error)
                    return
                failures += 1
                await self._backoff(failures)
                continue
            failures = 0
            self._push(envelopes)
        self._reading_ended()

    async def _read(self) -> Sequence[Envelope]:
        """One read from the broker: the envelopes to hand out, in order (maybe none)."""
        raise NotImplementedError

    def _read_failed(self, exc: Exception) -> BaseException | None:
        """None when a failed read is an outage (logged here, retried after a backoff); else
        the error that stops the source."""
        return exc

    def _reading_ended(self) -> None:
        """Called when a reader leaves its loop after stop_consuming()."""

    def _full(self) -> bool:
        """True when a reader must wait for the pipeline before it reads again."""
        return len(self._buffer) >= self.count

    async def _wait_for_room(self) -> None:
        """Backpressure: wait until the pipeline drained the buffer below ``count``, and below
        the ``_full`` mark where that is lower (Kafka's buffer_size may be): waiting for less
        would send the reader straight back here without yielding, freezing the loop.

        The reader loops back to its ``while self._consuming`` afterwards, so a stop during
        the wait starts no read.
        """
        self._pause_reading()
        try:
            while self._consuming and (len(self._buffer) >= self.count or self._full()):
                self._paused = True  # again after every wake-up: several readers may wait
                self._demand.clear()
                await self._demand.wait()
        finally:
            self._resume_reading()

    def _pause_reading(self) -> None:
        """Called when a reader starts waiting for room (Kafka pauses its partitions)."""

    def _resume_reading(self) -> None:
        """Called when that reader stops waiting."""

    def _push(self, envelopes: Iterable[Envelope]) -> None:
        """Append what a read produced and wake the pipeline."""
        buffer = self._buffer
        before = len(buffer)
        buffer.extend(envelopes)
        if len(buffer) > before:
            self._ready.set()

    def _fail(self, error: BaseException) -> None:
        """Stop the source: ``__anext__`` raises ``error`` once the buffer is drained."""
        self._failure = error
        self._ready.set()

    async def _backoff(self, failures: int) -> None:
        """Wait before retrying after ``failures`` failed reads in a row (reconnect_delay),
        or until stop_consuming(): an unreachable broker must not delay a shutdown."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_reading.wait(), reconnect_delay(failures))

    def _unhanded(self) -> list[Envelope]:
        """Take the envelopes read ahead and never handed out, to give them back.

        The buffer is emptied in place: a waiting ``__anext__`` holds this very deque.
        """
        unhanded = list(self._buffer)
        self._buffer.clear()
        return unhanded
