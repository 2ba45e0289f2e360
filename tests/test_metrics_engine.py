"""Metrics against the real engine: collector counts equal the processor's own after random work."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from batchpunk import Batch, BatchConfig, BatchProcessor, OverflowPolicy, PartialFailure
from batchpunk.metrics import PrometheusMetrics, RecordingCollector


class Poison(Exception):
    """The error a poison message raises."""


def make_handler(rng: random.Random, poison: set[int]) -> Any:
    """A handler that fails poison messages and, now and then, a whole call transiently."""

    async def handle(batch: Batch[int]) -> None:
        await asyncio.sleep(0)
        if rng.random() < 0.05:
            raise ConnectionError("transient")
        bad = {i: Poison(m) for i, m in enumerate(batch) if m in poison}
        if bad:
            raise PartialFailure(bad)

    return handle


async def random_workload(seed: int, collector: object, overflow: OverflowPolicy) -> dict[str, Any]:
    """Run adds, keys, priorities, flushes, failures and drops; return the final stats."""
    rng = random.Random(seed)
    poison = set(rng.sample(range(3000), 15))
    config = BatchConfig(
        max_size=rng.choice([7, 32, 100]),
        max_wait=0.005,
        retry_delay=0.0005,
        retry_max_delay=0.001,
        max_retries=rng.choice([0, 1, 2]),
        max_pending=rng.choice([200, 1000]),
        overflow=overflow,
        max_concurrent_batches=rng.choice([1, 3]),
    )
    processor = BatchProcessor(config, make_handler(rng, poison), collector)
    async with processor:
        for m in range(3000):
            key = rng.choice([None, "a", "b"])
            priority = rng.choice([0, 0, 1])
            if overflow is OverflowPolicy.BLOCK:
                await processor.add_message(m, key=key, priority=priority)
            else:
                processor.add_message_nowait(m, key=key, priority=priority)
            if m % 500 == 499:
                await processor.flush()
            elif m % 97 == 0:
                await asyncio.sleep(0)
    return await processor.get_stats()


def assert_counts_match(
    stats: dict[str, Any], collector: RecordingCollector, *, received: bool = True
) -> None:
    """Every counter the collector received equals the processor's own count."""
    assert collector.total("messages_processed") == stats["processed"]
    assert collector.total("messages_dead_lettered") == stats["dead_lettered"]
    assert collector.total("messages_failed") == stats["failed"]
    assert collector.total("messages_dropped") == stats["dropped"]
    for reason, count in stats["dead_letter_reasons"].items():
        assert collector.total("messages_dead_lettered", reason=reason) == count, reason
    assert collector.total("batches") == stats["batches"]
    for reason, count in stats["flush_reasons"].items():
        assert collector.total("batches", reason=reason) == count, reason
    assert collector.total("retries") == stats["retries"]
    assert collector.total("splits") == stats["splits"]
    if received:
        assert collector.total("messages_received") == stats["received"]
    assert len(collector.samples("batch_size")) == stats["batches"]


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_collector_counts_match_processor_counts_after_random_work(seed: int) -> None:
    """With blocking adds, random keys, failures and flushes, every forwarded total is exact."""
    collector = RecordingCollector()
    stats = await random_workload(seed, collector, OverflowPolicy.BLOCK)
    assert stats["received"] == 3000
    assert stats["processed"] + stats["dead_lettered"] == 3000
    assert stats["failed"] > 0
    assert_counts_match(stats, collector)
    assert collector.gauges[("pending", ())] == 0
    assert collector.gauges[("in_flight", ())] == 0


async def dropping_workload(overflow: OverflowPolicy, collector: object) -> dict[str, Any]:
    """Flood a slow processor with nowait adds so that the overflow policy drops messages."""

    async def slow(batch: Batch[int]) -> None:
        await asyncio.sleep(0.002)

    config = BatchConfig(max_size=20, max_wait=0.005, max_pending=60, overflow=overflow)
    processor = BatchProcessor(config, slow, collector, dead_letter=lambda letters: None)
    async with processor:
        for m in range(2000):
            processor.add_message_nowait(m, key=m % 3)
            if m % 50 == 0:
                await asyncio.sleep(0.001)
    stats = await processor.get_stats()
    assert stats["received"] == 2000
    assert stats["dropped"] > 0
    return stats


@pytest.mark.parametrize("overflow", [OverflowPolicy.DROP_NEWEST, OverflowPolicy.DROP_OLDEST])
async def test_collector_counts_match_when_messages_are_dropped(overflow: OverflowPolicy) -> None:
    """Under the drop policies, dropped, dead-letter and batch totals equal the processor's."""
    collector = RecordingCollector()
    stats = await dropping_workload(overflow, collector)
    assert_counts_match(stats, collector, received=False)


