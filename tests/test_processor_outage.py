"""Outages versus poison: a downstream that refuses connections is waited out, never bisected.

The fake downstream below refuses every call while it is "down" (as a stopped database does:
the connection fails before any row is looked at), and fails only its poison messages while up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from batchpunk import Batch, BatchProcessor
from batchpunk.errors import DownstreamUnavailable, MessageExpired, PartialFailure
from tests.engine_support import PATIENCE, config, ledger, stopped_ledger


class FlakyDownstream:
    """Refuses connections while ``down``; while up, fails the poison messages' batches."""

    def __init__(self, poison: set[Any] | None = None, poison_error: type = ValueError) -> None:
        self.down = True
        self.poison = poison or set()
        self.poison_error = poison_error
        self.sizes: list[int] = []
        self.refused = 0
        self.written: list[Any] = []
        self._changed = asyncio.Event()

    async def __call__(self, batch: Batch[Any]) -> list[Any]:
        self.sizes.append(len(batch))
        self._changed.set()
        await asyncio.sleep(0)
        if self.down:
            self.refused += 1
            raise ConnectionRefusedError(111, "Connection refused")
        bad = [m for m in batch if m in self.poison]
        if bad:
            raise self.poison_error(f"bad row {bad[0]!r}")
        self.written.extend(batch)
        return [f"ok:{m}" for m in batch]

    async def wait(self, condition: Callable[[], bool], within: float = PATIENCE) -> None:
        async with asyncio.timeout(within):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


def _config(**overrides: Any) -> Any:
    values: dict[str, Any] = {
        "max_size": 10,
        "max_retries": 3,
        "max_concurrent_batches": 4,
        "delivery_timeout": 30.0,
    }
    values.update(overrides)
    return config(**values)


async def _ride_out(
    p: BatchProcessor[Any, Any], sink: FlakyDownstream, refusals: int
) -> dict[str, Any]:
    """Wait until the sink refused ``refusals`` calls, snapshot the stats, then recover it."""
    await sink.wait(lambda: sink.refused >= refusals, within=10 * PATIENCE)
    during = await p.get_stats()
    sink.down = False
    return during


@pytest.mark.parametrize("breaker", [None, 2])
async def test_an_outage_longer_than_the_retry_budget_dead_letters_nothing(
    breaker: int | None,
) -> None:
    """Refused calls far past max_retries: no dead letter, each message written once, results."""
    sink = FlakyDownstream()
    cfg = _config(max_size=64, circuit_breaker_threshold=breaker, circuit_breaker_cooldown=0.02)
    async with BatchProcessor(cfg, sink) as p:
        futures = [p.submit_nowait(i) for i in range(256)]
        during = await _ride_out(p, sink, refusals=60)
        results = await asyncio.wait_for(asyncio.gather(*futures), 10 * PATIENCE)
    stats = await stopped_ledger(p)
    assert results == [f"ok:{i}" for i in range(256)]
    assert sorted(sink.written) == list(range(256))  # every message exactly once
    assert stats["dead_lettered"] == 0
    assert p.dead_letters == []
    assert during["downstream"]["state"] == "unavailable"
    assert during["downstream"]["held"] > 0
    assert during["downstream"]["since"] is not None
    assert stats["downstream"]["state"] == "available"
    assert stats["downstream"]["outages"] == 1
    assert stats["downstream"]["held"] == 0
    # Not shredded: a held batch is probed in parts of an eighth at the smallest.
    assert min(sink.sizes) >= 8


async def test_poison_mixed_into_an_outage_dead_letters_exactly_the_poison() -> None:
    """After the outage, bisection isolates the poison messages and only them."""
    poison = {7, 42, 93}
    sink = FlakyDownstream(poison)
    async with BatchProcessor(_config(), sink) as p:
        futures = [p.submit_nowait(i) for i in range(100)]
        await _ride_out(p, sink, refusals=40)
        outcomes = await asyncio.wait_for(
            asyncio.gather(*futures, return_exceptions=True), 10 * PATIENCE
        )
    await stopped_ledger(p)
    failed = {i for i, r in enumerate(outcomes) if isinstance(r, BaseException)}
    assert failed == poison
    assert {letter.message for letter in p.dead_letters} == poison
    assert {letter.reason for letter in p.dead_letters} == {"failed"}
    assert sorted(sink.written) == sorted(set(range(100)) - poison)


