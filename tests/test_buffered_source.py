"""BufferedSource, the read-ahead buffer Redis Streams, Kafka and SQS sources share.

A scripted subclass stands in for a broker: its readers push one envelope per read, so each
rule of the buffer (start once, backpressure, failure after what was read, stop) is checked
without a server. The brokers' own behaviour around it is in tests/integration.
"""

from __future__ import annotations

import asyncio

import pytest

from batchpunk.config import BatchConfig
from batchpunk.connectors import _toolkit
from batchpunk.connectors._toolkit import BufferedSource
from batchpunk.envelope import Envelope


class _Scripted(BufferedSource):
    """Readers that read one envelope per pass, counting reads per reader."""

    def __init__(self, *, count: int | None = 4, readers: int = 1) -> None:
        super().__init__("Scripted", count, 10)
        self.readers = readers
        self.opened = 0
        self.reads = [0] * readers
        self.tasks: list[asyncio.Task[None]] = []

    async def _open(self) -> None:
        self.opened += 1
        await asyncio.sleep(0)  # racing first callers pile up on the start lock here
        self.tasks = [asyncio.create_task(self._read_loop(i)) for i in range(self.readers)]

    async def _read_loop(self, reader: int) -> None:
        while self._consuming:
            if self._full():
                await self._wait_for_room()
                continue
            self.reads[reader] += 1
            self._push([Envelope((reader, self.reads[reader]))])
            await asyncio.sleep(0)

    async def close(self) -> None:
        self.stop_consuming()
        await asyncio.gather(*self.tasks)


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_racing_first_callers_start_the_source_once() -> None:
    """Concurrent first __anext__ calls open the broker connection exactly once."""
    source = _Scripted()
    await asyncio.gather(*(source.__anext__() for _ in range(3)))
    assert source.opened == 1
    await source.close()


async def test_a_full_buffer_stops_the_reader_until_drained_below_count() -> None:
    """Readers never hold more than count envelopes; taking one lets them read one more."""
    source = _Scripted(count=4)
    await source.__anext__()
    await _settle()
    assert len(source._buffer) == 4
    reads = sum(source.reads)
    await _settle()
    assert sum(source.reads) == reads  # waiting on demand, not polling
    await source.__anext__()
    await _settle()
    assert sum(source.reads) == reads + 1
    assert len(source._buffer) == 4
    await source.close()


async def test_every_waiting_reader_reads_again_once_the_buffer_is_drained() -> None:
    """With several readers waiting for room, draining the buffer wakes all of them."""
    source = _Scripted(count=4, readers=3)
    await source.__anext__()
    await _settle()
    before = list(source.reads)
    for _ in range(4):
        await source.__anext__()
    await _settle()
    assert all(after > was for after, was in zip(source.reads, before, strict=True))
    await source.close()


async def test_a_readers_failure_is_raised_after_what_it_read_before() -> None:
    """Envelopes pushed before a fatal error are handed out first, then the error is raised."""

    class Failing(_Scripted):
        async def _read_loop(self, reader: int) -> None:
            self._push([Envelope("a"), Envelope("b")])
            self._fail(RuntimeError("the broker refused"))

    source = Failing()
    assert [(await source.__anext__()).payload for _ in range(2)] == ["a", "b"]
    with pytest.raises(RuntimeError, match="refused"):
        await source.__anext__()


async def test_stop_consuming_ends_a_waiting_iteration_and_cuts_a_backoff_short(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A caller waiting for envelopes gets StopAsyncIteration, and a reader backing off from
    an unreachable broker returns at once instead of after its reconnect delay."""
    monkeypatch.setattr(_toolkit, "reconnect_delay", lambda failures: 60.0)

    class Unreachable(_Scripted):
        async def _read_loop(self, reader: int) -> None:
            failures = 0
            while self._consuming:
                failures += 1
                await self._backoff(failures)

    source = Unreachable()
    waiting = asyncio.create_task(source.__anext__())
    await _settle()
    source.stop_consuming()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, 1)
    await asyncio.wait_for(asyncio.gather(*source.tasks), 1)


async def test_prepare_sizes_reads_to_the_batches_unless_count_was_given() -> None:
    """count follows the pipeline's max_size only when the user did not set it."""
    default, given = _Scripted(count=None), _Scripted(count=7)
    await default.prepare(BatchConfig(max_size=250))
    await given.prepare(BatchConfig(max_size=250))
    assert (default.count, given.count) == (250, 7)
