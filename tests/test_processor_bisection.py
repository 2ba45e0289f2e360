"""Poison isolation by bisection: exactly the poison messages end dead, within the call budget."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchpunk import Batch, BatchProcessor
from tests.engine_support import config, record_sleeps, stopped_ledger


class Poison(Exception):
    """The error a batch containing a poison message fails with."""


class PoisonAware:
    """Fails any batch that holds a poison message; counts calls and successes per message."""

    def __init__(self, poison: set[int]) -> None:
        self.poison = poison
        self.calls = 0
        self.sizes: list[int] = []
        self.attempts: list[tuple[int, int]] = []
        self.ok: Counter[int] = Counter()

    async def __call__(self, batch: Batch[Any]) -> list[str]:
        self.calls += 1
        self.sizes.append(len(batch))
        self.attempts.append((len(batch), batch.attempt))
        bad = [m for m in batch if m in self.poison]
        if bad:
            raise Poison(f"poison {bad[0]}")
        self.ok.update(batch)
        return [f"done {m}" for m in batch]


async def _isolate(size: int, poison: set[int], **overrides: Any) -> tuple[PoisonAware, Any]:
    """Run one batch of ``size`` messages through a processor that rejects ``poison``."""
    handler = PoisonAware(poison)
    values: dict[str, Any] = {"max_size": size, "max_wait": 60.0, "retry_delay": 0.0002}
    values.update(overrides)
    cfg = config(**values)
    p: BatchProcessor[Any, Any] = BatchProcessor(cfg, handler)
    await p.start()
    for i in range(size):
        p.add_message_nowait(i)
    await p.flush()
    await p.stop()
    return handler, p


@st.composite
def poison_cases(draw: st.DrawFn) -> tuple[int, set[int]]:
    """A batch size and 0, 1, 3 or 10 poison positions within it."""
    count = draw(st.sampled_from([0, 1, 3, 10]))
    size = draw(st.integers(min_value=max(1, count), max_value=160))
    positions = draw(
        st.sets(st.integers(min_value=0, max_value=size - 1), min_size=count, max_size=count)
    )
    return size, positions


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=poison_cases(),
    max_retries=st.integers(min_value=0, max_value=2),
    split_retries=st.integers(min_value=0, max_value=1),
    retryable=st.booleans(),
)
def test_bisection_dead_letters_exactly_the_poison_messages(
    case: tuple[int, set[int]], max_retries: int, split_retries: int, retryable: bool
) -> None:
    """Whatever the batch size and poison positions, exactly the poison messages are
    dead-lettered (each with its own error) and every other message is processed exactly once."""
    size, poison = case
    retry_on: Any = (Exception,) if retryable else (ConnectionError,)
    handler, p = asyncio.run(
        _isolate(
            size, poison, max_retries=max_retries, split_retries=split_retries, retry_on=retry_on
        )
    )
    letters = p.dead_letters
    assert sorted(letter.message for letter in letters) == sorted(poison)
    for letter in letters:
        assert letter.reason == "failed"
        assert str(letter.error) == f"poison {letter.message}"
    assert set(handler.ok) == set(range(size)) - poison
    assert set(handler.ok.values()) <= {1}
    stats = asyncio.run(stopped_ledger(p))
    assert stats["processed"] == size - len(poison)
    assert stats["dead_lettered"] == len(poison)
    if not poison:
        assert handler.calls == 1
        assert stats["splits"] == 0


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Records every positive asyncio.sleep the engine asks for, and skips the wait."""
    return record_sleeps(monkeypatch)


