"""Pipeline: end to end counts, and acknowledgements that never run ahead of the data."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from batchpunk.config import BatchConfig
from batchpunk.connectors import JsonlSource, SqliteSink
from batchpunk.connectors._common import PayloadError
from batchpunk.deadletter import DeadLetter, MemoryDeadLetters
from batchpunk.envelope import Envelope
from batchpunk.errors import PartialFailure, ProcessorClosed
from batchpunk.pipeline import REDELIVERED, Pipeline, prefetch_for

FAST = {"retry_delay": 0.001, "retry_max_delay": 0.005, "max_retries": 1}


class RecordingSource:
    """Yields given payloads (or endless numbers) and records every ack and nack in ``log``."""

    def __init__(
        self,
        payloads: Sequence[Any] | None,
        log: list[tuple[Any, ...]],
        *,
        headers: dict[int, dict[str, Any]] | None = None,
        malformed: set[int] = frozenset(),  # type: ignore[assignment]
    ) -> None:
        self.payloads = payloads
        self.log = log
        self.headers = headers or {}
        self.malformed = malformed
        self.closed = False
        self.read = 0
        self._milestone: tuple[int, asyncio.Event] | None = None

    async def until_read(self, count: int) -> None:
        """Return once ``count`` envelopes were read."""
        if self.read < count:
            self._milestone = (count, asyncio.Event())
            await self._milestone[1].wait()

    def __aiter__(self) -> AsyncIterator[Envelope]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Envelope]:
        i = 0
        while not self.closed and (self.payloads is None or i < len(self.payloads)):
            payload = self.payloads[i] if self.payloads is not None else i
            self.read += 1
            if self._milestone is not None and self.read >= self._milestone[0]:
                self._milestone[1].set()
            yield Envelope(
                payload if i not in self.malformed else f"garbage {i}",
                headers=self.headers.get(i),
                receipt=i,
                error=ValueError(f"undecodable {i}") if i in self.malformed else None,
            )
            i += 1
            await asyncio.sleep(0)

    async def ack_many(self, envelopes: Sequence[Envelope]) -> None:
        self.log.extend(("ack", envelope.receipt) for envelope in envelopes)

    async def nack_many(self, envelopes: Sequence[Envelope], requeue: bool) -> None:
        self.log.extend(("nack", envelope.receipt, requeue) for envelope in envelopes)

    async def close(self) -> None:
        self.closed = True
        self.log.append(("close",))


class RecordingSink:
    """Logs each successful write; payloads in ``poison`` fail alone (not retryable)."""

    def __init__(
        self, log: list[tuple[Any, ...]], poison: set[int] = frozenset(), delay: float = 0.0
    ) -> None:  # type: ignore[assignment]
        self.log = log
        self.poison = poison
        self.delay = delay
        self.gate: asyncio.Event | None = None

    async def write(self, batch: Sequence[int]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        bad = {i: PayloadError(f"poison {p}") for i, p in enumerate(batch) if p in self.poison}
        good = [p for p in batch if p not in self.poison]
        if good:
            self.log.append(("write", *good))
        if bad:
            if len(batch) == 1:
                raise bad[0]
            raise PartialFailure(bad)

    async def close(self) -> None:
        self.log.append(("sink-close",))


class RecordingLetters(MemoryDeadLetters):
    """MemoryDeadLetters that logs each stored letter and can fail its first ``fail`` puts."""

    def __init__(self, log: list[tuple[Any, ...]], fail: int = 0) -> None:
        super().__init__()
        self.log = log
        self.fail = fail

    async def put(self, letters: Sequence[DeadLetter]) -> None:
        if self.fail:
            self.fail -= 1
            raise OSError("dead-letter disk unavailable")
        await super().put(letters)
        self.log.append(("letters", *[letter.message for letter in letters]))


def position(log: list[tuple[Any, ...]], kind: str, item: Any) -> int:
    """Index of the first log entry of ``kind`` that mentions ``item``."""
    for index, entry in enumerate(log):
        if entry[0] == kind and item in entry[1:]:
            return index
    raise AssertionError(f"no {kind} entry for {item!r}")


# -- end to end ---------------------------------------------------------------------------------


async def test_jsonl_to_sqlite_end_to_end_with_poison_and_malformed_lines(tmp_path: Path) -> None:
    """3,000 JSONL lines with 6 malformed and 9 poison lines: the table holds exactly the 2,985
    good ids once, the durable dead-letter file exactly the 15 bad lines (reasons malformed and
    failed, each with its line number), and every line was acknowledged."""
    from batchpunk.deadletter import JsonlDeadLetters

    malformed = {10, 500, 1000, 1500, 2000, 2999}
    poison = {3, 7, 250, 251, 1234, 1998, 2500, 2501, 2777}
    lines = []
    for i in range(3000):
        if i in malformed:
            lines.append(f'{{"id": {i}, "body": ')
        elif i in poison:
            lines.append(json.dumps({"id": i}))
        else:
            lines.append(json.dumps({"id": i, "body": f"event {i}"}))
    source_path = tmp_path / "in.jsonl"
    source_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    db_path, letters_path = tmp_path / "out.db", tmp_path / "dead.jsonl"
    pipeline = Pipeline(
        JsonlSource(str(source_path)),
        SqliteSink(str(db_path), "events", ["id", "body"], idempotency_key="id"),
        BatchConfig(max_size=200, max_wait=0.05, **FAST),
        dead_letter=JsonlDeadLetters(str(letters_path)),
    )
    await asyncio.wait_for(pipeline.run(), 60)

    with sqlite3.connect(db_path) as db:
        ids = [row[0] for row in db.execute("SELECT id FROM events")]
    assert sorted(ids) == sorted(set(range(3000)) - malformed - poison)
    reader = JsonlDeadLetters(str(letters_path))
    letters = [letter async for letter in reader.read()]
    await reader.close()
    by_reason: dict[str, set[int]] = {}
    for letter in letters:
        by_reason.setdefault(letter.reason, set()).add(letter.headers["line"] - 1)
    assert len(letters) == 15
    assert by_reason == {"malformed": malformed, "failed": poison}
    stats = await pipeline.get_stats()
    assert stats["received"] == 3000
    assert stats["processed"] == 2985
    assert stats["dead_lettered"] == 15
    assert stats["dead_letter_reasons"] == {"failed": 9, "malformed": 6}
    assert stats["pipeline"]["acked"] == 3000
    assert stats["pipeline"]["unfinished"] == 0


# -- acknowledgements ---------------------------------------------------------------------------


async def test_each_ack_comes_after_its_write_or_its_stored_dead_letter() -> None:
    """No envelope is acknowledged before the write that holds it succeeded, or before its dead
    letter was stored; each is acknowledged exactly once and never nacked."""
    log: list[tuple[Any, ...]] = []
    poison = {13, 77, 150}
    malformed = {40, 41}
    source = RecordingSource(list(range(300)), log, malformed=malformed)
    pipeline = Pipeline(
        source,
        RecordingSink(log, poison, delay=0.002),
        BatchConfig(max_size=25, max_wait=0.01, **FAST),
        dead_letter=RecordingLetters(log),
    )
    await asyncio.wait_for(pipeline.run(), 30)
    acks = [entry[1] for entry in log if entry[0] == "ack"]
    assert sorted(acks) == list(range(300))
    assert not [entry for entry in log if entry[0] == "nack"]
    for i in range(300):
        if i in malformed:
            done = position(log, "letters", f"garbage {i}")
        elif i in poison:
            done = position(log, "letters", i)
        else:
            done = position(log, "write", i)
        assert done < log.index(("ack", i)), i
    assert log.index(("close",)) > max(log.index(("ack", i)) for i in range(300))


async def test_graceful_stop_acks_what_finished_and_nacks_nothing_twice() -> None:
    """stop() on an endless source: every envelope read ends acknowledged after its write (the
    drain finishes them), none is both acknowledged and nacked, and run() returns."""
    log: list[tuple[Any, ...]] = []
    source = RecordingSource(None, log)
    pipeline = Pipeline(
        source, RecordingSink(log, delay=0.001), BatchConfig(max_size=50, max_wait=0.01)
    )
    runner = asyncio.create_task(pipeline.run())
    await asyncio.wait_for(source.until_read(500), 10)
    await asyncio.wait_for(pipeline.stop(), 10)
    await runner
    acked = {entry[1] for entry in log if entry[0] == "ack"}
    nacked = {entry[1] for entry in log if entry[0] == "nack"}
    written = {i for entry in log if entry[0] == "write" for i in entry[1:]}
    assert acked.isdisjoint(nacked)
    assert acked <= written
    assert acked | nacked == set(range(source.read))
    assert len(nacked) <= 1  # at most the envelope in hand when the stop began


async def test_hard_stop_nacks_every_unfinished_envelope_and_acks_none_of_them() -> None:
    """stop(drain=False) while the sink hangs: run() returns at once, every envelope read is
    nacked with requeue and none is acknowledged, even when the hung batch completes later."""
    log: list[tuple[Any, ...]] = []
    source = RecordingSource(None, log)
    sink = RecordingSink(log)
    sink.gate = asyncio.Event()
    config = BatchConfig(max_size=10, max_wait=0.01, max_pending=100, drain_timeout=0.5)
    pipeline = Pipeline(source, sink, config)
    runner = asyncio.create_task(pipeline.run())
    await asyncio.wait_for(source.until_read(100), 10)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(pipeline.stop(drain=False), 10)
    await runner
    assert loop.time() - began < 5
    assert pipeline.aborted
    sink.gate.set()
    await asyncio.sleep(0.05)
    assert not [entry for entry in log if entry[0] == "ack"]
    nacked = [entry for entry in log if entry[0] == "nack"]
    assert sorted(entry[1] for entry in nacked) == list(range(source.read))
    assert all(entry[2] is True for entry in nacked)


async def test_batches_unfinished_at_drain_timeout_go_back_to_the_broker() -> None:
    """A graceful stop whose drain_timeout runs out nacks the hung batch's envelopes with
    requeue: none is acknowledged and none is parked in the dead-letter sink."""
    log: list[tuple[Any, ...]] = []
    source = RecordingSource([0, 1, 2], log)
    sink = RecordingSink(log)
    sink.gate = asyncio.Event()  # never opens: the batch outlives the drain
    letters = RecordingLetters(log)
    config = BatchConfig(max_size=3, max_wait=0.01, drain_timeout=0.2)
    pipeline = Pipeline(source, sink, config, dead_letter=letters)
    runner = asyncio.create_task(pipeline.run())
    await asyncio.wait_for(source.until_read(3), 10)
    await asyncio.sleep(0.05)
    await asyncio.wait_for(pipeline.stop(), 10)
    await runner
    assert not [entry for entry in log if entry[0] in ("ack", "write", "letters")]
    assert sorted(entry[1:] for entry in log if entry[0] == "nack") == [
        (0, True),
        (1, True),
        (2, True),
    ]
    assert letters.letters == []


async def test_a_second_signal_stops_at_once_after_the_first_began_a_drain() -> None:
    """run(handle_signals=True): the first SIGTERM starts a drain; a second one while the sink
    hangs stops at once with every unfinished envelope nacked."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("loop signal handlers need the main thread; SIGTERM would end the run")
    log: list[tuple[Any, ...]] = []
    source = RecordingSource(None, log)
    sink = RecordingSink(log)
    sink.gate = asyncio.Event()
    pipeline = Pipeline(source, sink, BatchConfig(max_size=10, max_wait=0.01, max_pending=50))
    runner = asyncio.create_task(pipeline.run(handle_signals=True))
    await asyncio.wait_for(source.until_read(50), 10)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.sleep(0.1)
    assert pipeline.stop_requested
    assert not pipeline.aborted
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(runner, 10)
    assert pipeline.aborted
    assert pipeline.signals_received == 2
    assert not [entry for entry in log if entry[0] == "ack"]
    assert len([entry for entry in log if entry[0] == "nack"]) == source.read


