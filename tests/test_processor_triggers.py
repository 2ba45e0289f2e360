"""Flush triggers: size, timeout (max_size chunks), both, all (merged chunks), bytes, manual."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest

from batchpunk import Batch, BatchProcessor, BatchTrigger
from tests.engine_support import Recorder, config, ledger, settle


async def test_size_cuts_full_batches_and_leaves_a_partial_one_waiting() -> None:
    """SIZE cuts at max_size only; a partial lane waits, whatever its age, until flush()."""
    rec = Recorder()
    async with BatchProcessor(config(trigger="size", max_size=3, max_wait=0.01), rec) as p:
        for i in range(7):
            await p.add_message(i)
        await rec.wait_calls(2)
        await asyncio.sleep(0.05)  # five times max_wait: the partial lane must still wait
        assert [c.messages for c in rec.calls] == [[0, 1, 2], [3, 4, 5]]
        assert [c.flush_reason for c in rec.calls] == ["size", "size"]
        await p.flush()
        assert rec.calls[-1].messages == [6]
        assert rec.calls[-1].flush_reason == "manual"
        stats = await ledger(p)
        assert stats["flush_reasons"] == {"size": 2, "manual": 1}


async def test_timeout_cuts_on_age_and_chunks_by_max_size() -> None:
    """TIMEOUT never cuts on size; at the deadline the lane is cut in chunks of max_size."""
    rec = Recorder()
    async with BatchProcessor(config(trigger="timeout", max_size=3, max_wait=0.05), rec) as p:
        loop = asyncio.get_running_loop()
        first = loop.time()
        for i in range(8):
            p.add_message_nowait(i)
        await settle()
        assert rec.calls == []  # eight messages, max_size three: still no cut before the deadline
        await rec.wait_calls(3)
        assert [c.messages for c in rec.calls] == [[0, 1, 2], [3, 4, 5], [6, 7]]
        assert {c.flush_reason for c in rec.calls} == {"timeout"}
        assert rec.calls[0].started - first >= 0.05 - 0.002
        stats = await ledger(p)
        assert stats["flush_reasons"] == {"timeout": 3}


async def test_timeout_deadline_fires_close_to_max_wait() -> None:
    """The time trigger is a loop deadline: the batch runs shortly after max_wait, not later."""
    rec = Recorder()
    async with BatchProcessor(config(trigger="timeout", max_wait=0.02), rec) as p:
        loop = asyncio.get_running_loop()
        first = loop.time()
        await p.add_message("x")
        await rec.wait_calls(1)
        late = rec.calls[0].started - first - 0.02
        assert -0.002 <= late < 0.08


async def test_timeout_is_measured_from_the_oldest_message_of_the_lane() -> None:
    """Messages arriving later do not push the deadline of a lane's first message back."""
    rec = Recorder()
    async with BatchProcessor(config(trigger="timeout", max_size=100, max_wait=0.06), rec) as p:
        first = asyncio.get_running_loop().time()
        await p.add_message(0)
        await asyncio.sleep(0.04)
        await p.add_message(1)
        await rec.wait_calls(1)
        assert rec.calls[0].messages == [0, 1]
        # Measured from the second message, the deadline would be 0.1 s after the first.
        assert rec.calls[0].started - first < 0.06 + 0.03


async def test_both_cuts_on_size_before_the_deadline() -> None:
    """BOTH cuts a full lane at once, long before a far deadline."""
    rec = Recorder()
    async with BatchProcessor(config(trigger="both", max_size=4, max_wait=60.0), rec) as p:
        for i in range(4):
            await p.add_message(i)
        await rec.wait_calls(1)
        assert rec.calls[0].messages == [0, 1, 2, 3]
        assert rec.calls[0].flush_reason == "size"


async def test_both_cuts_a_partial_lane_on_its_deadline() -> None:
    """BOTH cuts a partial lane when its oldest message reaches max_wait."""
    rec = Recorder()
    async with BatchProcessor(config(trigger="both", max_size=100, max_wait=0.02), rec) as p:
        await p.add_message("a")
        await p.add_message("b")
        await rec.wait_calls(1)
        assert rec.calls[0].messages == ["a", "b"]
        assert rec.calls[0].flush_reason == "timeout"


