"""PostgresSink write throughput: COPY, idempotent COPY, and one INSERT per row, in one run.

Run: python bench/postgres_sink.py [--quick] [--dsn DSN] [--batch 1000]

Each mode writes into its own fresh table (dropped afterwards) from one writer, so the figures
compare the write paths, not the concurrency. Every round runs all modes in turn, and the best
time of each mode over the rounds is shown: on a shared machine the slow runs measure the
neighbours. "Redelivered" writes the idempotent table's batches
a second time: the cost of absorbing a broker's redelivery. The baseline is what a consumer
without batching does: one autocommit INSERT per message (bench/_postgres_baseline.py).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

from batchpunk.connectors.postgres import PostgresSink

try:
    from bench._postgres_baseline import insert_one_at_a_time
except ImportError:  # run as a script: bench/ itself is on sys.path
    from _postgres_baseline import insert_one_at_a_time  # type: ignore[no-redef]

COLUMNS = ("id", "body", "n")


def payloads(count: int) -> list[dict[str, Any]]:
    return [{"id": i, "body": f"event body number {i}", "n": i % 1000} for i in range(count)]


async def make_table(admin: Any) -> str:
    name = f"bp_bench_{uuid.uuid4().hex[:10]}"
    await admin.execute(
        f"CREATE TABLE {name} (id bigint PRIMARY KEY, body text NOT NULL, n int CHECK (n >= 0), "
        "created timestamptz NOT NULL DEFAULT now())"
    )
    return name


async def through_sink(
    dsn: str, table: str, rows: Sequence[dict[str, Any]], batch: int, key: str | None
) -> float:
    """Seconds to write rows in batches through one PostgresSink (pool opened beforehand)."""
    sink = PostgresSink(dsn, table, COLUMNS, idempotency_key=key, pool_min=1, pool_max=1)
    await sink.open()
    try:
        started = time.perf_counter()
        for start in range(0, len(rows), batch):
            await sink.write(rows[start : start + batch])
        return time.perf_counter() - started
    finally:
        await sink.close()


async def one_round(
    admin: Any, dsn: str, bulk: int, single: int, batch: int
) -> list[tuple[str, int, float]]:
    """Every mode once, each into fresh tables that are dropped afterwards."""
    tables: list[str] = []
    results: list[tuple[str, int, float]] = []
    try:
        rows = payloads(bulk)
        copy_table = await make_table(admin)
        tables.append(copy_table)
        seconds = await through_sink(dsn, copy_table, rows, batch, None)
        results.append(("COPY", bulk, seconds))

        idem_table = await make_table(admin)
        tables.append(idem_table)
        seconds = await through_sink(dsn, idem_table, rows, batch, "id")
        results.append(("idempotent COPY, new rows", bulk, seconds))
        seconds = await through_sink(dsn, idem_table, rows, batch, "id")
        results.append(("idempotent COPY, redelivered", bulk, seconds))

        one_table = await make_table(admin)
        tables.append(one_table)
        count, seconds = await insert_one_at_a_time(dsn, one_table, COLUMNS, payloads(single))
        results.append(("one INSERT per row (baseline)", count, seconds))

        for table, expected in ((copy_table, bulk), (idem_table, bulk), (one_table, single)):
            stored = await admin.fetchval(f"SELECT count(*) FROM {table}")
            assert stored == expected, f"{table}: {stored} rows, expected {expected}"
        return results
    finally:
        for table in tables:
            await admin.execute(f"DROP TABLE IF EXISTS {table}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (a few seconds)")
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--batch", type=int, default=1000, help="rows per write (default 1000)")
    parser.add_argument("--rounds", type=int, help="rounds; the best of each mode is shown")
    parser.add_argument("--plot", action="store_true", help="also write docs/img/postgres_sink.png")
    args = parser.parse_args()
    bulk = 20_000 if args.quick else 200_000
    single = 1_000 if args.quick else 5_000
    rounds = args.rounds or (1 if args.quick else 3)

    import asyncpg

    admin = await asyncpg.connect(args.dsn)
    try:
        version = await admin.fetchval("SHOW server_version")
        best: dict[str, tuple[int, float]] = {}
        for _ in range(rounds):
            for name, count, seconds in await one_round(admin, args.dsn, bulk, single, args.batch):
                if name not in best or seconds < best[name][1]:
                    best[name] = (count, seconds)
    finally:
        await admin.close()

    count, seconds = best["one INSERT per row (baseline)"]
    baseline = count / seconds
    print(
        f"PostgresSink write throughput: PostgreSQL {version}, batches of {args.batch}, "
        f"one writer, one connection, best of {rounds} round(s)"
    )
    print(f"  {'mode':<32}{'rows':>9}{'seconds':>10}{'rows/s':>11}{'vs baseline':>13}")
    for name, (count, seconds) in best.items():
        rate = count / seconds
        print(f"  {name:<32}{count:>9}{seconds:>10.2f}{rate:>11,.0f}{rate / baseline:>12.1f}x")
    if args.plot:
        try:
            from bench._plot import bar_chart
        except ImportError:  # run as a script: bench/ itself is on sys.path
            from _plot import bar_chart  # type: ignore[no-redef]

        rows = [
            (
                name,
                count / seconds,
                f"{count / seconds / baseline:.1f}x",
                name.endswith("(baseline)"),
            )
            for name, (count, seconds) in best.items()
        ]
        path = bar_chart(
            "postgres_sink",
            f"PostgreSQL {version.split()[0]}: batches of {args.batch} against one INSERT a row",
            rows,
            unit="rows per second (best round)",
            note="python bench/postgres_sink.py; one writer, one connection",
        )
        print(f"  plot: {path}")


if __name__ == "__main__":
    asyncio.run(main())
