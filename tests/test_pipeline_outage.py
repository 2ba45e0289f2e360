"""A pipeline during an outage: it stops reading its source, probes calmly, then catches up."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from batchpunk.config import BatchConfig
from batchpunk.connectors.generator import GeneratorSource
from batchpunk.pipeline import Pipeline


class DownSink:
    """Refuses every connection while ``down``; counts calls and the ids written."""

    def __init__(self) -> None:
        self.down = True
        self.calls = 0
        self.refused = 0
        self.written: list[Any] = []

    async def write(self, batch: Sequence[Any]) -> None:
        self.calls += 1
        await asyncio.sleep(0)
        if self.down:
            self.refused += 1
            raise ConnectionRefusedError(111, "Connection refused")
        self.written.extend(event["id"] for event in batch)

    async def close(self) -> None:
        pass


async def test_an_outage_stops_the_pipeline_reading_and_nothing_busy_loops() -> None:
    """Held batches fill max_pending, the source is not read meanwhile, and calls stay few."""
    source = GeneratorSource(count=2_000)
    sink = DownSink()
    config = BatchConfig(
        max_size=50,
        max_wait=0.01,
        max_pending=200,
        max_concurrent_batches=4,
        retry_delay=0.01,
        retry_max_delay=0.05,
        circuit_breaker_threshold=5,
        circuit_breaker_cooldown=0.1,
    )
    pipeline = Pipeline(source, sink, config)
    running = asyncio.create_task(pipeline.run())
    async with asyncio.timeout(10):
        while sink.refused < 10:  # noqa: ASYNC110 - a test polling public counters
            await asyncio.sleep(0.01)
    stats = await pipeline.get_stats()
    read_then, calls_then = stats["pipeline"]["read"], sink.calls
    await asyncio.sleep(0.6)
    stats = await pipeline.get_stats()
    # Backpressure reached the source: at most max_pending (+ the one read waiting for room).
    assert stats["pipeline"]["read"] == read_then
    assert read_then <= 201
    assert stats["downstream"]["state"] == "unavailable"
    assert stats["downstream"]["held"] > 0
    assert stats["circuit"] == "open"
    # One probe per 0.1 s cooldown at most, never a busy loop.
    assert sink.calls - calls_then <= 10
    sink.down = False
    await asyncio.wait_for(running, 10)
    stats = await pipeline.get_stats()
    assert sorted(sink.written) == list(range(2_000))
    assert stats["dead_lettered"] == 0
    assert stats["downstream"]["state"] == "available"


async def test_a_pipeline_built_without_a_config_has_the_circuit_breaker_on() -> None:
    """Pipelines default to the breaker (5 failures, 5 s), the library to none."""
    pipeline = Pipeline(GeneratorSource(count=1), DownSink())
    assert pipeline.config.circuit_breaker_threshold == 5
    assert pipeline.config.circuit_breaker_cooldown == 5.0
    assert BatchConfig().circuit_breaker_threshold is None


def test_pipeline_files_default_to_the_breaker_and_zero_turns_it_off() -> None:
    """[batch] without circuit_breaker_threshold gets 5 / 5 s; 0 means no breaker."""
    from batchpunk.pipeline_file import parse_pipeline

    def batch(**table: Any) -> BatchConfig:
        data = {
            "source": {"type": "generator"},
            "batch": table,
            "sink": {"type": "jsonl", "path": "-"},
        }
        return parse_pipeline(data, environ={}).batch

    assert (batch().circuit_breaker_threshold, batch().circuit_breaker_cooldown) == (5, 5.0)
    assert batch(circuit_breaker_threshold=0).circuit_breaker_threshold is None
    custom = batch(circuit_breaker_threshold=3, circuit_breaker_cooldown=1.0)
    assert (custom.circuit_breaker_threshold, custom.circuit_breaker_cooldown) == (3, 1.0)
    assert batch(unavailable_on=[]).unavailable_on == ()


async def test_stop_during_an_outage_nacks_the_held_messages_back_to_the_source() -> None:
    """stop() while batches are held: after drain_timeout they go back to the broker (nack,
    requeue), none acknowledged, none stored as a dead letter."""
    from tests.test_pipeline import RecordingLetters, RecordingSource

    log: list[tuple[Any, ...]] = []
    source = RecordingSource(list(range(300)), log)
    sink = DownSink()
    config = BatchConfig(
        max_size=50,
        max_wait=0.01,
        max_pending=200,
        retry_delay=0.01,
        retry_max_delay=0.05,
        circuit_breaker_threshold=5,
        circuit_breaker_cooldown=0.1,
        drain_timeout=0.3,
    )
    pipeline = Pipeline(source, sink, config, dead_letter=RecordingLetters(log))
    running = asyncio.create_task(pipeline.run())
    async with asyncio.timeout(10):
        while sink.refused < 8:  # noqa: ASYNC110 - a test polling its own fake
            await asyncio.sleep(0.01)
    await pipeline.stop()
    await running
    nacked = {entry[1] for entry in log if entry[0] == "nack"}
    assert all(entry[2] is True for entry in log if entry[0] == "nack")
    assert not [entry for entry in log if entry[0] in ("ack", "letters")]
    assert nacked == set(range(source.read))
    assert sink.written == []
