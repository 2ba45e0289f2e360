"""COMPATIBILITY SHIM for the Kafka and SQS sources (issue 15): delete after issue 12 merges.

The Kafka and SQS sources are written against contract 1 of the session brief: an ``Envelope``
with the slots payload, key, priority, headers, receipt and error, settled per batch through the
source's ``ack_many`` / ``nack_many``. Until issue 12 lands that Envelope, the one in
``batchpunk.envelope`` is the older dataclass with ``malformed`` and per-message ``on_ack`` /
``on_nack`` callables. This module builds whichever exists and reads the receipt back from
either, so the sources run (and their tests pass) on both.

After the merge: replace ``make_envelope(...)`` with ``Envelope(...)`` and ``receipt_of(e)``
with ``e.receipt`` in kafka.py and sqs.py, and delete this file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from batchpunk.envelope import Envelope

__all__ = ["NEW_ENVELOPE", "make_envelope", "receipt_of"]

#: True once batchpunk.Envelope carries ``receipt`` itself (issue 12's contract 1).
NEW_ENVELOPE = "receipt" in getattr(Envelope, "__slots__", ())

_REDELIVERED = "batchpunk_redelivered"


class _Settles(Protocol):
    async def ack_many(self, envelopes: Sequence[Envelope]) -> None: ...

    async def nack_many(self, envelopes: Sequence[Envelope], requeue: bool) -> None: ...


class _OldStyle:
    """The per-envelope ack/nack the old Envelope wants, routed to the source's batch calls."""

    __slots__ = ("envelope", "receipt", "source")

    def __init__(self, source: _Settles, receipt: Any) -> None:
        self.source = source
        self.receipt = receipt
        self.envelope: Envelope | None = None

    async def ack(self) -> None:
        if self.envelope is not None:
            await self.source.ack_many((self.envelope,))

    async def nack(self, requeue: bool) -> None:
        if self.envelope is not None:
            await self.source.nack_many((self.envelope,), requeue)


def make_envelope(
    source: _Settles,
    payload: Any,
    *,
    key: Any = None,
    headers: dict[str, Any] | None = None,
    receipt: Any = None,
    error: BaseException | None = None,
) -> Envelope:
    """``Envelope(payload, key=, headers=, receipt=, error=)`` on either Envelope."""
    factory: Any = Envelope
    if NEW_ENVELOPE:
        return factory(payload, key=key, headers=headers, receipt=receipt, error=error)  # type: ignore[no-any-return]
    settle = _OldStyle(source, receipt)
    # The old pipeline dead-letters "redelivered" by header, "malformed" by the flag.
    malformed = error is not None and not (headers and headers.get(_REDELIVERED))
    envelope: Envelope = factory(
        payload,
        key=key,
        headers=headers if headers is not None else {},
        malformed=malformed,
        error=error,
        on_ack=settle.ack,
        on_nack=settle.nack,
    )
    settle.envelope = envelope
    return envelope


def receipt_of(envelope: Envelope) -> Any:
    """The receipt the source put on ``envelope`` (None for an envelope from elsewhere)."""
    if NEW_ENVELOPE:
        return getattr(envelope, "receipt", None)
    settle = getattr(getattr(envelope, "on_ack", None), "__self__", None)
    return settle.receipt if isinstance(settle, _OldStyle) else None
