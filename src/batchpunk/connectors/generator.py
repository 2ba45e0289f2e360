"""GeneratorSource: synthetic events for demos, benchmarks and tests, with no server at all.

Deterministic for a given seed, so a demo or a test knows in advance exactly which events are
malformed or poisoned and can check that each one ends where it should.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

from batchpunk.envelope import Envelope

__all__ = ["GeneratorSource"]

#: Events produced between two yields to the event loop, so a fast source never starves timers.
_YIELD_EVERY = 512


class GeneratorSource:
    """Yields ``count`` events ``{"id", "user", "amount", "kind"}`` as fast as asked.

    Choose it to try a pipeline or measure a sink without a broker. ``malformed`` events arrive
    as undecodable text (the pipeline dead-letters them as "malformed"); ``poison`` events lack
    the ``amount`` field, so a sink with an ``amount`` column refuses exactly those. Both sets of
    ids are known up front (``malformed_ids``, ``poison_ids``).

    Args:
        count: events to produce before iteration ends; None for an endless stream.
        keys: spread events over this many lane keys ("k0", "k1", ...); 0 for no key.
        priorities: spread events over priorities 0 .. priorities-1.
        malformed: how many events are undecodable.
        poison: how many events lack ``amount``.
        seed: makes the malformed and poison positions reproducible.
        rate: events per second; None for as fast as the pipeline takes them.
        start: id of the first event (lets several generators share one table).

    Acknowledgements are no-ops: nothing is redelivered, by design.
    """

    def __init__(
        self,
        count: int | None = 100_000,
        *,
        keys: int = 0,
        priorities: int = 1,
        malformed: int = 0,
        poison: int = 0,
        seed: int = 0,
        rate: float | None = None,
        start: int = 0,
    ) -> None:
        if count is not None and (not isinstance(count, int) or count < 0):
            raise ValueError(f"count: expected an integer >= 0 or None, got {count!r}")
        for name, value, low in (
            ("keys", keys, 0),
            ("priorities", priorities, 1),
            ("malformed", malformed, 0),
            ("poison", poison, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
        if rate is not None and (not isinstance(rate, int | float) or rate <= 0):
            raise ValueError(f"rate: expected events per second > 0 or None, got {rate!r}")
        special = malformed + poison
        if special and (count is None or special > count):
            raise ValueError(
                f"malformed + poison: expected at most count ({count}) special events, "
                f"got {special}"
            )
        self.count = count
        self.keys = keys
        self.priorities = priorities
        self.seed = seed
        self.rate = rate
        self.start = start
        picked = random.Random(seed).sample(range(start, start + (count or 0)), special)
        #: ids of the events delivered as undecodable text.
        self.malformed_ids: frozenset[int] = frozenset(picked[:malformed])
        #: ids of the events that lack ``amount``.
        self.poison_ids: frozenset[int] = frozenset(picked[malformed:])
        #: events yielded so far.
        self.produced = 0
        self._closed = False

    def event(self, i: int) -> dict[str, Any]:
        """The well-formed event with id ``i`` (what a sink should store for it)."""
        event: dict[str, Any] = {
            "id": i,
            "user": f"user-{i % 1000}",
            "amount": (i * 7919) % 10_000 / 100,
            "kind": "poison" if i in self.poison_ids else "order",
        }
        if i in self.poison_ids:
            del event["amount"]
        return event

    def __aiter__(self) -> AsyncIterator[Envelope]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Envelope]:
        loop = asyncio.get_running_loop()
        began = loop.time()
        keys, priorities = self.keys, self.priorities
        malformed_ids = self.malformed_ids
        i = self.start
        end = None if self.count is None else self.start + self.count
        while not self._closed and (end is None or i < end):
            if i in malformed_ids:
                text = f'{{"id": {i}, "user": "user-{i % 1000}", "amount": '
                envelope = Envelope(
                    text,
                    headers={"id": i},
                    error=ValueError(f"event {i}: truncated JSON"),
                )
            else:
                envelope = Envelope(
                    self.event(i),
                    key=f"k{i % keys}" if keys else None,
                    priority=(i * 7) % priorities if priorities > 1 else 0,
                )
            self.produced += 1
            yield envelope
            i += 1
            if self.rate is not None:
                ahead = began + self.produced / self.rate - loop.time()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            if self.produced % _YIELD_EVERY == 0:
                await asyncio.sleep(0)

    async def close(self) -> None:
        """End iteration; safe to call twice."""
        self._closed = True

    def __repr__(self) -> str:
        return (
            f"GeneratorSource(count={self.count}, keys={self.keys}, "
            f"priorities={self.priorities}, produced={self.produced})"
        )
