"""Priorities, keys and ordering: lanes never mix, higher priority first, preserve_order per key."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchpunk import Batch, BatchProcessor
from tests.engine_support import Recorder, config, ledger


async def test_higher_priority_runs_first_when_batches_wait_for_a_slot() -> None:
    """Batches waiting for the single slot start highest priority first, FIFO within one."""
    rec = Recorder(held=True)
    cfg = config(max_size=1, enable_parallel_processing=False)
    async with BatchProcessor(cfg, rec) as p:
        await p.add_message("blocker")
        await rec.wait_running(1)
        for name, priority in [("p1", 1), ("p5-a", 5), ("p0", 0), ("p3", 3), ("p5-b", 5)]:
            await p.add_message(name, priority=priority)
        rec.gate.set()
        await p.flush()
    order = [c.messages[0] for c in rec.calls]
    assert order == ["blocker", "p5-a", "p5-b", "p3", "p1", "p0"]
    assert [c.priority for c in rec.calls] == [0, 5, 5, 3, 1, 0]


async def test_negative_priorities_run_after_the_default() -> None:
    """Priorities are plain ints: a negative one yields to priority 0."""
    rec = Recorder(held=True)
    async with BatchProcessor(config(max_size=1, enable_parallel_processing=False), rec) as p:
        await p.add_message("blocker")
        await rec.wait_running(1)
        await p.add_message("low", priority=-1)
        await p.add_message("normal")
        rec.gate.set()
        await p.flush()
    assert [c.messages[0] for c in rec.calls] == ["blocker", "normal", "low"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=st.lists(
        st.tuples(st.sampled_from([None, "a", "b", 7]), st.integers(min_value=-1, max_value=2)),
        max_size=40,
    ),
    max_size=st.integers(min_value=1, max_value=6),
)
def test_different_keys_or_priorities_never_share_a_batch(
    messages: list[tuple[Any, int]], max_size: int
) -> None:
    """Every batch holds one (key, priority) lane's messages, in the order they were added."""

    async def scenario() -> list[Batch[Any]]:
        seen: list[Batch[Any]] = []

        async def handler(batch: Batch[Any]) -> None:
            seen.append(batch)

        async with BatchProcessor(config(trigger="size", max_size=max_size), handler) as p:
            for index, (key, priority) in enumerate(messages):
                await p.add_message((index, key, priority), key=key, priority=priority)
            await p.flush()
            stats = await ledger(p)
            assert stats["processed"] == len(messages)
        return seen

    batches = asyncio.run(scenario())
    per_lane: dict[tuple[Any, int], list[int]] = defaultdict(list)
    for batch in batches:
        assert 1 <= len(batch) <= max_size
        for index, key, priority in batch:
            assert (key, priority) == (batch.key, batch.priority)
            per_lane[(key, priority)].append(index)
    for indices in per_lane.values():
        assert indices == sorted(indices)
    assert sorted(i for indices in per_lane.values() for i in indices) == list(range(len(messages)))


class OrderWatch:
    """A processor that records, per key, how many calls run at once and the finish order."""

    def __init__(self, fail_first: dict[int, int] | None = None) -> None:
        self.running: dict[Any, int] = defaultdict(int)
        self.overlap: dict[Any, int] = defaultdict(int)
        self.total = 0
        self.peak = 0
        self.finished: dict[Any, list[Any]] = defaultdict(list)
        self.attempts: dict[int, int] = defaultdict(int)
        self.fail_first = fail_first or {}

    async def __call__(self, batch: Batch[Any]) -> None:
        key = batch.key
        self.running[key] += 1
        self.total += 1
        self.peak = max(self.peak, self.total)
        self.overlap[key] = max(self.overlap[key], self.running[key])
        try:
            await asyncio.sleep(random.random() * 0.003)
            first = batch[0]
            self.attempts[first] += 1
            if self.attempts[first] <= self.fail_first.get(first, 0):
                raise ConnectionError(f"transient failure of batch starting at {first}")
            self.finished[key].extend(batch)
        finally:
            self.running[key] -= 1
            self.total -= 1


async def test_preserve_order_never_runs_one_key_twice_and_finishes_in_cut_order() -> None:
    """With preserve_order, a key's batches never overlap and finish in cut order."""
    watch = OrderWatch()
    cfg = config(max_size=2, max_concurrent_batches=4, preserve_order=True)
    async with BatchProcessor(cfg, watch) as p:
        for i in range(60):
            await p.add_message(i, key=i % 3)
        await p.flush()
        await ledger(p)
    for key in range(3):
        assert watch.overlap[key] == 1
        assert watch.finished[key] == [i for i in range(60) if i % 3 == key]
    assert watch.peak > 1  # different keys still run side by side


async def test_preserve_order_holds_through_retries() -> None:
    """A retried batch still finishes before the next batch of its key starts."""
    watch = OrderWatch(fail_first={0: 2, 4: 1})
    cfg = config(max_size=2, max_concurrent_batches=4, preserve_order=True)
    async with BatchProcessor(cfg, watch) as p:
        for i in range(12):
            await p.add_message(i, key="k")
        await p.flush()
        stats = await ledger(p)
    assert watch.overlap["k"] == 1
    assert watch.finished["k"] == list(range(12))
    assert stats["retries"] == 3


async def test_preserve_order_spans_priorities_of_one_key() -> None:
    """A high-priority batch of a key waits for that key's running low-priority batch."""
    rec = Recorder(held=True)
    cfg = config(max_size=1, max_concurrent_batches=4, preserve_order=True)
    async with BatchProcessor(cfg, rec) as p:
        await p.add_message("low", key="k", priority=0)
        await rec.wait_running(1)
        await p.add_message("high", key="k", priority=9)
        await p.add_message("other", key="z", priority=0)
        await rec.wait_running(2)
        await asyncio.sleep(0.01)
        assert sorted(c.messages[0] for c in rec.calls) == ["low", "other"]
        rec.gate.set()
        await p.flush()
    assert [c.messages[0] for c in rec.calls if c.key == "k"] == ["low", "high"]


async def test_preserve_order_treats_none_as_a_key() -> None:
    """Messages added without a key are ordered among themselves like any key."""
    watch = OrderWatch()
    cfg = config(max_size=1, max_concurrent_batches=4, preserve_order=True)
    async with BatchProcessor(cfg, watch) as p:
        for i in range(20):
            await p.add_message(i)
        await p.flush()
    assert watch.overlap[None] == 1
    assert watch.finished[None] == list(range(20))


async def test_without_preserve_order_one_key_may_run_in_parallel() -> None:
    """The contrast: without preserve_order, batches of one key do overlap."""
    rec = Recorder(held=True)
    async with BatchProcessor(config(max_size=1, max_concurrent_batches=3), rec) as p:
        for i in range(3):
            await p.add_message(i, key="k")
        await rec.wait_running(3)
        rec.gate.set()
        await p.flush()
    assert rec.max_running == 3
