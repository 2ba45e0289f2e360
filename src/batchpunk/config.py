"""What to batch, when to flush, how hard to retry: frozen, validated configuration values.

A bad value fails when the config is built, with a ConfigError (a ValueError) naming the field,
never later in the middle of a run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from enum import Enum, StrEnum
from typing import Any

from batchpunk.codec.options import validate_options
from batchpunk.errors import ConfigError

__all__ = ["PIPELINE_CIRCUIT_BREAKER", "BatchConfig", "BatchTrigger", "OverflowPolicy", "RetryOn"]

#: (threshold, cooldown seconds) of the circuit breaker a pipeline turns on unless its config
#: sets one: a pipeline fronts exactly one downstream, so five outage failures in a row say it is
#: out, and one probe every 5 s notices its return within 5 s at a negligible load.
PIPELINE_CIRCUIT_BREAKER: tuple[int, float] = (5, 5.0)

#: Which exceptions deserve a retry: a tuple of types, or a predicate taking the exception.
RetryOn = tuple[type[BaseException], ...] | Callable[[BaseException], bool]


class BatchTrigger(StrEnum):
    """When a lane of waiting messages becomes a batch.

    SIZE: when it holds ``max_size`` messages (or ``max_bytes`` bytes). Choose it for pure bulk
    efficiency when the stream never pauses; a partial lane waits for flush(), stop() or pressure.
    TIMEOUT: when its oldest message has waited ``max_wait``; batches are still cut in chunks of at
    most ``max_size`` messages. Choose it for steady latency whatever the rate.
    BOTH: whichever comes first. The usual choice: bounded size and bounded latency.
    ALL: only when both hold (at least ``max_size`` messages and age at least ``max_wait``); the
    lane is then cut in chunks of ``max_size`` with the remainder joined to the last chunk, so each
    batch holds between ``max_size`` and ``2 * max_size - 1`` messages.
    """

    SIZE = "size"
    TIMEOUT = "timeout"
    BOTH = "both"
    ALL = "all"


class OverflowPolicy(StrEnum):
    """What happens to a new message when ``max_pending`` messages are unfinished.

    BLOCK: ``add_message`` waits for room; ``add_message_nowait`` raises BufferFull.
    RAISE: both raise BufferFull: the producer decides.
    DROP_NEWEST: the new message is dead-lettered with reason "dropped".
    DROP_OLDEST: the oldest message not yet in a running call is dead-lettered with reason
    "dropped" to make room (the new one is, when every unfinished message is already running).

    The drop policies stop dropping once ``max_pending`` letters wait for a dead-letter sink
    whose last write failed: ``add_message`` then waits for room and ``add_message_nowait``
    raises BufferFull, so a sink that is down slows producers instead of filling memory.
    """

    BLOCK = "block"
    RAISE = "raise"
    DROP_NEWEST = "drop_newest"
    DROP_OLDEST = "drop_oldest"


@dataclass(frozen=True, slots=True)
class BatchConfig:
    """How a BatchProcessor batches, schedules, retries and encodes.

    Attributes:
        max_size: messages that trigger a flush (SIZE, BOTH, ALL) and cap a batch (TIMEOUT).
        max_wait: seconds the oldest message of a lane may wait (TIMEOUT, BOTH, ALL).
        trigger: which of the two conditions cut a batch; see BatchTrigger.
        retry_failed: retry a failed batch at all.
        max_retries: retries of a whole batch before it is split (or dead-lettered, if single).
        retry_delay: first backoff sleep in seconds; the n-th retry sleeps retry_delay * 2**(n-1).
        enable_partial_batches: split a batch that exhausted its retries to isolate poison messages.
        enable_parallel_processing: when False, one processor call at a time.
        max_concurrent_batches: processor calls running at once.
        compression_threshold: Batch.encode() compresses payloads larger than this (bytes).
        max_bytes: byte size of a batch that triggers a flush; sizes come from ``sizer``.
        sizer: size of one message in bytes; default len() of bytes or str messages.
        max_pending: unfinished messages (buffered, running or awaiting their dead letter) before
            the overflow policy applies; None for unbounded (not recommended).
        overflow: see OverflowPolicy.
        preserve_order: batches of one key never run at once and finish in the order they were cut.
        batch_timeout: seconds one processor call may run; a longer one is a retryable failure.
        drain_timeout: seconds stop() waits for batches (then again for dead letters).
        retry_max_delay: cap on one backoff sleep.
        retry_jitter: sleep a random time in [0, capped delay] (full jitter) instead of the delay.
        retry_on: exception types, or a predicate, that deserve a retry; others skip to splitting.
        unavailable_on: exception types, or a predicate, that mean the downstream is unavailable
            (an outage: the batch is held and retried whole, never split); None for the built-in
            rule: an exception class's own ``unavailable`` attribute, else ConnectionError,
            TimeoutError (BatchTimeout included) and network OSErrors. See
            docs/failure-handling.md.
        delivery_timeout: seconds from a message's acceptance after which a batch held by an
            outage is dead-lettered with reason "expired"; None waits for the downstream forever.
        split_retries: extra attempts each split half gets before it is split again.
        circuit_breaker_threshold: consecutive calls failed by an outage that open the circuit;
            None (the library default) disables it; pipelines default to 5.
        circuit_breaker_cooldown: seconds the circuit stays open before one trial call.
        message_ttl: a message older than this at its first attempt is dead-lettered as "expired".
        serializer: Batch.encode() serializer: "json", "msgpack" or "pickle".
        compression: Batch.encode() compression: "none", "zlib", "gzip", "zstd" or "lz4".
        compression_level: the algorithm's own level; None for its default.
    """

    max_size: int = 100
    max_wait: float = 5.0
    trigger: BatchTrigger = BatchTrigger.BOTH
    retry_failed: bool = True
    max_retries: int = 3
    retry_delay: float = 1.0
    enable_partial_batches: bool = True
    enable_parallel_processing: bool = True
    max_concurrent_batches: int = 5
    compression_threshold: int = 1024
    max_bytes: int | None = None
    sizer: Callable[[Any], int] | None = None
    max_pending: int | None = 10_000
    overflow: OverflowPolicy = OverflowPolicy.BLOCK
    preserve_order: bool = False
    batch_timeout: float | None = None
    drain_timeout: float | None = 30.0
    retry_max_delay: float = 30.0
    retry_jitter: bool = True
    retry_on: RetryOn = (Exception,)
    split_retries: int = 0
    circuit_breaker_threshold: int | None = None
    circuit_breaker_cooldown: float = 30.0
    message_ttl: float | None = None
    unavailable_on: RetryOn | None = None
    delivery_timeout: float | None = 300.0
    serializer: str = "json"
    compression: str = "zlib"
    compression_level: int | None = None

    def __post_init__(self) -> None:
        # Enums arrive as strings from config files: accept their values, keep the enum.
        object.__setattr__(self, "trigger", _enum(BatchTrigger, "trigger", self.trigger))
        object.__setattr__(self, "overflow", _enum(OverflowPolicy, "overflow", self.overflow))
        _int("max_size", self.max_size, minimum=1)
        _seconds("max_wait", self.max_wait, positive=True)
        _bool("retry_failed", self.retry_failed)
        _int("max_retries", self.max_retries, minimum=0)
        _seconds("retry_delay", self.retry_delay)
        _bool("enable_partial_batches", self.enable_partial_batches)
        _bool("enable_parallel_processing", self.enable_parallel_processing)
        _int("max_concurrent_batches", self.max_concurrent_batches, minimum=1)
        _int("compression_threshold", self.compression_threshold, minimum=0)
        if self.max_bytes is not None:
            _int("max_bytes", self.max_bytes, minimum=1)
        if self.sizer is not None and not callable(self.sizer):
            raise ConfigError(f"sizer: expected a callable or None, got {self.sizer!r}")
        if self.max_pending is not None:
            _int("max_pending", self.max_pending, minimum=1)
        _bool("preserve_order", self.preserve_order)
        if self.batch_timeout is not None:
            _seconds("batch_timeout", self.batch_timeout, positive=True)
        if self.drain_timeout is not None:
            _seconds("drain_timeout", self.drain_timeout)
        _seconds("retry_max_delay", self.retry_max_delay)
        _bool("retry_jitter", self.retry_jitter)
        _retry_on(self.retry_on)
        _int("split_retries", self.split_retries, minimum=0)
        if self.circuit_breaker_threshold is not None:
            _int("circuit_breaker_threshold", self.circuit_breaker_threshold, minimum=1)
        _seconds("circuit_breaker_cooldown", self.circuit_breaker_cooldown)
        if self.message_ttl is not None:
            _seconds("message_ttl", self.message_ttl, positive=True)
        if self.unavailable_on is not None:
            _retry_on(self.unavailable_on, "unavailable_on")
        if self.delivery_timeout is not None:
            _seconds("delivery_timeout", self.delivery_timeout, positive=True)
        try:
            validate_options(self.serializer, self.compression, self.compression_level)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def concurrency(self) -> int:
        """Processor calls allowed at once, after enable_parallel_processing."""
        return self.max_concurrent_batches if self.enable_parallel_processing else 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (enums as values, callables by name) for stats and logs."""
        out: dict[str, Any] = {}
        for name, value in asdict(self).items():
            if isinstance(value, Enum):
                value = value.value
            elif callable(value):
                value = getattr(value, "__qualname__", repr(value))
            elif isinstance(value, tuple):
                value = [getattr(v, "__qualname__", repr(v)) for v in value]
            out[name] = value
        return out

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Every field a config file's [batch] section may set."""
        return tuple(f.name for f in fields(cls))


