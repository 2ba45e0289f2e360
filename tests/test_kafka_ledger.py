"""The Kafka source's offset ledger: a committed offset never passes an unfinished message.

A property test drives ``_Ledger`` the way KafkaSource does (fetch in order, hand out batches,
finish them in any order, rebalance: drop what is buffered, commit, start a new ledger at the
committed offset) and checks every commit against the set of messages actually finished.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from batchpunk.connectors.kafka import _Ledger


def _commit(ledger: _Ledger, finished: set[int], gaps: set[int], committed: int) -> int:
    position = ledger.committable()
    if position is None:
        return committed
    unfinished = [o for o in range(position) if o not in finished and o not in gaps]
    assert not unfinished, f"commit {position} passes unfinished offsets {unfinished[:10]}"
    return max(committed, position)


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=300),
    gap_ratio=st.floats(min_value=0.0, max_value=0.3),
    seed=st.integers(min_value=0, max_value=2**32),
    steps=st.lists(
        st.sampled_from(["fetch", "hand", "finish", "finish", "commit", "rebalance"]),
        min_size=1,
        max_size=120,
    ),
)
def test_a_committed_offset_never_passes_an_unfinished_message(
    n: int, gap_ratio: float, seed: int, steps: list[str]
) -> None:
    """Random fetches, hand-outs, completion orders and rebalances: every commit covers only
    finished (or compacted-away) offsets, and once all is finished the commit reaches the end."""
    rng = random.Random(seed)
    gaps = {o for o in range(n) if rng.random() < gap_ratio}  # offsets compaction removed
    finished: set[int] = set()  # processed by any generation: may be committed past
    committed = 0
    ledger = _Ledger(("t", 0))
    position = 0  # where the consumer fetches next
    buffered: list[int] = []  # fetched, not handed out
    running: list[tuple[_Ledger, list[int]]] = []  # batches handed out, unfinished

    def fetch() -> None:
        nonlocal position
        taken = 0
        while position < n and taken < rng.randint(1, 40):
            if position not in gaps:
                ledger.deliver(position)
                buffered.append(position)
                taken += 1
            position += 1

    for step in steps:
        if step == "fetch":
            fetch()
        elif step == "hand" and buffered:
            size = rng.randint(1, len(buffered))
            batch = buffered[:size]
            del buffered[:size]
            rng.shuffle(batch)  # lanes and bisection reorder messages within and across batches
            running.append((ledger, batch))
        elif step == "finish" and running:
            owner, batch = running.pop(rng.randrange(len(running)))
            for offset in batch:
                finished.add(offset)
                if owner.alive:  # acks for a released partition are ignored
                    owner.finish(offset)
        elif step == "commit":
            committed = _commit(ledger, finished, gaps, committed)
        elif step == "rebalance":
            # KafkaSource._revoked: drop the buffer, let some running batches finish (the rest
            # are abandoned at the deadline), commit, release; the next owner starts there.
            if buffered:
                ledger.forget_from(min(buffered))
                buffered.clear()
            for owner, batch in list(running):
                if rng.random() < 0.5:
                    running.remove((owner, batch))
                    for offset in batch:
                        finished.add(offset)
                        if owner.alive:
                            owner.finish(offset)
            committed = _commit(ledger, finished, gaps, committed)
            ledger.alive = False
            ledger = _Ledger(("t", 0))
            position = committed
    # Finish everything: the next owner re-reads from the commit, and the commit reaches the end.
    for owner, batch in running:
        for offset in batch:
            finished.add(offset)
            if owner.alive:
                owner.finish(offset)
    for offset in buffered:
        ledger.finish(offset)
        finished.add(offset)
    buffered.clear()
    while position < n:
        fetch()
        for offset in buffered:
            ledger.finish(offset)
            finished.add(offset)
        buffered.clear()
    committed = _commit(ledger, finished, gaps, committed)
    last = max((o for o in range(n) if o not in gaps), default=None)
    if last is not None and ledger.end is not None:
        assert committed == last + 1


def test_the_ledger_commits_the_first_unfinished_offset_whatever_the_finish_order() -> None:
    """Batches finishing out of order hold the commit at the oldest unfinished offset."""
    ledger = _Ledger(("t", 0))
    for offset in range(10):
        ledger.deliver(offset)
    for offset in (5, 6, 7, 8, 9):
        ledger.finish(offset)
    assert ledger.committable() == 0
    for offset in (0, 1, 2):
        ledger.finish(offset)
    assert ledger.committable() == 3
    ledger.finish(4)
    ledger.finish(3)
    assert ledger.committable() == 10


def test_the_ledger_refuses_an_offset_not_above_the_last_one_delivered() -> None:
    """An offset delivered again into the same ledger is refused (not handed out), even when
    ``end`` was set back while offsets were out (as the position-store assignment once did):
    the queue of unfinished offsets stays increasing, so finishing every delivered offset, in
    any order, empties it."""
    ledger = _Ledger(("t", 0))
    assert all(ledger.deliver(offset) for offset in range(10))
    assert not ledger.deliver(5)
    assert not ledger.deliver(9)
    for offset in reversed(range(10)):
        ledger.finish(offset)
    assert ledger.committable() == 10
    assert not ledger.deliver(9)  # all finished: still only above the last delivered
    assert ledger.deliver(12)
    ledger.end = 0  # set back while 12 is out
    assert not ledger.deliver(11)
    assert not ledger.deliver(12)
    assert list(ledger.outstanding) == [12]
    ledger.finish(12)
    assert not ledger.outstanding
