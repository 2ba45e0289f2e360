"""BufferedSource, the read-ahead buffer and reader loop Redis Streams, Kafka and SQS share.

A scripted subclass stands in for a broker: it supplies the primitives (``_open``, ``_read``,
``_read_failed``) the way a connector does, so each rule of the base (start once,
backpressure, outage or fatal failure, stop) is checked without a server. The brokers' own
behaviour around it is in tests/integration.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest

from batchpunk.config import BatchConfig
from batchpunk.connectors import _toolkit
from batchpunk.connectors._toolkit import BufferedSource
from batchpunk.envelope import Envelope


class _Scripted(BufferedSource):
    """Readers whose every read returns one envelope, or what ``script`` says for that read."""

    def __init__(
        self,
        *,
        count: int | None = 4,
        readers: int = 1,
        script: Callable[[int], Sequence[Envelope]] | None = None,
    ) -> None:
        super().__init__("Scripted", count, 10)
        self.readers = readers
        self.script = script
        self.opened = 0
        self.calls = 0
        self.reads: dict[asyncio.Task[None] | None, int] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.ended = 0

    async def _open(self) -> None:
        self.opened += 1
        await asyncio.sleep(0)  # racing first callers pile up on the start lock here
        self.tasks = [asyncio.create_task(self._read_loop()) for _ in range(self.readers)]

    async def _read(self) -> Sequence[Envelope]:
        self.calls += 1
        if self.script is not None:
            return self.script(self.calls)
        await asyncio.sleep(0)  # a read takes a while: other readers read meanwhile
        task = asyncio.current_task()
        self.reads[task] = self.reads.get(task, 0) + 1  # type: ignore[index]
        return [Envelope(self.calls)]

    def _read_failed(self, exc: Exception) -> BaseException | None:
        return None if isinstance(exc, OSError) else exc

    def _reading_ended(self) -> None:
        self.ended += 1

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
    calls = source.calls
    await _settle()
    assert source.calls == calls  # waiting on demand, not polling
    await source.__anext__()
    await _settle()
    assert source.calls == calls + 1
    assert len(source._buffer) == 4
    await source.close()


@pytest.mark.timeout(10)
async def test_a_high_water_mark_below_count_waits_instead_of_spinning() -> None:
    """A _full below count (KafkaSource with buffer_size under the batch size) still waits.

    Before, the reader waited only while the buffer held count envelopes, so it returned at
    once, found the buffer full again and looped without yielding: the event loop froze.
    """

    class Small(_Scripted):
        def _full(self) -> bool:
            return len(self._buffer) >= 3

    source = Small(count=8)
    await source.__anext__()
    await _settle()
    assert len(source._buffer) == 3
    await source.__anext__()
    await _settle()
    assert len(source._buffer) == 3
    await source.close()


async def test_every_waiting_reader_reads_again_once_the_buffer_is_drained() -> None:
    """With several readers waiting for room, draining the buffer wakes all of them."""
    source = _Scripted(count=6, readers=3)
    await source.__anext__()
    await _settle()
    before = dict(source.reads)
    assert len(before) == 3
    while source._buffer:
        await source.__anext__()
    await _settle()
    assert all(source.reads[task] > reads for task, reads in before.items())
    await source.close()


async def test_a_fatal_read_error_is_raised_after_what_was_read_before() -> None:
    """Envelopes read before a fatal error are handed out first, then the error is raised."""

    def script(call: int) -> Sequence[Envelope]:
        if call == 1:
            return [Envelope("a"), Envelope("b")]
        raise RuntimeError("the broker refused")

    source = _Scripted(script=script)
    assert [(await source.__anext__()).payload for _ in range(2)] == ["a", "b"]
    with pytest.raises(RuntimeError, match="refused"):
        await source.__anext__()


async def test_an_outage_is_retried_after_a_backoff_counted_from_the_last_success(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Failed reads back off with a growing failure count, which a good read resets."""
    delays: list[int] = []
    monkeypatch.setattr(_toolkit, "reconnect_delay", lambda failures: delays.append(failures) or 0)

    def script(call: int) -> Sequence[Envelope]:
        if call in (1, 2, 4):
            raise OSError("connection refused")
        return [Envelope(call)]

    source = _Scripted(script=script)
    assert (await source.__anext__()).payload == 3
    assert (await source.__anext__()).payload == 5
    assert delays == [1, 2, 1]
    await source.close()


async def test_stop_consuming_ends_a_waiting_iteration_and_cuts_a_backoff_short(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A caller waiting for envelopes gets StopAsyncIteration, and a reader backing off from
    an unreachable broker leaves its loop at once instead of after its reconnect delay."""
    monkeypatch.setattr(_toolkit, "reconnect_delay", lambda failures: 60.0)

    def unreachable(call: int) -> Sequence[Envelope]:
        raise OSError("no route to host")

    source = _Scripted(script=unreachable)
    waiting = asyncio.create_task(source.__anext__())
    await _settle()
    source.stop_consuming()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, 1)
    await asyncio.wait_for(asyncio.gather(*source.tasks), 1)
    assert source.ended == 1


async def test_prepare_sizes_reads_to_the_batches_unless_count_was_given() -> None:
    """count follows the pipeline's max_size only when the user did not set it."""
    default, given = _Scripted(count=None), _Scripted(count=7)
    await default.prepare(BatchConfig(max_size=250))
    await given.prepare(BatchConfig(max_size=250))
    assert (default.count, given.count) == (250, 7)
