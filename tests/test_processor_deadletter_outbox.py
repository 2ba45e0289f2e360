"""Dead-letter delivery: where letters go, a sink that fails and recovers, stop, and replay()."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import pytest

from batchpunk import Batch, BatchProcessor, BufferFull, DeadLetter
from batchpunk.deadletter import MemoryDeadLetters
from tests.engine_support import (
    PATIENCE,
    Recorder,
    config,
    ledger,
    record_sleeps,
    settle,
    stopped_ledger,
)


class Rejected(Exception):
    """The processor's verdict on a bad message."""


def _reject_all(batch: Batch[Any], call: int) -> BaseException | None:
    return Rejected(f"rejected {list(batch)}")


#: Fail fast: no retries, no splits, so each bad message becomes a letter at once.
FAST_FAIL: dict[str, Any] = {"retry_on": (ConnectionError,), "max_size": 1}


class DownSink:
    """A dead-letter sink that raises while ``down`` is set, and stores letters otherwise."""

    def __init__(self, down: bool = True) -> None:
        self.down = down
        self.letters: list[DeadLetter] = []
        self.attempts = 0
        self.stored = asyncio.Event()
        self._tried = asyncio.Event()

    async def put(self, letters: Sequence[DeadLetter]) -> None:
        self.attempts += 1
        self._tried.set()
        if self.down:
            raise OSError("disk full")
        self.letters.extend(letters)
        self.stored.set()

    async def wait_attempts(self, count: int) -> None:
        """Return once put() has been called ``count`` times."""
        async with asyncio.timeout(PATIENCE):
            while self.attempts < count:
                self._tried.clear()
                await self._tried.wait()


async def test_without_a_sink_letters_are_kept_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """With no dead_letter target, letters land in processor.dead_letters and are logged."""
    caplog.set_level(logging.WARNING, logger="batchpunk")
    async with BatchProcessor(config(**FAST_FAIL), Recorder(fail=_reject_all)) as p:
        await p.add_message("bad")
        await p.flush()
    assert [letter.message for letter in p.dead_letters] == ["bad"]
    assert any("dead-letter" in record.getMessage() for record in caplog.records)


async def _async_target(store: list[DeadLetter], letters: list[DeadLetter]) -> None:
    store.extend(letters)


@pytest.mark.parametrize("kind", ["async callable", "sync callable", "put object"])
async def test_every_kind_of_sink_receives_the_letters(kind: str) -> None:
    """An async callable, a sync callable or an object with async put() receives every letter."""
    store: list[DeadLetter] = []
    memory = MemoryDeadLetters()
    target: Any
    if kind == "async callable":

        async def target(letters: list[DeadLetter]) -> None:
            store.extend(letters)

    elif kind == "sync callable":
        target = store.extend
    else:
        target = memory
    async with BatchProcessor(
        config(**FAST_FAIL), Recorder(fail=_reject_all), dead_letter=target
    ) as p:
        for message in ("x", "y"):
            await p.add_message(message)
        await p.flush()
        stats = await ledger(p)
    received = memory.letters if kind == "put object" else store
    assert sorted(letter.message for letter in received) == ["x", "y"]
    assert p.dead_letters == []
    assert stats["dead_lettered"] == 2


async def test_a_failing_sink_keeps_letters_pending_until_it_recovers() -> None:
    """While the sink fails, letters wait as backlog (messages still pending, submit unsettled);
    once it recovers each letter is stored exactly once."""
    sink = DownSink()
    cfg = config(**FAST_FAIL)
    async with BatchProcessor(cfg, Recorder(fail=_reject_all), dead_letter=sink) as p:
        outcomes = [asyncio.ensure_future(p.submit(i)) for i in range(3)]
        await sink.wait_attempts(3)
        stats = await ledger(p)
        assert stats["dead_letter_backlog"] == 3
        assert stats["pending"] == 3
        assert stats["dead_lettered"] == 0
        assert stats["dead_letter_write_failures"] >= 2
        assert not any(outcome.done() for outcome in outcomes)
        sink.down = False
        await asyncio.wait_for(sink.stored.wait(), PATIENCE)
        for outcome in outcomes:
            with pytest.raises(Rejected):
                await asyncio.wait_for(outcome, PATIENCE)
        stats = await ledger(p)
        assert stats["dead_letter_backlog"] == 0
        assert stats["dead_lettered"] == 3
    assert sorted(letter.message for letter in sink.letters) == [0, 1, 2]
    assert p.dead_letters == []
    await stopped_ledger(p)