async def test_letters_the_engine_could_not_store_are_nacked_not_acked() -> None:
    """When the dead-letter sink stays down past the drain (delivery_timeout + drain_timeout
    once the input ended), the failed envelopes are returned to the source (nack) instead of
    acknowledged; the good ones are acknowledged."""
    log: list[tuple[Any, ...]] = []
    letters = RecordingLetters(log, fail=10_000)
    pipeline = Pipeline(
        RecordingSource(list(range(20)), log),
        RecordingSink(log, poison={5}),
        BatchConfig(max_size=20, max_wait=0.01, drain_timeout=0.3, delivery_timeout=0.3, **FAST),
        dead_letter=letters,
    )
    await asyncio.wait_for(pipeline.run(), 20)
    assert ("nack", 5, True) in log
    assert ("ack", 5) not in log
    assert sorted(entry[1] for entry in log if entry[0] == "ack") == [
        i for i in range(20) if i != 5
    ]
    assert [letter.message for letter in pipeline.undelivered] == [5]


async def test_rejected_envelopes_wait_for_a_recovering_dead_letter_sink() -> None:
    """A malformed envelope whose letter cannot be stored yet is retried, then stored and only
    then acknowledged; nothing is lost while the sink is down."""
    log: list[tuple[Any, ...]] = []
    letters = RecordingLetters(log, fail=2)
    pipeline = Pipeline(
        RecordingSource(list(range(10)), log, malformed={4}),
        RecordingSink(log),
        BatchConfig(max_size=10, max_wait=0.01, retry_delay=0.01),
        dead_letter=letters,
    )
    await asyncio.wait_for(pipeline.run(), 20)
    assert [letter.reason for letter in letters.letters] == ["malformed"]
    assert position(log, "letters", "garbage 4") < log.index(("ack", 4))
    assert (await pipeline.get_stats())["dead_letter_reasons"] == {"malformed": 1}


