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


def outage_config(**overrides: Any) -> BatchConfig:
    """Small batches, fast retries and probes, and a drain_timeout far below the waits."""
    settings: dict[str, Any] = {
        "max_size": 10,
        "max_wait": 0.01,
        "retry_delay": 0.01,
        "retry_max_delay": 0.05,
        "circuit_breaker_threshold": 3,
        "circuit_breaker_cooldown": 0.05,
        "drain_timeout": 0.1,
    }
    settings.update(overrides)
    return BatchConfig(**settings)


class OneShotSource:
    """Yields ``count`` events once and cannot take any back: no ack_many, no nack_many (like
    standard input or a generator)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.read = 0
        self.ended = asyncio.Event()

    def __aiter__(self) -> Any:
        return self._iterate()

    async def _iterate(self) -> Any:
        from batchpunk.envelope import Envelope

        for i in range(self.count):
            self.read += 1
            yield Envelope({"id": i}, headers={"line": i + 1})
        self.ended.set()

    async def close(self) -> None:
        pass


async def test_the_end_of_the_input_during_an_outage_waits_for_the_downstream() -> None:
    """Before, a source that ended while the sink was down stopped the pipeline within
    drain_timeout (0.1 s) and every held message was nacked; now the end of the input waits
    for held batches as a running engine would (delivery_timeout), and they are written once
    the downstream is back: nothing nacked, everything acknowledged."""
    from tests.test_pipeline import RecordingLetters, RecordingSource

    log: list[tuple[Any, ...]] = []
    source = RecordingSource([{"id": i} for i in range(100)], log)
    sink = DownSink()
    pipeline = Pipeline(source, sink, outage_config(), dead_letter=RecordingLetters(log))
    running = asyncio.create_task(pipeline.run())
    await asyncio.wait_for(source.until_read(100), 10)
    done, _ = await asyncio.wait({running}, timeout=0.5)  # five times drain_timeout
    assert not done, "the pipeline stopped at drain_timeout although only the input ended"
    sink.down = False
    await asyncio.wait_for(running, 10)
    assert sorted(sink.written) == list(range(100))
    assert not [entry for entry in log if entry[0] in ("nack", "letters")]
    assert sorted(entry[1] for entry in log if entry[0] == "ack") == list(range(100))


async def test_held_batches_expire_into_the_dead_letter_sink_when_the_input_has_ended() -> None:
    """Before, the held batches were nacked at drain_timeout; now, the sink staying down, they
    are dead-lettered "expired" at delivery_timeout, stored, then acknowledged."""
    from tests.test_pipeline import RecordingLetters, RecordingSource

    log: list[tuple[Any, ...]] = []
    source = RecordingSource([{"id": i} for i in range(30)], log)
    letters = RecordingLetters(log)
    config = outage_config(delivery_timeout=0.4)
    pipeline = Pipeline(source, DownSink(), config, dead_letter=letters)
    await asyncio.wait_for(pipeline.run(), 10)
    assert sorted(letter.message["id"] for letter in letters.letters) == list(range(30))
    assert {letter.reason for letter in letters.letters} == {"expired"}
    assert not [entry for entry in log if entry[0] == "nack"]
    assert sorted(entry[1] for entry in log if entry[0] == "ack") == list(range(30))


async def test_a_stop_while_the_ended_input_waits_drains_within_drain_timeout() -> None:
    """A stop request (a first signal) during that wait still stops as documented: within
    drain_timeout the held messages go back to the broker (nack with requeue)."""
    from tests.test_pipeline import RecordingSource

    log: list[tuple[Any, ...]] = []
    source = RecordingSource([{"id": i} for i in range(30)], log)
    pipeline = Pipeline(source, DownSink(), outage_config(delivery_timeout=None))
    running = asyncio.create_task(pipeline.run())
    await asyncio.wait_for(source.until_read(30), 10)
    done, _ = await asyncio.wait({running}, timeout=0.3)
    assert not done
    began = asyncio.get_running_loop().time()
    await asyncio.wait_for(pipeline.stop(), 10)
    assert asyncio.get_running_loop().time() - began < 2.0
    assert sorted(entry[1] for entry in log if entry[0] == "nack") == list(range(30))
    assert pipeline.lost == 0


async def test_unfinished_messages_a_source_cannot_take_back_become_shutdown_letters() -> None:
    """Before, a stop nacked the held messages of a source without nack_many (stdin, a
    generator): they were counted as given back and gone. Now they are stored in the
    dead-letter sink with reason "shutdown" and their error, and nothing is lost."""
    from tests.test_pipeline import RecordingLetters

    log: list[tuple[Any, ...]] = []
    source = OneShotSource(40)
    letters = RecordingLetters(log)
    pipeline = Pipeline(
        source, DownSink(), outage_config(delivery_timeout=None), dead_letter=letters
    )
    running = asyncio.create_task(pipeline.run())
    await asyncio.wait_for(source.ended.wait(), 10)
    await asyncio.wait_for(pipeline.stop(), 10)
    await running
    assert sorted(letter.message["id"] for letter in letters.letters) == list(range(40))
    assert {letter.reason for letter in letters.letters} == {"shutdown"}
    assert all(letter.headers["line"] == letter.message["id"] + 1 for letter in letters.letters)
    stats = (await pipeline.get_stats())["pipeline"]
    assert (stats["shutdown_letters"], stats["nacked"], stats["lost"]) == (40, 0, 0)
    assert stats["acked"] == 40
    assert stats["unfinished"] == 0


async def test_messages_neither_stored_nor_returned_are_counted_as_lost() -> None:
    """When the dead-letter sink refuses those "shutdown" letters too, the messages are lost:
    pipeline.lost says how many (what `batchpunk run` exits 1 on), and the letters are kept in
    pipeline.undelivered."""
    from tests.test_pipeline import RecordingLetters

    log: list[tuple[Any, ...]] = []
    source = OneShotSource(20)
    letters = RecordingLetters(log, fail=10_000)
    pipeline = Pipeline(
        source, DownSink(), outage_config(delivery_timeout=None), dead_letter=letters
    )
    running = asyncio.create_task(pipeline.run())
    await asyncio.wait_for(source.ended.wait(), 10)
    await asyncio.wait_for(pipeline.stop(), 10)
    await running
    assert letters.letters == []
    assert pipeline.lost == 20
    assert sorted(letter.message["id"] for letter in pipeline.undelivered) == list(range(20))
    assert (await pipeline.get_stats())["pipeline"]["lost"] == 20
