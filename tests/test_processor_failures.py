"""Failures: retries with backoff, retry_on, PartialFailure, and what a dead letter records."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest

from batchpunk import Batch, BatchProcessor, DeadLetter, PartialFailure, ResultMismatch
from tests.engine_support import Recorder, config, record_sleeps, stopped_ledger


class Flaky(Exception):
    """A transient downstream failure."""


class Poison(Exception):
    """A failure that no retry will fix."""


def fail_first(count: int) -> Any:
    """A fail rule: the first ``count`` calls raise Flaky, later ones succeed."""

    def rule(batch: Batch[Any], call: int) -> BaseException | None:
        return Flaky(f"call {call}") if call <= count else None

    return rule


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Records every positive asyncio.sleep the engine asks for, and skips the wait."""
    return record_sleeps(monkeypatch)


async def test_a_batch_that_fails_twice_then_succeeds_is_retried_twice() -> None:
    """Two failures then success: three calls, retries == 2, every message processed once."""
    rec = Recorder(fail=fail_first(2), result=lambda m: m + 100)
    async with BatchProcessor(config(max_size=3), rec) as p:
        results = await asyncio.gather(*(p.submit(i) for i in range(3)))
        stats = await p.get_stats()
    assert results == [100, 101, 102]
    assert stats["retries"] == 2
    assert stats["calls"] == 3
    assert stats["splits"] == 0
    assert [c.attempt for c in rec.calls] == [1, 2, 3]
    assert rec.processed == [0, 1, 2]
    assert p.dead_letters == []


async def test_a_single_message_failing_every_retry_ends_with_its_last_error() -> None:
    """After 1 + max_retries calls a lone message is dead-lettered "failed" with the last error."""
    rec = Recorder(fail=fail_first(99))
    async with BatchProcessor(config(max_size=1, max_retries=3), rec) as p:
        with pytest.raises(Flaky, match="call 4"):
            await p.submit("m")
    assert len(rec.calls) == 4
    [letter] = p.dead_letters
    assert (letter.message, letter.reason, letter.attempts) == ("m", "failed", 4)
    assert str(letter.error) == "call 4"


async def test_retry_failed_false_means_a_single_call() -> None:
    """With retry_failed False a failing lone message is dead-lettered after one call."""
    rec = Recorder(fail=fail_first(99))
    async with BatchProcessor(config(max_size=1, retry_failed=False), rec) as p:
        with pytest.raises(Flaky):
            await p.submit("m")
        stats = await p.get_stats()
    assert len(rec.calls) == 1
    assert stats["retries"] == 0


@pytest.mark.parametrize(
    "retry_on",
    [(ConnectionError, Flaky), lambda exc: not isinstance(exc, Poison)],
    ids=["tuple", "predicate"],
)
async def test_a_non_retryable_error_skips_the_retries(retry_on: Any) -> None:
    """An error retry_on rejects (tuple or predicate) is not retried at all."""
    rec = Recorder(fail=lambda batch, call: Poison("bad record"))
    async with BatchProcessor(config(max_size=1, max_retries=5, retry_on=retry_on), rec) as p:
        with pytest.raises(Poison):
            await p.submit("m")
        stats = await p.get_stats()
    assert len(rec.calls) == 1
    assert stats["retries"] == 0
    assert p.dead_letters[0].attempts == 1


@pytest.mark.parametrize(
    "retry_on",
    [(ConnectionError, Flaky), lambda exc: not isinstance(exc, Poison)],
    ids=["tuple", "predicate"],
)
async def test_a_retryable_error_under_retry_on_is_retried(retry_on: Any) -> None:
    """An error retry_on accepts is retried as usual."""
    rec = Recorder(fail=fail_first(1))
    async with BatchProcessor(config(max_size=1, retry_on=retry_on), rec) as p:
        await p.submit("m")
        stats = await p.get_stats()
    assert stats["retries"] == 1
    assert rec.processed == ["m"]


async def test_without_partial_batches_the_whole_batch_is_dead_lettered() -> None:
    """enable_partial_batches False: a batch that exhausts its retries is dead-lettered whole."""
    rec = Recorder(fail=fail_first(99))
    cfg = config(max_size=4, max_retries=1, enable_partial_batches=False)
    async with BatchProcessor(cfg, rec) as p:
        for i in range(4):
            await p.add_message(i)
        await p.flush()
        stats = await p.get_stats()
    await stopped_ledger(p)
    assert len(rec.calls) == 2
    assert stats["splits"] == 0
    assert sorted(letter.message for letter in p.dead_letters) == [0, 1, 2, 3]
    assert {letter.attempts for letter in p.dead_letters} == {2}


async def test_backoff_sleeps_double_up_to_the_cap(sleeps: list[float]) -> None:
    """Without jitter the n-th retry sleeps min(retry_max_delay, retry_delay * 2**(n-1))."""
    rec = Recorder(fail=fail_first(4))
    cfg = config(max_size=1, max_retries=4, retry_delay=1.0, retry_max_delay=3.0)
    async with BatchProcessor(cfg, rec) as p:
        await p.submit("m")
    assert sleeps == [1.0, 2.0, 3.0, 3.0]
    assert rec.processed == ["m"]