async def test_redelivered_envelopes_are_dead_lettered_with_their_headers() -> None:
    """An envelope flagged batchpunk_redelivered skips the sink: it is dead-lettered with reason
    "redelivered" and its headers, then acknowledged; failed letters keep their headers too."""
    log: list[tuple[Any, ...]] = []
    headers = {2: {REDELIVERED: True, "delivery": 11}, 6: {"message_id": "m-6"}}
    letters = MemoryDeadLetters()
    pipeline = Pipeline(
        RecordingSource(list(range(10)), log, headers=headers),
        RecordingSink(log, poison={6}),
        BatchConfig(max_size=10, max_wait=0.01, **FAST),
        dead_letter=letters,
    )
    await asyncio.wait_for(pipeline.run(), 20)
    found = {letter.message: letter for letter in letters.letters}
    assert found[2].reason == "redelivered"
    assert found[2].headers["delivery"] == 11
    assert found[6].reason == "failed"
    assert found[6].headers["message_id"] == "m-6"
    assert 2 not in {i for entry in log if entry[0] == "write" for i in entry[1:]}
    assert ("ack", 2) in log


async def test_a_failing_source_is_drained_then_its_error_raised() -> None:
    """When the source raises, what was read is still written and acknowledged, then run()
    raises the source's error."""
    log: list[tuple[Any, ...]] = []

    class Broken(RecordingSource):
        async def _iterate(self) -> AsyncIterator[Envelope]:
            async for envelope in super()._iterate():
                yield envelope
                if self.read == 30:
                    raise ConnectionError("broker went away")

    pipeline = Pipeline(
        Broken(list(range(100)), log), RecordingSink(log), BatchConfig(max_size=7, max_wait=0.01)
    )
    with pytest.raises(ConnectionError, match="broker went away"):
        await asyncio.wait_for(pipeline.run(), 20)
    assert sorted(entry[1] for entry in log if entry[0] == "ack") == list(range(30))
    assert ("close",) in log


