"""The batchpunk exception tree.

Every exception batchpunk raises on purpose derives from :class:`BatchpunkError`, and where a
builtin fits it derives from that too, so callers can catch either::

    BatchpunkError
    ├── BufferFull                      the buffer is at max_pending and the policy refuses to wait
    ├── ProcessorClosed                 the processor is stopping or stopped (or not started)
    ├── BatchTimeout (TimeoutError)     one processor call ran past batch_timeout (an outage)
    ├── MessageExpired (TimeoutError)   past message_ttl before its first attempt, or held by an
    │                                   outage past delivery_timeout (reason "expired")
    ├── DownstreamUnavailable           base for "the downstream did not answer" errors: an outage,
    │   (ConnectionError)               retried whole and waited out, never bisected
    ├── CallCancelled                   a processor call raised CancelledError nobody asked for
    ├── ResultMismatch (ValueError)     a processor returned the wrong number of results
    ├── PartialFailure                  raised by a processor: only some messages of a batch failed
    ├── DeadLetterError                 a dead-letter sink could not take letters (retried)
    ├── DeliveryLimitExceeded           a broker delivered a message past its limit ("redelivered")
    ├── FrameError (ValueError)         bytes that are not a valid batchpunk frame
    ├── ConfigError (ValueError)        a pipeline file or connector setting is wrong
    ├── ConnectorError                  a connector failed talking to its broker or store
    └── MissingDependency (ImportError) an optional extra is not installed

Error messages name the field or input at fault and what was expected.

Two class attributes classify any exception, batchpunk's or not: ``retryable = False`` says the
failure belongs to the message and no retry helps; ``unavailable = True`` says the downstream did
not answer (an outage): the batch is held and retried whole until the downstream answers or
``delivery_timeout`` passes, and is never split into dead letters. ``unavailable = False`` says an
error that looks like a connection failure may still belong to a message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "BatchpunkError",
    "BatchTimeout",
    "BufferFull",
    "CallCancelled",
    "ConfigError",
    "ConnectorError",
    "DeadLetterError",
    "DeliveryLimitExceeded",
    "DownstreamUnavailable",
    "FrameError",
    "MessageExpired",
    "MissingDependency",
    "PartialFailure",
    "ProcessorClosed",
    "ResultMismatch",
]


class BatchpunkError(Exception):
    """Root of every batchpunk exception: catch this to catch them all."""


class BufferFull(BatchpunkError):
    """The processor holds ``max_pending`` unfinished messages and the overflow policy refuses.

    Raised by ``add_message_nowait`` under BLOCK and by both add methods under RAISE; under the
    drop policies it is the error recorded on the dropped message's dead letter.
    """


class ProcessorClosed(BatchpunkError):
    """The processor is not accepting messages: it was not started, or ``stop()`` has begun."""


class BatchTimeout(BatchpunkError, TimeoutError):
    """A processor call ran longer than ``batch_timeout``; it counts as a retryable failure."""


class MessageExpired(BatchpunkError, TimeoutError):
    """A message waited longer than ``message_ttl`` before its first attempt (reason "expired")."""


class DownstreamUnavailable(BatchpunkError, ConnectionError):
    """The downstream did not answer: refused, reset, lost, timed out, overloaded (429/503).

    Raise it (or subclass it) from a processor to say "not this batch's fault": the engine holds
    the batch and retries it whole with backoff, one probe at a time behind the circuit breaker,
    until the downstream answers again or the messages reach ``delivery_timeout``.
    """

    retryable = True
    unavailable = True


class CallCancelled(BatchpunkError):
    """A processor call raised CancelledError although nothing was cancelling the batch.

    A library inside the processor let an internal cancellation escape. It is a failure of that
    one call (retried, then isolated like any error), not a shutdown: the messages are not lost
    as "shutdown" letters while the processor keeps running.
    """


class ResultMismatch(BatchpunkError, ValueError):
    """A processor returned a result sequence whose length differs from the batch's."""


class PartialFailure(BatchpunkError):
    """Raised by a processor to say that only some messages of its batch failed.

    Attributes:
        failures: index in the batch -> the exception that failed that message.
        results: when given, one result per message of the batch (any value at failed indices);
            the messages that did not fail complete at once with these results.

    Only the failed messages go on to retries, splitting and dead-lettering. Each carries its own
    exception, not this one.
    """

    def __init__(
        self,
        failures: Mapping[int, BaseException],
        results: Sequence[Any] | None = None,
    ) -> None:
        if not failures:
            raise ValueError("PartialFailure.failures: expected at least one failed index")
        for index, error in failures.items():
            if not isinstance(index, int) or isinstance(index, bool):
                raise ValueError(f"PartialFailure.failures: index {index!r} is not an int")
            if not isinstance(error, BaseException):
                raise ValueError(
                    f"PartialFailure.failures[{index}]: expected an exception, got {error!r}"
                )
        self.failures: dict[int, BaseException] = dict(failures)
        self.results: Sequence[Any] | None = results
        super().__init__(f"{len(self.failures)} message(s) of the batch failed")

    def fits(self, size: int) -> bool:
        """Whether it fits a batch of ``size`` messages: every failure index inside the batch
        and, if results are given, one per message.

        One that does not fit is a ResultMismatch for the whole batch: nothing of it completes,
        and the batch is retried (so no source message may be settled for it).
        """
        results = self.results
        if results is not None and len(results) != size:
            return False
        return all(0 <= index < size for index in self.failures)


class DeadLetterError(BatchpunkError):
    """A dead-letter sink failed to store letters; batchpunk keeps them and retries."""


class DeliveryLimitExceeded(BatchpunkError):
    """A broker delivered a message more times than its limit allows.

    Such a message likely crashes or stalls every worker that takes it, so sources flag it
    (``headers["batchpunk_redelivered"]``) with this as its error, and the pipeline dead-letters
    it with reason "redelivered" instead of processing it again.
    """


class FrameError(BatchpunkError, ValueError):
    """Bytes that cannot be read as a batchpunk frame; the message says exactly why."""


class ConfigError(BatchpunkError, ValueError):
    """A pipeline file, section or connector setting is wrong; the message names where."""


class ConnectorError(BatchpunkError):
    """Base of every error a connector raises on purpose (broker, database, file, HTTP).

    What a failure means is a class attribute, read by the retry policy: ``unavailable = True``
    marks an outage of the downstream (retried whole and waited out, never dead-lettered);
    ``retryable = False`` marks a failure of one message that no retry can fix. A subclass sets
    the one that fits; this base claims neither.
    """


class MissingDependency(BatchpunkError, ImportError):
    """An optional extra is not installed; the message gives the pip command that installs it."""


def require(module: str, extra: str, feature: str) -> Any:
    """Import an optional dependency, or fail with the exact pip command that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(
            f"{feature} needs the '{module}' package: pip install 'batchpunk[{extra}]'"
        ) from exc
