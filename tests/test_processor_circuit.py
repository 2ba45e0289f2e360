"""Circuit breaker: closed, open for the cooldown, half_open for one trial, then closed or open."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from batchpunk import Batch, BatchProcessor
from batchpunk.errors import MessageExpired
from batchpunk.metrics import RecordingCollector
from tests.engine_support import PATIENCE, config, stopped_ledger

COOLDOWN = 0.05


class Scripted:
    """A processor whose n-th call fails, succeeds, or waits for a gate, as scripted."""

    def __init__(self, script: dict[int, str]) -> None:
        self.script = script
        self.starts: list[float] = []
        self.running = 0
        self.max_running = 0
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def __call__(self, batch: Batch[Any]) -> None:
        self.starts.append(asyncio.get_running_loop().time())
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.started.set()
        try:
            action = self.script.get(len(self.starts), "ok")
            if action == "hold":
                await self.gate.wait()
            elif action == "fail":
                raise ConnectionError(f"call {len(self.starts)} refused")
        finally:
            self.running -= 1

    async def wait_calls(self, count: int) -> None:
        async with asyncio.timeout(PATIENCE):
            while len(self.starts) < count:
                self.started.clear()
                await self.started.wait()


def _config(**overrides: Any) -> Any:
    values: dict[str, Any] = {
        "max_size": 1,
        "max_retries": 6,
        "circuit_breaker_threshold": 2,
        "circuit_breaker_cooldown": COOLDOWN,
    }
    values.update(overrides)
    return config(**values)


async def _circuit(p: BatchProcessor[Any, Any]) -> str:
    return str((await p.get_stats())["circuit"])


async def test_circuit_goes_open_then_half_open_then_closed() -> None:
    """Two failures open the circuit; after the cooldown one trial runs half_open; its success
    closes the circuit."""
    handler = Scripted({1: "fail", 2: "fail", 3: "hold"})
    async with BatchProcessor(_config(), handler) as p:
        assert await _circuit(p) == "closed"
        result = asyncio.ensure_future(p.submit("m"))
        await handler.wait_calls(2)
        await asyncio.sleep(0.005)
        assert await _circuit(p) == "open"
        await handler.wait_calls(3)
        assert await _circuit(p) == "half_open"
        assert handler.starts[2] - handler.starts[1] >= COOLDOWN - 0.003
        handler.gate.set()
        await asyncio.wait_for(result, PATIENCE)
        assert await _circuit(p) == "closed"
        stats = await p.get_stats()
    assert stats["retries"] == 2
    await stopped_ledger(p)


async def test_a_failed_trial_reopens_the_circuit() -> None:
    """A trial call that fails reopens the circuit for another full cooldown."""
    handler = Scripted({1: "fail", 2: "fail", 3: "fail"})
    async with BatchProcessor(_config(), handler) as p:
        result = asyncio.ensure_future(p.submit("m"))
        await handler.wait_calls(3)
        await asyncio.sleep(0.005)
        assert await _circuit(p) == "open"
        await asyncio.wait_for(result, PATIENCE)
        assert await _circuit(p) == "closed"
    starts = handler.starts
    assert starts[2] - starts[1] >= COOLDOWN - 0.003
    assert starts[3] - starts[2] >= COOLDOWN - 0.003


async def test_half_open_lets_a_single_trial_through() -> None:
    """While the trial call runs, other waiting batches start no call despite free slots."""
    handler = Scripted({1: "fail", 2: "fail", 3: "hold"})
    cfg = _config(circuit_breaker_threshold=1, max_concurrent_batches=4)
    async with BatchProcessor(cfg, handler) as p:
        both = asyncio.gather(p.submit("a"), p.submit("b"))
        await handler.wait_calls(3)
        await asyncio.sleep(0.02)
        assert await _circuit(p) == "half_open"
        assert handler.running == 1
        assert len(handler.starts) == 3
        handler.gate.set()
        await asyncio.wait_for(both, PATIENCE)
    assert await _circuit(p) == "closed"


async def test_new_batches_wait_while_the_circuit_is_open() -> None:
    """A batch cut while the circuit is open starts only after the cooldown."""
    handler = Scripted({1: "fail"})
    cfg = _config(circuit_breaker_threshold=1, max_retries=0, enable_partial_batches=False)
    async with BatchProcessor(cfg, handler) as p:
        first = asyncio.ensure_future(p.submit("first"))  # held by the outage
        await handler.wait_calls(1)
        await asyncio.sleep(0)
        assert await _circuit(p) == "open"
        cut = asyncio.get_running_loop().time()
        await p.submit("second")
        await first
    assert len(handler.starts) == 3  # the failed call, then the trial, then the other batch
    assert all(start > cut for start in handler.starts[1:])
    assert all(start - handler.starts[0] >= COOLDOWN - 0.003 for start in handler.starts[1:])


async def test_delivery_timeout_ends_the_wait_of_a_batch_behind_an_open_circuit() -> None:
    """A batch waiting for its first call while the circuit is open expires at its
    delivery_timeout (it waited for the cooldown, however long), with an error saying why."""
    handler = Scripted({1: "fail"})
    cfg = _config(
        circuit_breaker_threshold=1,
        max_retries=0,
        enable_partial_batches=False,
        delivery_timeout=COOLDOWN / 3,
    )
    async with BatchProcessor(cfg, handler) as p:
        with pytest.raises(MessageExpired):  # held by the outage until delivery_timeout
            await p.submit("first")
        assert await _circuit(p) == "open"
        with pytest.raises(MessageExpired, match="circuit breaker stayed open"):
            await p.submit("second")
    assert len(handler.starts) == 1
    assert [letter.message for letter in p.dead_letters] == ["first", "second"]


async def test_non_retryable_errors_do_not_open_the_circuit() -> None:
    """Poison messages prove the downstream answers: non-retryable failures never open it."""

    async def reject(batch: Batch[Any]) -> None:
        if batch[0] == "bad":
            raise ValueError("malformed")

    cfg = _config(circuit_breaker_threshold=1, retry_on=(ConnectionError,))
    async with BatchProcessor(cfg, reject) as p:
        for _ in range(3):
            with pytest.raises(ValueError, match="malformed"):
                await p.submit("bad")
        assert await _circuit(p) == "closed"
        await p.submit("good")


async def test_without_a_threshold_the_circuit_stays_closed() -> None:
    """With circuit_breaker_threshold None, failures never open a circuit."""
    handler = Scripted({i: "fail" for i in range(1, 6)})
    async with BatchProcessor(config(max_size=1, max_retries=5), handler) as p:
        await p.submit("m")
        assert await _circuit(p) == "closed"
    assert len(handler.starts) == 6


async def test_stop_does_not_wait_out_an_open_circuit() -> None:
    """Batches held by an open circuit are dead-lettered "shutdown" once drain_timeout passes."""
    handler = Scripted({1: "fail"})
    cfg = _config(circuit_breaker_threshold=1, circuit_breaker_cooldown=30.0, drain_timeout=0.05)
    p: BatchProcessor[Any, Any] = BatchProcessor(cfg, handler)
    await p.start()
    await p.add_message("retrying")
    await handler.wait_calls(1)
    await p.add_message("queued")
    loop = asyncio.get_running_loop()
    began = loop.time()
    await p.stop()
    assert loop.time() - began < 0.05 + 0.4
    assert sorted((d.message, d.reason) for d in p.dead_letters) == [
        ("queued", "shutdown"),
        ("retrying", "shutdown"),
    ]
    assert len(handler.starts) == 1
    await stopped_ledger(p)


async def test_a_late_success_from_before_the_opening_does_not_cut_the_cooldown() -> None:
    """Once open, no call starts for the cooldown, even if an older call then succeeds."""
    starts: list[tuple[str, float]] = []
    slow_done = asyncio.Event()

    async def handler(batch: Batch[Any]) -> None:
        starts.append((batch[0], asyncio.get_running_loop().time()))
        if batch[0] == "slow":
            await asyncio.sleep(0.02)
            slow_done.set()
        elif sum(1 for name, _ in starts if name == "bad") == 1:
            raise ConnectionError("down")

    cfg = _config(
        circuit_breaker_threshold=1, circuit_breaker_cooldown=0.2, max_concurrent_batches=2
    )
    async with BatchProcessor(cfg, handler) as p:
        await p.add_message("slow")
        await asyncio.sleep(0)
        await p.add_message("bad")
        await asyncio.wait_for(slow_done.wait(), PATIENCE)
        await p.flush()
    bad = [at for name, at in starts if name == "bad"]
    assert bad[1] - bad[0] >= 0.2 - 0.005


async def test_the_circuit_gauge_follows_the_breaker_while_no_batch_finishes() -> None:
    """The circuit_state gauge was only set when a batch finished, and while the circuit is
    open none does: /metrics said 0 (closed) for a whole outage while /stats said open. Each
    change of state is now reported as it happens."""
    handler = Scripted({1: "fail", 2: "hold"})
    collector = RecordingCollector()
    cfg = _config(circuit_breaker_threshold=1, max_retries=0, enable_partial_batches=False)
    async with BatchProcessor(cfg, handler, metrics_collector=collector) as p:
        first = asyncio.ensure_future(p.submit("first"))
        await handler.wait_calls(1)
        await asyncio.sleep(0)
        assert await _circuit(p) == "open"
        assert collector.gauges[("circuit_state", ())] == 2  # open, with no batch finished
        await handler.wait_calls(2)  # the trial call, held by the gate
        assert collector.gauges[("circuit_state", ())] == 1  # half_open
        handler.gate.set()
        await first
        assert collector.gauges[("circuit_state", ())] == 0  # closed again
    states = [value for kind, name, value, _ in collector.calls if name == "circuit_state"]
    assert states[:3] == [2, 1, 0]