async def test_connector_hooks_prepare_ack_many_and_stop_consuming() -> None:
    """prepare(config) runs before the first message on every part; ack_many settles groups
    when the source has it; stop_consuming ends iteration without cancelling."""
    config = BatchConfig(max_size=10, max_wait=0.01)
    calls: list[Any] = []

    class Source:
        def __init__(self) -> None:
            self.stopping = False

        async def prepare(self, cfg: BatchConfig) -> None:
            calls.append(("prepare-source", cfg))

        def __aiter__(self) -> AsyncIterator[Envelope]:
            return self._iterate()

        async def _iterate(self) -> AsyncIterator[Envelope]:
            i = 0
            while not self.stopping:
                yield Envelope(i)
                i += 1
                await asyncio.sleep(0.001)

        async def ack_many(self, envelopes: Sequence[Envelope]) -> None:
            calls.append(("ack_many", len(envelopes)))

        def stop_consuming(self) -> None:
            calls.append(("stop_consuming",))
            self.stopping = True

        async def close(self) -> None:
            calls.append(("close",))

    class Sink:
        async def prepare(self, cfg: BatchConfig) -> None:
            calls.append(("prepare-sink", cfg))

        async def write(self, batch: Sequence[Any]) -> None:
            return None

        async def close(self) -> None:
            return None

    pipeline = Pipeline(Source(), Sink(), config)
    runner = asyncio.create_task(pipeline.run())
    await asyncio.sleep(0.2)
    await pipeline.stop()
    await runner
    assert calls[0] == ("prepare-source", config)
    assert calls[1] == ("prepare-sink", config)
    assert ("stop_consuming",) in calls
    acked = sum(n for name, *rest in calls if name == "ack_many" for n in rest)
    stats = await pipeline.get_stats()
    assert acked == stats["received"] == stats["pipeline"]["acked"]
    assert calls[-1] == ("close",)