async def test_a_permanent_outage_expires_at_delivery_timeout_and_loses_nothing() -> None:
    """A downstream that never answers: every message ends as an "expired" letter."""
    sink = FlakyDownstream()
    async with BatchProcessor(_config(delivery_timeout=0.3), sink) as p:
        futures = [p.submit_nowait(i) for i in range(30)]
        outcomes = await asyncio.wait_for(
            asyncio.gather(*futures, return_exceptions=True), 10 * PATIENCE
        )
    stats = await stopped_ledger(p)
    assert all(isinstance(r, MessageExpired) for r in outcomes)
    assert sorted(letter.message for letter in p.dead_letters) == list(range(30))
    assert {letter.reason for letter in p.dead_letters} == {"expired"}
    assert isinstance(p.dead_letters[0].error.__cause__, ConnectionRefusedError)
    assert stats["dead_letter_reasons"] == {"expired": 30}
    assert sink.written == []


async def test_a_connection_looking_poison_alone_is_isolated_in_25_calls() -> None:
    """With nothing else running, a poison raising ConnectionError is still isolated."""
    sink = FlakyDownstream({500}, poison_error=ConnectionResetError)
    sink.down = False
    cfg = _config(max_size=1024, max_concurrent_batches=1)
    async with BatchProcessor(cfg, sink) as p:
        for i in range(1024):
            await p.add_message(i)
    await stopped_ledger(p)
    assert [letter.message for letter in p.dead_letters] == [500]
    assert len(sink.written) == 1023
    assert len(sink.sizes) <= 25  # 24 for ordinary poison, one more to see it is not an outage


async def test_a_connection_looking_poison_among_healthy_batches_is_isolated() -> None:
    """Other batches succeeding show the downstream answers: the poison batch is bisected."""
    sink = FlakyDownstream({55}, poison_error=ConnectionResetError)
    sink.down = False
    async with BatchProcessor(_config(), sink) as p:
        for i in range(200):
            await p.add_message(i)
    await stopped_ledger(p)
    assert [letter.message for letter in p.dead_letters] == [55]
    assert len(sink.written) == 199


async def test_an_error_marked_unavailable_is_an_outage_and_false_is_not() -> None:
    """The class attribute decides: ``unavailable = False`` makes a ConnectionError poison."""

    class Refused(Exception):
        unavailable = True

    class NotAnOutage(ConnectionError):
        unavailable = False

    calls: list[int] = []

    async def handler(batch: Batch[Any]) -> None:
        calls.append(len(batch))
        if len(calls) <= 8:
            raise Refused("down")

    async with BatchProcessor(_config(), handler) as p:
        for i in range(10):
            await p.add_message(i)
    assert p.dead_letters == []  # held and retried, then written

    async def poisoned(batch: Batch[Any]) -> None:
        if 3 in batch:
            raise NotAnOutage("looks like a connection error, but is this message's fault")

    async with BatchProcessor(_config(), poisoned) as p:
        for i in range(10):
            await p.add_message(i)
    assert [letter.message for letter in p.dead_letters] == [3]


async def test_the_old_policy_turns_an_outage_into_dead_letters() -> None:
    """Negative control: with unavailable_on=() nothing is an outage, and good messages die."""
    sink = FlakyDownstream()
    async with BatchProcessor(_config(unavailable_on=()), sink) as p:
        futures = [p.submit_nowait(i) for i in range(20)]
        await asyncio.gather(*futures, return_exceptions=True)
    assert len(p.dead_letters) == 20
    assert {letter.reason for letter in p.dead_letters} == {"failed"}


async def test_an_outage_blocks_producers_and_makes_few_calls() -> None:
    """Held batches fill max_pending so add_message waits; no busy loop while waiting."""
    sink = FlakyDownstream()
    cfg = _config(
        max_pending=40,
        circuit_breaker_threshold=3,
        circuit_breaker_cooldown=0.1,
        retry_max_delay=0.1,
    )
    async with BatchProcessor(cfg, sink) as p:
        for i in range(40):
            await p.add_message(i)
        blocked = asyncio.ensure_future(p.add_message(40))
        await sink.wait(lambda: sink.refused >= 8, within=10 * PATIENCE)
        calls_then = len(sink.sizes)
        await asyncio.sleep(0.5)
        assert not blocked.done()  # backpressure: the producer waits for room
        # One probe per cooldown (0.1 s) at most, plus the calls already under way.
        assert len(sink.sizes) - calls_then <= 10
        stats = await p.get_stats()
        assert stats["downstream"]["probes"] >= 1
        sink.down = False
        await asyncio.wait_for(blocked, 10 * PATIENCE)
    await stopped_ledger(p)
    assert sorted(sink.written) == list(range(41))


