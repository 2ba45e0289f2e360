"""Jobs and trackers: what a cut batch carries from the accumulator to its completion.

Every step of the engine after the cut (scheduler, execution, outbox, the processor's counts)
works on these types, so they live apart from the accumulator that creates them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from batchpunk.batch import Batch

__all__ = ["Job", "Tracker", "Trackers", "pick"]

#: A per-message completion handle: an asyncio.Future, or anything with the same three methods.
Tracker = Any
#: Trackers of a batch by index; sparse, so messages added without one cost nothing.
Trackers = dict[int, Tracker]


def pick(trackers: Trackers | None, indices: Iterable[int]) -> Trackers | None:
    """The trackers of the messages at ``indices``, renumbered from 0 in that order."""
    if not trackers:
        return None
    out = {new: trackers[old] for new, old in enumerate(indices) if old in trackers}
    return out or None


class Job:
    """A cut batch on its way through the scheduler and the execution, with its bookkeeping."""

    __slots__ = (
        "batch",
        "first_seen",
        "first_wall",
        "nbytes",
        "running",
        "seq",
        "times",
        "trackers",
    )

    def __init__(
        self,
        batch: Batch[Any],
        trackers: Trackers | None,
        times: list[float] | None,
        first_seen: float,
        first_wall: float,
        nbytes: int | None,
        seq: int,
    ) -> None:
        self.batch = batch
        self.trackers = trackers
        self.times = times
        self.first_seen = first_seen
        self.first_wall = first_wall
        self.nbytes = nbytes
        self.seq = seq
        self.running = False

    def __repr__(self) -> str:
        return f"Job(seq={self.seq}, {self.batch!r})"