async def test_pipeline_runs_once_and_checks_its_parts() -> None:
    """A second run() raises ProcessorClosed; a sink without write(), or an overflow policy
    that would make reading fail, is refused up front."""
    log: list[tuple[Any, ...]] = []
    pipeline = Pipeline(RecordingSource([1], log), RecordingSink(log), BatchConfig(max_wait=0.01))
    await pipeline.run()
    with pytest.raises(ProcessorClosed):
        await pipeline.run()
    with pytest.raises(ValueError, match="sink"):
        Pipeline(RecordingSource([1], log), object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="overflow"):
        Pipeline(RecordingSource([1], log), RecordingSink(log), BatchConfig(overflow="raise"))


def test_prefetch_covers_running_batches_and_one_filling() -> None:
    """The prefetch window holds every running batch plus one more that is filling."""
    assert prefetch_for(BatchConfig(max_size=500, max_concurrent_batches=4)) == 2500
    assert prefetch_for(BatchConfig(max_size=10, enable_parallel_processing=False)) == 20


async def test_a_hard_stop_logs_the_time_waited_not_the_drain_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before, a hard stop during a drain logged "stop: 30.0s passed with 1 batch(es)
    unfinished; dead-lettering them" at once: the configured grace, not the time that passed,
    and in a pipeline they are given back. Now the line says how long the stop waited
    before it was hurried."""
    log: list[tuple[Any, ...]] = []
    source = RecordingSource([0, 1, 2], log)
    sink = RecordingSink(log)
    sink.gate = asyncio.Event()  # never opens
    pipeline = Pipeline(source, sink, BatchConfig(max_size=3, max_wait=0.01, drain_timeout=30))
    runner = asyncio.create_task(pipeline.run())
    await asyncio.wait_for(source.until_read(3), 10)
    await asyncio.sleep(0.05)  # the batch is in the sink
    pipeline.request_stop()
    await asyncio.sleep(0.05)
    with caplog.at_level("ERROR", logger="batchpunk"):
        await asyncio.wait_for(pipeline.stop(drain=False), 10)
        await runner
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stop:")]
    assert lines, caplog.text
    assert all("30" not in line for line in lines), lines
    assert all("(stop hurried)" in line for line in lines), lines
