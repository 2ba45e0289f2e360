"""Core engine throughput, latency and memory, each beside a baseline measured in the same run.

Run: python bench/core.py [--quick]

Targets (docs/ARCHITECTURE.md, performance budget): add_message_nowait >= 2.0x and await
add_message >= 1.2x a plain asyncio.Queue producer/consumer; submit with 1,000 concurrent
callers >= 1.0x aiodataloader's load(); time-trigger lateness p99 <= 5 ms at max_wait 50 ms;
<= 100 bytes of bookkeeping per pending message at 1,000,000 pending.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

from batchpunk import Batch, BatchConfig, BatchProcessor, BatchTrigger

MAX_SIZE = 1000


async def noop(batch: Batch[Any]) -> None:
    return None


async def queue_baseline(n: int) -> float:
    """A producer putting n items on an asyncio.Queue and a consumer taking them one by one."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    done = asyncio.get_running_loop().create_future()

    async def consumer() -> None:
        get = queue.get
        for _ in range(n):
            await get()
        done.set_result(None)

    task = asyncio.create_task(consumer())
    start = time.perf_counter()
    put = queue.put_nowait
    for i in range(n):
        put(i)
        if i % MAX_SIZE == MAX_SIZE - 1:
            await asyncio.sleep(0)  # let the consumer run, as a real producer would
    await done
    elapsed = time.perf_counter() - start
    await task
    return n / elapsed


def config(**overrides: Any) -> BatchConfig:
    base: dict[str, Any] = {
        "max_size": MAX_SIZE,
        "max_wait": 1.0,
        "max_pending": 100_000,
        "max_concurrent_batches": 4,
    }
    base.update(overrides)
    return BatchConfig(**base)


async def nowait_rate(n: int, collector: object | None = None) -> float:
    processor = BatchProcessor(config(), noop, collector)
    await processor.start()
    start = time.perf_counter()
    add = processor.add_message_nowait
    for i in range(n):
        add(i)
        if i % MAX_SIZE == MAX_SIZE - 1:
            await asyncio.sleep(0)
    await processor.flush()
    elapsed = time.perf_counter() - start
    await processor.stop()
    assert (await processor.get_stats())["processed"] == n
    return n / elapsed


async def await_rate(n: int) -> float:
    processor = BatchProcessor(config(), noop)
    await processor.start()
    start = time.perf_counter()
    add = processor.add_message
    for i in range(n):
        await add(i)
        if i % MAX_SIZE == MAX_SIZE - 1:
            await asyncio.sleep(0)
    await processor.flush()
    elapsed = time.perf_counter() - start
    await processor.stop()
    assert (await processor.get_stats())["processed"] == n
    return n / elapsed


async def callers(callers: int, per_caller: int, call: Callable[[int], Awaitable[Any]]) -> float:
    async def one(base: int) -> None:
        for i in range(per_caller):
            value = base + i
            assert await call(value) == value * 2

    start = time.perf_counter()
    await asyncio.gather(*(one(c * per_caller) for c in range(callers)))
    return callers * per_caller / (time.perf_counter() - start)


async def submit_rate(n_callers: int, per_caller: int) -> float:
    async def double(batch: Batch[int]) -> list[int]:
        return [x * 2 for x in batch]

    async with BatchProcessor(config(max_wait=0.001), double) as processor:
        return await callers(n_callers, per_caller, processor.submit)


async def dataloader_rate(n_callers: int, per_caller: int) -> float:
    from aiodataloader import DataLoader

    async def double(keys: list[int]) -> list[int]:
        return [x * 2 for x in keys]

    loader = DataLoader(double, max_batch_size=MAX_SIZE, cache=False)
    return await callers(n_callers, per_caller, loader.load)