def _enum(kind: type[Any], name: str, value: Any) -> Any:
    try:
        return kind(value)
    except (ValueError, TypeError):
        allowed = ", ".join(repr(m.value) for m in kind)
        raise ConfigError(f"{name}: expected one of {allowed}, got {value!r}") from None


_INT64 = 2**63 - 1


def _int(name: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if value > _INT64:
        raise ConfigError(f"{name}: {value!r} does not fit in 64 bits")


def _seconds(name: str, value: Any, *, positive: bool = False) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{name}: expected a finite number of seconds, got {value!r}")
    if value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ConfigError(f"{name}: expected seconds {bound}, got {value!r}")


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: expected True or False, got {value!r}")


def _retry_on(value: Any, name: str = "retry_on") -> None:
    if isinstance(value, tuple):
        for item in value:
            if not (isinstance(item, type) and issubclass(item, BaseException)):
                raise ConfigError(f"{name}: expected exception types, got {item!r}")
    elif isinstance(value, type):
        # A class is callable, so it would pass as a predicate that is true for every error.
        raise ConfigError(
            f"{name}: expected a tuple of exception types or a predicate, got the class "
            f"{value.__name__}; write ({value.__name__},)"
        )
    elif not callable(value):
        raise ConfigError(
            f"{name}: expected a tuple of exception types or a predicate, got {value!r}"
        )
