"""Broker -> PostgreSQL: batchpunk (max_size 500) versus one message at a time, in one run.

Run: python bench/brokers.py [--quick] [--brokers rabbitmq,redis,nats] [--messages N]
                             [--baseline-messages N] [--rounds R]
     python bench/brokers.py --brokers kafka,sqs [--messages N] [--sqs-messages N]
                             (Kafka and SQS beside their hand-written loops: bench/_kafka_sqs.py)

For each broker, the same JSON orders are published first (a full backlog, so both consumers
read as fast as they can), then consumed into a fresh PostgreSQL table twice:

- **batchpunk**: a Pipeline with the broker's own source and PostgresSink(idempotency_key="id"),
  max_size 500, max_wait 0.2 s, 4 concurrent batches; timed from ``run()`` (connecting
  included) until the last row is committed;
- **one at a time**: what a consumer without batching does: take one message (RabbitMQ
  prefetch 1, Redis XREADGROUP COUNT 1, NATS fetch 1), insert it with its own autocommit
  ``INSERT ... ON CONFLICT DO NOTHING`` (bench/_postgres_baseline.py, the same idempotency),
  then acknowledge it, and only then take the next.

The baseline is measured on fewer messages (it is slow); both figures are messages per second.
With several rounds, the best of each side is shown: on a shared machine the slow runs measure
the neighbours. The target is a ratio of at least 10x.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

from batchpunk.config import BatchConfig
from batchpunk.connectors.postgres import PostgresSink
from batchpunk.pipeline import Pipeline

try:
    from bench._postgres_baseline import OneRowInserter
except ImportError:  # run as a script: bench/ itself is on sys.path
    from _postgres_baseline import OneRowInserter  # type: ignore[no-redef]

DSN = "postgresql://postgres@127.0.0.1:5432/test"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
REDIS_URL = "redis://127.0.0.1:6379/0"
NATS_URL = "nats://127.0.0.1:4222"
BROKERS = ("rabbitmq", "redis", "nats")
COLUMNS = ("id", "customer", "amount_cents")
CONFIG = BatchConfig(max_size=500, max_wait=0.2, max_concurrent_batches=4, retry_delay=0.1)


def orders(count: int) -> list[bytes]:
    return [
        json.dumps(
            {"id": i, "customer": f"customer-{i % 977}", "amount_cents": i % 10_000}
        ).encode()
        for i in range(count)
    ]


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


# -- PostgreSQL --------------------------------------------------------------------------------


async def make_table(admin: Any) -> str:
    name = unique("bp_bench_broker_")
    await admin.execute(
        f"CREATE TABLE {name} (id bigint PRIMARY KEY, customer text NOT NULL, "
        "amount_cents bigint NOT NULL CHECK (amount_cents >= 0))"
    )
    return name


# -- one broker place per measurement ------------------------------------------------------------


class Place:
    """A fresh queue / stream+group / stream+durable, filled with a backlog before timing."""

    def __init__(self, broker: str) -> None:
        self.broker = broker
        self.name = unique("BENCH")
        self.group = unique("G")
        self.subject = unique("bench") + ".orders"

    async def fill(self, bodies: Sequence[bytes]) -> None:
        if self.broker == "rabbitmq":
            import aio_pika

            connection = await aio_pika.connect(RABBITMQ_URL)
            channel = await connection.channel(publisher_confirms=True)
            await channel.declare_queue(self.name, durable=True)
            persistent = aio_pika.DeliveryMode.PERSISTENT
            for start in range(0, len(bodies), 2000):
                await asyncio.gather(
                    *(
                        channel.default_exchange.publish(
                            aio_pika.Message(body, delivery_mode=persistent), self.name
                        )
                        for body in bodies[start : start + 2000]
                    )
                )
            await connection.close()
        elif self.broker == "redis":
            import redis.asyncio

            client = redis.asyncio.Redis.from_url(REDIS_URL)
            await client.xgroup_create(self.name, self.group, id="0", mkstream=True)
            for start in range(0, len(bodies), 2000):
                pipe = client.pipeline(transaction=False)
                for body in bodies[start : start + 2000]:
                    pipe.xadd(self.name, {"data": body})
                await pipe.execute()
            await client.aclose()
        else:
            import nats

            nc = await nats.connect(NATS_URL)
            js = nc.jetstream()
            await js.add_stream(name=self.name, subjects=[self.subject])
            for start in range(0, len(bodies), 2000):
                futures = [
                    await js.publish_async(self.subject, body)
                    for body in bodies[start : start + 2000]
                ]
                await asyncio.gather(*futures)
            await nc.close()

    def source(self) -> Any:
        """The batchpunk source for this place."""
        if self.broker == "rabbitmq":
            from batchpunk.connectors.rabbitmq import RabbitMQSource

            return RabbitMQSource(RABBITMQ_URL, self.name)
        if self.broker == "redis":
            from batchpunk.connectors.redis_streams import RedisStreamSource

            return RedisStreamSource(REDIS_URL, self.name, self.group, "bench-1", block=0.5)
        from batchpunk.connectors.nats import NatsJetStreamSource

        return NatsJetStreamSource(
            NATS_URL, self.name, self.subject, self.group, fetch_timeout=0.5, ack_wait=30.0
        )

    async def delete(self) -> None:
        if self.broker == "rabbitmq":
            import aio_pika

            connection = await aio_pika.connect(RABBITMQ_URL)
            channel = await connection.channel()
            await channel.queue_delete(self.name)
            await connection.close()
        elif self.broker == "redis":
            import redis.asyncio

            client = redis.asyncio.Redis.from_url(REDIS_URL)
            await client.delete(self.name)
            await client.aclose()
        else:
            import nats

            nc = await nats.connect(NATS_URL)
            await nc.jetstream().delete_stream(self.name)
            await nc.close()


# -- batchpunk ---------------------------------------------------------------------------------


class CountingSink(PostgresSink):
    """PostgresSink that sets an event once ``target`` rows were written."""

    def __init__(self, target: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.target = target
        self.written = 0
        self.done = asyncio.Event()
        self.finished_at = 0.0

    async def write(self, batch: Sequence[Any]) -> None:
        await super().write(batch)
        self.written += len(batch)
        if self.written >= self.target and not self.done.is_set():
            self.finished_at = time.perf_counter()
            self.done.set()


async def through_batchpunk(place: Place, table: str, count: int) -> float:
    """Seconds for a Pipeline to move ``count`` messages from the backlog into the table."""
    sink = CountingSink(count, DSN, table, COLUMNS, idempotency_key="id", pool_max=4)
    pipeline = Pipeline(place.source(), sink, CONFIG)
    started = time.perf_counter()
    task = asyncio.create_task(pipeline.run())
    try:
        await asyncio.wait_for(sink.done.wait(), timeout=max(120.0, count / 200))
    finally:
        await pipeline.stop()
        await task
    return sink.finished_at - started


# -- one message at a time -----------------------------------------------------------------------


async def one_at_a_time(place: Place, table: str, count: int) -> float:
    """Seconds for a naive consumer to take, insert and ack ``count`` messages one by one."""
    inserter = OneRowInserter(DSN, table, COLUMNS, on_conflict_do_nothing=True)
    await inserter.open()
    try:
        if place.broker == "rabbitmq":
            return await _one_rabbitmq(place, inserter, count)
        if place.broker == "redis":
            return await _one_redis(place, inserter, count)
        return await _one_nats(place, inserter, count)
    finally:
        await inserter.close()


async def _one_rabbitmq(place: Place, inserter: OneRowInserter, count: int) -> float:
    import aio_pika

    connection = await aio_pika.connect(RABBITMQ_URL)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1)
        queue = await channel.declare_queue(place.name, durable=True)
        done = 0
        started = time.perf_counter()
        async with queue.iterator() as messages:
            async for message in messages:
                await inserter.insert(json.loads(message.body))
                await message.ack()
                done += 1
                if done == count:
                    break
        return time.perf_counter() - started
    finally:
        await connection.close()


async def _one_redis(place: Place, inserter: OneRowInserter, count: int) -> float:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        done = 0
        started = time.perf_counter()
        while done < count:
            reply = await client.xreadgroup(
                place.group, "baseline-1", {place.name: ">"}, count=1, block=1000
            )
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    await inserter.insert(json.loads(fields[b"data"]))
                    await client.xack(place.name, place.group, entry_id)
                    done += 1
        return time.perf_counter() - started
    finally:
        await client.aclose()


async def _one_nats(place: Place, inserter: OneRowInserter, count: int) -> float:
    import nats

    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        subscription = await js.pull_subscribe(place.subject, place.group, stream=place.name)
        done = 0
        started = time.perf_counter()
        while done < count:
            for message in await subscription.fetch(1, timeout=5):
                await inserter.insert(json.loads(message.data))
                await message.ack()
                done += 1
        return time.perf_counter() - started
    finally:
        await nc.close()


# -- driver ------------------------------------------------------------------------------------


async def measure(
    broker: str, messages: int, baseline_messages: int, admin: Any
) -> tuple[float, float]:
    """(batchpunk msg/s, one-at-a-time msg/s) for one broker, each on a fresh place and table."""
    rates: list[float] = []
    for side, count in (("batchpunk", messages), ("baseline", baseline_messages)):
        place = Place(broker)
        table = await make_table(admin)
        try:
            await place.fill(orders(count))
            if side == "batchpunk":
                seconds = await through_batchpunk(place, table, count)
            else:
                seconds = await one_at_a_time(place, table, count)
            rows = await admin.fetchval(f"SELECT count(*) FROM {table}")
            if rows != count:
                raise SystemExit(f"{broker} {side}: {rows} rows in the table, expected {count}")
            rates.append(count / seconds)
        finally:
            await place.delete()
            await admin.execute(f"DROP TABLE IF EXISTS {table}")
    return rates[0], rates[1]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument("--brokers", default=",".join(BROKERS), help="comma-separated subset")
    parser.add_argument("--messages", type=int, help="messages through batchpunk per broker")
    parser.add_argument("--baseline-messages", type=int, help="messages one at a time")
    parser.add_argument("--rounds", type=int, help="rounds; the best of each side is shown")
    args = parser.parse_args()
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    for broker in brokers:
        if broker not in BROKERS:
            parser.error(f"--brokers: unknown broker {broker!r} (expected {', '.join(BROKERS)})")
    messages = args.messages or (10_000 if args.quick else 50_000)
    baseline = args.baseline_messages or (1_000 if args.quick else 3_000)
    rounds = args.rounds or 1

    import asyncpg

    admin = await asyncpg.connect(DSN)
    try:
        version = await admin.fetchval("SHOW server_version")
        load = os.getloadavg()[0]
        print(
            f"broker -> PostgreSQL {version}, idempotent on id: batchpunk (max_size 500, "
            f"4 concurrent batches) vs one message at a time; best of {rounds} round(s); "
            f"load average {load:.1f} on {os.cpu_count()} CPUs"
        )
        print(
            f"  {'broker':<10}{'batchpunk msg/s':>17}{'messages':>10}"
            f"{'one-at-a-time msg/s':>22}{'messages':>10}{'ratio':>9}"
        )
        for broker in brokers:
            best_batch = best_one = 0.0
            for _ in range(rounds):
                batched, single = await measure(broker, messages, baseline, admin)
                best_batch, best_one = max(best_batch, batched), max(best_one, single)
            print(
                f"  {broker:<10}{best_batch:>17,.0f}{messages:>10,}"
                f"{best_one:>22,.0f}{baseline:>10,}{best_batch / best_one:>8.1f}x",
                flush=True,
            )
    finally:
        await admin.close()


# -- Kafka and SQS (issue 15): contenders in bench/_kafka_sqs.py ------------------------------


def _kafka_sqs_requested() -> bool:
    """True for ``--brokers kafka``, ``sqs`` or ``kafka,sqs``: handled by bench/_kafka_sqs.py."""
    import sys

    args = sys.argv[1:]
    if "--brokers" not in args or args.index("--brokers") + 1 >= len(args):
        return False
    wanted = set(args[args.index("--brokers") + 1].split(","))
    return bool(wanted) and wanted <= {"kafka", "sqs"}


if __name__ == "__main__":
    if _kafka_sqs_requested():
        try:
            from bench._kafka_sqs import main as kafka_sqs_main
        except ImportError:  # run as a script: bench/ itself is on sys.path
            from _kafka_sqs import main as kafka_sqs_main  # type: ignore[no-redef]
        kafka_sqs_main()
    else:
        asyncio.run(main())