async def lateness(samples: int, max_wait: float = 0.05) -> list[float]:
    """How late the time trigger fires: processor call time minus (accept time + max_wait)."""
    loop = asyncio.get_running_loop()
    late: list[float] = []
    called: asyncio.Future[float] | None = None

    async def record(batch: Batch[float]) -> None:
        assert called is not None
        called.set_result(loop.time())

    cfg = BatchConfig(max_size=MAX_SIZE, max_wait=max_wait, trigger=BatchTrigger.TIMEOUT)
    async with BatchProcessor(cfg, record) as processor:
        for _ in range(samples):
            called = loop.create_future()
            accepted = loop.time()
            processor.add_message_nowait(accepted)
            late.append(await called - (accepted + max_wait))
    return late


async def bytes_per_pending(n: int) -> float:
    """Bookkeeping memory per pending message, messages themselves excluded."""
    release = asyncio.Event()

    async def hold(batch: Batch[int]) -> None:
        await release.wait()

    cfg = config(
        max_pending=None, max_concurrent_batches=1, trigger=BatchTrigger.SIZE, max_wait=60.0
    )
    messages = list(range(n))  # allocated before measuring: they are the user's objects
    processor = BatchProcessor(cfg, hold)
    await processor.start()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    add = processor.add_message_nowait
    for message in messages:
        add(message)
    await asyncio.sleep(0)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    stats = await processor.get_stats()
    pending = stats["pending"] + stats["in_flight"]
    release.set()
    await processor.stop()
    return (after - before) / pending


def best(rates: list[float]) -> float:
    return max(rates)


async def main(quick: bool) -> None:
    n = 200_000 if quick else 1_000_000
    rounds = 2 if quick else 3
    print(f"batchpunk core benchmark: {n:,} messages, max_size {MAX_SIZE}, best of {rounds}")
    queue = best([await queue_baseline(n) for _ in range(rounds)])
    nowait = best([await nowait_rate(n) for _ in range(rounds)])
    waited = best([await await_rate(n) for _ in range(rounds)])
    print(f"  asyncio.Queue producer/consumer : {queue:>12,.0f} msg/s  (baseline)")
    print(
        f"  add_message_nowait              : {nowait:>12,.0f} msg/s  "
        f"{nowait / queue:5.2f}x  (target >= 2.0x)"
    )
    print(
        f"  await add_message               : {waited:>12,.0f} msg/s  "
        f"{waited / queue:5.2f}x  (target >= 1.2x)"
    )
    try:
        from batchpunk.metrics import PrometheusMetrics
    except ImportError:
        PrometheusMetrics = None  # type: ignore[assignment,misc]
    if PrometheusMetrics is not None:
        from prometheus_client import CollectorRegistry

        metered = best(
            [
                await nowait_rate(n, PrometheusMetrics(registry=CollectorRegistry()))
                for _ in range(rounds)
            ]
        )
        print(
            f"  nowait + PrometheusMetrics      : {metered:>12,.0f} msg/s  "
            f"cost {100 * (1 - metered / nowait):5.1f}%  (target < 15%)"
        )
    n_callers, per_caller = 1000, (20 if quick else 100)
    loader = best([await dataloader_rate(n_callers, per_caller) for _ in range(rounds)])
    submit = best([await submit_rate(n_callers, per_caller) for _ in range(rounds)])
    print(f"  aiodataloader load(), 1000 callers: {loader:>10,.0f} msg/s  (baseline)")
    print(
        f"  submit(), 1000 callers          : {submit:>12,.0f} msg/s  "
        f"{submit / loader:5.2f}x  (target >= 1.0x)"
    )
    late = sorted(await lateness(40 if quick else 100))
    p50 = statistics.median(late) * 1000
    p99 = late[min(len(late) - 1, int(len(late) * 0.99))] * 1000
    print(
        f"  time trigger lateness, max_wait 50 ms: p50 {p50:.2f} ms  p99 {p99:.2f} ms  "
        "(target p99 <= 5 ms)"
    )
    per = await bytes_per_pending(1_000_000)
    print(f"  bookkeeping at 1,000,000 pending: {per:.1f} bytes/message  (target <= 100)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages and rounds")
    args = parser.parse_args()
    asyncio.run(main(args.quick))