async def test_failed_writes_are_retried_with_growing_pauses() -> None:
    """The outbox backs off between failed writes instead of spinning on a dead sink."""
    sink = DownSink()
    cfg = config(**FAST_FAIL, retry_delay=0.02, retry_max_delay=0.04)
    async with BatchProcessor(cfg, Recorder(fail=_reject_all), dead_letter=sink) as p:
        await p.add_message("bad")
        await asyncio.sleep(0.1)
        # Pauses of 0.02, 0.04, 0.04 ... allow at most four writes in 0.1 s.
        assert 2 <= sink.attempts <= 4
        sink.down = False
    assert [letter.message for letter in sink.letters] == ["bad"]


async def test_stop_waits_for_a_sink_that_recovers() -> None:
    """stop() returns only after the backlog was delivered to a sink that came back."""
    sink = DownSink()
    p: BatchProcessor[Any, Any] = BatchProcessor(
        config(**FAST_FAIL), Recorder(fail=_reject_all), dead_letter=sink
    )
    await p.start()
    for i in range(4):
        await p.add_message(i)
    stopping = asyncio.ensure_future(p.stop())
    await asyncio.sleep(0.03)
    assert not stopping.done()
    sink.down = False
    await asyncio.wait_for(stopping, PATIENCE)
    assert sorted(letter.message for letter in sink.letters) == [0, 1, 2, 3]
    assert p.dead_letters == []
    await stopped_ledger(p)


async def test_letters_a_sink_never_takes_are_kept_after_drain_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sink that never recovers delays stop() by drain_timeout at most; its letters are then
    kept in processor.dead_letters and an error is logged."""
    caplog.set_level(logging.ERROR, logger="batchpunk")
    sink = DownSink()
    cfg = config(**FAST_FAIL, drain_timeout=0.1)
    p: BatchProcessor[Any, Any] = BatchProcessor(cfg, Recorder(fail=_reject_all), dead_letter=sink)
    await p.start()
    outcomes = [asyncio.ensure_future(p.submit(i)) for i in range(3)]
    await settle()
    loop = asyncio.get_running_loop()
    began = loop.time()
    await p.stop()
    assert loop.time() - began < 2 * 0.1 + 0.4
    assert sorted(letter.message for letter in p.dead_letters) == [0, 1, 2]
    assert sink.letters == []
    for outcome in outcomes:
        with pytest.raises(Rejected):
            await outcome
    assert any("dead letter" in record.getMessage() for record in caplog.records)
    stats = await stopped_ledger(p)
    assert stats["dead_lettered"] == 3


async def test_undelivered_letters_count_against_max_pending() -> None:
    """Letters stuck in the outbox keep their messages unfinished, so the buffer fills."""
    sink = DownSink()
    cfg = config(**FAST_FAIL, max_pending=2)
    async with BatchProcessor(cfg, Recorder(fail=_reject_all), dead_letter=sink) as p:
        await p.add_message("a")
        await p.add_message("b")
        await sink.wait_attempts(1)
        with pytest.raises(BufferFull):
            p.add_message_nowait("c")
        sink.down = False


async def test_flush_waits_until_letters_are_stored() -> None:
    """flush() returns only once the dead letters of the flushed batches reached the sink."""

    class SlowSink:
        def __init__(self) -> None:
            self.letters: list[DeadLetter] = []

        async def put(self, letters: Sequence[DeadLetter]) -> None:
            await asyncio.sleep(0.02)
            self.letters.extend(letters)

    sink = SlowSink()
    cfg = config(**FAST_FAIL)
    async with BatchProcessor(cfg, Recorder(fail=_reject_all), dead_letter=sink) as p:
        await p.add_message("bad")
        await p.flush()
        assert [letter.message for letter in sink.letters] == ["bad"]


async def test_dropped_messages_go_to_the_sink_too() -> None:
    """Letters of every reason, here "dropped", are delivered to the configured sink."""
    memory = MemoryDeadLetters()
    rec = Recorder(held=True)
    cfg = config(max_size=1, max_pending=1, overflow="drop_newest")
    async with BatchProcessor(cfg, rec, dead_letter=memory) as p:
        await p.add_message("kept")
        await p.add_message("dropped")
        rec.gate.set()
        await p.flush()
    assert [(d.message, d.reason) for d in memory.letters] == [("dropped", "dropped")]


async def test_replay_submits_letters_again_with_their_key_and_priority() -> None:
    """replay() resubmits dead letters' messages in their own lane and reports the successes."""
    memory = MemoryDeadLetters()
    broken = True

    def rule(batch: Batch[Any], call: int) -> BaseException | None:
        return Rejected("downstream was broken") if broken else None

    rec = Recorder(fail=rule, result=lambda m: f"ok {m}")
    cfg = config(**FAST_FAIL)
    async with BatchProcessor(cfg, rec, dead_letter=memory) as p:
        await p.add_message("a", key="user-1", priority=2)
        await p.add_message("b", key="user-2")
        await p.flush()
        assert len(memory) == 2
        broken = False
        report = await p.replay(memory.read())
        stats = await ledger(p)
    assert sorted(letter.message for letter in report.succeeded) == ["a", "b"]
    assert report.failed == []
    replayed = {c.messages[0]: (c.key, c.priority) for c in rec.succeeded}
    assert replayed == {"a": ("user-1", 2), "b": ("user-2", 0)}
    assert stats["processed"] == 2


