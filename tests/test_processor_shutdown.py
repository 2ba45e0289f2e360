"""Shutdown: closed to new messages at once, every accepted one processed or dead-lettered."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Any

import pytest

from batchpunk import Batch, BatchProcessor, ProcessorClosed
from tests.engine_support import PATIENCE, Recorder, config, settle, stopped_ledger


def _fates(p: BatchProcessor[Any, Any], rec: Recorder) -> Counter[Any]:
    """How many times each message ended, processed or dead-lettered."""
    return Counter(rec.processed) + Counter(letter.message for letter in p.dead_letters)


async def test_producers_still_adding_get_processor_closed_and_nothing_is_lost() -> None:
    """Producers racing stop() get ProcessorClosed; every message they got in ends exactly once."""
    done: list[Any] = []

    async def slow(batch: Batch[Any]) -> list[Any]:
        await asyncio.sleep(0.001)
        done.extend(batch)
        return list(batch)

    p: BatchProcessor[Any, Any] = BatchProcessor(config(max_size=5, max_pending=20), slow)
    await p.start()
    added: list[Any] = []
    submits: dict[Any, asyncio.Future[Any]] = {}

    async def adder(name: str) -> None:
        for i in range(100_000):
            await p.add_message((name, i))
            added.append((name, i))
            await asyncio.sleep(0)

    async def submitter() -> None:
        for i in range(100_000):
            submits[("s", i)] = asyncio.ensure_future(p.submit(("s", i)))
            await asyncio.sleep(0)
            if p.closed:
                raise ProcessorClosed("stopped")

    producers = [asyncio.ensure_future(adder(f"a{n}")) for n in range(2)]
    producers.append(asyncio.ensure_future(submitter()))
    await asyncio.sleep(0.03)
    await p.stop()
    outcomes = await asyncio.gather(*producers, return_exceptions=True)
    assert all(isinstance(outcome, ProcessorClosed) for outcome in outcomes)
    results = await asyncio.wait_for(
        asyncio.gather(*submits.values(), return_exceptions=True), PATIENCE
    )
    ended = Counter(done) + Counter(letter.message for letter in p.dead_letters)
    assert max(ended.values()) == 1
    assert set(added) <= set(ended)
    assert set(ended) <= set(added) | set(submits)
    for message, result in zip(submits, results, strict=True):
        assert result == message or isinstance(result, ProcessorClosed)
        if result == message:
            assert message in done
    stats = await stopped_ledger(p)
    assert stats["processed"] + stats["dead_lettered"] == stats["received"] == sum(ended.values())
    assert len(added) > 0


async def test_producers_waiting_for_room_get_processor_closed_when_stop_begins() -> None:
    """Producers blocked on a full buffer wake with ProcessorClosed as soon as stop() begins."""
    rec = Recorder(held=True)
    p: BatchProcessor[Any, Any] = BatchProcessor(config(max_size=1, max_pending=2), rec)
    await p.start()
    await p.add_message("a")
    await p.add_message("b")
    waiting = [
        asyncio.ensure_future(p.add_message("c")),
        asyncio.ensure_future(p.submit("d")),
    ]
    await settle()
    assert not any(task.done() for task in waiting)
    stopping = asyncio.ensure_future(p.stop())
    for task in waiting:
        with pytest.raises(ProcessorClosed):
            await asyncio.wait_for(task, PATIENCE)
    assert not stopping.done()  # the running batches are still draining
    rec.gate.set()
    await asyncio.wait_for(stopping, PATIENCE)
    assert sorted(rec.processed) == ["a", "b"]
    await stopped_ledger(p)


async def test_every_add_path_raises_processor_closed_after_stop() -> None:
    """After stop(), add_message, add_message_nowait and submit raise ProcessorClosed."""
    p: BatchProcessor[Any, Any] = BatchProcessor(config(), Recorder())
    await p.start()
    await p.stop()
    assert p.closed
    with pytest.raises(ProcessorClosed):
        await p.add_message(1)
    with pytest.raises(ProcessorClosed):
        p.add_message_nowait(1)
    with pytest.raises(ProcessorClosed):
        await p.submit(1)
    with pytest.raises(ProcessorClosed):
        await p.add_message(1, key="k", priority=2)


async def test_every_add_path_raises_processor_closed_before_start() -> None:
    """A processor that was never started refuses messages with ProcessorClosed."""
    p: BatchProcessor[Any, Any] = BatchProcessor(config(), Recorder())
    with pytest.raises(ProcessorClosed):
        await p.add_message(1)
    with pytest.raises(ProcessorClosed):
        p.add_message_nowait(1)
    with pytest.raises(ProcessorClosed):
        await p.submit(1)


async def test_stop_with_drain_flushes_every_lane_as_shutdown() -> None:
    """stop(drain=True) cuts each partial lane with reason "shutdown" and runs it."""
    rec = Recorder()
    p: BatchProcessor[Any, Any] = BatchProcessor(config(trigger="size", max_size=100), rec)
    await p.start()
    for i in range(6):
        await p.add_message(i, key=i % 3, priority=i % 2)
    await p.stop()
    assert sorted(rec.processed) == list(range(6))
    assert {c.flush_reason for c in rec.calls} == {"shutdown"}
    stats = await stopped_ledger(p)
    assert stats["flush_reasons"]["shutdown"] == len(rec.calls)


async def test_drain_timeout_dead_letters_a_hanging_async_processor() -> None:
    """A hung async call is cancelled at drain_timeout and its messages dead-lettered "shutdown"."""
    cancelled = asyncio.Event()

    async def hang(batch: Batch[Any]) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    cfg = config(max_size=2, max_concurrent_batches=1, drain_timeout=0.1)
    p: BatchProcessor[Any, Any] = BatchProcessor(cfg, hang)
    await p.start()
    for i in range(5):
        await p.add_message(i)
    victim = asyncio.ensure_future(p.submit("submitted"))
    await settle()
    loop = asyncio.get_running_loop()
    began = loop.time()
    await p.stop()
    took = loop.time() - began
    assert 0.1 - 0.01 <= took < 0.1 + 0.4
    assert cancelled.is_set()
    with pytest.raises(ProcessorClosed):
        await victim
    assert sorted(map(str, (letter.message for letter in p.dead_letters))) == sorted(
        map(str, [0, 1, 2, 3, 4, "submitted"])
    )
    assert {letter.reason for letter in p.dead_letters} == {"shutdown"}
    assert all(isinstance(letter.error, ProcessorClosed) for letter in p.dead_letters)
    stats = await stopped_ledger(p)
    assert stats["processed"] == 0
    assert stats["dead_letter_reasons"] == {"shutdown": 6}


async def test_drain_timeout_abandons_a_hanging_sync_processor() -> None:
    """A hung sync call does not hold stop() past drain_timeout; its messages are dead-lettered."""
    release = threading.Event()

    def hang(batch: Batch[Any]) -> None:
        release.wait(PATIENCE)

    p: BatchProcessor[Any, Any] = BatchProcessor(config(max_size=2, drain_timeout=0.1), hang)
    await p.start()
    try:
        for i in range(4):
            await p.add_message(i)
        loop = asyncio.get_running_loop()
        began = loop.time()
        await p.stop()
        assert loop.time() - began < 0.1 + 0.4
    finally:
        release.set()
    assert sorted(letter.message for letter in p.dead_letters) == [0, 1, 2, 3]
    assert {letter.reason for letter in p.dead_letters} == {"shutdown"}
    await stopped_ledger(p)


async def test_stop_without_drain_dead_letters_waiting_messages_at_once() -> None:
    """stop(drain=False) dead-letters lanes and queued batches at once; running ones finish."""
    rec = Recorder(held=True)
    cfg = config(max_size=2, max_wait=60.0, max_concurrent_batches=1)
    p: BatchProcessor[Any, Any] = BatchProcessor(cfg, rec)
    await p.start()
    for message in ["run1", "run2", "queued1", "queued2", "lane"]:
        await p.add_message(message)
    await rec.wait_running(1)
    stopping = asyncio.ensure_future(p.stop(drain=False))
    await settle()
    assert sorted(letter.message for letter in p.dead_letters) == ["lane", "queued1", "queued2"]
    assert {letter.reason for letter in p.dead_letters} == {"shutdown"}
    assert not stopping.done()
    rec.gate.set()
    await asyncio.wait_for(stopping, PATIENCE)
    assert rec.processed == ["run1", "run2"]
    assert len(rec.calls) == 1
    await stopped_ledger(p)


async def test_stop_without_drain_cancels_a_running_call_past_drain_timeout() -> None:
    """stop(drain=False) waits for a running call only up to drain_timeout."""
    rec = Recorder(held=True)
    p: BatchProcessor[Any, Any] = BatchProcessor(config(max_size=1, drain_timeout=0.05), rec)
    await p.start()
    await p.add_message("stuck")
    await rec.wait_running(1)
    await asyncio.wait_for(p.stop(drain=False), 0.05 + 0.4)
    assert [(d.message, d.reason) for d in p.dead_letters] == [("stuck", "shutdown")]
    await stopped_ledger(p)


async def test_stop_without_drain_with_preserve_order_ends_each_message_once() -> None:
    """Queued batches of one key behind a running one are dead-lettered once, never run."""
    rec = Recorder(held=True)
    cfg = config(max_size=1, preserve_order=True, max_concurrent_batches=2)
    p: BatchProcessor[Any, Any] = BatchProcessor(cfg, rec)
    await p.start()
    for i in range(6):
        await p.add_message(i, key="k" if i < 4 else "z")
    await rec.wait_running(2)
    stopping = asyncio.ensure_future(p.stop(drain=False))
    await settle()
    rec.gate.set()
    await asyncio.wait_for(stopping, PATIENCE)
    fates = _fates(p, rec)
    assert set(fates) == set(range(6))
    assert max(fates.values()) == 1
    assert sorted(rec.processed) == [0, 4]
    await stopped_ledger(p)


async def test_zero_drain_timeout_still_accounts_for_every_message() -> None:
    """drain_timeout=0 returns at once, yet every accepted message ends exactly once."""
    rec = Recorder(held=True)
    p: BatchProcessor[Any, Any] = BatchProcessor(config(max_size=2, drain_timeout=0), rec)
    await p.start()
    for i in range(7):
        await p.add_message(i)
    await asyncio.wait_for(p.stop(), PATIENCE)
    fates = _fates(p, rec)
    assert set(fates) == set(range(7))
    assert max(fates.values()) == 1
    await stopped_ledger(p)


async def test_stop_is_idempotent() -> None:
    """Concurrent and repeated stop() calls all return, after one shutdown."""
    rec = Recorder(held=True)
    p: BatchProcessor[Any, Any] = BatchProcessor(config(max_size=1), rec)
    await p.start()
    await p.add_message("x")
    await rec.wait_running(1)
    first = asyncio.ensure_future(p.stop())
    second = asyncio.ensure_future(p.stop(drain=False))
    await settle()
    assert not first.done()
    assert not second.done()
    rec.gate.set()
    await asyncio.wait_for(asyncio.gather(first, second), PATIENCE)
    await asyncio.wait_for(p.stop(), PATIENCE)
    assert rec.processed == ["x"]
    stats = await stopped_ledger(p)
    assert stats["state"] == "closed"
    with pytest.raises(ProcessorClosed):
        await p.start()


async def test_stopping_a_processor_that_never_started_is_harmless() -> None:
    """stop() before start() returns, and the processor stays refused."""
    p: BatchProcessor[Any, Any] = BatchProcessor(config(), Recorder())
    await p.stop()
    await p.stop()
    with pytest.raises(ProcessorClosed):
        p.add_message_nowait(1)


async def test_async_with_drains_on_exit_even_when_the_body_raises() -> None:
    """Leaving `async with` by an exception still drains every accepted message."""
    rec = Recorder()
    p: BatchProcessor[Any, Any] = BatchProcessor(config(trigger="size", max_size=100), rec)

    async def body() -> None:
        async with p:
            await p.add_message(1)
            await p.add_message(2)
            raise RuntimeError("body failed")

    with pytest.raises(RuntimeError, match="body"):
        await body()
    assert rec.processed == [1, 2]
    assert p.closed


def test_add_nowait_while_the_loop_is_not_running_is_all_or_nothing() -> None:
    """A nowait add from the loop's thread between run_until_complete calls either works or
    refuses the message whole: it is never half accepted."""
    loop = asyncio.new_event_loop()
    try:
        rec = Recorder()
        p: BatchProcessor[Any, Any] = BatchProcessor(config(max_size=1, drain_timeout=0.1), rec)
        loop.run_until_complete(p.start())
        try:
            p.add_message_nowait("x")
            accepted = True
        except RuntimeError:
            accepted = False
        loop.run_until_complete(p.stop())
        stats = loop.run_until_complete(stopped_ledger(p))
        assert stats["received"] == int(accepted)
        assert rec.processed == (["x"] if accepted else [])
    finally:
        loop.close()