async def test_jittered_backoff_stays_within_the_capped_delay(sleeps: list[float]) -> None:
    """With retry_jitter each sleep lies in [0, min(retry_max_delay, retry_delay * 2**(n-1))]."""
    rec = Recorder(fail=fail_first(4))
    cfg = config(max_size=1, max_retries=4, retry_delay=1.0, retry_max_delay=3.0, retry_jitter=True)
    async with BatchProcessor(cfg, rec) as p:
        await p.submit("m")
    assert len(sleeps) <= 4  # a draw of exactly 0 skips the sleep
    for sleep, ceiling in zip(sleeps, [1.0, 2.0, 3.0, 3.0], strict=False):
        assert 0 <= sleep <= ceiling


async def test_retries_really_wait_their_backoff() -> None:
    """On a real clock the gaps between calls are at least the scheduled backoff."""
    rec = Recorder(fail=fail_first(3))
    cfg = config(max_size=1, max_retries=3, retry_delay=0.01, retry_max_delay=0.015)
    async with BatchProcessor(cfg, rec) as p:
        await p.submit("m")
    starts = [c.started for c in rec.calls]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    for gap, scheduled in zip(gaps, [0.01, 0.015, 0.015], strict=True):
        assert gap >= scheduled - 0.002


async def test_a_backing_off_batch_keeps_its_slot() -> None:
    """While a failed batch waits to retry, no other batch takes its slot."""
    rec = Recorder(
        fail=lambda batch, call: Flaky("once") if batch[0] == "a" and call == 1 else None
    )
    cfg = config(max_size=1, enable_parallel_processing=False, retry_delay=0.03)
    async with BatchProcessor(cfg, rec) as p:
        await p.add_message("a")
        await rec.wait_calls(1)
        await p.add_message("b")
        await p.flush()
    assert [c.messages[0] for c in rec.calls] == ["a", "a", "b"]
    assert rec.calls[2].started >= rec.calls[1].started


async def test_partial_failure_with_results_completes_the_others_at_once() -> None:
    """Messages a PartialFailure does not name complete with their results; the named ones
    fail with their own exception, in submit() and in their dead letter."""
    errors = {1: Poison("bad 1"), 4: Poison("bad 4")}

    async def handler(batch: Batch[Any]) -> list[Any]:
        failures = {i: errors[m] for i, m in enumerate(batch) if m in errors}
        results = [f"ok {m}" for m in batch]
        if failures:
            raise PartialFailure(failures, results=results)
        return results

    cfg = config(max_size=6, retry_on=(Flaky,))
    async with BatchProcessor(cfg, handler) as p:
        outcomes = await asyncio.gather(*(p.submit(i) for i in range(6)), return_exceptions=True)
        stats = await p.get_stats()
    assert outcomes[1] is errors[1]
    assert outcomes[4] is errors[4]
    assert [outcomes[i] for i in (0, 2, 3, 5)] == ["ok 0", "ok 2", "ok 3", "ok 5"]
    letters = {letter.message: letter for letter in p.dead_letters}
    assert set(letters) == {1, 4}
    assert letters[1].error is errors[1]
    assert letters[4].error is errors[4]
    assert stats["processed"] == 4
    assert stats["splits"] == 0


async def test_partial_failure_without_results_completes_the_others_with_none() -> None:
    """Without results, messages a PartialFailure does not name complete with None."""

    async def handler(batch: Batch[Any]) -> None:
        raise PartialFailure({0: Poison("first is bad")})

    cfg = config(max_size=3, retry_on=(Flaky,))
    async with BatchProcessor(cfg, handler) as p:
        outcomes = await asyncio.gather(*(p.submit(i) for i in range(3)), return_exceptions=True)
    assert isinstance(outcomes[0], Poison)
    assert outcomes[1:] == [None, None]


async def test_partial_failure_retries_only_the_failed_messages() -> None:
    """Retryable failures named by a PartialFailure are retried alone, not with the others."""
    seen: list[list[Any]] = []

    async def handler(batch: Batch[Any]) -> None:
        seen.append(list(batch))
        if len(seen) == 1:
            raise PartialFailure({1: Flaky("b busy"), 2: Flaky("c busy")})

    async with BatchProcessor(config(max_size=4), handler) as p:
        await asyncio.gather(*(p.submit(m) for m in "abcd"))
        stats = await p.get_stats()
    assert seen == [["a", "b", "c", "d"], ["b", "c"]]
    assert stats["retries"] == 1
    assert stats["processed"] == 4