async def test_replay_reports_letters_that_fail_again() -> None:
    """A replayed message that fails again is reported with its error and dead-lettered again."""
    rec = Recorder(fail=lambda batch, call: Rejected("still bad") if batch[0] == "x" else None)
    async with BatchProcessor(config(**FAST_FAIL), rec) as p:
        letters = [DeadLetter(message="x"), DeadLetter(message="y", key="k")]
        report = await p.replay(letters)
    assert [letter.message for letter in report.succeeded] == ["y"]
    [(letter, error)] = report.failed
    assert letter.message == "x"
    assert isinstance(error, Rejected)
    assert [(d.message, d.reason) for d in p.dead_letters] == [("x", "failed")]


async def test_sink_retries_follow_the_capped_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Failed writes are retried after min(retry_max_delay, retry_delay * 2**(n-1)) seconds."""

    class FailsFourTimes(DownSink):
        async def put(self, letters: Sequence[DeadLetter]) -> None:
            self.down = self.attempts < 4
            await super().put(letters)

    asked = record_sleeps(monkeypatch)
    sink = FailsFourTimes()
    cfg = config(**FAST_FAIL, retry_delay=1.0, retry_max_delay=3.0)
    async with BatchProcessor(cfg, Recorder(fail=_reject_all), dead_letter=sink) as p:
        await p.add_message("bad")
        await p.flush()
    assert asked == [1.0, 2.0, 3.0, 3.0]
    assert [letter.message for letter in sink.letters] == ["bad"]


async def test_sink_retries_wait_as_long_as_its_error_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead-letter sink whose error carries ``retry_after`` (an HttpSink answered 429 with
    Retry-After) is not called again sooner than that, nor later than retry_max_delay."""

    class Throttled(OSError):
        def __init__(self, seconds: float) -> None:
            super().__init__(f"throttled, come back in {seconds}s")
            self.retry_after = seconds

    class AsksToWait(DownSink):
        async def put(self, letters: Sequence[DeadLetter]) -> None:
            self.attempts += 1
            if self.attempts <= 2:
                raise Throttled([2.5, 60.0][self.attempts - 1])
            self.letters.extend(letters)

    asked = record_sleeps(monkeypatch)
    sink = AsksToWait()
    cfg = config(**FAST_FAIL, retry_delay=1.0, retry_max_delay=10.0)
    async with BatchProcessor(cfg, Recorder(fail=_reject_all), dead_letter=sink) as p:
        await p.add_message("bad")
        await p.flush()
    assert asked == [2.5, 10.0]
    assert [letter.message for letter in sink.letters] == ["bad"]


async def test_a_sink_that_leaks_a_cancel_once_is_retried_and_stores_every_letter() -> None:
    """A dead-letter sink whose client library leaked CancelledError once ended the outbox's
    task: flush() never returned and the 3 letters were never stored, with nothing logged. A
    cancel nobody asked for is now a failed write like any other, retried with backoff."""

    class LeaksACancel(DownSink):
        async def put(self, letters: Sequence[DeadLetter]) -> None:
            self.down = False
            if self.attempts == 0:
                self.attempts += 1
                raise asyncio.CancelledError()
            await super().put(letters)

    sink = LeaksACancel()
    cfg = config(**FAST_FAIL, retry_delay=0.01, retry_max_delay=0.02)
    async with BatchProcessor(cfg, Recorder(fail=_reject_all), dead_letter=sink) as p:
        for i in range(3):
            await p.add_message(i)
        await asyncio.wait_for(p.flush(), PATIENCE)
        stats = await ledger(p)
    assert sorted(letter.message for letter in sink.letters) == [0, 1, 2]
    assert stats["dead_letter_write_failures"] == 1
    assert p.dead_letters == []
