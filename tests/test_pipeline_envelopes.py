"""The per-message record: what an Envelope is, and how a pipeline carries it to the end."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from batchpunk.config import BatchConfig
from batchpunk.connectors import JsonlSource
from batchpunk.connectors._common import PayloadError
from batchpunk.deadletter import MemoryDeadLetters
from batchpunk.envelope import Envelope
from batchpunk.errors import PartialFailure
from batchpunk.pipeline import Pipeline


class Source:
    """Yields envelopes with dict payloads and int receipts; logs every settlement."""

    def __init__(self, count: int | None, log: list[tuple[str, int]] | None = None) -> None:
        self.count = count
        self.log = log if log is not None else []
        self.read = 0
        self.closed = False
        self.ack_gate: asyncio.Event | None = None
        self.ack_called = asyncio.Event()

    def __aiter__(self) -> AsyncIterator[Envelope]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Envelope]:
        i = 0
        while not self.closed and (self.count is None or i < self.count):
            self.read += 1
            # A nested dict makes the payload one object the collector tracks, as decoded JSON
            # orders are (a dict of only atoms is untracked, which would flatter the count).
            yield Envelope({"id": i, "order": {"sku": "a-1", "qty": 2}}, receipt=i)
            i += 1
            if i % 100 == 0:
                await asyncio.sleep(0)

    async def ack_many(self, envelopes: Sequence[Envelope]) -> None:
        self.ack_called.set()
        if self.ack_gate is not None:
            await self.ack_gate.wait()
        self.log.extend(("ack", e.receipt) for e in envelopes)

    async def nack_many(self, envelopes: Sequence[Envelope], requeue: bool) -> None:
        self.log.extend(("nack", e.receipt) for e in envelopes)

    async def close(self) -> None:
        self.closed = True


class GatedSink:
    """Writes the first ``free`` batches at once; later batches wait for ``gate``."""

    def __init__(self, free: int = 0) -> None:
        self.free = free
        self.gate = asyncio.Event()
        self.written: list[int] = []
        self.waiting = asyncio.Event()

    async def write(self, batch: Sequence[Any]) -> None:
        if self.free:
            self.free -= 1
        else:
            self.waiting.set()
            await self.gate.wait()
        self.written.extend(p["id"] for p in batch)

    async def close(self) -> None:
        return None


def test_an_envelope_is_one_slotted_object_with_the_contract_fields() -> None:
    """Envelope has exactly the six slots, no instance dict, headers None by default, and
    ``malformed`` is read-only and true exactly when ``error`` is set."""
    envelope = Envelope({"id": 1})
    assert Envelope.__slots__ == ("error", "headers", "key", "payload", "priority", "receipt")
    assert not hasattr(envelope, "__dict__")
    assert (envelope.key, envelope.priority, envelope.headers) == (None, 0, None)
    assert (envelope.receipt, envelope.error, envelope.malformed) == (None, None, False)
    bad = Envelope(b"{", None, 0, {"line": 3}, 7, ValueError("not JSON"))
    assert bad.malformed
    assert (bad.headers, bad.receipt) == ({"line": 3}, 7)
    with pytest.raises(AttributeError):
        bad.malformed = False  # type: ignore[misc]
    assert not hasattr(envelope, "ack")
    assert not hasattr(envelope, "on_ack")


async def test_equal_payloads_keep_their_own_line_headers_in_dead_letters(tmp_path: Path) -> None:
    """The JSONL file 7 / {"id":1} / 7 / null / {"id":2} / null, with a sink that rejects 7 and
    null, gives letters whose line headers are 1, 3, 4, 6: each letter carries its own
    envelope's headers, even when payloads are equal (the old identity map swapped them)."""
    path = tmp_path / "in.jsonl"
    path.write_text('7\n{"id":1}\n7\nnull\n{"id":2}\nnull\n', encoding="utf-8")

    class Rejecting:
        async def write(self, batch: Sequence[Any]) -> None:
            bad = {
                i: PayloadError(f"rejected {p!r}") for i, p in enumerate(batch) if p in (7, None)
            }
            if bad:
                raise PartialFailure(bad)

        async def close(self) -> None:
            return None

    letters = MemoryDeadLetters()
    pipeline = Pipeline(
        JsonlSource(str(path)),
        Rejecting(),
        BatchConfig(max_size=6, max_wait=0.01, max_retries=0),
        dead_letter=letters,
    )
    await asyncio.wait_for(pipeline.run(), 20)
    found = sorted((letter.headers["line"], letter.message) for letter in letters.letters)
    assert found == [(1, 7), (3, 7), (4, None), (6, None)]


