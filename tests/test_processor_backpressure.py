"""Backpressure: max_pending with each overflow policy, and pressure cuts that prevent deadlock."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from batchpunk import BatchProcessor, BufferFull, DeadLetter
from tests.engine_support import PATIENCE, Recorder, config, ledger, settle, stopped_ledger


def _letters(p: BatchProcessor[Any, Any]) -> list[tuple[Any, str]]:
    return [(letter.message, letter.reason) for letter in p.dead_letters]


async def test_block_makes_add_message_wait_for_room() -> None:
    """Under BLOCK a full buffer makes add_message wait until a running batch finishes."""
    rec = Recorder(held=True)
    async with BatchProcessor(config(max_size=1, max_pending=3), rec) as p:
        for i in range(3):
            await p.add_message(i)
        await rec.wait_running(3)
        waiting = asyncio.ensure_future(p.add_message(3))
        await settle()
        assert not waiting.done()
        assert (await ledger(p))["received"] == 3
        rec.gate.set()
        await asyncio.wait_for(waiting, PATIENCE)
        await p.flush()
    assert sorted(rec.processed) == [0, 1, 2, 3]
    assert p.dead_letters == []


async def test_block_makes_add_message_nowait_raise_buffer_full() -> None:
    """Under BLOCK add_message_nowait never waits: it raises BufferFull naming max_pending."""
    rec = Recorder(held=True)
    async with BatchProcessor(config(max_size=1, max_pending=2), rec) as p:
        p.add_message_nowait("a")
        p.add_message_nowait("b")
        with pytest.raises(BufferFull, match="max_pending"):
            p.add_message_nowait("c")
        assert (await ledger(p))["received"] == 2
        rec.gate.set()


async def test_a_cancelled_waiting_producer_does_not_lose_the_room() -> None:
    """Cancelling one waiting producer passes the freed room to the next one."""
    rec = Recorder(held=True)
    async with BatchProcessor(config(max_size=1, max_pending=1), rec) as p:
        await p.add_message("running")
        first = asyncio.ensure_future(p.add_message("cancelled"))
        second = asyncio.ensure_future(p.add_message("second"))
        await settle()
        first.cancel()
        await settle()
        rec.gate.set()
        await asyncio.wait_for(second, PATIENCE)
        await p.flush()
    assert rec.processed == ["running", "second"]


async def test_raise_refuses_every_add_when_full() -> None:
    """Under RAISE add_message, add_message_nowait and submit all raise BufferFull when full."""
    rec = Recorder(held=True)
    async with BatchProcessor(config(max_size=1, max_pending=2, overflow="raise"), rec) as p:
        await p.add_message(0)
        await p.add_message(1)
        with pytest.raises(BufferFull):
            await p.add_message(2)
        with pytest.raises(BufferFull):
            p.add_message_nowait(3)
        with pytest.raises(BufferFull):
            await p.submit(4)
        stats = await ledger(p)
        assert stats["received"] == 2
        assert stats["dropped"] == 0
        rec.gate.set()
        await p.flush()
    assert sorted(rec.processed) == [0, 1]


async def test_drop_newest_dead_letters_the_new_message() -> None:
    """Under DROP_NEWEST the new message returns normally and is dead-lettered "dropped"."""
    rec = Recorder(held=True)
    cfg = config(max_size=1, max_pending=2, overflow="drop_newest")
    async with BatchProcessor(cfg, rec) as p:
        await p.add_message(0)
        await p.add_message(1)
        await p.add_message("new")
        p.add_message_nowait("newer")
        with pytest.raises(BufferFull):
            await p.submit("submitted")
        stats = await ledger(p)
        assert stats["dropped"] == 3
        assert stats["received"] == 5
        rec.gate.set()
        await p.flush()
    assert sorted(rec.processed) == [0, 1]
    assert _letters(p) == [("new", "dropped"), ("newer", "dropped"), ("submitted", "dropped")]
    assert all(isinstance(letter.error, BufferFull) for letter in p.dead_letters)
    stats = await stopped_ledger(p)
    assert stats["dead_lettered"] == 3


async def test_drop_oldest_drops_the_oldest_waiting_message_in_a_lane() -> None:
    """Under DROP_OLDEST the oldest message not in a running call makes room for the new one."""
    rec = Recorder(held=True)
    cfg = config(
        max_size=2, max_wait=60.0, max_pending=3, overflow="drop_oldest", max_concurrent_batches=1
    )
    async with BatchProcessor(cfg, rec) as p:
        await p.add_message("r1")
        await p.add_message("r2")
        await rec.wait_running(1)
        await p.add_message("old")
        await p.add_message("new")
        stats = await ledger(p)
        assert stats["dropped"] == 1
        rec.gate.set()
        await p.flush()
    assert rec.processed == ["r1", "r2", "new"]
    assert _letters(p) == [("old", "dropped")]


async def test_drop_oldest_takes_from_a_batch_waiting_for_a_slot() -> None:
    """A cut batch still waiting for a slot is not in flight: its oldest message can be dropped."""
    rec = Recorder(held=True)
    cfg = config(
        max_size=2, max_wait=60.0, max_pending=5, overflow="drop_oldest", max_concurrent_batches=1
    )
    async with BatchProcessor(cfg, rec) as p:
        for message in ["r1", "r2", "w1", "w2", "lane"]:
            await p.add_message(message)
        await rec.wait_running(1)
        await p.add_message("new")
        rec.gate.set()
        await p.flush()
    assert _letters(p) == [("w1", "dropped")]
    assert sorted(rec.processed) == ["lane", "new", "r1", "r2", "w2"]
    await stopped_ledger(p)


async def test_drop_oldest_drops_the_new_message_when_everything_runs() -> None:
    """When every unfinished message is in a running call, DROP_OLDEST drops the new one."""
    rec = Recorder(held=True)
    cfg = config(max_size=1, max_pending=2, overflow="drop_oldest", max_concurrent_batches=2)
    async with BatchProcessor(cfg, rec) as p:
        await p.add_message("a")
        await p.add_message("b")
        await rec.wait_running(2)
        await p.add_message("new")
        assert (await ledger(p))["dropped"] == 1
        rec.gate.set()
        await p.flush()
    assert sorted(rec.processed) == ["a", "b"]
    assert _letters(p) == [("new", "dropped")]
    letter = p.dead_letters[0]
    assert isinstance(letter, DeadLetter)
    assert isinstance(letter.error, BufferFull)


async def test_drop_oldest_fails_a_dropped_submitters_future() -> None:
    """A submit() whose message is dropped to make room raises BufferFull, not hangs."""
    rec = Recorder(held=True)
    cfg = config(
        max_size=2, max_wait=60.0, max_pending=3, overflow="drop_oldest", max_concurrent_batches=1
    )
    async with BatchProcessor(cfg, rec) as p:
        await p.add_message("r1")
        await p.add_message("r2")
        await rec.wait_running(1)
        victim = asyncio.ensure_future(p.submit("victim"))
        await settle()
        await p.add_message("new")
        with pytest.raises(BufferFull):
            await asyncio.wait_for(victim, PATIENCE)
        rec.gate.set()


@pytest.mark.parametrize("trigger", ["size", "all"])
async def test_full_buffer_of_partial_lanes_is_cut_for_pressure(trigger: str) -> None:
    """With size-bound triggers and many keys, a full buffer is cut ("pressure"), not deadlocked."""
    rec = Recorder()
    cfg = config(trigger=trigger, max_size=1000, max_wait=60.0, max_pending=5)
    async with BatchProcessor(cfg, rec) as p:
        async with asyncio.timeout(PATIENCE):
            for i in range(60):
                await p.add_message(i, key=i % 30)
        stats = await ledger(p)
        assert stats["flush_reasons"].get("pressure", 0) >= 1
    assert sorted(rec.processed) == list(range(60))
    assert p.dead_letters == []


async def test_nowait_on_a_full_idle_buffer_cuts_for_pressure() -> None:
    """add_message_nowait raising BufferFull still cuts the oldest lane, so room comes back."""
    rec = Recorder()
    cfg = config(trigger="size", max_size=1000, max_pending=2)
    async with BatchProcessor(cfg, rec) as p:
        p.add_message_nowait("a", key=1)
        p.add_message_nowait("b", key=2)
        with pytest.raises(BufferFull):
            p.add_message_nowait("c", key=3)
        await rec.wait_calls(1)
        assert rec.calls[0].flush_reason == "pressure"
        assert rec.calls[0].messages == ["a"]


async def test_many_waiting_producers_with_partial_lanes_never_deadlock() -> None:
    """Twenty producers each waiting to add to its own key all get in: pressure cuts continue."""
    rec = Recorder()
    cfg = config(trigger="size", max_size=1000, max_wait=60.0, max_pending=4)
    p: BatchProcessor[Any, Any] = BatchProcessor(cfg, rec)
    await p.start()
    producers = [asyncio.ensure_future(p.add_message(i, key=i)) for i in range(20)]
    _, stuck = await asyncio.wait(producers, timeout=0.5)
    await p.stop(drain=False)
    await asyncio.gather(*producers, return_exceptions=True)
    assert not stuck


async def test_unbounded_buffer_takes_everything() -> None:
    """max_pending=None never refuses, whatever the count."""
    rec = Recorder()
    async with BatchProcessor(config(max_size=1000, max_pending=None), rec) as p:
        for i in range(12_000):
            p.add_message_nowait(i)
        await p.flush()
        stats = await ledger(p)
    assert stats["processed"] == 12_000


async def test_drop_oldest_from_a_waiting_batch_keeps_the_others_results_aligned() -> None:
    """After the first message of a waiting batch is dropped, the rest still get their results."""
    rec = Recorder(held=True, result=lambda m: f"r-{m}")
    cfg = config(
        max_size=3, max_wait=60.0, max_pending=6, overflow="drop_oldest", max_concurrent_batches=1
    )
    async with BatchProcessor(cfg, rec) as p:
        for message in ["r1", "r2", "r3"]:
            await p.add_message(message)
        await rec.wait_running(1)
        waiting = [asyncio.ensure_future(p.submit(m)) for m in ["w1", "w2", "w3"]]
        await settle()
        await p.add_message("new")
        rec.gate.set()
        await p.flush()
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert isinstance(outcomes[0], BufferFull)
    assert outcomes[1:] == ["r-w2", "r-w3"]


@pytest.mark.parametrize("overflow", ["raise", "drop_newest", "drop_oldest"])
async def test_refusing_or_dropping_on_an_idle_full_buffer_cuts_for_pressure(
    overflow: str,
) -> None:
    """Under every non-blocking policy, a full buffer of partial lanes is cut ("pressure") when
    a message is refused or dropped, so room comes back instead of staying full forever."""
    rec = Recorder()
    cfg = config(trigger="size", max_size=1000, max_wait=60.0, max_pending=2, overflow=overflow)
    async with BatchProcessor(cfg, rec) as p:
        p.add_message_nowait("a", key=1)
        p.add_message_nowait("b", key=2)
        with contextlib.suppress(BufferFull):
            p.add_message_nowait("c", key=3)
        await rec.wait_calls(1)
        assert rec.calls[0].flush_reason == "pressure"
        stats = await ledger(p)
        assert stats["flush_reasons"]["pressure"] >= 1
