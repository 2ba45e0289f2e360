"""Cost of isolating poison messages: batchpunk's bisection against the original design's policy.

Run: python bench/failures.py [--quick]

Both policies run here on the same batches of 1,024 messages with k poison messages at random
positions, the same handler and the same retry settings (max_retries=3, no jitter). The original
policy retried every split half with the full backoff; batchpunk retries the whole batch, then
bisects with no backoff. Printed: processor calls, backoff seconds slept, and wall time.

A second table: the same isolation when the poison message raises a connection-looking error
(ConnectionResetError), which the outage rule must still isolate. A third: a downstream that
refuses every connection for a while (an outage) under batchpunk's outage policy and under the
policy before issue 13 (``unavailable_on=()``: nothing is an outage, so the outage is bisected).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import time
from typing import Any

from batchpunk import BatchConfig, BatchProcessor

SIZE = 1024
MAX_RETRIES = 3
#: Whether this engine tells outages from poison (issue 13); the bench runs on older ones too.
OUTAGE_POLICY = "unavailable_on" in BatchConfig.field_names()


class Poisoned(Exception):
    """The batch holds a poison message."""


def handler_for(poison: set[int], calls: list[int], error: type = Poisoned) -> Any:
    async def handle(batch: list[int]) -> None:
        calls[0] += 1
        if not poison.isdisjoint(batch):
            raise error(f"{len(poison.intersection(batch))} poison message(s)")

    return handle


async def original_policy(
    batch: list[int], handle: Any, retry_delay: float, slept: list[float], dead: list[int]
) -> None:
    """The original design: full retries with backoff at every split level."""
    for attempt in range(MAX_RETRIES + 1):
        try:
            await handle(batch)
            return
        except Poisoned:
            if attempt < MAX_RETRIES:
                delay = retry_delay * 2**attempt
                slept[0] += delay
                await asyncio.sleep(delay)
    if len(batch) == 1:
        dead.extend(batch)
        return
    mid = len(batch) // 2
    await original_policy(batch[:mid], handle, retry_delay, slept, dead)
    await original_policy(batch[mid:], handle, retry_delay, slept, dead)


async def batchpunk_policy(
    poison: set[int], retry_delay: float, error: type = Poisoned
) -> tuple[int, float, list[int]]:
    calls = [0]
    handle = handler_for(poison, calls, error)
    config = BatchConfig(
        max_size=SIZE,
        max_wait=60.0,
        max_retries=MAX_RETRIES,
        retry_delay=retry_delay,
        retry_jitter=False,
        retry_max_delay=3600.0,
        max_pending=SIZE,
        # Bounds the case where every part holds a connection-looking poison message.
        **({"delivery_timeout": 10.0} if OUTAGE_POLICY else {}),
    )
    async with BatchProcessor(config, handle) as processor:
        for i in range(SIZE):
            processor.add_message_nowait(i)
        await processor.flush()
        stats = await processor.get_stats()
        dead = sorted(letter.message for letter in processor.dead_letters)
    # Without jitter, batchpunk's n-th retry sleeps retry_delay * 2**(n-1); after the split,
    # no half is retried (split_retries=0), so every retry is one of the whole batch.
    slept = sum(retry_delay * 2**n for n in range(stats["retries"]))
    return calls[0], slept, dead


async def run(k: int, retry_delay: float, seed: int) -> None:
    poison = set(random.Random(seed).sample(range(SIZE), k))
    start = time.perf_counter()
    calls, slept, dead = await batchpunk_policy(poison, retry_delay)
    ours = time.perf_counter() - start
    assert dead == sorted(poison), "batchpunk must dead-letter exactly the poison messages"

    base_calls = [0]
    base_slept = [0.0]
    base_dead: list[int] = []
    start = time.perf_counter()
    await original_policy(
        list(range(SIZE)), handler_for(poison, base_calls), retry_delay, base_slept, base_dead
    )
    theirs = time.perf_counter() - start
    assert sorted(base_dead) == sorted(poison)
    print(
        f"  k={k:<3} batchpunk: {calls:>5} calls {slept:>7.2f} s asleep {ours:>7.2f} s wall | "
        f"original: {base_calls[0]:>5} calls {base_slept[0]:>7.2f} s asleep {theirs:>7.2f} s wall"
        f" | calls {base_calls[0] / calls:5.1f}x fewer"
    )


async def run_connection_looking(k: int, retry_delay: float, seed: int) -> None:
    poison = set(random.Random(seed).sample(range(SIZE), k))
    start = time.perf_counter()
    calls, _, dead = await batchpunk_policy(poison, retry_delay, ConnectionResetError)
    wall = time.perf_counter() - start
    print(
        f"  k={k:<3} batchpunk: {calls:>5} calls {wall:>7.2f} s wall, {len(dead)} dead letter(s), "
        f"{'exactly the poison' if dead == sorted(poison) else 'NOT only the poison'}"
    )


async def outage(seconds: float, old_policy: bool, breaker: bool) -> dict[str, Any]:
    """10,000 messages; the downstream refuses every call for ``seconds``, then answers."""
    state = {"down_until": 0.0, "calls": 0, "refused": 0}

    async def sink(batch: list[int]) -> None:
        state["calls"] += 1
        await asyncio.sleep(0.001)  # a round trip
        if time.monotonic() < state["down_until"]:
            state["refused"] += 1
            raise ConnectionRefusedError(111, "Connection refused")

    options: dict[str, Any] = {}
    if OUTAGE_POLICY:  # absent before issue 13, where the bench then measures that engine
        options["unavailable_on"] = () if old_policy else None
    config = BatchConfig(
        max_size=500,
        max_wait=0.05,
        max_concurrent_batches=4,
        max_retries=MAX_RETRIES,
        retry_delay=0.05,
        retry_max_delay=0.5,
        circuit_breaker_threshold=5 if breaker else None,
        circuit_breaker_cooldown=0.25,
        **options,
    )
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    state["down_until"] = time.monotonic() + seconds
    async with BatchProcessor(config, sink) as processor:
        for i in range(10_000):
            await processor.add_message(i)
        await processor.flush()
        stats = await processor.get_stats()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "calls": state["calls"],
        "refused": state["refused"],
        "dead": stats["dead_lettered"],
        "processed": stats["processed"],
        "wall": time.perf_counter() - start,
        "cpu": after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime,
        "outages": stats.get("downstream", {}).get("outages"),
    }


async def main(quick: bool) -> None:
    retry_delay = 0.001 if quick else 0.01
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"isolating k poison messages in a batch of {SIZE}; max_retries={MAX_RETRIES}, "
        f"retry_delay={retry_delay}s, no jitter (sleep scales linearly with retry_delay: "
        f"at 1 s multiply the asleep column by {1 / retry_delay:.0f})"
    )
    for k in (1, 4, 16):
        await run(k, retry_delay, seed=k)
    print("the same, the poison raising ConnectionResetError (looks like an outage, is not one)")
    for k in (1, 4, 16):
        await run_connection_looking(k, retry_delay, seed=k)
    seconds = 1.0 if quick else 3.0
    print(
        f"an outage: 10,000 messages, batches of 500, 4 at once, every call refused for "
        f"{seconds:.0f} s; max_retries={MAX_RETRIES}, retry_delay=0.05 s, retry_max_delay=0.5 s"
    )
    policies = (
        (
            ("old policy (unavailable_on=())", True, False),
            ("batchpunk", False, False),
            ("batchpunk, circuit 5 / 0.25 s", False, True),
        )
        if OUTAGE_POLICY
        else (("batchpunk before issue 13", True, False),)
    )
    for name, old, breaker in policies:
        r = await outage(seconds, old, breaker)
        print(
            f"  {name:<31}: {r['calls']:>6} calls ({r['refused']:>6} refused)  "
            f"{r['processed']:>6} processed  {r['dead']:>6} dead letters  "
            f"{r['wall']:5.2f} s wall  {r['cpu']:5.2f} s CPU"
        )


if __name__ == "__main__":
    import logging

    logging.getLogger("batchpunk").setLevel(logging.ERROR)  # one line per dead letter otherwise
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a shorter retry_delay")
    asyncio.run(main(parser.parse_args().quick))
