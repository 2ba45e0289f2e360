"""Which idempotent write statement is fastest at which batch size, measured in one run.

Run: python bench/postgres_statements.py [--quick]

For each batch size, the same new rows (then the same rows again: a redelivery) are written to
a fresh keyed table on one connection, in turns, by:

- **unnest**: ``INSERT INTO t SELECT * FROM unnest($1::bigint[], ...) ON CONFLICT DO NOTHING``;
- **staged COPY**: in a transaction, a temporary table, a binary COPY into it, and
  ``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` (PostgresSink's path before issue 12);
- **executemany**: ``INSERT ... VALUES ($1, $2, $3) ON CONFLICT DO NOTHING`` per row, pipelined.

Each figure is the median milliseconds per batch over the rounds; the last column says which
statement won. PostgresSink uses unnest up to ``UNNEST_MAX_ROWS`` and the staged COPY above
(it also falls back to the staged COPY when unnest refuses a row, to name that row).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from typing import Any

DSN = "postgresql://postgres@127.0.0.1:5432/test"
SIZES = (100, 500, 2000, 5000, 10_000)


def rows(start: int, count: int) -> list[tuple[int, str, int]]:
    return [(i, f"customer-{i % 977}", i % 10_000) for i in range(start, start + count)]


async def unnest(conn: Any, table: str, batch: list[tuple[int, str, int]]) -> None:
    ids, customers, amounts = (list(c) for c in zip(*batch, strict=True))
    await conn.execute(
        f"INSERT INTO {table} (id, customer, amount_cents) SELECT * FROM "
        "unnest($1::bigint[], $2::text[], $3::bigint[]) ON CONFLICT (id) DO NOTHING",
        ids,
        customers,
        amounts,
    )


async def staged(conn: Any, table: str, batch: list[tuple[int, str, int]]) -> None:
    async with conn.transaction():
        await conn.execute(
            f"CREATE TEMP TABLE stage ON COMMIT DROP AS SELECT id, customer, amount_cents "
            f"FROM {table} WITH NO DATA"
        )
        await conn.copy_records_to_table(
            "stage", records=batch, columns=("id", "customer", "amount_cents")
        )
        await conn.execute(
            f"INSERT INTO {table} (id, customer, amount_cents) SELECT id, customer, "
            "amount_cents FROM stage ON CONFLICT (id) DO NOTHING"
        )


async def executemany(conn: Any, table: str, batch: list[tuple[int, str, int]]) -> None:
    await conn.executemany(
        f"INSERT INTO {table} (id, customer, amount_cents) VALUES ($1, $2, $3) "
        "ON CONFLICT (id) DO NOTHING",
        batch,
    )


STATEMENTS = {"unnest": unnest, "staged COPY": staged, "executemany": executemany}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    rounds = 5 if args.quick else 15

    import asyncpg

    conn = await asyncpg.connect(DSN)
    tables: list[str] = []
    try:
        version = await conn.fetchval("SHOW server_version")
        one, five, _ = os.getloadavg()
        print(
            f"idempotent write statements, PostgreSQL {version}, one connection, median ms per "
            f"batch over {rounds} rounds (new rows / the same rows redelivered); "
            f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"
        )
        header = "".join(f"{name:>24}" for name in STATEMENTS)
        print(f"  {'rows':>7}{header}  fastest (new rows)")
        for size in SIZES:
            times: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in STATEMENTS}
            # One table per statement, so that its prepared statement is reused (as a sink's is).
            table_of = {name: f"bp_bench_stmt_{uuid.uuid4().hex[:10]}" for name in STATEMENTS}
            for table in table_of.values():
                tables.append(table)
                await conn.execute(
                    f"CREATE TABLE {table} (id bigint PRIMARY KEY, customer text NOT NULL, "
                    "amount_cents bigint NOT NULL)"
                )
            for name, write in STATEMENTS.items():  # warm up: prepare, plan, first pages
                await write(conn, table_of[name], rows(-size, size))
            for round_no in range(rounds):
                batch = rows(round_no * size, size)
                for name, write in STATEMENTS.items():
                    for kind in (0, 1):  # new rows, then the same rows again
                        began = time.perf_counter()
                        await write(conn, table_of[name], batch)
                        times[name][kind].append((time.perf_counter() - began) * 1000)
            for table in table_of.values():
                await conn.execute(f"DROP TABLE {table}")
                tables.remove(table)
            medians = {
                n: (statistics.median(a), statistics.median(b)) for n, (a, b) in times.items()
            }
            cells = "".join(f"{new:>13.2f} / {again:>8.2f}" for new, again in medians.values())
            fastest = min(medians, key=lambda n: medians[n][0])
            print(f"  {size:>7}{cells}  {fastest}", flush=True)
    finally:
        for table in tables:
            await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
