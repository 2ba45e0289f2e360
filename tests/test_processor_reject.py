"""BatchProcessor.reject: dead-lettering a message that never reached a batch."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from batchpunk import BatchConfig, BatchProcessor
from batchpunk.deadletter import DeadLetter, MemoryDeadLetters
from batchpunk.errors import ProcessorClosed


class Counting:
    """A metrics collector that sums increments by name and reason tag."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str | None], int] = {}

    def increment(self, name: str, value: int = 1, tags: dict[str, str] | None = None) -> None:
        key = (name, (tags or {}).get("reason"))
        self.counts[key] = self.counts.get(key, 0) + value

    def timing(self, name: str, seconds: float, tags: dict[str, str] | None = None) -> None:
        return None

    def gauge(self, name: str, value: float, tags: dict[str, str] | None = None) -> None:
        return None


async def noop(batch: Sequence[Any]) -> None:
    return None


async def test_a_rejected_message_is_counted_stored_with_its_headers_and_resolved() -> None:
    """reject() counts the message as received and dead-lettered (reason and metrics too),
    stores its letter with the given key, priority and headers, and resolves its future only
    once the letter is stored."""
    store = MemoryDeadLetters()
    metrics = Counting()
    processor: BatchProcessor[Any, Any] = BatchProcessor(
        BatchConfig(max_size=10, max_wait=0.01), noop, metrics, dead_letter=store
    )
    async with processor:
        error = ValueError("not JSON")
        stored = processor.reject(
            b"{", "malformed", error, key="k", priority=2, headers={"line": 3}
        )
        await asyncio.wait_for(stored, 5)
        assert stored.result() is None
        [letter] = store.letters
        assert (letter.message, letter.reason, letter.error) == (b"{", "malformed", error)
        assert (letter.key, letter.priority, letter.headers) == ("k", 2, {"line": 3})
        stats = await processor.get_stats()
    assert stats["received"] == stats["dead_lettered"] == 1
    assert stats["dead_letter_reasons"] == {"malformed": 1}
    assert stats["pending"] == stats["in_flight"] == 0
    assert metrics.counts[("messages_dead_lettered", "malformed")] == 1


async def test_rejects_and_batch_dead_letters_share_one_outbox_in_order() -> None:
    """Letters from reject() and from failed batches reach the one sink, each once, and the
    conservation count holds with both kinds."""
    store = MemoryDeadLetters()

    async def fail_odd(batch: Sequence[int]) -> None:
        if any(i % 2 for i in batch):
            raise ValueError("odd")

    processor: BatchProcessor[int, None] = BatchProcessor(
        BatchConfig(max_size=1, max_wait=0.01, max_retries=0), fail_odd, dead_letter=store
    )
    async with processor:
        for i in range(4):
            await processor.add_message(i)
            processor.reject(f"raw {i}", "malformed", ValueError("bad"))
    reasons = sorted(letter.reason for letter in store.letters)
    assert reasons == ["failed", "failed", "malformed", "malformed", "malformed", "malformed"]
    stats = await processor.get_stats()
    assert stats["received"] == 8
    assert stats["processed"] + stats["dead_lettered"] == 8


async def test_a_letter_not_stored_before_stop_fails_its_future() -> None:
    """When the dead-letter sink stays down past drain_timeout, the reject future fails with
    ProcessorClosed and the letter is kept in processor.dead_letters."""

    async def down(letters: Sequence[DeadLetter]) -> None:
        raise OSError("disk gone")

    processor: BatchProcessor[Any, Any] = BatchProcessor(
        BatchConfig(drain_timeout=0.2, retry_delay=0.01, retry_max_delay=0.02),
        noop,
        dead_letter=down,
    )
    await processor.start()
    stored = processor.reject("x", "redelivered", RuntimeError("too many"))
    await processor.stop()
    with pytest.raises(ProcessorClosed):
        await stored
    assert [letter.message for letter in processor.dead_letters] == ["x"]


async def test_reject_refuses_after_stop_and_an_empty_reason() -> None:
    """reject() raises ProcessorClosed once stop() began, and ValueError for an empty reason."""
    processor: BatchProcessor[Any, Any] = BatchProcessor(BatchConfig(), noop)
    await processor.start()
    with pytest.raises(ValueError, match="reason"):
        processor.reject("x", "", ValueError("bad"))
    await processor.stop()
    with pytest.raises(ProcessorClosed):
        processor.reject("x", "malformed", ValueError("bad"))
