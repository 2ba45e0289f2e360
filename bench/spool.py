"""The durable spool's cost, beside the in-memory path and a hand-written SQLite outbox (one run).

Run: python bench/spool.py [--quick] [--ceiling]

Each row: 1,000 concurrent producers each awaiting ``add_message`` in a loop (the way a busy
service calls it), a no-op async handler, max_size 1000. "Added latency" is the time one
``await add_message`` took. Wall-clock rates are the headline (an fsync is waiting, not CPU, so
CPU time would flatter the disk-bound rows); CPU-seconds of this process are printed beside.

Baselines measured in the same run:
(a) the in-memory path: the same processor without a spool (no durability at all);
(b) an SQLite outbox, the usual way to get the same guarantee by hand: each message is inserted
    into an outbox table before it is handed to the processor (executemany, one transaction per
    1,000 messages, WAL, synchronous=FULL: group commit, as the spool does), and deleted once its
    batch succeeded (one transaction per batch), as the spool writes its finish markers.
    Like with like: the outbox serializes with the same JSON encoder as the spool (the codec's:
    orjson when installed), its producers share one future per transaction as the spool's share
    one per commit, and its deletes are not synced on their own (synchronous=NORMAL for them; the
    next insert's FULL commit syncs the WAL), as the spool's finish markers are not: a lost
    delete or marker costs a duplicate, never a message. A row with the stdlib's json.dumps shows
    what a plainer hand-written outbox costs.

--ceiling adds two diagnostic rows, not modes (nothing in them is durable): the spool with its
disk writes skipped, and with its serialization skipped too, so only its bookkeeping and its
producers' wait for a commit remain. Their ratios to the outbox show how far the target is
once the spool's I/O and serialization cost nothing.

Target: the spool (sync="data", fdatasync) >= 2x the SQLite outbox; the HTTP source >= 20,000
events/s with NDJSON requests of 100 events (server in its own process, through a spool).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from batchpunk import Batch, BatchConfig, BatchProcessor, Spool

PRODUCERS = 1000


async def noop(batch: Batch[Any]) -> None:
    return None


def config() -> BatchConfig:
    return BatchConfig(max_size=1000, max_wait=0.005, max_pending=50_000, drain_timeout=60)


async def drive(add: Callable[[Any], Awaitable[None]], n: int) -> list[float]:
    """PRODUCERS tasks share n messages; returns each await's duration."""
    per = n // PRODUCERS
    latencies: list[float] = []
    clock = time.perf_counter

    async def producer(base: int) -> None:
        record = latencies.append
        for i in range(per):
            began = clock()
            await add({"id": base + i, "body": "x" * 64})
            record(clock() - began)

    await asyncio.gather(*(producer(p * per) for p in range(PRODUCERS)))
    return latencies


async def run_memory(n: int, _: Path) -> list[float]:
    async with BatchProcessor(config(), noop) as processor:
        return await drive(processor.add_message, n)


def run_spool(
    kind: type[Spool] = Spool, **settings: Any
) -> Callable[[int, Path], Awaitable[list[float]]]:
    async def run(n: int, directory: Path) -> list[float]:
        spool = kind(directory / "spool", **settings)
        async with BatchProcessor(config(), noop, spool=spool) as processor:
            return await drive(processor.add_message, n)

    return run


class _WritesSkipped(Spool):
    """--ceiling only: the spool with its disk writes skipped (nothing is durable)."""

    def _write(self, segment: Any, data: bytes, sync: bool = True) -> None:
        return None


class _WritesAndEncodingSkipped(_WritesSkipped):
    """--ceiling only: the spool's bookkeeping and its producers' wait, nothing else."""

    _BODY = json.dumps([{"id": 0, "body": "x" * 64}, None, 0]).encode()

    def _encode(self, message: Any, key: Any, priority: int) -> bytes:
        return self._BODY


def _same_json() -> Callable[[Any], str]:
    """The spool's JSON encoder (orjson when installed), as text for SQLite; else json.dumps."""
    try:
        import orjson
    except ImportError:
        return json.dumps
    dumps = orjson.dumps
    return lambda message: dumps(message).decode()


