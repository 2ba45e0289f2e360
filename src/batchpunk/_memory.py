"""How ``batchpunk run`` keeps the cyclic garbage collector off the message path.

A pipeline holds up to ``max_pending`` messages, each an Envelope and its payload, for a few
milliseconds to seconds: long enough to survive a young collection and be scanned again and
again in the older generations, short enough to die soon after. With CPython's default
thresholds (700 allocations per young collection) the collector spent a fifth of the process's
CPU on them (issue 12's profile). Two measures, measured with bench/brokers.py (figures in
docs/brokers.md):

- fewer objects: one Envelope per message (``receipt`` and ``headers`` usually an int or str
  and None), so there is less to scan in the first place;
- ``gc.freeze()`` once start-up is over (imports, connections, the engine): everything alive
  then moves to the permanent generation and is never scanned again; and a young-generation
  threshold of ``YOUNG_THRESHOLD`` allocations, so that young collections run about a hundred
  times less often and find most envelopes of a batch already gone.

Reference cycles are still collected (the collector keeps running, less often); memory held
by cycles can grow by at most about ``YOUNG_THRESHOLD`` objects between collections.

No full collection runs before the freeze. In a process that has imported batchpunk, asyncpg,
redis, aio-pika and nats-py (about 62,000 tracked objects) it took 27.6 to 40.6 ms of CPU (three
processes) and found 46 unreachable objects: start-up leaves almost no garbage, so freezing
those few costs a few kilobytes once, where the collection cost every start (and every run of
bench/brokers.py) the CPU of some 4,000 messages.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["YOUNG_THRESHOLD", "tune_collector", "tuned_collector"]

#: Allocations (net) between two young collections while a pipeline runs (CPython's is 700).
YOUNG_THRESHOLD = 50_000


def tune_collector() -> tuple[int, int, int]:
    """Freeze what start-up allocated and raise the young threshold; returns the old ones."""
    old = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, old[1], old[2])
    return old


@contextlib.contextmanager
def tuned_collector() -> Iterator[None]:
    """``tune_collector()`` for the duration of the block, then the old thresholds again."""
    old = tune_collector()
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()
