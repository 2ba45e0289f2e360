"""What the broker pipeline tests share: an idempotent id sink, waking dead letters, a runner."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from batchpunk.config import BatchConfig
from batchpunk.deadletter import DeadLetter, MemoryDeadLetters
from batchpunk.errors import PartialFailure
from batchpunk.pipeline import Pipeline

#: Small batches and quick retries, so a few hundred messages exercise every path.
CONFIG = BatchConfig(max_size=50, max_wait=0.05, max_retries=1, retry_delay=0.01, drain_timeout=5)


class IdSink:
    """Keeps the ids it wrote (an idempotent store: a redelivered id is counted once) and
    refuses payloads marked poison, as a database refuses a bad row."""

    def __init__(self, progress: asyncio.Event, delay: float = 0.0) -> None:
        self.ids: set[int] = set()
        self.writes = 0
        self.progress = progress
        self.delay = delay

    async def write(self, batch: Sequence[Any]) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.ids.update(p["id"] for p in batch if not p.get("poison"))
        self.writes += len(batch)
        self.progress.set()
        bad = {i: ValueError(f"poison {p['id']}") for i, p in enumerate(batch) if p.get("poison")}
        if bad:
            raise PartialFailure(bad)

    async def close(self) -> None:
        return None


class Letters(MemoryDeadLetters):
    """Dead letters in memory that wake the test when some arrive."""

    def __init__(self, progress: asyncio.Event) -> None:
        super().__init__()
        self.progress = progress

    async def put(self, letters: Sequence[DeadLetter]) -> None:
        await super().put(letters)
        self.progress.set()


async def run_until(
    pipeline: Pipeline, done: Callable[[], bool], progress: asyncio.Event, seconds: float = 10.0
) -> None:
    """Run the pipeline until ``done()`` holds (checked at each progress), then stop it."""
    task = asyncio.create_task(pipeline.run())
    try:
        async with asyncio.timeout(seconds):
            while not done():
                await progress.wait()
                progress.clear()
    finally:
        await pipeline.stop()
        await task