async def test_a_lane_refilled_after_a_size_cut_times_out_on_its_new_first_message() -> None:
    """The deadline after a size cut is the new first message's, not the cut batch's.

    The lane's timer outlives the cut (one timer per lane): when it fires at the first batch's
    deadline it must re-arm for the refill's, neither cutting it early nor forgetting it.
    """
    rec = Recorder()
    async with BatchProcessor(config(trigger="both", max_size=3, max_wait=0.1), rec) as p:
        loop = asyncio.get_running_loop()
        for i in range(3):
            p.add_message_nowait(i)  # cut on size at once; its timer stays armed for +0.1 s
        await asyncio.sleep(0.05)
        refilled = loop.time()
        p.add_message_nowait(3)
        await rec.wait_calls(2)
        assert [c.messages for c in rec.calls] == [[0, 1, 2], [3]]
        assert [c.flush_reason for c in rec.calls] == ["size", "timeout"]
        # Not at the first batch's deadline (0.05 s after the refill) but at the refill's own.
        assert rec.calls[1].started - refilled >= 0.1 - 0.002
        # And again for a third fill, after the re-armed timer fired and the lane was empty.
        third = loop.time()
        p.add_message_nowait(4)
        await rec.wait_calls(3)
        assert rec.calls[2].messages == [4]
        assert 0.1 - 0.002 <= rec.calls[2].started - third < 0.1 + 0.08


async def test_all_waits_for_size_after_the_deadline_passed() -> None:
    """ALL does not cut a short lane at its deadline; the message that fills it cuts at once."""
    rec = Recorder()
    async with BatchProcessor(config(trigger="all", max_size=3, max_wait=0.02), rec) as p:
        await p.add_message(0)
        await p.add_message(1)
        await asyncio.sleep(0.05)  # well past the deadline: still too small
        assert rec.calls == []
        await p.add_message(2)
        await rec.wait_calls(1)
        assert rec.calls[0].messages == [0, 1, 2]
        assert rec.calls[0].flush_reason == "size"


async def test_all_waits_for_age_after_size_was_reached() -> None:
    """ALL does not cut a full lane before its deadline; then it cuts chunks, tail merged."""
    rec = Recorder()
    async with BatchProcessor(config(trigger="all", max_size=3, max_wait=0.05), rec) as p:
        for i in range(8):
            p.add_message_nowait(i)
        await settle()
        assert rec.calls == []  # eight messages, but the oldest is younger than max_wait
        await rec.wait_calls(2)
        await settle()
        assert [c.messages for c in rec.calls] == [[0, 1, 2], [3, 4, 5, 6, 7]]
        assert {c.flush_reason for c in rec.calls} == {"timeout"}
        for call in rec.calls:
            assert 3 <= len(call.messages) <= 2 * 3 - 1


@pytest.mark.parametrize(("count", "sizes"), [(3, [3]), (5, [5]), (6, [3, 3]), (11, [3, 3, 5])])
async def test_all_chunks_hold_between_max_size_and_twice_minus_one(
    count: int, sizes: list[int]
) -> None:
    """An ALL lane of any length is cut into chunks of max_size with the remainder joined."""
    rec = Recorder()
    async with BatchProcessor(config(trigger="all", max_size=3, max_wait=0.01), rec) as p:
        for i in range(count):
            p.add_message_nowait(i)
        await rec.wait_calls(len(sizes))
        await settle()
        assert [len(c.messages) for c in rec.calls] == sizes
        assert rec.processed == list(range(count))


async def test_byte_trigger_cuts_before_a_message_would_overflow() -> None:
    """With max_bytes a lane is cut (reason "bytes") before the message that would exceed it."""
    rec = Recorder()
    cfg = config(trigger="size", max_size=100, max_bytes=10)
    async with BatchProcessor(cfg, rec) as p:
        for text in ["aaaa", "bbbb", "cccc", "dd", "e"]:
            await p.add_message(text)
        await rec.wait_calls(1)
        assert rec.calls[0].messages == ["aaaa", "bbbb"]
        assert rec.calls[0].flush_reason == "bytes"
        await p.flush()
        assert rec.calls[-1].messages == ["cccc", "dd", "e"]


async def test_byte_trigger_cuts_when_the_lane_reaches_max_bytes_exactly() -> None:
    """A lane whose size reaches max_bytes exactly is cut at once."""
    rec = Recorder()
    async with BatchProcessor(config(trigger="both", max_wait=60.0, max_bytes=6), rec) as p:
        await p.add_message(b"abc")
        await p.add_message(b"def")
        await rec.wait_calls(1)
        assert rec.calls[0].messages == [b"abc", b"def"]
        assert rec.calls[0].flush_reason == "bytes"


async def test_byte_trigger_uses_the_sizer() -> None:
    """A custom sizer measures messages of any type for the byte trigger."""
    rec = Recorder()
    cfg = config(trigger="size", max_bytes=100, sizer=lambda m: m["n"])
    async with BatchProcessor(cfg, rec) as p:
        for n in (30, 30, 40, 5):
            await p.add_message({"n": n})
        await rec.wait_calls(1)
        assert [m["n"] for m in rec.calls[0].messages] == [30, 30, 40]
        assert rec.calls[0].flush_reason == "bytes"


