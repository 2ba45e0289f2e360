"""Conservation under random traffic: every accepted message ends processed or dead, once.

A hypothesis rule-based state machine drives one BatchProcessor with random adds (waiting and
not), submits, flushes, transient failures, poison messages and passing time, checks the ledger
after every step, and ends with stop(): then accepted = processed + dead_lettered, nothing twice.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Coroutine
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from batchpunk import (
    Batch,
    BatchConfig,
    BatchProcessor,
    BufferFull,
    OverflowPolicy,
    ProcessorClosed,
)

T = TypeVar("T")

#: Seconds any single step may take before it counts as a hang (a deadlock is a failure).
STEP_LIMIT = 2.0


class PoisonError(ValueError):
    """Raised for a batch holding a poison message; not retryable, so bisection isolates it."""


class ConservationMachine(RuleBasedStateMachine):
    """One processor's life under random operations, with the ledger checked at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.processor: BatchProcessor[int, int] | None = None
        self.drain = True
        self.next_id = 0
        self.added: set[int] = set()  # add_message / add_message_nowait returned normally
        self.offered: set[int] = set()  # every id handed to any add or submit
        self.submits: dict[int, asyncio.Future[int]] = {}
        self.poison: set[int] = set()
        self.ok: Counter[int] = Counter()
        self.transient_failures = 0

    # -- driving the loop ------------------------------------------------------------------
    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run one coroutine on the machine's loop, failing on a hang instead of waiting."""
        return self.loop.run_until_complete(asyncio.wait_for(coro, STEP_LIMIT))

    async def handle(self, batch: Batch[int]) -> list[int]:
        """The processor: transient failures on demand, poison batches fail, others succeed."""
        await asyncio.sleep(0)
        if self.transient_failures > 0:
            self.transient_failures -= 1
            raise ConnectionError("downstream hiccup")
        bad = [m for m in batch if m in self.poison]
        if bad:
            raise PoisonError(f"poison {bad[0]}")
        self.ok.update(batch)
        return [m * 2 for m in batch]

    def new_id(self, poison: bool) -> int:
        self.next_id += 1
        self.offered.add(self.next_id)
        if poison:
            self.poison.add(self.next_id)
        return self.next_id

    @property
    def p(self) -> BatchProcessor[int, int]:
        assert self.processor is not None
        return self.processor

    # -- rules -----------------------------------------------------------------------------
    @initialize(
        max_size=st.integers(min_value=1, max_value=8),
        trigger=st.sampled_from(["size", "timeout", "both", "all"]),
        max_pending=st.sampled_from([None, 3, 8, 50]),
        overflow=st.sampled_from(list(OverflowPolicy)),
        preserve_order=st.booleans(),
        concurrency=st.integers(min_value=1, max_value=3),
        max_retries=st.integers(min_value=0, max_value=2),
        message_ttl=st.sampled_from([None, 0.05]),
        drain=st.booleans(),
    )
    def start(
        self,
        max_size: int,
        trigger: str,
        max_pending: int | None,
        overflow: OverflowPolicy,
        preserve_order: bool,
        concurrency: int,
        max_retries: int,
        message_ttl: float | None,
        drain: bool,
    ) -> None:
        """Build and start a processor with a random but small configuration."""
        config = BatchConfig(
            max_size=max_size,
            max_wait=0.005,
            trigger=trigger,  # type: ignore[arg-type]
            max_pending=max_pending,
            overflow=overflow,
            preserve_order=preserve_order,
            max_concurrent_batches=concurrency,
            max_retries=max_retries,
            retry_delay=0.0005,
            retry_max_delay=0.001,
            retry_jitter=False,
            retry_on=(ConnectionError,),
            message_ttl=message_ttl,
            drain_timeout=STEP_LIMIT,
        )
        self.drain = drain
        self.processor = BatchProcessor(config, self.handle)
        self.run(self.p.start())

    @rule(
        count=st.integers(min_value=1, max_value=12),
        key=st.sampled_from([None, "a", "b"]),
        priority=st.integers(min_value=0, max_value=2),
        poison=st.booleans(),
    )
    def add_nowait(self, count: int, key: str | None, priority: int, poison: bool) -> None:
        """add_message_nowait a run of messages; BufferFull refuses (does not accept) them."""
        self.run(self.add_run(count, key, priority, poison))

    async def add_run(self, count: int, key: str | None, priority: int, poison: bool) -> None:
        """The nowait adds, on the running loop as the engine expects of its callers."""
        for n in range(count):
            message = self.new_id(poison and n == 0)
            try:
                self.p.add_message_nowait(message, key=key, priority=priority)
            except BufferFull:
                continue
            self.added.add(message)

    @rule(key=st.sampled_from([None, "a", "b"]), priority=st.integers(min_value=0, max_value=2))
    def add_waiting(self, key: str | None, priority: int) -> None:
        """await add_message: under BLOCK it waits for room, which must come (no deadlock)."""
        message = self.new_id(False)
        try:
            self.run(self.p.add_message(message, key=key, priority=priority))
        except BufferFull:
            assert self.p.config.overflow is OverflowPolicy.RAISE
            return
        self.added.add(message)

    @rule(
        count=st.integers(min_value=1, max_value=6),
        key=st.sampled_from([None, "a"]),
        poison=st.booleans(),
    )
    def submit(self, count: int, key: str | None, poison: bool) -> None:
        """Start submits without awaiting them; their outcomes are checked at the end."""
        for n in range(count):
            message = self.new_id(poison and n == count - 1)
            self.submits[message] = self.loop.create_task(self.p.submit(message, key=key))
        self.run(asyncio.sleep(0))

    @rule()
    def flush(self) -> None:
        """flush() returns once everything cut so far has finished."""
        self.run(self.p.flush())

    @rule(n=st.integers(min_value=1, max_value=4))
    def fail_next_calls(self, n: int) -> None:
        """Make the next n processor calls fail with a transient error."""
        self.transient_failures = n

    @rule(seconds=st.sampled_from([0.0, 0.002, 0.01]))
    def let_time_pass(self, seconds: float) -> None:
        """Let deadlines fire and batches run."""
        self.run(asyncio.sleep(seconds))

    # -- checks ----------------------------------------------------------------------------
    @invariant()
    def ledger_balances(self) -> None:
        """received = processed + dead_lettered + pending + in_flight, and no message twice."""
        if self.processor is not None:
            self.run(self.check_ledger())

    async def check_ledger(self) -> None:
        """The ledger check, in one loop step so the handler cannot run in between."""
        stats = await self.p.get_stats()
        total = stats["processed"] + stats["dead_lettered"] + stats["pending"]
        assert stats["received"] == total + stats["in_flight"], stats
        assert stats["processed"] == sum(self.ok.values()), (stats, self.ok)
        assert all(count == 1 for count in self.ok.values())

    def teardown(self) -> None:
        """Stop, then check that every accepted message ended exactly once, as reported."""
        try:
            if self.processor is not None:
                self.final_checks()
        finally:
            for task in self.submits.values():
                task.cancel()
            self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()

    async def outcomes(self) -> list[Any]:
        """Every submit's result or exception, in submit order."""
        return await asyncio.gather(*self.submits.values(), return_exceptions=True)

    def final_checks(self) -> None:
        p = self.p
        self.run(p.stop(drain=self.drain))
        outcomes = self.run(self.outcomes())
        letters = {letter.message: letter for letter in p.dead_letters}
        assert len(letters) == len(p.dead_letters), "a message was dead-lettered twice"
        assert not set(letters) & set(self.ok), "a message was processed and dead-lettered"
        assert all(count == 1 for count in self.ok.values())
        ended = set(letters) | set(self.ok)
        assert ended <= self.offered
        assert self.added <= ended, f"accepted but lost: {sorted(self.added - ended)}"
        assert set(self.ok).isdisjoint(self.poison)
        for message, outcome in zip(self.submits, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if message in letters:
                    letter = letters[message]
                    assert outcome is letter.error or letter.reason == "shutdown"
                else:
                    assert isinstance(outcome, BufferFull | ProcessorClosed), outcome
            else:
                assert outcome == message * 2
                assert message in self.ok
        for message, letter in letters.items():
            if letter.reason == "failed":
                assert message in self.poison or isinstance(letter.error, ConnectionError)
        stats = self.run(p.get_stats())
        assert stats["pending"] == 0
        assert stats["in_flight"] == 0
        assert stats["received"] == len(ended)
        assert stats["processed"] == len(self.ok)
        assert stats["dead_lettered"] == len(letters)


ConservationMachine.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class TestConservation(ConservationMachine.TestCase):  # type: ignore[name-defined,misc]
    """Random operations never lose, duplicate or miscount a message."""
