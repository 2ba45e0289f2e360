"""Core engine throughput, latency and memory, each beside a baseline measured in the same run.

Run: python bench/core.py [--quick]

The headline is wall clock: messages per second from the first add until the last batch ran,
with the ratio the median of same-round ratios (runs take turns within a round, so a busy
neighbour slows both sides of a ratio alike). Messages per CPU-second of this process stand
beside it, and the load average is printed before and after.

The baseline is the loop a user writes without us: a producer putting on an asyncio.Queue and
a consumer that awaits one item, then drains up to max_size with get_nowait() and hands the
batch to the same no-op async handler.

Targets (issue 12): add_message_nowait >= 2.0x and await add_message >= 1.3x that baseline;
submit with 1,000 concurrent callers >= 1.1x aiodataloader's load() in the same pattern;
time-trigger lateness p99 <= 5 ms at max_wait 50 ms; <= 100 bytes of bookkeeping per pending
message at 1,000,000 pending.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

from batchpunk import Batch, BatchConfig, BatchProcessor, BatchTrigger

MAX_SIZE = 1000


async def noop(batch: Batch[Any]) -> None:
    return None


#: (messages per wall-clock second, messages per CPU-second) of one run.
Rate = tuple[float, float]


class Clock:
    """Wall and CPU time of one run, started together."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def rate(self, n: int) -> Rate:
        return n / (time.perf_counter() - self.wall), n / (time.process_time() - self.cpu)


