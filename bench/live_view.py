"""What watching costs: engine throughput with and without the live view and Prometheus metrics.

Run: python bench/live_view.py [--quick]

The workload is bench/core.py's add_message_nowait run: a no-op async handler, max_size 1000, a
producer yielding to the loop once per 1,000 messages. Each configuration runs once per round, in
a shuffled order, and is compared with the baseline of its own round (so a busy neighbour on the
machine hurts both sides of a comparison alike); the median ratio over the rounds is the cost.

Targets (issue 5): the live view (rich, 4 frames per second) costs under 5 % of throughput;
full metrics (a PrometheusMetrics collector) cost under 15 %.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import statistics
import time
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Any

from prometheus_client import CollectorRegistry
from rich.console import Console

from batchpunk import Batch, BatchConfig, BatchProcessor
from batchpunk.metrics import PrometheusMetrics
from batchpunk.metrics.live import LiveView

MAX_SIZE = 1000


async def noop(batch: Batch[Any]) -> None:
    return None


def terminal() -> Console:
    """A console that renders every frame as on a terminal, into /dev/null."""
    return Console(file=open(os.devnull, "w"), force_terminal=True, width=120)


def plain_stream() -> io.StringIO:
    return io.StringIO()


async def run(seconds: float, *, view: str | None, prometheus: bool) -> tuple[float, float, int]:
    """Messages per wall second and per CPU second over about ``seconds``, and frames drawn.

    Runs last a fixed time rather than a fixed count so that the view draws its frames at its
    own rate whatever the engine's speed. The process is single-threaded (the view renders on
    the loop), so messages per CPU second count every cost of watching while ignoring the time
    other processes take the CPU away: on a shared machine it is the steadier figure.
    """
    collector = PrometheusMetrics(CollectorRegistry()) if prometheus else None
    config = BatchConfig(max_size=MAX_SIZE, max_wait=1.0, max_pending=100_000)
    processor = BatchProcessor(config, noop, collector)
    await processor.start()
    live: LiveView | None = None
    watcher: AbstractAsyncContextManager[Any]
    if view == "rich":
        live = LiveView(processor.get_stats, console=terminal(), refresh_per_second=4)
        watcher = live
    elif view == "plain":
        live = LiveView(processor.get_stats, stream=plain_stream(), plain_every=1.0)
        watcher = live
    else:
        watcher = nullcontext()
    async with watcher:
        if view == "rich":
            assert live is not None
            assert live.rich, "the view fell back to plain lines"
        start = time.perf_counter()
        cpu_start = time.process_time()
        deadline = start + seconds
        add = processor.add_message_nowait
        n = 0
        while time.perf_counter() < deadline:
            for i in range(n, n + MAX_SIZE):
                add(i)
            n += MAX_SIZE
            await asyncio.sleep(0)
        await processor.flush()
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
    await processor.stop()
    stats = await processor.get_stats()
    assert stats["processed"] == n, stats["processed"]
    return n / elapsed, n / cpu, live.frames if live is not None else 0


async def frame_cost(frames: int) -> tuple[float, float]:
    """Mean seconds of one rich frame and of one get_stats() on a processor holding messages."""
    processor = BatchProcessor(BatchConfig(max_size=MAX_SIZE, max_wait=60.0), noop)
    await processor.start()
    for i in range(5 * MAX_SIZE + 123):
        processor.add_message_nowait(i, key=i % 7, priority=i % 2)
    await asyncio.sleep(0.05)
    view = LiveView(processor.get_stats, console=terminal(), refresh_per_second=4)
    async with view:
        start = time.perf_counter()
        for _ in range(frames):
            await view._frame()
        per_frame = (time.perf_counter() - start) / frames
    start = time.perf_counter()
    for _ in range(frames):
        await processor.get_stats()
    per_stats = (time.perf_counter() - start) / frames
    await processor.stop()
    return per_frame, per_stats


CASES: list[tuple[str, str | None, bool]] = [
    ("baseline (no view, no collector)", None, False),
    ("live view, rich, 4 frames/s", "rich", False),
    ("live view, plain lines, 1/s", "plain", False),
    ("PrometheusMetrics collector", None, True),
    ("PrometheusMetrics + rich view", "rich", True),
]


async def main(quick: bool) -> None:
    seconds = 0.75 if quick else 1.5
    rounds = 3 if quick else 7
    print(
        f"live view cost: {seconds} s of producing per run, {rounds} rounds in shuffled order, "
        f"max_size {MAX_SIZE}"
    )
    wall: dict[str, list[float]] = {label: [] for label, _, _ in CASES}
    cpu: dict[str, list[float]] = {label: [] for label, _, _ in CASES}
    frames: dict[str, list[int]] = {label: [] for label, _, _ in CASES}
    # Each round runs every case once, in a fresh random order, and each case is compared with
    # the baseline of its own round: neighbours' load drifts slowly, so the ratio within a
    # round is steadier than the ratio of overall medians.
    ratios: dict[str, list[float]] = {label: [] for label, _, _ in CASES}
    shuffle = random.Random(5).shuffle
    await run(0.2, view=None, prometheus=False)  # warm-up
    for _ in range(rounds):
        order = list(CASES)
        shuffle(order)
        this_round: dict[str, float] = {}
        for label, view, prometheus in order:
            wall_rate, cpu_rate, drawn = await run(seconds, view=view, prometheus=prometheus)
            wall[label].append(wall_rate)
            cpu[label].append(cpu_rate)
            frames[label].append(drawn)
            this_round[label] = cpu_rate
        for label, _, _ in CASES:
            ratios[label].append(this_round[label] / this_round[CASES[0][0]])
    base_wall = statistics.median(wall[CASES[0][0]])
    print(
        f"{'configuration':34} {'msg/s (wall)':>13} {'msg/CPU-s':>12} {'cost':>7} "
        f"{'range':>16} {'frames':>6}"
    )
    costs: dict[str, float] = {}
    for label, _, _ in CASES:
        costs[label] = 1 - statistics.median(ratios[label])
        low, high = 1 - max(ratios[label]), 1 - min(ratios[label])
        print(
            f"{label:34} {statistics.median(wall[label]):>13,.0f} "
            f"{statistics.median(cpu[label]):>12,.0f} {costs[label]:>+7.1%} "
            f"{f'{low:+.1%}..{high:+.1%}':>16} {statistics.median(frames[label]):>6.0f}"
        )
    print(
        f"(medians over rounds; cost = 1 - msg/CPU-s relative to the same round's baseline; "
        f"baseline wall median {base_wall:,.0f} msg/s)"
    )
    per_frame, per_stats = await frame_cost(50 if quick else 200)
    print(
        f"one rich frame (get_stats + render + write): {per_frame * 1e3:.2f} ms; "
        f"get_stats() alone: {per_stats * 1e6:.0f} us; "
        f"at 4 frames/s the view keeps the loop busy {4 * per_frame:.2%} of the time"
    )
    view_cost, prom_cost = costs[CASES[1][0]], costs[CASES[3][0]]
    verdict = "met" if view_cost < 0.05 else "MISSED"
    print(f"target: live view cost < 5 %: {verdict} ({view_cost:+.1%})")
    verdict = "met" if prom_cost < 0.15 else "MISSED"
    print(f"target: PrometheusMetrics cost < 15 %: {verdict} ({prom_cost:+.1%})")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (about 10 s)")
    args = parser.parse_args()
    asyncio.run(main(args.quick))


if __name__ == "__main__":
    cli()