async def test_partial_failure_retried_to_exhaustion_keeps_each_messages_error() -> None:
    """A message that keeps failing through PartialFailure ends with its own last exception."""

    async def handler(batch: Batch[Any]) -> None:
        raise PartialFailure({i: Flaky(f"{m} still busy") for i, m in enumerate(batch) if m != "a"})

    async with BatchProcessor(config(max_size=3, max_retries=2), handler) as p:
        outcomes = await asyncio.gather(*(p.submit(m) for m in "abc"), return_exceptions=True)
    assert outcomes[0] is None
    assert [str(o) for o in outcomes[1:]] == ["b still busy", "c still busy"]
    assert {str(letter.error) for letter in p.dead_letters} == {"b still busy", "c still busy"}


async def test_partial_failure_naming_a_missing_index_is_a_mismatch() -> None:
    """A PartialFailure naming an index outside the batch fails it with a ResultMismatch."""

    async def handler(batch: Batch[Any]) -> None:
        raise PartialFailure({len(batch): Poison("out of range")})

    cfg = config(max_size=1, retry_failed=False)
    async with BatchProcessor(cfg, handler) as p:
        with pytest.raises(ResultMismatch, match="outside the batch"):
            await p.submit("m")


async def test_partial_failure_with_results_of_the_wrong_length_is_a_mismatch() -> None:
    """A PartialFailure whose results do not match the batch fails it with a ResultMismatch."""

    async def handler(batch: Batch[Any]) -> None:
        raise PartialFailure({0: Poison("bad")}, results=[1, 2, 3, 4])

    cfg = config(max_size=1, retry_failed=False)
    async with BatchProcessor(cfg, handler) as p:
        with pytest.raises(ResultMismatch, match="results"):
            await p.submit("m")


def test_partial_failure_needs_at_least_one_failure() -> None:
    """An empty PartialFailure is a ValueError: it would say nothing failed."""
    with pytest.raises(ValueError, match="failures"):
        PartialFailure({})


async def test_a_dead_letter_records_where_and_how_its_message_failed() -> None:
    """A DeadLetter keeps message, key, priority, reason, error, attempts and first_seen."""
    before = time.time()
    rec = Recorder(fail=lambda batch, call: Poison("rejected"))
    cfg = config(max_size=1, max_retries=2)
    async with BatchProcessor(cfg, rec) as p:
        with pytest.raises(Poison):
            await p.submit({"id": 7}, key="user-7", priority=3)
    [letter] = p.dead_letters
    assert isinstance(letter, DeadLetter)
    assert letter.message == {"id": 7}
    assert (letter.key, letter.priority, letter.reason) == ("user-7", 3, "failed")
    assert isinstance(letter.error, Poison)
    assert letter.attempts == 3
    assert before - 1 <= letter.first_seen <= time.time()
    assert "Poison" in letter.error_type
    assert "rejected" in letter.traceback


async def test_one_failing_batch_does_not_disturb_the_others() -> None:
    """Other keys' batches succeed while one batch fails all the way to dead letters."""
    rec = Recorder(fail=lambda batch, call: Poison("bad key") if batch.key == "bad" else None)
    async with BatchProcessor(config(max_size=2), rec) as p:
        for i in range(6):
            await p.add_message(i, key="bad" if i % 3 == 0 else "good")
        await p.flush()
        stats = await p.get_stats()
    await stopped_ledger(p)
    assert sorted(rec.processed) == [1, 2, 4, 5]
    assert sorted(letter.message for letter in p.dead_letters) == [0, 3]
    assert stats["processed"] == 4


class Fatal(BaseException):
    """A BaseException that is not an Exception, such as a processor might let escape."""


async def test_a_processor_raising_a_base_exception_loses_no_message() -> None:
    """Even a BaseException from the processor leaves every message dead-lettered, none lost."""

    async def fatal(batch: Batch[Any]) -> None:
        raise Fatal("escaped")

    p: BatchProcessor[Any, Any] = BatchProcessor(config(max_size=2, drain_timeout=0.2), fatal)
    await p.start()
    await p.add_message(1)
    await p.add_message(2)
    await asyncio.sleep(0.02)
    await p.stop()
    assert sorted(letter.message for letter in p.dead_letters) == [1, 2]
    assert {letter.reason for letter in p.dead_letters} == {"failed"}
    assert all(isinstance(letter.error, Fatal) for letter in p.dead_letters)
    await stopped_ledger(p)


@pytest.mark.parametrize("fails", [False, True], ids=["succeeds", "fails"])
async def test_a_processor_that_consumes_its_batch_loses_nothing(fails: bool) -> None:
    """A processor may empty the list it is given; every message still ends exactly once,
    and a retry still sees every message."""
    seen: list[list[Any]] = []

    async def consume(batch: Batch[Any]) -> None:
        seen.append(list(batch))
        while batch:
            batch.pop()
        if fails:
            raise Poison("consumed, then failed")

    cfg = config(max_size=3, max_retries=1, retry_on=(Poison,), enable_partial_batches=False)
    async with BatchProcessor(cfg, consume) as p:
        for i in range(3):
            await p.add_message(i)
        await p.flush()
    stats = await stopped_ledger(p)
    assert all(call == [0, 1, 2] for call in seen)
    if fails:
        assert sorted(letter.message for letter in p.dead_letters) == [0, 1, 2]
    else:
        assert stats["processed"] == 3