async def queue_baseline(n: int) -> Rate:
    """A producer putting n items on an asyncio.Queue; a consumer draining up to max_size per
    get into a batch for the same no-op handler (the hand-written batching loop)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    done = asyncio.get_running_loop().create_future()

    async def consumer() -> None:
        get, get_nowait, empty = queue.get, queue.get_nowait, queue.empty
        taken = 0
        while taken < n:
            batch = [await get()]
            while len(batch) < MAX_SIZE and not empty():
                batch.append(get_nowait())
            taken += len(batch)
            await noop(batch)  # type: ignore[arg-type]
        done.set_result(None)

    task = asyncio.create_task(consumer())
    clock = Clock()
    put = queue.put_nowait
    for i in range(n):
        put(i)
        if i % MAX_SIZE == MAX_SIZE - 1:
            await asyncio.sleep(0)  # let the consumer run, as a real producer would
    await done
    rate = clock.rate(n)
    await task
    return rate


def config(**overrides: Any) -> BatchConfig:
    base: dict[str, Any] = {
        "max_size": MAX_SIZE,
        "max_wait": 1.0,
        "max_pending": 100_000,
        "max_concurrent_batches": 4,
    }
    base.update(overrides)
    return BatchConfig(**base)


async def nowait_rate(n: int, collector: object | None = None) -> Rate:
    processor = BatchProcessor(config(), noop, collector)
    await processor.start()
    clock = Clock()
    add = processor.add_message_nowait
    for i in range(n):
        add(i)
        if i % MAX_SIZE == MAX_SIZE - 1:
            await asyncio.sleep(0)
    await processor.flush()
    rate = clock.rate(n)
    await processor.stop()
    assert (await processor.get_stats())["processed"] == n
    return rate


async def await_rate(n: int) -> Rate:
    processor = BatchProcessor(config(), noop)
    await processor.start()
    clock = Clock()
    add = processor.add_message
    for i in range(n):
        await add(i)
        if i % MAX_SIZE == MAX_SIZE - 1:
            await asyncio.sleep(0)
    await processor.flush()
    rate = clock.rate(n)
    await processor.stop()
    assert (await processor.get_stats())["processed"] == n
    return rate


async def callers(callers: int, per_caller: int, call: Callable[[int], Awaitable[Any]]) -> Rate:
    async def one(base: int) -> None:
        for i in range(per_caller):
            value = base + i
            assert await call(value) == value * 2

    clock = Clock()
    await asyncio.gather(*(one(c * per_caller) for c in range(callers)))
    return clock.rate(callers * per_caller)


async def submit_rate(n_callers: int, per_caller: int, *, nowait: bool = False) -> Rate:
    async def double(batch: Batch[int]) -> list[int]:
        return [x * 2 for x in batch]

    async with BatchProcessor(config(max_wait=0.001), double) as processor:
        call = processor.submit_nowait if nowait else processor.submit
        return await callers(n_callers, per_caller, call)


async def dataloader_rate(n_callers: int, per_caller: int) -> Rate:
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


class Rounds:
    """Rates of several runs over rounds in which the runs take turns.

    ``best`` is each run's best rate; ``ratio`` is the median over rounds of a run's rate
    divided by the baseline's rate in the same round, so noise that spans a round cancels.
    Index 0 is wall clock, 1 is CPU.
    """

    def __init__(self, rates: dict[str, list[Rate]]) -> None:
        self.rates = rates

    def best(self, name: str, which: int = 0) -> float:
        return max(rate[which] for rate in self.rates[name])

    def ratio(self, name: str, baseline: str, which: int = 0) -> float:
        pairs = zip(self.rates[name], self.rates[baseline], strict=True)
        return statistics.median(run[which] / base[which] for run, base in pairs)

    def line(self, label: str, name: str, baseline: str | None, target: str) -> str:
        wall, cpu = self.best(name), self.best(name, 1)
        if baseline is None:
            return f"  {label:<36}: {wall:>11,.0f} msg/s  {'(baseline)':>7}  cpu {cpu:>11,.0f}"
        return (
            f"  {label:<36}: {wall:>11,.0f} msg/s  {self.ratio(name, baseline):5.2f}x  "
            f"cpu {cpu:>11,.0f} {self.ratio(name, baseline, 1):5.2f}x  {target}"
        )


async def rounds_of(rounds: int, **runs: Callable[[], Awaitable[Rate]]) -> Rounds:
    """Run every run once per round, in turn, for ``rounds`` rounds."""
    rates: dict[str, list[Rate]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            gc.collect()
            rates[name].append(await run())
    return Rounds(rates)


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


async def main(quick: bool, plot: bool = False) -> None:
    n = 200_000 if quick else 1_000_000
    rounds = 3 if quick else 5
    print(
        f"batchpunk core benchmark: {n:,} messages, max_size {MAX_SIZE}, {rounds} rounds; "
        "msg/s wall clock (best round), ratio = median of same-round ratios; CPU beside"
    )
    print(f"  before: {load()}")
    runs: dict[str, Callable[[], Awaitable[Rate]]] = {
        "queue": lambda: queue_baseline(n),
        "nowait": lambda: nowait_rate(n),
        "waited": lambda: await_rate(n),
    }
    try:
        from prometheus_client import CollectorRegistry

        from batchpunk.metrics import PrometheusMetrics

        runs["metered"] = lambda: nowait_rate(n, PrometheusMetrics(registry=CollectorRegistry()))
    except ImportError:
        pass
    rate = await rounds_of(rounds, **runs)
    bars = [
        ("asyncio.Queue, drain max_size per get", rate.best("queue"), "baseline", True),
        ("add_message_nowait", rate.best("nowait"), f"{rate.ratio('nowait', 'queue'):.2f}x", False),
        ("await add_message", rate.best("waited"), f"{rate.ratio('waited', 'queue'):.2f}x", False),
    ]
    print(rate.line("asyncio.Queue, drain max_size per get", "queue", None, ""))
    print(rate.line("add_message_nowait", "nowait", "queue", "(target >= 2.0x)"))
    print(rate.line("await add_message", "waited", "queue", "(target >= 1.3x)"))
    if "metered" in rate.rates:
        cost = 1 - rate.ratio("metered", "nowait")
        print(
            f"  {'nowait + PrometheusMetrics':<36}: {rate.best('metered'):>11,.0f} msg/s  "
            f"cost {100 * cost:5.1f}% of nowait  (target < 15%)"
        )
    n_callers, per_caller = 1000, (20 if quick else 100)
    rate = await rounds_of(
        rounds,
        loader=lambda: dataloader_rate(n_callers, per_caller),
        submit=lambda: submit_rate(n_callers, per_caller),
        submit_nowait=lambda: submit_rate(n_callers, per_caller, nowait=True),
    )
    bars += [
        ("aiodataloader load(), 1000 callers", rate.best("loader"), "baseline", True),
        (
            "submit(), 1000 callers",
            rate.best("submit"),
            f"{rate.ratio('submit', 'loader'):.2f}x",
            False,
        ),
    ]
    print(rate.line("aiodataloader load(), 1000 callers", "loader", None, ""))
    print(rate.line("submit(), 1000 callers", "submit", "loader", "(target >= 1.1x)"))
    print(rate.line("submit_nowait(), 1000 callers", "submit_nowait", "loader", "(as load())"))
    late = sorted(await lateness(40 if quick else 100))
    p50 = statistics.median(late) * 1000
    p99 = late[min(len(late) - 1, int(len(late) * 0.99))] * 1000
    print(
        f"  time trigger lateness, max_wait 50 ms: p50 {p50:.2f} ms  p99 {p99:.2f} ms  "
        "(target p99 <= 5 ms)"
    )
    per = await bytes_per_pending(1_000_000)
    print(f"  bookkeeping at 1,000,000 pending: {per:.1f} bytes/message  (target <= 100)")
    print(f"  after: {load()}")
    if plot:
        try:
            from bench._plot import bar_chart
        except ImportError:  # run as a script: bench/ itself is on sys.path
            from _plot import bar_chart  # type: ignore[no-redef]

        path = bar_chart(
            "core",
            "batchpunk against the loops people write by hand",
            bars,
            unit="messages per second, wall clock (best round; ratio = median same-round ratio)",
            note=f"python bench/core.py; {n:,} messages, no-op async handler, max_size {MAX_SIZE}",
        )
        print(f"  plot: {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages and rounds")
    parser.add_argument("--plot", action="store_true", help="also write docs/img/core.png")
    args = parser.parse_args()
    asyncio.run(main(args.quick, args.plot))
