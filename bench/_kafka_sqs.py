"""Kafka and SQS -> PostgreSQL (issue 15): batchpunk beside the loops users would write instead.

Run: python bench/brokers.py --brokers kafka,sqs [--messages N] [--sqs-messages N] [--rounds R]
(or python bench/_kafka_sqs.py with the same options). Needs Tansu on 127.0.0.1:9092 and
moto_server on 127.0.0.1:4566 (.ci/services starts both).

For each broker the same JSON orders are published first (a full backlog), then moved into a
fresh PostgreSQL table (primary key ``id``, ``ON CONFLICT DO NOTHING`` everywhere) by:

- **batchpunk**: Pipeline(KafkaSource / SqsSource, PostgresSink(idempotency_key="id")),
  max_size 500, max_wait 0.2 s, 4 concurrent batches;
- **hand-written loop**: Kafka: aiokafka ``getmany(max_records=500)``, one ``executemany``
  in a transaction, ``commit()``, repeat. SQS: ``receive_message`` (10, long poll),
  ``executemany``, ``delete_message_batch``, repeat. The 30-line loop, done right (commit /
  delete only after the rows are in);
- **FastStream** (Kafka, when ``faststream[kafka]`` is installed): a batch subscriber
  (``batch=True, max_records=500``, ack after the handler) running the same ``executemany``.

Each is timed from its first message read from the broker until the table holds every row (the
Tansu test broker makes every consumer-group join wait seconds, which would swamp the figures;
the rate including start-up is printed beside). Timing from the first read, not the first row,
keeps batchpunk's read-ahead inside the measured interval; messages per second of wall clock,
best of the rounds, with the process CPU seconds (all contenders run in this process) and the
load average (the machine is shared). Target: batchpunk >= 1.2x the hand-written loop.
moto_server is slow (a few hundred receives a second here), so SQS uses fewer messages.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from batchpunk.config import BatchConfig
from batchpunk.connectors.postgres import PostgresSink
from batchpunk.pipeline import Pipeline

DSN = "postgresql://postgres@127.0.0.1:5432/test"
KAFKA = "127.0.0.1:9092"
SQS = {
    "endpoint_url": "http://127.0.0.1:4566",
    "region_name": "us-east-1",
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
}
COLUMNS = ("id", "customer", "amount_cents")
CONFIG = BatchConfig(max_size=500, max_wait=0.2, max_concurrent_batches=4, retry_delay=0.1)
PARTITIONS = 3


try:  # the orders, names and statement of bench/brokers.py, so both benches race the same work
    from bench.brokers import insert_sql as _insert_sql
    from bench.brokers import orders as _orders
    from bench.brokers import unique as _unique
except ImportError:  # run as a script: bench/ itself is on sys.path
    from brokers import insert_sql as _insert_sql  # type: ignore[no-redef]
    from brokers import orders as _orders  # type: ignore[no-redef]
    from brokers import unique as _unique  # type: ignore[no-redef]


def _row(body: bytes | str) -> tuple[Any, ...]:
    order = json.loads(body)
    return order["id"], order["customer"], order["amount_cents"]


#: table -> perf_counter when its contender first read a message from the broker.
FIRST_READ: dict[str, float] = {}


def _first_read(table: str) -> None:
    FIRST_READ.setdefault(table, time.perf_counter())


class _TimedSource:
    """A source that notes when it yields its first envelope; everything else is the source's.

    The extra generator step per message costs batchpunk a little: the figures err against it.
    """

    def __init__(self, source: Any, table: str) -> None:
        self._source = source
        self._table = table

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    def __aiter__(self) -> Any:
        return self._timed()

    async def _timed(self) -> Any:
        async for envelope in self._source:
            _first_read(self._table)
            yield envelope


async def _wait_rows(admin: Any, table: str, count: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        rows = await admin.fetchval(f"SELECT count(*) FROM {table}")
        if rows >= count:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{table}: not every row arrived within {seconds:.0f}s")
        await asyncio.sleep(0.02)


# -- Kafka -----------------------------------------------------------------------------------


async def _kafka_fill(count: int) -> str:
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topic = _unique("bench")
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)]
        )
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all", linger_ms=5)
    await producer.start()
    try:
        bodies = _orders(count)
        for start in range(0, count, 5000):
            futures = [await producer.send(topic, b) for b in bodies[start : start + 5000]]
            await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return topic


async def kafka_batchpunk(topic: str, table: str, count: int, admin: Any) -> None:
    from batchpunk.connectors.kafka import KafkaSource

    source = _TimedSource(KafkaSource(KAFKA, topic, _unique("g"), batch_key="none"), table)
    sink = PostgresSink(DSN, table, COLUMNS, idempotency_key="id", pool_max=4)
    pipeline = Pipeline(source, sink, CONFIG)
    task = asyncio.create_task(pipeline.run())
    try:
        await _wait_rows(admin, table, count, max(120.0, count / 200))
    finally:
        await pipeline.stop()
        await task


async def kafka_loop(topic: str, table: str, count: int, admin: Any) -> None:
    import asyncpg
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=KAFKA,
        group_id=_unique("g"),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=500,
    )
    await consumer.start()
    conn = await asyncpg.connect(DSN)
    sql = _insert_sql(table)
    try:
        done = 0
        while done < count:
            records = await consumer.getmany(timeout_ms=500, max_records=500)
            rows = [_row(r.value) for batch in records.values() for r in batch]
            if not rows:
                continue
            _first_read(table)
            async with conn.transaction():
                await conn.executemany(sql, rows)
            await consumer.commit()
            done += len(rows)
    finally:
        await conn.close()
        await consumer.stop()


async def kafka_faststream(topic: str, table: str, count: int, admin: Any) -> None:
    import asyncpg
    from faststream import AckPolicy
    from faststream.kafka import KafkaBroker

    pool = await asyncpg.create_pool(DSN, min_size=1, max_size=2)
    sql = _insert_sql(table)
    broker = KafkaBroker(KAFKA, logger=None)

    @broker.subscriber(  # type: ignore[misc]
        topic,
        batch=True,
        group_id=_unique("g"),
        auto_offset_reset="earliest",
        max_records=500,
        batch_timeout_ms=200,
        ack_policy=AckPolicy.ACK,
    )
    async def handle(orders: list[dict[str, Any]]) -> None:
        _first_read(table)
        rows = [(o["id"], o["customer"], o["amount_cents"]) for o in orders]
        async with pool.acquire() as conn, conn.transaction():
            await conn.executemany(sql, rows)

    await broker.start()
    try:
        await _wait_rows(admin, table, count, max(120.0, count / 200))
    finally:
        await broker.stop()
        await pool.close()


# -- SQS -------------------------------------------------------------------------------------


async def _sqs_fill(count: int) -> str:
    from aiobotocore.session import get_session

    async with get_session().create_client("sqs", **SQS) as client:
        url: str = (
            await client.create_queue(
                QueueName=_unique("bench"), Attributes={"VisibilityTimeout": "60"}
            )
        )["QueueUrl"]
        bodies = [b.decode() for b in _orders(count)]
        calls = [
            client.send_message_batch(
                QueueUrl=url,
                Entries=[
                    {"Id": str(i), "MessageBody": b} for i, b in enumerate(bodies[s : s + 10])
                ],
            )
            for s in range(0, count, 10)
        ]
        for start in range(0, len(calls), 20):
            await asyncio.gather(*calls[start : start + 20])
    return url


async def sqs_batchpunk(url: str, table: str, count: int, admin: Any) -> None:
    from batchpunk.connectors.sqs import SqsSource

    options = {k if k != "region_name" else "region": v for k, v in SQS.items()}
    source = _TimedSource(SqsSource(url, wait_time=1, **options), table)
    sink = PostgresSink(DSN, table, COLUMNS, idempotency_key="id", pool_max=4)
    pipeline = Pipeline(source, sink, CONFIG)
    task = asyncio.create_task(pipeline.run())
    try:
        await _wait_rows(admin, table, count, max(180.0, count / 20))
    finally:
        await pipeline.stop()
        await task


async def sqs_loop(url: str, table: str, count: int, admin: Any) -> None:
    import asyncpg
    from aiobotocore.session import get_session

    conn = await asyncpg.connect(DSN)
    sql = _insert_sql(table)
    try:
        async with get_session().create_client("sqs", **SQS) as client:
            done = 0
            while done < count:
                reply = await client.receive_message(
                    QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1
                )
                messages = reply.get("Messages", [])
                if not messages:
                    continue
                _first_read(table)
                async with conn.transaction():
                    await conn.executemany(sql, [_row(m["Body"]) for m in messages])
                await client.delete_message_batch(
                    QueueUrl=url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                        for i, m in enumerate(messages)
                    ],
                )
                done += len(messages)
    finally:
        await conn.close()


# -- driver ----------------------------------------------------------------------------------

Contender = Callable[[str, str, int, Any], Awaitable[None]]


def contenders(broker: str) -> list[tuple[str, Contender]]:
    """The contenders of one broker, batchpunk first; FastStream only when it is installed."""
    if broker == "sqs":
        return [("batchpunk", sqs_batchpunk), ("hand-written loop", sqs_loop)]
    out: list[tuple[str, Contender]] = [
        ("batchpunk", kafka_batchpunk),
        ("hand-written loop", kafka_loop),
    ]
    try:
        import faststream.kafka  # noqa: F401
    except ImportError:
        print("  (FastStream not installed: pip install 'faststream[kafka]' to compare it)")
    else:
        out.append(("FastStream batch subscriber", kafka_faststream))
    return out


async def measure(broker: str, count: int, rounds: int, admin: Any) -> None:
    """Print each contender's best rate over ``rounds``, and its ratio to the loop."""
    import asyncpg

    best: dict[str, tuple[float, float, float]] = {}
    watch = await asyncpg.connect(DSN)  # the row watcher's own connection
    for _ in range(rounds):
        for name, run in contenders(broker):
            place = await (_kafka_fill(count) if broker == "kafka" else _sqs_fill(count))
            table = _unique("bp_bench_i15_")
            await admin.execute(
                f"CREATE TABLE {table} (id bigint PRIMARY KEY, customer text NOT NULL, "
                "amount_cents bigint NOT NULL)"
            )
            try:
                cpu, began = time.process_time(), time.perf_counter()
                watcher = asyncio.create_task(_wait_rows(watch, table, count, 3600))
                await run(place, table, count, admin)
                await watcher
                ended = time.perf_counter()
                cpu = time.process_time() - cpu
                rows = await admin.fetchval(f"SELECT count(*) FROM {table}")
                if rows != count:
                    raise SystemExit(f"{broker} {name}: {rows} rows, expected {count}")
                # From the first read on: the test broker's group join (seconds) is not counted.
                rate = count / (ended - FIRST_READ.get(table, began))
                if rate > best.get(name, (0.0, 0.0, 0.0))[0]:
                    best[name] = (rate, count / (ended - began), cpu)
            finally:
                await admin.execute(f"DROP TABLE IF EXISTS {table}")
                if broker == "sqs":
                    await _sqs_delete(place)
    await watch.close()
    loop_rate = best["hand-written loop"][0]
    for name, (rate, with_start, cpu) in best.items():
        ratio = "(baseline)" if name == "hand-written loop" else f"{rate / loop_rate:.2f}x"
        print(
            f"  {broker:<6}{name:<30}{rate:>10,.0f} msg/s{count:>9,} msgs"
            f"  ({with_start:,.0f} msg/s with start-up)  cpu {cpu:6.2f} s  {ratio}",
            flush=True,
        )


