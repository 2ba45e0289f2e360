"""A producer process for the spool crash tests: killed with -9 at random moments, restarted.

    python _spool_producer.py sqlite   DB       SPOOL|- FIRST_ID DLQ [COUNT]
    python _spool_producer.py postgres TABLE    SPOOL|- FIRST_ID DLQ [COUNT]
    python _spool_producer.py http     DB       SPOOL    PORTFILE DLQ

sqlite/postgres: the spool's unfinished messages are replayed on start; then 64 tasks add
messages {"id": n} (n from FIRST_ID upward) until killed, or until COUNT of them were added (0:
none), then it drains and exits. Each id goes to stdout (unbuffered) once ``await add_message``
returned. SPOOL "-" runs without a spool (the negative control). Ids divisible by 997 are
poison: the sink fails them for good (dead letters).

http: a Pipeline from an HttpSource through the spool into SQLite; the port goes to PORTFILE.

Sinks are idempotent (insert-or-ignore on the id) and count every write attempt in a second
table, so duplicates are counted exactly and absorbed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batchpunk import BatchConfig, BatchProcessor, PartialFailure, Spool
from batchpunk.deadletter import JsonlDeadLetters

POISON = 997


class Poison(Exception):
    """A message no retry can fix."""

    retryable = False


def failures(batch: Sequence[Any]) -> dict[int, BaseException]:
    return {
        i: Poison(f"id {m['id']} is poison") for i, m in enumerate(batch) if m["id"] % POISON == 0
    }


class SqliteRows:
    """Idempotent SQLite sink: rows(id primary key), attempts(id) for every write."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY)")
        self.db.execute("CREATE TABLE IF NOT EXISTS attempts (id INTEGER)")
        self.lock = threading.Lock()

    def write(self, batch: Sequence[Any]) -> None:
        bad = failures(batch)
        good = [(m["id"],) for i, m in enumerate(batch) if i not in bad]
        with self.lock:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR IGNORE INTO rows (id) VALUES (?)", good)
            self.db.executemany("INSERT INTO attempts (id) VALUES (?)", good)
            self.db.execute("COMMIT")
        if bad:
            raise PartialFailure(bad)

    async def close(self) -> None:
        self.db.close()


class PostgresRows:
    """Idempotent PostgreSQL sink on tables TABLE and TABLE_attempts."""

    def __init__(self, table: str) -> None:
        self.table = table
        self.pool: Any = None

    async def open(self) -> None:
        import asyncpg

        self.pool = await asyncpg.create_pool(
            "postgresql://postgres@127.0.0.1:5432/test", min_size=1, max_size=4
        )

    async def write(self, batch: Sequence[Any]) -> None:
        bad = failures(batch)
        good = [m["id"] for i, m in enumerate(batch) if i not in bad]
        async with self.pool.acquire() as con, con.transaction():
            await con.execute(
                f"INSERT INTO {self.table} (id) SELECT unnest($1::bigint[]) ON CONFLICT DO NOTHING",
                good,
            )
            await con.execute(
                f"INSERT INTO {self.table}_attempts (id) SELECT unnest($1::bigint[])", good
            )
        if bad:
            raise PartialFailure(bad)


async def produce(
    mode: str, target: str, spool_path: str, first: int, dlq: str, count: int | None
) -> None:
    config = BatchConfig(
        max_size=200, max_wait=0.02, max_pending=20_000, max_concurrent_batches=4, retry_delay=0.05
    )
    sink: Any
    if mode == "sqlite":
        sink = SqliteRows(target)
        handler: Any = sink.write
    else:
        sink = PostgresRows(target)
        await sink.open()
        handler = sink.write
    if spool_path == "-":
        # The negative control: a slower sink, so a kill always finds messages in memory.
        inner = handler

        async def handler(batch: Any) -> Any:
            await asyncio.sleep(0.2)
            result = inner(batch)
            if asyncio.iscoroutine(result):
                await result

    spool = None if spool_path == "-" else Spool(spool_path, segment_bytes=1 << 20)
    processor = BatchProcessor(config, handler, dead_letter=JsonlDeadLetters(dlq), spool=spool)
    async with processor:
        ids = itertools.count(first) if count is None else iter(range(first, first + count))

        async def task() -> None:
            for n in ids:
                await processor.add_message({"id": n})
                os.write(1, b"%d\n" % n)

        await asyncio.gather(*(task() for _ in range(64)))


class HttpRows(SqliteRows):
    """The HTTP pipeline's sink (no poison: every event is good)."""

    def write(self, batch: Sequence[Any]) -> None:
        rows = [(m["id"],) for m in batch]
        with self.lock:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR IGNORE INTO rows (id) VALUES (?)", rows)
            self.db.executemany("INSERT INTO attempts (id) VALUES (?)", rows)
            self.db.execute("COMMIT")


async def serve(db: str, spool_path: str, portfile: str, dlq: str) -> None:
    from batchpunk.connectors.http_source import HttpSource
    from batchpunk.pipeline import Pipeline

    source = HttpSource(port=0)
    await source.prepare()
    config = BatchConfig(
        max_size=500, max_wait=0.02, max_pending=20_000, max_concurrent_batches=2, retry_delay=0.05
    )
    pipeline = Pipeline(
        source,
        HttpRows(db),
        config,
        dead_letter=JsonlDeadLetters(dlq),
        spool=Spool(spool_path, segment_bytes=1 << 20),
    )
    Path(portfile + ".tmp").write_text(str(source.port))  # noqa: ASYNC240 - one tiny write
    os.replace(portfile + ".tmp", portfile)
    await pipeline.run(handle_signals=True)


def main() -> None:
    mode, target, spool_path, arg, dlq = sys.argv[1:6]
    if mode == "http":
        asyncio.run(serve(target, spool_path, arg, dlq))
    else:
        count = int(sys.argv[6]) if len(sys.argv) > 6 else None
        asyncio.run(produce(mode, target, spool_path, int(arg), dlq, count))


if __name__ == "__main__":
    main()
