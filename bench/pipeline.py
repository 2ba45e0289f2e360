"""JSON Lines -> SQLite: a batchpunk pipeline beside one INSERT per message, in the same run.

Run: python bench/pipeline.py [--quick] [--events N] [--dir DIR]

The batched side is a real Pipeline: JsonlSource -> BatchProcessor (max_size 1000) ->
SqliteSink, acknowledgements included. The baseline is the consumer people write first: read a
line, decode it, INSERT it and COMMIT, one message at a time, as a plain synchronous loop (no
asyncio, no batchpunk: the cheapest per-message consumer there is). Both use the same database
settings (WAL) and are measured at both durability levels:

- synchronous=FULL (SqliteSink's default): every commit reaches the disk before it returns,
  which is what acknowledging a broker message after the commit needs;
- synchronous=NORMAL: commits survive a process crash, not a power loss.

One commit per message at FULL costs a disk flush per message, so the baseline runs over the
first ``--baseline-events`` lines only (its rate does not depend on the file's length), and the
batched side over every event. Target: batched >= 20x the per-message baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import tempfile
import time
from pathlib import Path

from batchpunk import BatchConfig
from batchpunk.connectors import JsonlSource, SqliteSink
from batchpunk.deadletter import MemoryDeadLetters
from batchpunk.pipeline import Pipeline

COLUMNS = ["id", "user", "amount", "kind", "ts"]


def write_events(path: Path, count: int) -> int:
    """A JSON Lines file of ``count`` order events (about 90 bytes each); its size in bytes."""
    with path.open("w", encoding="utf-8") as out:
        for i in range(count):
            event = {
                "id": i,
                "user": f"user-{i % 5000}",
                "amount": (i * 7919) % 100_000 / 100,
                "kind": "order",
                "ts": 1_700_000_000 + i,
            }
            out.write(json.dumps(event, separators=(",", ":")) + "\n")
    return path.stat().st_size


def fresh(path: Path) -> Path:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return path


async def batched(events: Path, db: Path, synchronous: str, count: int) -> float:
    """Messages per second through the pipeline (max_size 1000); checks every row landed."""
    sink = SqliteSink(str(fresh(db)), "events", COLUMNS, synchronous=synchronous)
    config = BatchConfig(
        max_size=1000,
        max_wait=0.05,
        max_concurrent_batches=2,
        max_pending=20_000,
    )
    letters = MemoryDeadLetters()
    pipeline = Pipeline(JsonlSource(str(events)), sink, config, dead_letter=letters)
    start = time.perf_counter()
    await pipeline.run()
    elapsed = time.perf_counter() - start
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    if rows != count or letters.letters:
        raise SystemExit(f"batched run lost data: {rows} rows, {len(letters.letters)} letters")
    return count / elapsed


def per_message(events: Path, db: Path, synchronous: str, count: int) -> float:
    """Messages per second inserting and committing one message at a time (first ``count``)."""
    conn = sqlite3.connect(fresh(db), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    names = ", ".join(COLUMNS)
    conn.execute(f"CREATE TABLE events ({names})")
    sql = f"INSERT INTO events ({names}) VALUES ({', '.join('?' for _ in COLUMNS)})"
    start = time.perf_counter()
    with events.open("rb") as lines:
        for done, line in enumerate(lines):
            if done == count:
                break
            event = json.loads(line)
            conn.execute("BEGIN")
            conn.execute(sql, [event[c] for c in COLUMNS])
            conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    rows = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    conn.close()
    assert rows == count, (rows, count)
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000 events, short baselines")
    parser.add_argument("--events", type=int, default=None, help="events in the file")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: temp)")
    parser.add_argument(
        "--baseline-events",
        type=int,
        default=None,
        help="lines the per-message baseline inserts at synchronous=FULL (NORMAL gets 10x)",
    )
    args = parser.parse_args()
    count = args.events or (100_000 if args.quick else 1_000_000)
    full_baseline = args.baseline_events or (1_000 if args.quick else 5_000)
    folder = args.dir or Path(tempfile.mkdtemp(prefix="batchpunk-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    events = folder / "events.jsonl"
    size = write_events(events, count)
    print(f"bench/pipeline.py: {count:,} JSONL events ({size / 2**20:.1f} MiB) -> SQLite (WAL)")
    print(f"files in {folder}")
    print()
    header = ("synchronous", "batched (max_size 1000)", "one INSERT per message", "ratio")
    print(f"{header[0]:<12} {header[1]:>26} {header[2]:>26} {header[3]:>8}")
    for synchronous, baseline_count in (("FULL", full_baseline), ("NORMAL", full_baseline * 10)):
        baseline_count = min(baseline_count, count)
        fast = asyncio.run(batched(events, folder / "batched.db", synchronous, count))
        slow = per_message(events, folder / "single.db", synchronous, baseline_count)
        print(
            f"{synchronous:<12} {fast:>20,.0f} msg/s {slow:>20,.0f} msg/s {fast / slow:>7.1f}x"
            f"   (batched over {count:,} events, per-message over {baseline_count:,})"
        )
    print()
    print("target: batched >= 20x one INSERT per message at the same durability (FULL, default)")


if __name__ == "__main__":
    main()
