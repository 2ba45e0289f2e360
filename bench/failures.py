"""Cost of isolating poison messages: batchpunk's bisection against the original design's policy.

Run: python bench/failures.py [--quick]

Both policies run here on the same batches of 1,024 messages with k poison messages at random
positions, the same handler and the same retry settings (max_retries=3, no jitter). The original
policy retried every split half with the full backoff; batchpunk retries the whole batch, then
bisects with no backoff. Printed: processor calls, backoff seconds slept, and wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

from batchpunk import BatchConfig, BatchProcessor

SIZE = 1024
MAX_RETRIES = 3


class Poisoned(Exception):
    """The batch holds a poison message."""


def handler_for(poison: set[int], calls: list[int]) -> Any:
    async def handle(batch: list[int]) -> None:
        calls[0] += 1
        if not poison.isdisjoint(batch):
            raise Poisoned(f"{len(poison.intersection(batch))} poison message(s)")

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


async def batchpunk_policy(poison: set[int], retry_delay: float) -> tuple[int, float, list[int]]:
    calls = [0]
    handle = handler_for(poison, calls)
    config = BatchConfig(
        max_size=SIZE,
        max_wait=60.0,
        max_retries=MAX_RETRIES,
        retry_delay=retry_delay,
        retry_jitter=False,
        retry_max_delay=3600.0,
        max_pending=SIZE,
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


async def main(quick: bool) -> None:
    retry_delay = 0.001 if quick else 0.01
    print(
        f"isolating k poison messages in a batch of {SIZE}; max_retries={MAX_RETRIES}, "
        f"retry_delay={retry_delay}s, no jitter (sleep scales linearly with retry_delay: "
        f"at 1 s multiply the asleep column by {1 / retry_delay:.0f})"
    )
    for k in (1, 4, 16):
        await run(k, retry_delay, seed=k)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a shorter retry_delay")
    asyncio.run(main(parser.parse_args().quick))