async def test_stop_during_an_outage_dead_letters_held_messages_as_shutdown() -> None:
    """stop() gives held batches drain_timeout, then dead-letters them as "shutdown"."""
    sink = FlakyDownstream()
    p: BatchProcessor[Any, Any] = BatchProcessor(_config(drain_timeout=0.2), sink)
    await p.start()
    for i in range(30):
        await p.add_message(i)
    await sink.wait(lambda: sink.refused >= 12, within=10 * PATIENCE)
    await p.stop()
    stats = await stopped_ledger(p)
    assert stats["dead_letter_reasons"] == {"shutdown": 30}
    assert stats["downstream"]["held"] == 0


async def test_downstream_unavailable_is_retried_whole() -> None:
    """DownstreamUnavailable, the library's own marker, holds the batch like a refusal."""
    calls: list[int] = []

    async def handler(batch: Batch[Any]) -> None:
        calls.append(len(batch))
        if len(calls) <= 6:
            raise DownstreamUnavailable("HTTP 503 from the bulk API")

    async with BatchProcessor(_config(enable_partial_batches=False), handler) as p:
        for i in range(10):
            await p.add_message(i)
    assert p.dead_letters == []
    assert set(calls) == {10}


async def test_a_leaked_cancelled_error_fails_only_that_call() -> None:
    """A processor raising CancelledError on its own is a failed call, retried, not a shutdown."""
    calls: list[int] = []

    async def handler(batch: Batch[Any]) -> None:
        calls.append(len(batch))
        if len(calls) == 1:
            raise asyncio.CancelledError()

    async with BatchProcessor(_config(), handler) as p:
        for i in range(10):
            await p.add_message(i)
        await p.flush()
        stats = await p.get_stats()
    assert stats["processed"] == 10
    assert stats["dead_lettered"] == 0
    assert calls == [10, 10]


def test_a_sync_call_abandoned_after_batch_timeout_does_not_keep_the_process_alive() -> None:
    """A sync processor hung past batch_timeout: the process still exits once stop() returned."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import asyncio, time
        from batchpunk import BatchConfig, BatchProcessor

        calls = []

        def handler(batch):
            calls.append(len(batch))
            if len(calls) == 1:
                time.sleep(3600)  # hangs: abandoned after batch_timeout

        async def main():
            cfg = BatchConfig(max_size=5, max_wait=0.01, batch_timeout=0.2, retry_delay=0.01)
            async with BatchProcessor(cfg, handler) as p:
                for i in range(5):
                    await p.add_message(i)
            print("stopped", (await p.get_stats())["processed"], flush=True)

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "stopped 5" in done.stdout


async def test_a_connection_lost_mid_batch_holds_the_rest_instead_of_dead_lettering_it() -> None:
    """A PartialFailure whose failures are all outages: the rest is held, then written."""
    state = {"down": True, "calls": 0}
    written: list[int] = []

    async def publish(batch: Batch[Any]) -> None:
        state["calls"] += 1
        if not state["down"]:
            written.extend(batch)
            return
        if state["calls"] > 1:
            raise ConnectionRefusedError(111, "Connection refused")
        # The first call: half the batch went out, then the connection dropped.
        half = len(batch) // 2
        written.extend(batch[:half])
        raise PartialFailure({i: TimeoutError("no ack") for i in range(half, len(batch))})

    async def recover() -> None:
        async with asyncio.timeout(PATIENCE * 5):
            while state["calls"] < 12:  # noqa: ASYNC110 - a test waiting on its own fake
                await asyncio.sleep(0.01)
        state["down"] = False

    async with BatchProcessor(_config(max_size=16), publish) as p:
        recovering = asyncio.ensure_future(recover())
        for i in range(16):
            await p.add_message(i)
        await p.flush()
        await recovering
    await stopped_ledger(p)
    assert p.dead_letters == []
    assert sorted(written) == list(range(16))


async def test_held_parts_retry_at_once_when_the_downstream_answers_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once one held part gets an answer, the other parts retry without sleeping a backoff."""
    from batchpunk._downstream import Downstream

    waits: list[float] = []
    original = Downstream.wait_answer

    async def recording(self: Downstream, seconds: float) -> None:
        waits.append(seconds)
        await original(self, seconds)

    monkeypatch.setattr(Downstream, "wait_answer", recording)
    sink = FlakyDownstream()
    cfg = _config(
        max_size=64, max_concurrent_batches=1, max_retries=0, retry_delay=0.2, retry_max_delay=60.0
    )
    async with BatchProcessor(cfg, sink) as p:
        futures = [p.submit_nowait(i) for i in range(64)]
        # 1 call on the batch, then probe splits into 2, 4 and 8 parts: 15 refusals, all held.
        await sink.wait(lambda: sink.refused >= 15, within=10 * PATIENCE)
        held_waits = len(waits)
        sink.down = False
        await asyncio.wait_for(asyncio.gather(*futures), 10 * PATIENCE)
    assert sorted(sink.written) == list(range(64))
    after = waits[held_waits:]
    # At most the first part waits out its backoff; the others go at once.
    assert after.count(0.0) >= 7, waits


