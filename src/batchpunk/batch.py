"""Batch: what a processor receives, a plain list of messages that knows where it came from."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from batchpunk.config import BatchConfig

__all__ = ["FLUSH_REASONS", "Batch", "as_results"]

T = TypeVar("T")

#: Why a batch was cut.
FLUSH_REASONS = ("size", "bytes", "timeout", "manual", "shutdown", "pressure")


class Batch(list[T]):
    """The messages of one lane in arrival order, passed to the processor.

    It is a real list, so handlers can index, slice and iterate it at list speed.

    Attributes:
        key: the lane key the messages were added with (None for the shared lane).
        priority: the lane priority.
        attempt: 1 on the first call for these messages; a retry or a split half of a batch that
            already failed sees a higher number (it counts every earlier call that included them).
        flush_reason: why the batch was cut: one of FLUSH_REASONS.
    """

    __slots__ = ("_config", "attempt", "flush_reason", "key", "priority")

    def __init__(
        self,
        messages: Any = (),
        *,
        key: Any = None,
        priority: int = 0,
        attempt: int = 1,
        flush_reason: str = "manual",
    ) -> None:
        super().__init__(messages)
        self.key = key
        self.priority = priority
        self.attempt = attempt
        self.flush_reason = flush_reason
        self._config: BatchConfig | None = None

    def derive(self, messages: Iterable[T]) -> Batch[T]:
        """A batch of some of these messages that keeps this batch's lane and settings."""
        out: Batch[T] = Batch(
            messages,
            key=self.key,
            priority=self.priority,
            attempt=self.attempt,
            flush_reason=self.flush_reason,
        )
        out._config = self._config
        return out

    def encode(self, *, hmac_key: bytes | None = None) -> bytes:
        """The batch as a checked batchpunk frame, with the processor's codec settings.

        Use it to hand a batch to another broker or a file; ``batchpunk.codec.decode_batch``
        reads it back. See docs/FORMAT.md.
        """
        from batchpunk.codec import encode_batch

        config = self._config
        if config is None:
            return encode_batch(list(self), hmac_key=hmac_key)
        return encode_batch(
            list(self),
            serializer=config.serializer,
            compression=config.compression,
            level=config.compression_level,
            threshold=config.compression_threshold,
            hmac_key=hmac_key,
        )

    def __repr__(self) -> str:
        return (
            f"Batch(size={len(self)}, key={self.key!r}, priority={self.priority}, "
            f"attempt={self.attempt}, flush_reason={self.flush_reason!r})"
        )


def as_results(results: Any) -> Sequence[Any] | None:
    """A processor's results as the engine reads them: None, or a sequence (any other iterable
    is read into a list, once, so that every reader sees the same values)."""
    if results is None or (isinstance(results, Sequence) and not isinstance(results, str | bytes)):
        return results
    return list(results)