async def _sqs_delete(url: str) -> None:
    from aiobotocore.session import get_session

    async with get_session().create_client("sqs", **SQS) as client:
        await client.delete_queue(QueueUrl=url)


async def run(brokers: list[str], messages: int, sqs_messages: int, rounds: int) -> None:
    import asyncpg

    admin = await asyncpg.connect(DSN)
    try:
        version = await admin.fetchval("SHOW server_version")
        print(
            f"Kafka (Tansu test broker, {PARTITIONS} partitions) / SQS (moto_server) -> "
            f"PostgreSQL {version}, idempotent on id; best of {rounds} round(s); "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        for broker in brokers:
            await measure(broker, messages if broker == "kafka" else sqs_messages, rounds, admin)
        print(f"  load average at the end: {os.getloadavg()[0]:.1f}")
    finally:
        await admin.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brokers", default="kafka,sqs", help="kafka, sqs or both")
    parser.add_argument("--messages", type=int, default=50_000, help="Kafka messages")
    parser.add_argument("--sqs-messages", type=int, default=2_000, help="SQS messages")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="10,000 Kafka and 500 SQS messages")
    args = parser.parse_args(argv)
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    unknown = [b for b in brokers if b not in ("kafka", "sqs")]
    if unknown:
        parser.error(f"--brokers: unknown {unknown} (expected kafka, sqs)")
    messages, sqs_messages = args.messages, args.sqs_messages
    if args.quick:
        messages, sqs_messages = 10_000, 500
    asyncio.run(run(brokers, messages, sqs_messages, args.rounds))


if __name__ == "__main__":
    main()