async def test_a_partial_failure_naming_every_message_with_an_outage_is_held_not_bisected() -> None:
    """A PartialFailure in which every message failed by an outage (nothing got through)
    counted as an answer from the downstream, so each retry looked like evidence of a bad
    message: a 0.3 s outage dead-lettered all 4 messages as "failed". It is now the same as a
    call that raised the outage error: the batch is held and written once the downstream is
    back."""
    state = {"down": True}
    written: list[int] = []

    async def publish(batch: Batch[Any]) -> None:
        if state["down"]:
            raise PartialFailure({i: ConnectionRefusedError("refused") for i in range(len(batch))})
        written.extend(batch)

    async def recover() -> None:
        await asyncio.sleep(0.3)
        state["down"] = False

    cfg = _config(max_size=4, max_retries=2, max_concurrent_batches=1)
    async with BatchProcessor(cfg, publish) as p:
        recovering = asyncio.ensure_future(recover())
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(p.submit(i) for i in range(4)), return_exceptions=True),
            10 * PATIENCE,
        )
        await recovering
    stats = await stopped_ledger(p)
    assert outcomes == [None] * 4
    assert p.dead_letters == []
    assert sorted(written) == [0, 1, 2, 3]
    assert stats["downstream"]["outages"] == 1


async def test_delivery_timeout_bounds_batches_waiting_behind_an_open_circuit() -> None:
    """Batches waiting for the circuit breaker's one trial per cooldown were not bound by
    delivery_timeout: with 4 batches, cooldown 0.5 s and delivery_timeout 1 s, messages
    expired 3.0 to 7.5 s after they were accepted. Each now expires by its deadline."""

    async def refuse(batch: Batch[Any]) -> None:
        raise ConnectionRefusedError("downstream down")

    cfg = _config(
        max_size=10,
        max_retries=3,
        retry_delay=0.01,
        retry_max_delay=0.05,
        circuit_breaker_threshold=1,
        circuit_breaker_cooldown=0.5,
        delivery_timeout=1.0,
        max_concurrent_batches=4,
    )
    loop = asyncio.get_running_loop()
    ended: list[float] = []

    async def one(p: BatchProcessor[Any, Any], i: int) -> BaseException | None:
        try:
            await p.submit(i)
        except Exception as exc:
            ended.append(loop.time() - began)
            return exc
        return None

    async with BatchProcessor(cfg, refuse) as p:
        began = loop.time()
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(one(p, i) for i in range(40))), 10 * PATIENCE
        )
    await stopped_ledger(p)
    assert all(isinstance(outcome, MessageExpired) for outcome in outcomes)
    assert {letter.reason for letter in p.dead_letters} == {"expired"}
    assert len(p.dead_letters) == 40
    assert max(ended) < 2.0, sorted(set(round(t, 1) for t in ended))


async def test_no_message_stays_counted_as_held_once_its_batch_was_bisected() -> None:
    """A poison raising ConnectionResetError among 7 good messages: the batch was counted as
    held, then bisected once the evidence came, and stayed counted: get_stats() said held 7
    (the gauge, /readyz and the next outage's log line with it) with nothing held."""
    sink = FlakyDownstream({"poison"}, poison_error=ConnectionResetError)
    sink.down = False
    async with BatchProcessor(
        _config(max_size=8, max_retries=1, max_concurrent_batches=1), sink
    ) as p:
        for i in range(7):
            await p.add_message(f"ok{i}")
        await p.add_message("poison")
        await p.flush()
        stats = await ledger(p)
    assert [letter.message for letter in p.dead_letters] == ["poison"]
    assert stats["downstream"]["held"] == 0