class Outbox:
    """A hand-written durable outbox in SQLite with group commit (1,000 per transaction)."""

    def __init__(self, path: Path, encode: Callable[[Any], str]) -> None:
        self.encode = encode
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY, body TEXT)")
        self.pending: list[tuple[int, str]] = []
        #: One future per transaction (per 1,000 pending rows), shared by its producers as the
        #: spool's producers share one per commit.
        self.futures: list[asyncio.Future[None]] = []
        self.wake = asyncio.Event()
        self.lock = asyncio.Lock()
        self.task = asyncio.ensure_future(self.writer())

    async def put(self, message: dict[str, Any]) -> None:
        if len(self.pending) % 1000 == 0:  # the first message of a transaction: its future
            self.futures.append(asyncio.get_running_loop().create_future())
            self.wake.set()
        future = self.futures[-1]
        self.pending.append((message["id"], self.encode(message)))
        await future

    def insert(self, rows: list[tuple[int, str]]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany("INSERT INTO outbox (id, body) VALUES (?, ?)", rows)
        self.db.execute("COMMIT")

    def delete(self, ids: list[tuple[int]]) -> None:
        # Not synced on its own (the next insert's FULL commit syncs the WAL with it), as the
        # spool's finish markers ride along with its next message write.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("BEGIN")
        self.db.executemany("DELETE FROM outbox WHERE id = ?", ids)
        self.db.execute("COMMIT")
        self.db.execute("PRAGMA synchronous=FULL")

    async def writer(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.pending:
                chunk, self.pending = self.pending[:1000], self.pending[1000:]
                future = self.futures.pop(0)
                async with self.lock:
                    await asyncio.to_thread(self.insert, chunk)
                future.set_result(None)

    async def done(self, batch: Batch[Any]) -> None:
        async with self.lock:
            await asyncio.to_thread(self.delete, [(m["id"],) for m in batch])


def run_outbox(encode: Callable[[Any], str]) -> Callable[[int, Path], Awaitable[list[float]]]:
    async def run(n: int, directory: Path) -> list[float]:
        outbox = Outbox(directory / "outbox.db", encode)
        async with BatchProcessor(config(), outbox.done) as processor:

            async def add(message: Any) -> None:
                await outbox.put(message)
                await processor.add_message(message)

            latencies = await drive(add, n)
        outbox.task.cancel()
        remaining = outbox.db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        assert remaining == 0, remaining
        return latencies

    return run


def measure(
    run: Callable[[int, Path], Awaitable[list[float]]], n: int
) -> tuple[float, float, float, float]:
    """(messages per wall second, per CPU second, p50 ms, p99 ms)."""
    directory = Path(tempfile.mkdtemp(prefix="bench-spool-", dir=os.environ.get("BENCH_DIR")))
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        latencies = asyncio.run(run(n, directory))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    return len(latencies) / wall, len(latencies) / cpu, p50, p99


SERVER = r"""
import asyncio, sys
from batchpunk import BatchConfig, Spool
from batchpunk.connectors.http_source import HttpSource
from batchpunk.pipeline import Pipeline

class Null:
    async def write(self, batch): return None
    async def close(self): return None

async def main():
    source = HttpSource(port=0, max_queue=100_000)
    await source.prepare()
    config = BatchConfig(max_size=1000, max_wait=0.005, max_pending=50_000)
    pipeline = Pipeline(source, Null(), config, spool=Spool(sys.argv[1]))
    print(source.port, flush=True)
    await pipeline.run(handle_signals=True)

asyncio.run(main())
"""


def http_rate(requests: int, directory: Path) -> tuple[float, dict[int, int]]:
    """Events per wall second through HttpSource -> spool -> a null sink (server in a process)."""
    import aiohttp

    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(directory / "spool")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    port = int(server.stdout.readline())
    url = f"http://127.0.0.1:{port}/events"
    body = b"\n".join(b'{"id": %d, "body": "%s"}' % (i, b"x" * 64) for i in range(100))
    statuses: dict[int, int] = {}

    async def main() -> float:
        left = iter(range(requests))
        async with aiohttp.ClientSession() as http:

            async def client() -> None:
                for _ in left:
                    async with http.post(url, data=body) as reply:
                        statuses[reply.status] = statuses.get(reply.status, 0) + 1
                        await reply.read()

            began = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(32)))
            return time.perf_counter() - began

    try:
        elapsed = asyncio.run(main())
    finally:
        server.terminate()
        server.wait(30)
    return statuses.get(202, 0) * 100 / elapsed, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every row")
    parser.add_argument("--producers", type=int, default=PRODUCERS, help="concurrent producers")
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="add two diagnostic rows: the spool with its writes (and its encoding) skipped",
    )
    args = parser.parse_args()
    globals()["PRODUCERS"] = args.producers
    n = 50_000 if args.quick else 100_000
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"Load average at start: {os.getloadavg()[0]:.2f}")
    print(
        f"{n:,} messages x {args.rounds} rounds, {args.producers:,} concurrent producers "
        "awaiting add_message, max_size 1000; wall-clock rates (CPU-second rates beside)"
    )
    rows = [
        ("in-memory (no durability)", run_memory),
        ("SQLite outbox (baseline)", run_outbox(_same_json())),
        ("SQLite outbox, stdlib json.dumps", run_outbox(json.dumps)),
        ('spool sync="data" (fdatasync)', run_spool(sync="data")),
        ('spool sync="full" (fsync)', run_spool(sync="full")),
        ('spool sync="none" (no fsync)', run_spool(sync="none")),
        ("spool data, commit_interval 2 ms", run_spool(sync="data", commit_interval=0.002)),
    ]
    writes, everything = "ceiling: spool, no writes", "ceiling: spool, no writes/encoding"
    if args.ceiling:
        rows += [
            (writes, run_spool(_WritesSkipped, sync="none")),
            (everything, run_spool(_WritesAndEncodingSkipped, sync="none")),
        ]
    # Rounds run every row in turn; a row shows its best round (the one least disturbed by the
    # neighbours); ratios are medians of same-round ratios.
    rounds: list[dict[str, tuple[float, float, float, float]]] = []
    for _ in range(args.rounds):
        rounds.append({name: measure(run, n) for name, run in rows})
    header = f"  {'path':<34} {'msg/s wall':>12} {'msg/s CPU':>12} {'p50 ms':>8} {'p99 ms':>8}"
    print(header)
    for name, _ in rows:
        rate, cpu, p50, p99 = max((r[name] for r in rounds), key=lambda row: row[0])
        print(f"  {name:<34} {rate:>12,.0f} {cpu:>12,.0f} {p50:>8.2f} {p99:>8.2f}")

    def ratio(a: str, b: str) -> float:
        return statistics.median(r[a][0] / r[b][0] for r in rounds)

    spool, outbox = 'spool sync="data" (fdatasync)', "SQLite outbox (baseline)"
    memory = "in-memory (no durability)"
    print(f"  spool (fdatasync) vs SQLite outbox : {ratio(spool, outbox):.2f}x  (target >= 2.0x)")
    plain = "SQLite outbox, stdlib json.dumps"
    print(f"  spool (fdatasync) vs outbox, json  : {ratio(spool, plain):.2f}x")
    print(
        f"  spool (fdatasync) vs in-memory     : {ratio(spool, memory):.2f}x  (durability's price)"
    )
    if args.ceiling:
        # Not modes (nothing is durable): the ratio left once I/O and serialization cost nothing.
        print(f"  {writes} vs SQLite outbox : {ratio(writes, outbox):.2f}x")
        print(f"  {everything} vs SQLite outbox : {ratio(everything, outbox):.2f}x")
    requests = 500 if args.quick else 2000
    directory = Path(tempfile.mkdtemp(prefix="bench-http-", dir=os.environ.get("BENCH_DIR")))
    try:
        rate, statuses = http_rate(requests, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(
        f"  HTTP source, NDJSON x 100 events, 32 clients: {rate:,.0f} events/s wall "
        f"(target >= 20,000); replies {statuses}"
    )
    print(f"Load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
