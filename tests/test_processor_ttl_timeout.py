"""Time limits: message_ttl expires stale messages; batch_timeout bounds one processor call."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest

from batchpunk import Batch, BatchProcessor, BatchTimeout, MessageExpired
from tests.engine_support import PATIENCE, Recorder, config, settle, stopped_ledger


async def test_a_message_that_waited_past_its_ttl_is_dead_lettered_expired() -> None:
    """A message still waiting for a slot after message_ttl never reaches the processor."""
    rec = Recorder(held=True)
    cfg = config(max_size=1, enable_parallel_processing=False, message_ttl=0.02)
    async with BatchProcessor(cfg, rec) as p:
        await p.add_message("blocker")
        await rec.wait_running(1)
        late = asyncio.ensure_future(p.submit("late"))
        await asyncio.sleep(0.04)
        rec.gate.set()
        with pytest.raises(MessageExpired, match="message_ttl"):
            await asyncio.wait_for(late, PATIENCE)
        stats = await p.get_stats()
    assert rec.processed == ["blocker"]
    [letter] = p.dead_letters
    assert (letter.message, letter.reason, letter.attempts) == ("late", "expired", 0)
    assert isinstance(letter.error, TimeoutError)
    assert stats["dead_letter_reasons"] == {"expired": 1}
    await stopped_ledger(p)


async def test_only_the_stale_messages_of_a_batch_expire() -> None:
    """In one batch, messages older than the ttl expire and the younger ones are processed."""
    rec = Recorder()
    # 75 ms of slack each way (a loaded machine's loop can oversleep tens of milliseconds):
    # "young" joins the batch 75 ms before its cut and has waited 75 ms less than the ttl.
    cfg = config(trigger="timeout", max_wait=0.25, message_ttl=0.15)
    async with BatchProcessor(cfg, rec) as p:
        await p.add_message("old")
        await asyncio.sleep(0.175)
        await p.add_message("young")
        await rec.wait_calls(1)
    assert [c.messages for c in rec.calls] == [["young"]]
    assert [(d.message, d.reason) for d in p.dead_letters] == [("old", "expired")]


async def test_ttl_applies_before_the_first_attempt_only() -> None:
    """A retry that happens after the ttl has passed still runs: ttl bounds waiting, not work."""
    rec = Recorder(fail=lambda batch, call: ConnectionError("once") if call == 1 else None)
    cfg = config(max_size=1, message_ttl=0.02, retry_delay=0.04, retry_max_delay=0.04)
    async with BatchProcessor(cfg, rec) as p:
        await p.submit("m")
    assert rec.processed == ["m"]
    assert p.dead_letters == []


async def test_an_async_call_past_batch_timeout_is_cancelled_and_retried() -> None:
    """An async call running past batch_timeout is cancelled and counts as a retryable failure,
    even when retry_on does not list timeouts."""
    cancelled = asyncio.Event()
    calls = 0

    async def slow_once(batch: Batch[Any]) -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            try:
                await asyncio.sleep(PATIENCE)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return ["done"]

    cfg = config(max_size=1, batch_timeout=0.02, retry_on=(ValueError,))
    async with BatchProcessor(cfg, slow_once) as p:
        assert await asyncio.wait_for(p.submit("m"), PATIENCE) == "done"
        stats = await p.get_stats()
    assert cancelled.is_set()
    assert stats["retries"] == 1
    assert calls == 2


async def test_a_call_that_always_times_out_ends_with_batch_timeout() -> None:
    """When timeouts are not outages and every attempt times out, submit() raises BatchTimeout."""

    async def hang(batch: Batch[Any]) -> None:
        await asyncio.sleep(PATIENCE)

    cfg = config(max_size=1, batch_timeout=0.01, max_retries=2, unavailable_on=())
    async with BatchProcessor(cfg, hang) as p:
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(BatchTimeout, match="batch_timeout"):
            await p.submit("m")
        assert loop.time() - began < 3 * 0.01 + 0.3
    [letter] = p.dead_letters
    assert isinstance(letter.error, BatchTimeout)
    assert letter.attempts == 3


async def test_a_sync_call_past_batch_timeout_is_abandoned_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sync call past batch_timeout is abandoned (logged) and the retry runs beside it."""
    caplog.set_level(logging.WARNING, logger="batchpunk")
    release = threading.Event()
    calls = 0

    def stuck_once(batch: Batch[Any]) -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            release.wait(PATIENCE)
            return ["late"]
        return ["done"]

    cfg = config(max_size=1, batch_timeout=0.03, max_concurrent_batches=2)
    try:
        async with BatchProcessor(cfg, stuck_once) as p:
            assert await asyncio.wait_for(p.submit("m"), PATIENCE) == "done"
            stats = await p.get_stats()
    finally:
        release.set()
    assert stats["retries"] == 1
    assert any("abandoned" in record.getMessage() for record in caplog.records)


async def test_an_abandoned_sync_call_does_not_block_the_retry_with_one_slot() -> None:
    """With enable_parallel_processing False, the retry of an abandoned sync call still runs."""
    release = threading.Event()
    calls = 0

    def stuck_once(batch: Batch[Any]) -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            release.wait(PATIENCE)
        return ["done"]

    cfg = config(max_size=1, batch_timeout=0.03, enable_parallel_processing=False)
    try:
        async with BatchProcessor(cfg, stuck_once) as p:
            outcome = await asyncio.gather(p.submit("m"), return_exceptions=True)
    finally:
        release.set()
        await settle()
    assert outcome == ["done"]


async def test_submitters_of_a_partly_expired_batch_get_their_own_outcome() -> None:
    """The expired submit raises MessageExpired; the young ones in the same batch get results."""
    rec = Recorder(result=lambda m: f"ok {m}")
    cfg = config(trigger="timeout", max_wait=0.25, message_ttl=0.15)  # slack as above
    async with BatchProcessor(cfg, rec) as p:
        old = asyncio.ensure_future(p.submit("old"))
        await asyncio.sleep(0.175)
        young = [asyncio.ensure_future(p.submit(m)) for m in ("y1", "y2")]
        outcomes = await asyncio.gather(old, *young, return_exceptions=True)
    assert isinstance(outcomes[0], MessageExpired)
    assert outcomes[1:] == ["ok y1", "ok y2"]