async def test_a_hard_stop_never_nacks_a_batch_whose_write_already_returned() -> None:
    """Batch 0-9 is written and its acknowledgement is still on its way to the broker when a
    second SIGTERM stops the pipeline at once: those ten are acknowledged, never nacked; the
    hung batches are nacked; no envelope is both, and every envelope read is settled."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("loop signal handlers need the main thread; SIGTERM would end the run")
    log: list[tuple[str, int]] = []
    source = Source(None, log)
    source.ack_gate = asyncio.Event()
    sink = GatedSink(free=1)
    config = BatchConfig(max_size=10, max_wait=0.01, max_pending=50, drain_timeout=5)
    pipeline = Pipeline(source, sink, config)
    runner = asyncio.create_task(pipeline.run(handle_signals=True))
    await asyncio.wait_for(sink.waiting.wait(), 10)
    # The written batch's ack_many is under way, held by the gate.
    await asyncio.wait_for(source.ack_called.wait(), 10)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.sleep(0.05)
    source.ack_gate.set()  # the broker answers the ack after the stop began
    await asyncio.wait_for(runner, 10)
    sink.gate.set()
    await asyncio.sleep(0.05)
    assert pipeline.aborted
    acked = {receipt for kind, receipt in log if kind == "ack"}
    nacked = [receipt for kind, receipt in log if kind == "nack"]
    assert set(range(10)) <= acked
    assert acked.isdisjoint(nacked)
    assert len(nacked) == len(set(nacked))
    assert acked | set(nacked) == set(range(source.read))


async def test_a_sink_with_write_envelopes_gets_the_envelopes_instead_of_payloads() -> None:
    """write_envelopes is called instead of write, with the envelopes in order, and its
    PartialFailure indices fail those envelopes only."""
    seen: list[Envelope] = []

    class EnvelopeSink:
        async def write(self, batch: Sequence[Any]) -> None:
            raise AssertionError("write() must not be called when write_envelopes exists")

        async def write_envelopes(self, envelopes: Sequence[Envelope]) -> None:
            seen.extend(envelopes)
            bad = {i: PayloadError("odd") for i, e in enumerate(envelopes) if e.receipt == 3}
            if bad:
                raise PartialFailure(bad)

        async def close(self) -> None:
            return None

    log: list[tuple[str, int]] = []
    letters = MemoryDeadLetters()
    pipeline = Pipeline(
        Source(8, log),
        EnvelopeSink(),
        BatchConfig(max_size=8, max_wait=0.01, max_retries=0),
        dead_letter=letters,
    )
    await asyncio.wait_for(pipeline.run(), 20)
    assert [e.receipt for e in seen[:8]] == list(range(8))
    assert [letter.message["id"] for letter in letters.letters] == [3]
    assert sorted(receipt for kind, receipt in log if kind == "ack") == list(range(8))


async def test_live_objects_per_in_flight_message_are_at_most_two() -> None:
    """With 20,000 messages read and held by a hung sink, the collector tracks at most two
    objects per message (its Envelope and its payload dict): no ticket, tracker, bound method
    or headers dict per message on the pipeline path."""
    count = 20_000
    source = Source(count)
    sink = GatedSink()
    config = BatchConfig(max_size=count, max_wait=60.0, max_pending=count, max_concurrent_batches=1)
    pipeline = Pipeline(source, sink, config)
    gc.collect()
    before = len(gc.get_objects())
    runner = asyncio.create_task(pipeline.run())
    await asyncio.wait_for(sink.waiting.wait(), 20)
    gc.collect()
    per_message = (len(gc.get_objects()) - before) / count
    sink.gate.set()
    await asyncio.wait_for(runner, 20)
    assert per_message <= 2.05, f"{per_message:.3f} tracked objects per in-flight message"