@pytest.mark.parametrize("overflow", [OverflowPolicy.DROP_NEWEST, OverflowPolicy.DROP_OLDEST])
async def test_messages_received_counts_dropped_messages_too(overflow: OverflowPolicy) -> None:
    """messages_received equals the processor's received count even when messages are dropped."""
    collector = RecordingCollector()
    stats = await dropping_workload(overflow, collector)
    assert collector.total("messages_received") == stats["received"]


async def test_messages_received_counts_messages_abandoned_by_stop_without_drain() -> None:
    """Messages still in open lanes when stop(drain=False) abandons them count as received."""
    collector = RecordingCollector()

    async def handle(batch: Batch[int]) -> None:
        return None

    config = BatchConfig(max_size=1000, max_wait=60.0)
    processor = BatchProcessor(config, handle, collector, dead_letter=lambda letters: None)
    await processor.start()
    for m in range(250):
        processor.add_message_nowait(m, key=m % 5)
    await processor.stop(drain=False)
    stats = await processor.get_stats()
    assert stats["dead_letter_reasons"] == {"shutdown": 250}
    assert collector.total("messages_dead_lettered", reason="shutdown") == 250
    assert collector.total("messages_received") == stats["received"] == 250


async def test_prometheus_counters_equal_get_stats_after_a_run() -> None:
    """Scraped Prometheus counters equal the processor's stats after a random workload."""
    registry = CollectorRegistry()
    stats = await random_workload(5, PrometheusMetrics(registry), OverflowPolicy.BLOCK)
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert values[("batchpunk_messages_processed_total", ())] == stats["processed"]
    assert values[("batchpunk_messages_received_total", ())] == stats["received"]
    assert values[("batchpunk_messages_failed_total", ())] == stats["failed"]
    assert values[("batchpunk_retries_total", ())] == stats["retries"]
    assert values[("batchpunk_splits_total", ())] == stats["splits"]
    for reason, count in stats["flush_reasons"].items():
        assert values[("batchpunk_batches_total", (("reason", reason),))] == count
    assert values[("batchpunk_batch_size_messages_count", ())] == stats["batches"]
    assert values[("batchpunk_pending_messages", ())] == 0


class Exploding:
    """A collector whose every method raises, sync or async alike."""

    def __init__(self) -> None:
        self.calls = 0

    def increment(self, name: str, value: int = 1, tags: Mapping[str, str] | None = None) -> None:
        self.calls += 1
        raise RuntimeError("collector down")

    async def timing(
        self, name: str, seconds: float, tags: Mapping[str, str] | None = None
    ) -> None:
        self.calls += 1
        raise RuntimeError("collector down (async)")

    def gauge(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        self.calls += 1
        raise RuntimeError("collector down")


async def test_a_raising_collector_never_breaks_processing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every message is processed although each collector call raises; errors are only logged."""
    collector = Exploding()
    results: list[int] = []

    async def handle(batch: Batch[int]) -> None:
        results.extend(batch)

    async with BatchProcessor(BatchConfig(max_size=10, max_wait=0.01), handle, collector) as p:
        for m in range(200):
            await p.add_message(m)
    stats = await p.get_stats()
    assert sorted(results) == list(range(200))
    assert stats["processed"] == 200
    assert collector.calls > 20
    assert stats["collector_errors"] == collector.calls
    logged = [r for r in caplog.records if "collector down" in r.getMessage()]
    assert len(logged) == 1


class AsyncRecorder(RecordingCollector):
    """A RecordingCollector whose methods are coroutines."""

    async def increment(  # type: ignore[override]
        self, name: str, value: int = 1, tags: Mapping[str, str] | None = None
    ) -> None:
        await asyncio.sleep(0)
        super().increment(name, value, tags)

    async def timing(  # type: ignore[override]
        self, name: str, seconds: float, tags: Mapping[str, str] | None = None
    ) -> None:
        super().timing(name, seconds, tags)

    async def gauge(  # type: ignore[override]
        self, name: str, value: float, tags: Mapping[str, str] | None = None
    ) -> None:
        super().gauge(name, value, tags)


async def test_async_collector_receives_every_count_by_the_time_stop_returns() -> None:
    """An async collector's scheduled calls have all run once the processor is stopped."""
    collector = AsyncRecorder()

    async def handle(batch: Batch[int]) -> None:
        return None

    async with BatchProcessor(BatchConfig(max_size=25, max_wait=0.01), handle, collector) as p:
        for m in range(500):
            p.add_message_nowait(m)
    await asyncio.sleep(0.01)
    stats = await p.get_stats()
    assert collector.total("messages_processed") == stats["processed"] == 500
    assert collector.total("batches") == stats["batches"] == 20
