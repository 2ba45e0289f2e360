"""Shared helpers for the engine tests: small timings, a recording processor, the ledger check.

Tests wait on events set by the processor rather than sleeping, so they stay fast and exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from batchpunk import Batch, BatchConfig, BatchProcessor

#: How long a test waits for something that should happen at once before calling it a hang.
PATIENCE = 2.0


def config(**overrides: Any) -> BatchConfig:
    """A BatchConfig with test-sized timings: short waits, tiny deterministic backoff."""
    values: dict[str, Any] = {
        "max_size": 10,
        "max_wait": 0.02,
        "retry_delay": 0.001,
        "retry_max_delay": 0.01,
        "retry_jitter": False,
        "drain_timeout": PATIENCE,
    }
    values.update(overrides)
    return BatchConfig(**values)


@dataclass(frozen=True)
class Call:
    """What one processor call received, copied at the moment of the call."""

    messages: list[Any]
    key: Any
    priority: int
    attempt: int
    flush_reason: str
    started: float


#: Decides whether a call fails: returns the exception to raise, or None to succeed.
FailRule = Callable[[Batch[Any], int], BaseException | None]


class Recorder:
    """An async processor that records calls, can be held on a gate, and fails on demand.

    ``fail(batch, call_number)`` (1-based over all calls) returns an exception to raise or None.
    ``result(message)`` makes the results; without it the processor returns None.
    """

    def __init__(
        self,
        *,
        held: bool = False,
        fail: FailRule | None = None,
        result: Callable[[Any], Any] | None = None,
    ) -> None:
        self.calls: list[Call] = []
        self.succeeded: list[Call] = []
        self.running = 0
        self.max_running = 0
        self.gate = asyncio.Event()
        if not held:
            self.gate.set()
        self._fail = fail
        self._result = result
        self._changed = asyncio.Event()

    async def __call__(self, batch: Batch[Any]) -> Sequence[Any] | None:
        loop = asyncio.get_running_loop()
        call = Call(
            list(batch), batch.key, batch.priority, batch.attempt, batch.flush_reason, loop.time()
        )
        self.calls.append(call)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self._changed.set()
        try:
            await self.gate.wait()
            if self._fail is not None:
                error = self._fail(batch, len(self.calls))
                if error is not None:
                    raise error
        finally:
            self.running -= 1
            self._changed.set()
        self.succeeded.append(call)
        if self._result is None:
            return None
        return [self._result(message) for message in batch]

    @property
    def processed(self) -> list[Any]:
        """Every message of every successful call, in completion order."""
        return [message for call in self.succeeded for message in call.messages]

    async def wait_calls(self, count: int, within: float = PATIENCE) -> None:
        """Return once at least ``count`` calls have started."""
        await self.wait(lambda: len(self.calls) >= count, within)

    async def wait_running(self, count: int, within: float = PATIENCE) -> None:
        """Return once exactly ``count`` calls are running."""
        await self.wait(lambda: self.running == count, within)

    async def wait(self, condition: Callable[[], bool], within: float = PATIENCE) -> None:
        """Return once ``condition()`` holds, re-checked after each call starts or ends."""
        async with asyncio.timeout(within):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


async def settle(rounds: int = 20) -> None:
    """Let every ready callback run a few times without letting timers fire."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def ledger(processor: BatchProcessor[Any, Any]) -> dict[str, Any]:
    """The processor's stats, after checking that every accepted message is accounted for."""
    stats = await processor.get_stats()
    accounted = stats["processed"] + stats["dead_lettered"] + stats["pending"] + stats["in_flight"]
    assert stats["received"] == accounted, stats
    return stats


async def stopped_ledger(processor: BatchProcessor[Any, Any]) -> dict[str, Any]:
    """The ledger of a stopped processor: nothing may be pending or in flight any more."""
    stats = await ledger(processor)
    assert stats["pending"] == 0, stats
    assert stats["in_flight"] == 0, stats
    assert stats["downstream"]["held"] == 0, stats  # nothing is held once nothing is left
    return stats


def record_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Make asyncio.sleep record each positive delay asked for and return at once.

    Backoff schedules become exact and instant to check; the loop still turns once per sleep.
    """
    real = asyncio.sleep
    asked: list[float] = []

    async def fake(delay: float, result: Any = None) -> Any:
        if delay > 0:
            asked.append(delay)
        return await real(0, result)

    monkeypatch.setattr(asyncio, "sleep", fake)
    return asked


class ListSource:
    """A pipeline source handing out ``items`` as envelopes, without acknowledgements.

    ``endless``: once the items are out, wait instead of ending the input, so that the pipeline
    runs until it is stopped.
    """

    def __init__(self, items: Sequence[Any], *, endless: bool = False) -> None:
        self.items = list(items)
        self.endless = endless

    def __aiter__(self) -> ListSource:
        return self

    async def __anext__(self) -> Any:
        from batchpunk.envelope import Envelope

        if not self.items:
            if not self.endless:
                raise StopAsyncIteration
            await asyncio.Event().wait()
        return Envelope(self.items.pop(0))
