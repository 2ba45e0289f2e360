"""The seams between batchpunk and the outside world: Envelope, Source and Sink.

They live below both the pipeline and the connectors so that a connector never imports the
pipeline that drives it. ``batchpunk.pipeline`` re-exports them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["Envelope", "Sink", "Source"]


async def _no_ack() -> None:
    return None


async def _no_nack(requeue: bool) -> None:
    return None


@dataclass(slots=True)
class Envelope:
    """One message from a Source, with what is needed to settle it with its broker.

    Attributes:
        payload: the decoded message that the processor and the sink see.
        key: lane key (ordering and batching); None for the shared lane.
        priority: higher runs first when batches wait for a slot.
        headers: broker metadata (message id, delivery count, ...), read-only by convention.
        malformed: set by a source that could not decode the raw bytes; ``error`` says why and
            ``payload`` holds the raw bytes or text. The pipeline dead-letters it as "malformed".
        error: the decoding error of a malformed envelope.

    ``ack()`` settles the message for good; ``nack(requeue)`` returns it to the broker (requeue)
    or rejects it. Both are no-ops for sources without acknowledgements.
    """

    payload: Any
    key: Any = None
    priority: int = 0
    headers: Mapping[str, Any] = field(default_factory=dict)
    malformed: bool = False
    error: BaseException | None = None
    on_ack: Callable[[], Awaitable[None]] = _no_ack
    on_nack: Callable[[bool], Awaitable[None]] = _no_nack

    async def ack(self) -> None:
        """Tell the source this message is finished (processed or durably dead-lettered)."""
        await self.on_ack()

    async def nack(self, requeue: bool) -> None:
        """Give the message back (requeue=True) or reject it (requeue=False)."""
        await self.on_nack(requeue)


@runtime_checkable
class Source(Protocol):
    """An async iterator of Envelopes that can be closed; iteration ends when the source is done."""

    def __aiter__(self) -> AsyncIterator[Envelope]: ...

    async def close(self) -> None: ...


@runtime_checkable
class Sink(Protocol):
    """Writes a batch of payloads; returns None or one result per payload, in order.

    Raise ``batchpunk.PartialFailure`` to fail only some payloads; raise an exception whose type
    the config's ``retry_on`` rejects for errors no retry can fix.
    """

    async def write(self, batch: Sequence[Any]) -> Sequence[Any] | None: ...

    async def close(self) -> None: ...
