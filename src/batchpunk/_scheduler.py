"""Scheduling: cut batches wait here for one of the concurrency slots.

Higher priority first, FIFO within a priority. With ``preserve_order``, each key's batches form
a queue of their own and only its head may wait for a slot, so batches of one key never run at
once and finish in cut order.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from batchpunk._jobs import Job

__all__ = ["Scheduler"]


class Scheduler:
    """Ready batches in priority order, handed to ``start`` while slots are free."""

    def __init__(self, slots: int, preserve_order: bool, start: Callable[[Job], None]) -> None:
        self.slots = slots
        self.preserve_order = preserve_order
        self._start = start
        self.running = 0
        self._ready: list[tuple[int, int, Job]] = []
        # preserve_order only: every unfinished batch of a key, in cut order; the head is the
        # one in the ready heap or running.
        self._by_key: dict[Any, deque[Job]] = {}

    def push(self, job: Job) -> None:
        """Queue a freshly cut batch and start it if a slot is free."""
        if self.preserve_order:
            key = job.batch.key
            queue = self._by_key.get(key)
            if queue is not None:
                queue.append(job)  # waits behind this key's earlier batches
                return
            self._by_key[key] = deque([job])
        heapq.heappush(self._ready, (-job.batch.priority, job.seq, job))
        self._dispatch()

    def release(self, job: Job) -> None:
        """A running batch finished: free its slot and start what may run next."""
        self.running -= 1
        job.running = False
        if self.preserve_order:
            self._advance(job.batch.key)
        self._dispatch()

    def _advance(self, key: Any) -> None:
        queue = self._by_key[key]
        queue.popleft()
        if queue:
            head = queue[0]
            heapq.heappush(self._ready, (-head.batch.priority, head.seq, head))
        else:
            del self._by_key[key]

    def _dispatch(self) -> None:
        while self.running < self.slots and self._ready:
            job = heapq.heappop(self._ready)[2]
            self.running += 1
            job.running = True
            self._start(job)

    def waiting(self) -> Iterator[Job]:
        """Every batch not yet running."""
        if self.preserve_order:
            for queue in list(self._by_key.values()):
                yield from (job for job in queue if not job.running)
        else:
            yield from (entry[2] for entry in list(self._ready))

    def __len__(self) -> int:
        """Batches waiting for a slot."""
        return sum(1 for _ in self.waiting())

    def remove(self, job: Job) -> None:
        """Take a waiting batch out: its messages were dropped or dead-lettered."""
        for i, entry in enumerate(self._ready):
            if entry[2] is job:
                self._ready[i] = self._ready[-1]
                self._ready.pop()
                heapq.heapify(self._ready)
                break
        if self.preserve_order:
            queue = self._by_key[job.batch.key]
            if queue[0] is job:
                self._advance(job.batch.key)
                self._dispatch()
            else:
                queue.remove(job)
