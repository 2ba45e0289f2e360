"""The seams between batchpunk and the outside world: Envelope, Source and Sink.

They live below both the pipeline and the connectors so that a connector never imports the
pipeline that drives it. ``batchpunk.pipeline`` re-exports them.

One Envelope is the only object a pipeline keeps per message: the engine carries it through
lanes, batches and dead letters, so acknowledgements are settled per batch
(``source.ack_many(batch)``) and a dead letter carries its own envelope's headers, with no
identity maps, tickets or per-message callbacks. Keep it small: ``headers`` is None when the
broker gave none, and ``receipt`` is whatever the source needs to settle the message (a delivery
tag, a stream entry id, a reply subject), usually an int or bytes that the collector does not
track.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["REDELIVERED", "AcksMany", "Envelope", "Sink", "Source", "WritesEnvelopes"]

#: Header a broker source sets (to True) on an envelope delivered more times than its limit: the
#: pipeline dead-letters it with reason "redelivered" (with the envelope's ``error`` if set, else
#: a DeliveryLimitExceeded) instead of processing it. Every connector uses this one constant.
REDELIVERED = "batchpunk_redelivered"


class Envelope:
    """One message from a Source, with what is needed to settle it with its broker.

    Attributes:
        payload: the decoded message that the processor and the sink see (for a malformed
            envelope, the raw bytes or text).
        key: lane key (ordering and batching); None for the shared lane.
        priority: higher runs first when batches wait for a slot.
        headers: broker metadata (message id, delivery count, ...), read-only by convention;
            None when there is none.
        receipt: what the source needs to settle this message (opaque to everyone else).
        error: set by a source that could not decode the raw bytes; the pipeline dead-letters
            such an envelope with reason "malformed" and this error.
    """

    __slots__ = ("error", "headers", "key", "payload", "priority", "receipt")

    def __init__(
        self,
        payload: Any,
        key: Any = None,
        priority: int = 0,
        headers: dict[str, Any] | None = None,
        receipt: Any = None,
        error: BaseException | None = None,
    ) -> None:
        self.payload = payload
        self.key = key
        self.priority = priority
        self.headers = headers
        self.receipt = receipt
        self.error = error

    @property
    def malformed(self) -> bool:
        """True when the source could not decode this message (``error`` says why)."""
        return self.error is not None

    def __repr__(self) -> str:
        parts = [f"payload={self.payload!r}"]
        if self.key is not None:
            parts.append(f"key={self.key!r}")
        if self.priority:
            parts.append(f"priority={self.priority}")
        if self.headers:
            parts.append(f"headers={self.headers!r}")
        if self.receipt is not None:
            parts.append(f"receipt={self.receipt!r}")
        if self.error is not None:
            parts.append(f"error={self.error!r}")
        return f"Envelope({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Envelope):
            return NotImplemented
        return (
            self.payload == other.payload
            and self.key == other.key
            and self.priority == other.priority
            and self.headers == other.headers
            and self.receipt == other.receipt
            and self.error is other.error
        )

    __hash__ = object.__hash__


@runtime_checkable
class Source(Protocol):
    """An async iterator of Envelopes that can be closed; iteration ends when the source is done.

    A source with acknowledgements also implements :class:`AcksMany`; one without implements
    neither method and the pipeline settles nothing.
    """

    def __aiter__(self) -> AsyncIterator[Envelope]: ...

    async def close(self) -> None: ...


@runtime_checkable
class AcksMany(Protocol):
    """A source that settles its messages per batch (XACK, basic.ack multiple, ...).

    ``ack_many`` settles the envelopes for good (their batch was written, or their dead letters
    were stored); ``nack_many`` gives them back to the broker (``requeue``) or rejects them.
    Envelopes may come from several batches and in any order.
    """

    async def ack_many(self, envelopes: Sequence[Envelope]) -> None: ...

    async def nack_many(self, envelopes: Sequence[Envelope], requeue: bool) -> None: ...


@runtime_checkable
class Sink(Protocol):
    """Writes a batch of payloads; returns None or one result per payload, in order.

    Raise ``batchpunk.PartialFailure`` to fail only some payloads; raise an exception whose type
    the config's ``retry_on`` rejects for errors no retry can fix.
    """

    async def write(self, batch: Sequence[Any]) -> Sequence[Any] | None: ...

    async def close(self) -> None: ...


@runtime_checkable
class WritesEnvelopes(Protocol):
    """A sink that needs per-message metadata (a stored position, a header) to write.

    The pipeline calls ``write_envelopes`` instead of ``write`` when a sink has it: same result
    and PartialFailure rules, with indices into the envelopes.
    """

    async def write_envelopes(self, envelopes: Sequence[Envelope]) -> Sequence[Any] | None: ...