async def test_an_oversized_message_travels_alone() -> None:
    """A single message larger than max_bytes is a batch of its own, not an error."""
    rec = Recorder()
    async with BatchProcessor(config(trigger="size", max_bytes=4), rec) as p:
        await p.add_message("ab")
        await p.add_message("abcdefgh")
        await rec.wait_calls(2)
        assert [c.messages for c in rec.calls] == [["ab"], ["abcdefgh"]]


async def test_byte_trigger_works_in_keyed_lanes() -> None:
    """The byte trigger cuts keyed lanes too, and the message after a byte cut is not lost."""
    rec = Recorder()
    cfg = config(trigger="size", max_size=100, max_bytes=6)
    async with BatchProcessor(cfg, rec) as p:
        await p.add_message("aaaa", key="k")
        await p.add_message("bbbb", key="k")
        await p.add_message("cc", key="k")
        await p.flush()
        assert sorted(rec.processed) == ["aaaa", "bbbb", "cc"]
        assert [c.key for c in rec.calls] == ["k"] * len(rec.calls)
        await ledger(p)


@pytest.mark.parametrize("message", [42, 3.5, object(), ["a", "b"]])
async def test_a_message_without_byte_size_and_no_sizer_names_sizer(message: Any) -> None:
    """With max_bytes and no sizer, a message that is not bytes or str raises ValueError naming
    sizer, and is not accepted."""
    rec = Recorder()
    async with BatchProcessor(config(max_bytes=100), rec) as p:
        with pytest.raises(ValueError, match="sizer"):
            await p.add_message(message)
        with pytest.raises(ValueError, match="sizer"):
            p.add_message_nowait(message)
        with pytest.raises(ValueError, match="sizer"):
            await p.submit(message)
        stats = await ledger(p)
        assert stats["received"] == 0


async def test_a_sizer_returning_a_non_size_is_rejected_naming_sizer() -> None:
    """A sizer that returns something other than a byte count >= 0 is reported as sizer's fault."""
    async with BatchProcessor(config(max_bytes=100, sizer=lambda m: -1), Recorder()) as p:
        with pytest.raises(ValueError, match="sizer"):
            await p.add_message("x")


async def test_flush_cuts_every_lane_and_waits_for_the_batches() -> None:
    """flush() cuts every lane with reason "manual" and returns only when they all finished."""
    rec = Recorder()
    cfg = config(trigger="size", max_size=100)
    async with BatchProcessor(cfg, rec) as p:
        await p.add_message(1, key="a")
        await p.add_message(2, key="b")
        await p.add_message(3, priority=2)
        await p.flush()
        assert sorted(rec.processed) == [1, 2, 3]
        assert {c.flush_reason for c in rec.calls} == {"manual"}
        stats = await ledger(p)
        assert stats["flush_reasons"] == {"manual": 3}
        assert stats["processed"] == 3
        assert stats["batches"] == 3


async def test_batch_carries_its_lane_attempt_and_reason() -> None:
    """The processor receives a Batch (a list) with key, priority, attempt 1 and the cut reason."""
    seen: list[Batch[Any]] = []

    async def handler(batch: Batch[Any]) -> None:
        assert isinstance(batch, Batch)
        assert isinstance(batch, list)
        seen.append(batch)

    async with BatchProcessor(config(trigger=BatchTrigger.SIZE, max_size=2), handler) as p:
        await p.add_message("x", key="user-1", priority=3)
        await p.add_message("y", key="user-1", priority=3)
        await p.flush()
    assert len(seen) == 1
    batch = seen[0]
    assert list(batch) == ["x", "y"]
    assert (batch.key, batch.priority, batch.attempt, batch.flush_reason) == (
        "user-1",
        3,
        1,
        "size",
    )


@pytest.mark.parametrize("trigger", ["timeout", "all"])
async def test_chunked_lanes_keep_each_submitters_result(trigger: str) -> None:
    """When a lane is cut into chunks, every submit still gets its own message's result."""
    rec = Recorder(result=lambda m: -m)
    async with BatchProcessor(config(trigger=trigger, max_size=2, max_wait=0.01), rec) as p:
        results = await asyncio.gather(*(p.submit(i) for i in range(7)))
    assert results == [-i for i in range(7)]
    assert len(rec.calls) >= 3


async def test_a_stopped_processor_leaves_no_timer_that_keeps_it_alive() -> None:
    """Lane timers outlive cuts, not the processor: once stopped it can be collected at once."""
    processor = BatchProcessor(config(trigger="both", max_size=2, max_wait=60.0), Recorder())
    await processor.start()
    for i in range(5):
        processor.add_message_nowait(i)  # size cuts with the shared lane's timer still armed
        processor.add_message_nowait(i, key=f"k{i % 2}")  # keyed lanes, cut and forgotten
    await processor.stop()
    ref = weakref.ref(processor)
    del processor
    gc.collect()
    assert ref() is None
