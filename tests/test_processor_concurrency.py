"""Concurrency: at most max_concurrent_batches calls at once, one without parallel processing."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from batchpunk import Batch, BatchProcessor
from tests.engine_support import PATIENCE, Recorder, config, ledger, settle


async def test_no_more_calls_run_than_max_concurrent_batches() -> None:
    """With eight ready batches and three slots, exactly three calls run until one finishes."""
    rec = Recorder(held=True)
    async with BatchProcessor(config(max_size=1, max_concurrent_batches=3), rec) as p:
        for i in range(8):
            await p.add_message(i)
        await rec.wait_running(3)
        await settle()
        assert rec.running == 3
        assert len(rec.calls) == 3
        stats = await ledger(p)
        assert stats["batches_running"] == 3
        assert stats["is_processing"] is True
        rec.gate.set()
        await p.flush()
    assert rec.max_running == 3
    assert sorted(rec.processed) == list(range(8))


async def test_parallel_processing_off_runs_one_call_at_a_time() -> None:
    """enable_parallel_processing=False allows a single call even with many slots configured."""
    rec = Recorder(held=True)
    cfg = config(max_size=1, max_concurrent_batches=5, enable_parallel_processing=False)
    async with BatchProcessor(cfg, rec) as p:
        for i in range(4):
            await p.add_message(i)
        await rec.wait_running(1)
        await settle()
        assert len(rec.calls) == 1
        rec.gate.set()
        await p.flush()
    assert rec.max_running == 1
    assert rec.processed == [0, 1, 2, 3]


async def test_sync_processor_calls_are_bounded_too() -> None:
    """Sync processors run in worker threads, never more at once than the slots allow."""
    lock = threading.Lock()
    running = 0
    peak = 0

    def handler(batch: Batch[Any]) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.005)
        with lock:
            running -= 1

    async with BatchProcessor(config(max_size=1, max_concurrent_batches=2), handler) as p:
        for i in range(8):
            await p.add_message(i)
        await p.flush()
        stats = await ledger(p)
    assert stats["processed"] == 8
    assert peak == 2


async def test_a_running_call_never_blocks_adding() -> None:
    """While every slot is held by a hung call, add_message still returns at once."""
    rec = Recorder(held=True)
    cfg = config(max_size=1, enable_parallel_processing=False, max_pending=1000)
    async with BatchProcessor(cfg, rec) as p:
        await p.add_message("first")
        await rec.wait_running(1)
        async with asyncio.timeout(PATIENCE):
            for i in range(200):
                await p.add_message(i)
        stats = await ledger(p)
        assert stats["received"] == 201
        assert stats["in_flight"] == 1
        assert stats["pending"] == 200
        rec.gate.set()


async def test_pending_and_in_flight_follow_the_slots() -> None:
    """Messages in a running call count as in_flight; those waiting for a slot as pending."""
    rec = Recorder(held=True)
    cfg = config(max_size=2, max_concurrent_batches=1, max_wait=60.0)
    async with BatchProcessor(cfg, rec) as p:
        for i in range(5):
            await p.add_message(i)
        await rec.wait_running(1)
        stats = await ledger(p)
        assert (stats["in_flight"], stats["pending"]) == (2, 3)
        assert stats["batches_waiting"] == 1
        assert stats["current_batch_size"] == 1
        rec.gate.set()
        await p.flush()
        stats = await ledger(p)
        assert (stats["in_flight"], stats["pending"], stats["processed"]) == (0, 0, 5)
