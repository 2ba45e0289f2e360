"""Engine edge cases, each a defect found by review: a wake-up lost to a cancelled producer, a
batch cancelled before it started, an outage that began during a call, a bare exception class as
a predicate, a bad key under a drop policy, an awaitable outliving batch_timeout, and letters
growing without bound under a drop policy while the dead-letter sink is down."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from batchpunk import Batch, BatchConfig, BatchProcessor
from batchpunk.errors import BufferFull, ConfigError, ProcessorClosed


async def test_a_producer_cancelled_as_room_returns_hands_the_wakeup_on() -> None:
    """Room returns for producer b, which is cancelled in that same loop turn (its wait_for
    ran out): the wake-up it took goes to c, which would otherwise wait for ever with room
    free."""
    tasks: dict[str, asyncio.Task[None]] = {}
    gate = asyncio.Event()

    async def handler(batch: Batch[Any]) -> None:
        if batch[0] == "a":
            await gate.wait()
            asyncio.get_running_loop().call_soon(tasks["b"].cancel)

    processor = BatchProcessor(BatchConfig(max_size=1, max_pending=1, max_wait=60), handler)
    async with processor:
        await processor.add_message("a")
        tasks["b"] = asyncio.create_task(processor.add_message("b"))
        tasks["c"] = asyncio.create_task(processor.add_message("c"))
        for _ in range(5):
            await asyncio.sleep(0)
        gate.set()
        await asyncio.wait_for(tasks["c"], 3)
        assert tasks["b"].cancelled()
    stats = await processor.get_stats()
    assert (stats["received"], stats["processed"]) == (2, 2)


async def test_a_batch_task_cancelled_before_its_first_step_is_dead_lettered() -> None:
    """stop() past drain_timeout cancels every batch task, and one created in the same loop
    turn (the batch before it just finished) is cancelled before its first step: its coroutine
    never runs, so its own clean-up never did. The batch is dead-lettered as "shutdown" and its
    slot released all the same. (The cancel is made here the moment the task is created.)"""
    processor = BatchProcessor(BatchConfig(max_size=1, max_wait=60), Recorder())
    await processor.start()
    start = processor._sched._start

    def start_cancelled(job: Any) -> None:
        before = set(processor._tasks)
        start(job)
        (task,) = set(processor._tasks) - before
        task.cancel()

    processor._sched._start = start_cancelled
    submitted = processor.submit_nowait("b")
    with pytest.raises(ProcessorClosed):
        await asyncio.wait_for(submitted, 2)
    await processor.stop()
    stats = await processor.get_stats()
    assert (stats["received"], stats["processed"], stats["dead_lettered"]) == (1, 0, 1)
    assert [(letter.message, letter.reason) for letter in processor.dead_letters] == [
        ("b", "shutdown")
    ]
    assert stats["batches_running"] == 0


class Recorder:
    async def __call__(self, batch: Batch[Any]) -> None:
        return None


async def test_an_outage_that_began_during_a_call_is_held_not_bisected() -> None:
    """Batch "a" is in flight while batch "c" succeeds; then the downstream goes down and
    "a"'s call fails. The answer "c" got came before "a" failed, so it is no evidence against
    "a": it is held and written once the downstream is back, not split into dead letters."""
    down = False
    a_started, a_release = asyncio.Event(), asyncio.Event()

    async def handler(batch: Batch[Any]) -> None:
        if batch.key == "a" and batch.attempt == 1:
            a_started.set()
            await a_release.wait()
        if down:
            raise ConnectionRefusedError("the database restarts")

    config = BatchConfig(
        max_size=8, max_wait=60, max_concurrent_batches=2, retry_delay=0.01, retry_max_delay=0.05
    )
    processor = BatchProcessor(config, handler)
    async with processor:
        for i in range(8):
            processor.add_message_nowait(i, key="a")
        await a_started.wait()
        await asyncio.gather(*(processor.submit_nowait(f"ok{i}", key="c") for i in range(8)))
        down = True
        a_release.set()
        await asyncio.sleep(0.5)
        down = False
        await asyncio.wait_for(processor.flush(), 5)
    stats = await processor.get_stats()
    assert (stats["processed"], stats["dead_lettered"]) == (16, 0)


@pytest.mark.parametrize("field", ["retry_on", "unavailable_on"])
def test_a_bare_exception_class_is_refused_naming_the_field(field: str) -> None:
    """A class is callable, so it passed as a predicate that is true for every error (every
    poison message an outage, or every error retried)."""
    with pytest.raises(ConfigError, match=rf"{field}: .*the class ConnectionError; write"):
        BatchConfig(**{field: ConnectionError})


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
@pytest.mark.parametrize("bad", [{"key": ["unhashable"]}, {"priority": "high"}])
async def test_a_bad_key_when_full_raises_before_the_drop_policy_acts(
    policy: str, bad: dict[str, Any]
) -> None:
    """Full under a drop policy, a message with an unusable key or priority raises ValueError
    as it does with room: no accepted message is dropped for it, and it is not taken as a
    "dropped" letter."""
    gate = asyncio.Event()

    async def handler(batch: Batch[Any]) -> None:
        await gate.wait()

    config = BatchConfig(
        max_size=1, max_wait=60, max_pending=3, max_concurrent_batches=1, overflow=policy
    )
    processor = BatchProcessor(config, handler)
    await processor.start()
    for message in ("m1", "m2", "m3"):
        processor.add_message_nowait(message)
    await asyncio.sleep(0)
    try:
        with pytest.raises(ValueError, match=r"key|priority"):
            processor.add_message_nowait("bad", **bad)
        assert processor.dead_letters == []
    finally:
        gate.set()
        await processor.stop()
    assert processor.dead_letters == []


async def test_batch_timeout_bounds_an_awaitable_a_plain_callable_returned() -> None:
    """A lambda around a coroutine function runs as a sync call; the awaitable it returns is
    bounded by batch_timeout too, so a hung first call is retried instead of hanging."""
    calls: list[int] = []
    forever = asyncio.Event()

    async def write(batch: Batch[Any]) -> None:
        calls.append(len(batch))
        if len(calls) == 1:
            await forever.wait()

    config = BatchConfig(max_size=2, max_wait=60, batch_timeout=0.2, retry_delay=0.01)
    processor = BatchProcessor(config, lambda batch: write(batch))
    async with processor:
        results = await asyncio.wait_for(
            asyncio.gather(*(processor.submit_nowait(i) for i in range(2))), 3
        )
    assert results == [None, None]
    assert calls == [2, 2]


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
async def test_letters_waiting_for_a_failing_sink_bound_a_drop_policy(policy: str) -> None:
    """Under a drop policy every refused message becomes a letter; with the dead-letter sink
    down they waited in memory without bound. Once they fill max_pending, add_message_nowait
    raises BufferFull (and add_message waits), so a sink that is down slows producers."""

    async def handler(batch: Batch[Any]) -> None:
        raise ValueError("poison")

    async def sink(letters: Any) -> None:
        raise OSError("the dead-letter store is down")

    config = BatchConfig(
        max_size=5, max_wait=60, max_pending=5, overflow=policy, max_retries=0, drain_timeout=0.2
    )
    processor = BatchProcessor(config, handler, dead_letter=sink)
    await processor.start()
    errors: list[str] = []
    for i in range(500):
        try:
            processor.add_message_nowait(i)
        except BufferFull as exc:
            errors.append(str(exc))
        if i % 5 == 0:
            await asyncio.sleep(0)
    stats = await processor.get_stats()
    await processor.stop()
    assert len(errors) > 400
    assert all("dead letters wait for the dead-letter sink" in error for error in errors)
    assert stats["pending"] + stats["in_flight"] <= 10


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
async def test_a_drop_policy_with_a_working_sink_never_raises_in_a_burst(policy: str) -> None:
    """The bound on letters waiting for the dead-letter sink is for a sink that is down: a
    burst of nowait adds under a drop policy, with a sink that stores everything but has not
    run yet, raised BufferFull after max_pending drops (80 of 100) once that bound came in."""
    stored: list[Any] = []

    async def handler(batch: Batch[Any]) -> None:
        await asyncio.sleep(0.01)

    async def sink(letters: Any) -> None:
        stored.extend(letters)

    config = BatchConfig(max_size=10, max_wait=60, max_pending=10, overflow=policy)
    processor = BatchProcessor(config, handler, dead_letter=sink)
    async with processor:
        for i in range(100):  # no await in between: the sink has not run yet
            processor.add_message_nowait(i)
    stats = await processor.get_stats()
    assert stats["received"] == stats["processed"] + stats["dead_lettered"] == 100
    assert len(stored) == stats["dead_lettered"] > 0


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
async def test_a_dead_letter_sink_that_hangs_still_bounds_a_drop_policy(policy: str) -> None:
    """A sink whose write never returns (a connect to a blackholed host) never fails: counting
    only failed writes let 4,995 letters pile up in memory. A write under way counts too."""
    release = asyncio.Event()

    async def handler(batch: Batch[Any]) -> None:
        await asyncio.sleep(30)

    async def sink(letters: Any) -> None:
        await release.wait()

    config = BatchConfig(
        max_size=5, max_wait=60, max_pending=5, overflow=policy, max_retries=0, drain_timeout=0.2
    )
    processor = BatchProcessor(config, handler, dead_letter=sink)
    await processor.start()
    refused = 0
    for i in range(2000):
        try:
            processor.add_message_nowait(i)
        except BufferFull:
            refused += 1
        if i % 5 == 0:
            await asyncio.sleep(0)
    waiting = len(processor._outbox)  # type: ignore[arg-type]
    release.set()
    await processor.stop()
    assert waiting <= 10
    assert refused > 1900