@pytest.mark.parametrize("position", [0, 511, 512, 777, 1023])
async def test_one_poison_in_1024_costs_at_most_24_calls(
    position: int, sleeps: list[float]
) -> None:
    """max_retries=3: 4 calls on the whole batch, then two per halving, and only those first
    retries sleep: no good message waits for a backoff once the batch is split."""
    handler, p = await _isolate(1024, {position}, max_retries=3, retry_delay=0.001)
    assert handler.calls <= 24
    assert handler.sizes[:4] == [1024] * 4
    assert len(sleeps) == 3
    assert [letter.message for letter in p.dead_letters] == [position]
    assert sum(handler.ok.values()) == 1023
    stats = await stopped_ledger(p)
    assert stats["retries"] == 3
    assert stats["splits"] == 10


@pytest.mark.parametrize("position", [0, 300, 1023])
async def test_non_retryable_poison_in_1024_costs_at_most_21_calls_and_no_sleep(
    position: int, sleeps: list[float]
) -> None:
    """A non-retryable error skips retries: isolation takes at most 21 calls and never sleeps."""
    handler, p = await _isolate(
        1024, {position}, max_retries=3, retry_delay=0.001, retry_on=(ConnectionError,)
    )
    assert handler.calls <= 21
    assert sleeps == []
    assert [letter.message for letter in p.dead_letters] == [position]
    assert sum(handler.ok.values()) == 1023
    assert (await stopped_ledger(p))["retries"] == 0


async def test_batch_sizes_that_are_not_powers_of_two_stay_within_budget(
    sleeps: list[float],
) -> None:
    """A batch of 1000 needs no more halvings than one of 1024."""
    handler, p = await _isolate(1000, {999}, max_retries=3)
    assert handler.calls <= 24
    assert [letter.message for letter in p.dead_letters] == [999]


async def test_split_retries_give_each_half_extra_attempts(sleeps: list[float]) -> None:
    """With split_retries=1 a failing half is tried twice before it is split again."""
    handler, p = await _isolate(8, {5}, max_retries=3, split_retries=1)
    # 4 calls on the whole batch, then per level: the good half once, the poison half twice.
    assert handler.calls == 4 + 3 * 3
    [letter] = p.dead_letters
    assert letter.message == 5
    assert letter.attempts == 4 + 3 * 2
    assert sorted(handler.ok) == [0, 1, 2, 3, 4, 6, 7]


async def test_a_batch_that_recovers_after_its_retries_is_retried_whole_not_split() -> None:
    """An outage that outlasts the retries holds the batch whole (issue 13); then it succeeds."""
    calls: list[list[int]] = []

    async def handler(batch: Batch[Any]) -> None:
        calls.append(list(batch))
        if len(calls) <= 4:
            raise ConnectionError("downstream restarting")

    cfg = config(max_size=4, max_retries=3)
    async with BatchProcessor(cfg, handler) as p:
        for i in range(4):
            await p.add_message(i)
        await p.flush()
        stats = await p.get_stats()
    assert calls[4:] == [[0, 1, 2, 3]]
    assert stats["splits"] == 0
    assert p.dead_letters == []


async def test_split_halves_see_their_earlier_attempts() -> None:
    """A split half's Batch.attempt counts the calls its messages were already part of."""
    handler = PoisonAware({1})
    cfg = config(max_size=2, max_retries=3)
    async with BatchProcessor(cfg, handler) as p:
        await p.add_message(0)
        await p.add_message(1)
        await p.flush()
    assert handler.attempts[:4] == [(2, 1), (2, 2), (2, 3), (2, 4)]
    assert sorted(handler.attempts[4:]) == [(1, 5), (1, 5)]
    assert p.dead_letters[0].attempts == 5


async def test_bisection_settles_each_submitter() -> None:
    """Through bisection each submit() gets its own result, or its own poison error."""
    handler = PoisonAware({2, 5})
    async with BatchProcessor(config(max_size=8, max_retries=1), handler) as p:
        outcomes = await asyncio.gather(*(p.submit(i) for i in range(8)), return_exceptions=True)
    for i, outcome in enumerate(outcomes):
        if i in (2, 5):
            assert isinstance(outcome, Poison)
            assert str(outcome) == f"poison {i}"
        else:
            assert outcome == f"done {i}"
