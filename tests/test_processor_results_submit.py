"""Results and errors through submit(), with every shape of processor: sync, async, callable."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from batchpunk import Batch, BatchProcessor, ResultMismatch
from tests.engine_support import Recorder, config, ledger, stopped_ledger


async def test_each_submitter_gets_its_own_messages_result() -> None:
    """Fifty concurrent submits spread over batches each receive the result for their message."""
    rec = Recorder(result=lambda m: m * 10)
    async with BatchProcessor(config(max_size=7), rec) as p:
        results = await asyncio.gather(*(p.submit(i) for i in range(50)))
    assert results == [i * 10 for i in range(50)]
    assert len(rec.calls) >= 50 // 7


async def test_submit_returns_none_when_the_processor_returns_none() -> None:
    """A processor returning None completes every submit with None."""
    async with BatchProcessor(config(max_size=3), Recorder()) as p:
        assert await asyncio.gather(*(p.submit(i) for i in range(3))) == [None, None, None]


async def test_results_may_be_any_sequence_or_iterable() -> None:
    """A tuple, or a generator, of results is matched to the messages in order."""

    async def as_tuple(batch: Batch[Any]) -> tuple[Any, ...]:
        return tuple(m + 1 for m in batch)

    def as_generator(batch: Batch[Any]) -> Any:
        return (m + 2 for m in batch)

    for handler, offset in ((as_tuple, 1), (as_generator, 2)):
        async with BatchProcessor(config(max_size=4), handler) as p:
            results = await asyncio.gather(*(p.submit(i) for i in range(4)))
        assert results == [i + offset for i in range(4)]


async def test_submit_and_add_message_mix_in_one_batch() -> None:
    """Messages added without a future share batches with submitted ones, results still align."""
    rec = Recorder(result=lambda m: f"r{m}")
    async with BatchProcessor(config(max_size=6), rec) as p:
        futures = []
        for i in range(6):
            if i % 2:
                futures.append(asyncio.ensure_future(p.submit(i)))
                await asyncio.sleep(0)
            else:
                await p.add_message(i)
        results = await asyncio.gather(*futures)
    assert results == ["r1", "r3", "r5"]
    assert rec.calls[0].messages == [0, 1, 2, 3, 4, 5]


async def test_submit_raises_the_processors_error() -> None:
    """The exception that finally failed a message is the very one submit() raises."""
    boom = KeyError("no such record")

    async def failing(batch: Batch[Any]) -> None:
        raise boom

    cfg = config(max_size=1, retry_on=(ConnectionError,))
    async with BatchProcessor(cfg, failing) as p:
        with pytest.raises(KeyError) as caught:
            await p.submit("x")
    assert caught.value is boom
    assert p.dead_letters[0].error is boom


async def test_wrong_result_length_fails_each_message_with_result_mismatch() -> None:
    """A processor that always returns one result too many fails every message, even alone,
    with a ResultMismatch (a ValueError) that names both lengths."""

    async def one_too_many(batch: Batch[Any]) -> list[int]:
        return [0] * (len(batch) + 1)

    cfg = config(max_size=3, max_retries=1)
    async with BatchProcessor(cfg, one_too_many) as p:
        outcomes = await asyncio.gather(*(p.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(outcome, ResultMismatch) for outcome in outcomes)
    assert all(isinstance(outcome, ValueError) for outcome in outcomes)
    assert "2 results for a batch of 1" in str(outcomes[0])
    letters = p.dead_letters
    assert sorted(letter.message for letter in letters) == [0, 1, 2]
    assert {letter.reason for letter in letters} == {"failed"}
    stats = await stopped_ledger(p)
    assert stats["failed"] == 3


async def test_wrong_result_length_of_the_whole_batch_names_both_lengths() -> None:
    """The ResultMismatch message says how many results came back and how many were expected."""

    async def short(batch: Batch[Any]) -> list[int]:
        return [0]

    cfg = config(max_size=3, retry_failed=False, enable_partial_batches=False)
    async with BatchProcessor(cfg, short) as p:
        with pytest.raises(ResultMismatch, match=r"1 results? for a batch of 3"):
            await asyncio.gather(*(p.submit(i) for i in range(3)))


class AsyncCallable:
    """An object whose __call__ is a coroutine function."""

    async def __call__(self, batch: Batch[Any]) -> list[Any]:
        await asyncio.sleep(0)
        return [("obj", m) for m in batch]


class SyncCallable:
    """An object whose __call__ is a plain function."""

    def __call__(self, batch: Batch[Any]) -> list[Any]:
        return [("sync-obj", m) for m in batch]


async def _async_fn(batch: Batch[Any]) -> list[Any]:
    return [("async", m) for m in batch]


def _sync_fn(batch: Batch[Any]) -> list[Any]:
    return [("sync", m) for m in batch]


def _sync_returning_awaitable(batch: Batch[Any]) -> Awaitable[list[Any]]:
    async def later() -> list[Any]:
        return [("awaited", m) for m in batch]

    return later()


@pytest.mark.parametrize(
    ("handler", "tag"),
    [
        (_async_fn, "async"),
        (_sync_fn, "sync"),
        (AsyncCallable(), "obj"),
        (SyncCallable(), "sync-obj"),
        (_sync_returning_awaitable, "awaited"),
    ],
)
async def test_every_kind_of_processor_delivers_results(
    handler: Callable[[Batch[Any]], Any], tag: str
) -> None:
    """Async functions, async callables, sync ones and sync ones returning awaitables all work."""
    async with BatchProcessor(config(max_size=2), handler) as p:
        results = await asyncio.gather(*(p.submit(i) for i in range(4)))
        stats = await ledger(p)
    assert results == [(tag, i) for i in range(4)]
    assert stats["processed"] == 4


async def test_sync_processor_runs_off_the_event_loop() -> None:
    """A sync processor runs in a worker thread, and the loop keeps running while it works."""
    threads: list[threading.Thread] = []
    ticks = 0

    def slow(batch: Batch[Any]) -> None:
        threads.append(threading.current_thread())
        time.sleep(0.05)

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    tick_task = asyncio.ensure_future(ticker())
    try:
        async with BatchProcessor(config(max_size=1), slow) as p:
            await p.submit("x")
    finally:
        tick_task.cancel()
    assert threads
    assert threads[0] is not threading.main_thread()
    assert ticks >= 3


async def test_a_sync_processors_error_reaches_submit() -> None:
    """An exception raised in the worker thread is what submit() raises."""

    def failing(batch: Batch[Any]) -> None:
        raise LookupError("thread failure")

    cfg = config(max_size=1, retry_on=(ConnectionError,))
    async with BatchProcessor(cfg, failing) as p:
        with pytest.raises(LookupError, match="thread failure"):
            await p.submit("x")


async def test_a_cancelled_submit_does_not_disturb_its_batch() -> None:
    """A submitter that gives up leaves its message to be processed and others get results."""
    rec = Recorder(result=lambda m: m * 2)
    async with BatchProcessor(config(max_size=3, max_wait=0.01), rec) as p:
        gone = asyncio.ensure_future(p.submit(1))
        kept = asyncio.ensure_future(p.submit(2))
        await asyncio.sleep(0)
        gone.cancel()
        assert await kept == 4
        stats = await ledger(p)
    assert rec.processed == [1, 2]
    assert stats["processed"] == 2


async def test_a_cancelled_submit_in_the_middle_leaves_every_other_caller_its_result() -> None:
    """Callers before and after a cancelled one get theirs (with results, and with None)."""
    for result in (lambda m: m * 2, None):
        rec = Recorder(result=result)
        async with BatchProcessor(config(max_size=5, max_wait=0.01), rec) as p:
            calls = [asyncio.ensure_future(p.submit(i)) for i in range(5)]
            await asyncio.sleep(0)
            calls[2].cancel()
            kept = await asyncio.gather(*(calls[i] for i in (0, 1, 3, 4)))
            assert kept == ([0, 2, 6, 8] if result is not None else [None] * 4)
            assert calls[2].cancelled()
            stats = await ledger(p)
        assert rec.processed == [0, 1, 2, 3, 4]
        assert stats["processed"] == 5


async def test_submit_nowait_returns_each_messages_future_at_once() -> None:
    """submit_nowait accepts at once and its future holds that message's own result."""
    rec = Recorder(result=lambda m: m * 3)
    async with BatchProcessor(config(max_size=4), rec) as p:
        futures = [p.submit_nowait(i, key=i % 2) for i in range(10)]
        assert all(isinstance(f, asyncio.Future) for f in futures)
        assert await asyncio.gather(*futures) == [i * 3 for i in range(10)]
    await stopped_ledger(p)


async def test_submit_nowait_refuses_like_add_message_nowait() -> None:
    """Before start and when full under RAISE it raises; under DROP_NEWEST the future fails."""
    from batchpunk import BufferFull, ProcessorClosed

    idle = BatchProcessor(config(), Recorder())
    with pytest.raises(ProcessorClosed):
        idle.submit_nowait(1)
    rec = Recorder(held=True)
    async with BatchProcessor(config(max_pending=1, overflow="raise"), rec) as p:
        first = p.submit_nowait(1)
        with pytest.raises(BufferFull):
            p.submit_nowait(2)
        rec.gate.set()
        assert await first is None
    async with BatchProcessor(config(max_pending=1, overflow="drop_newest"), Recorder()) as p:
        kept = p.submit_nowait(1)
        dropped = p.submit_nowait(2)
        with pytest.raises(BufferFull):
            await dropped
        assert await kept is None
    assert [letter.reason for letter in p.dead_letters] == ["dropped"]
