"""The embedded demo: a real pipeline with no server, checked end to end.

GeneratorSource (with a few malformed and poison events) -> a handler that sleeps a little per
batch and writes to SQLite -> JSONL dead letters. Afterwards the rows in the database and the
letters in the dead-letter file are counted, and they must add up to what was generated: the
demo proves the conservation promise instead of only printing numbers.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchpunk.config import BatchConfig
from batchpunk.connectors.generator import GeneratorSource
from batchpunk.connectors.sqlite import SqliteSink
from batchpunk.deadletter import DeadLetter
from batchpunk.pipeline import Pipeline

__all__ = ["DemoResult", "DemoSink", "demo_config", "read_letters", "run_demo"]

_ID = re.compile(r'"id":\s*(\d+)')

LiveFactory = Callable[[Callable[[], Any]], AbstractAsyncContextManager[Any]]


def demo_config() -> BatchConfig:
    """Batching for the demo: big batches, short waits, fast poison isolation."""
    return BatchConfig(
        max_size=1000,
        max_wait=0.1,
        max_concurrent_batches=4,
        max_retries=2,
        retry_delay=0.005,
        retry_max_delay=0.05,
        max_pending=20_000,
        drain_timeout=30.0,
    )


class DemoSink:
    """SqliteSink behind a handler that sleeps ``pause`` seconds per batch, like a remote call."""

    def __init__(self, sink: SqliteSink, pause: float = 0.002) -> None:
        self.sink = sink
        self.pause = pause
        self.batches = 0

    async def prepare(self, config: BatchConfig) -> None:
        await self.sink.prepare(config)

    async def write(self, batch: Sequence[Any]) -> None:
        self.batches += 1
        await asyncio.sleep(self.pause)
        await self.sink.write(batch)

    async def close(self) -> None:
        await self.sink.close()


@dataclass
class DemoResult:
    """What the demo generated, what ended where, and whether it adds up.

    Attributes:
        generated: events the source produced (all of them unless stopped early).
        expected_letters: ids of the malformed and poison events among them.
        rows: rows counted in the database afterwards.
        letters: dead letters read back from the file, by reason.
        letter_ids: event ids of those letters.
        returned: events read but given back unfinished (only after an early stop).
        written_twice: events both a row and a letter: a batch given back (stored as a
            "shutdown" letter) by a hard stop while its commit was under way, which then
            landed. At least once, not a loss.
        stats: the pipeline's final stats.
        db_path, dead_letter_path: where the results are, to inspect them.
        elapsed: seconds the run took.
    """

    generated: int
    expected_letters: frozenset[int]
    rows: int
    letters: dict[str, int]
    letter_ids: list[int]
    returned: int
    stats: dict[str, Any]
    db_path: Path
    dead_letter_path: Path
    elapsed: float
    stopped_early: bool = False
    aborted: bool = False
    written_twice: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def letter_count(self) -> int:
        return sum(self.letters.values())

    @property
    def accounted(self) -> int:
        """Generated events found in the database, the letters, or given back, once each."""
        return self.rows + self.letter_count + self.returned - self.written_twice

    @property
    def consistent(self) -> bool:
        """Every generated event is a row, a letter or given back; only the events of a batch
        caught by a hard stop may be in two places; the letters of failures are exactly those
        expected (all of them when the run was not stopped early)."""
        return not self.problems


async def read_letters(store: Any) -> list[DeadLetter]:
    """Every letter a store holds, oldest first."""
    reader: AsyncIterator[DeadLetter] = store.read()
    return [letter async for letter in reader]


def _letter_id(letter: DeadLetter) -> int | None:
    message = letter.message
    if isinstance(message, dict) and isinstance(message.get("id"), int):
        return int(message["id"])
    if isinstance(letter.headers.get("id"), int):
        return int(letter.headers["id"])
    found = _ID.search(str(message))
    return int(found.group(1)) if found else None


async def run_demo(
    events: int = 300_000,
    *,
    directory: Path | None = None,
    seed: int = 0,
    malformed: int = 5,
    poison: int = 12,
    live: LiveFactory | None = None,
    handle_signals: bool = True,
    metrics_collector: object | None = None,
    on_pipeline: Callable[[Pipeline], Any] | None = None,
) -> DemoResult:
    """Run the demo pipeline and check its results; files go to ``directory`` (or a temp dir)."""
    from batchpunk import deadletter

    folder = (
        Path(directory)
        if directory is not None
        else Path(tempfile.mkdtemp(prefix="batchpunk-demo-"))
    )
    folder.mkdir(parents=True, exist_ok=True)
    db_path = folder / "demo.db"
    letters_path = folder / "dead-letters.jsonl"
    for stale in (db_path, letters_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")):
        stale.unlink(missing_ok=True)
    source = GeneratorSource(
        events, keys=4, priorities=2, malformed=malformed, poison=poison, seed=seed
    )
    sink = DemoSink(
        SqliteSink(
            str(db_path),
            "events",
            ["id", "user", "amount", "kind"],
            idempotency_key="id",
            synchronous="NORMAL",
        )
    )
    dead_letter = deadletter.JsonlDeadLetters(str(letters_path))
    pipeline = Pipeline(
        source,
        sink,
        demo_config(),
        dead_letter=dead_letter,
        metrics_collector=metrics_collector,
    )
    if on_pipeline is not None:
        on_pipeline(pipeline)
    began = time.perf_counter()
    if live is not None:
        async with live(pipeline.get_stats):
            await pipeline.run(handle_signals=handle_signals)
    else:
        await pipeline.run(handle_signals=handle_signals)
    elapsed = time.perf_counter() - began
    stats = await pipeline.get_stats()
    stats["elapsed"] = elapsed

    with sqlite3.connect(db_path) as db:
        row_ids = [row[0] for row in db.execute("SELECT id FROM events")]
    rows = len(row_ids)
    store = deadletter.JsonlDeadLetters(str(letters_path))
    try:
        letters = await read_letters(store)
    finally:
        await store.close()
    by_reason: dict[str, int] = {}
    for letter in letters:
        by_reason[letter.reason] = by_reason.get(letter.reason, 0) + 1
    identified = [(_letter_id(letter), letter) for letter in letters]
    ids = [i for i, _ in identified if i is not None]
    generated = source.produced
    expected = frozenset(
        i for i in source.malformed_ids | source.poison_ids if i < source.start + generated
    )
    returned = stats["pipeline"]["nacked"]
    stopped = pipeline.stop_requested
    result = DemoResult(
        generated=generated,
        expected_letters=expected,
        rows=rows,
        letters=by_reason,
        letter_ids=sorted(ids),
        returned=returned,
        stats=stats,
        db_path=db_path,
        dead_letter_path=letters_path,
        elapsed=elapsed,
        stopped_early=stopped,
        aborted=pipeline.aborted,
    )
    # Checked by event ids, not by adding counts: after a hard stop, a batch given back while
    # its commit was under way is both rows and "shutdown" letters (at least once), while the
    # given-back events of a source that takes them back are only a count.
    problems = result.problems
    in_rows = set(row_ids)
    if len(in_rows) != rows:
        problems.append(f"{rows - len(in_rows)} duplicate row(s) in the database")
    if len(ids) != len(letters):
        problems.append(f"{len(letters) - len(ids)} letter(s) without an event id")
    if len(set(ids)) != len(ids):
        problems.append("an event was dead-lettered twice")
    twice = in_rows & set(ids)
    result.written_twice = len(twice)
    if twice and not pipeline.aborted:
        problems.append(f"events both written and dead-lettered: {sorted(twice)[:10]}")
    generated_ids = range(source.start, source.start + generated)
    missing = len(generated_ids) - len(in_rows.union(ids).intersection(generated_ids))
    strays = in_rows.union(ids).difference(generated_ids)
    if missing > returned or strays:
        problems.append(
            f"rows ({rows}) + letters ({len(letters)}) + returned ({returned}) - written twice "
            f"({len(twice)}) != generated ({generated}): {missing} event(s) missing"
            + (f", {len(strays)} never generated" if strays else "")
        )
    failures = {i for i, letter in identified if i is not None and letter.reason != "shutdown"}
    unexpected = failures - expected
    if unexpected:
        problems.append(f"unexpected dead letters for events {sorted(unexpected)[:10]}")
    if not stopped and failures != expected:
        problems.append(f"missing dead letters for events {sorted(expected - failures)[:10]}")
    if pipeline.lost:
        problems.append(f"{pipeline.lost} event(s) lost (neither written, stored nor returned)")
    return result
