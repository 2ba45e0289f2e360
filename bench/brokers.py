"""Broker -> PostgreSQL: batchpunk against a hand-written loop and FastStream, in one run.

Run: python bench/brokers.py [--quick] [--brokers rabbitmq,redis,nats] [--messages N]
                             [--rounds R] [--floor]
     python bench/brokers.py --brokers kafka,sqs [--messages N] [--sqs-messages N]
                             (Kafka and SQS beside their hand-written loops: bench/_kafka_sqs.py)

For each broker, the same JSON orders are published first (a full backlog, so every consumer
reads as fast as it can), then consumed into a fresh PostgreSQL table (primary key ``id``, every
write idempotent: ON CONFLICT DO NOTHING) by, in turn within each round:

- **hand-written**: the loop a careful user writes with the official clients: read a batch of
  up to 500 (RabbitMQ: prefetch 1,000, the 500th message closes a batch; Redis: XREADGROUP COUNT
  500; NATS: pull fetch(500)), one ``executemany`` INSERT ... ON CONFLICT DO NOTHING, then the
  acknowledgement after the commit (RabbitMQ: one ack with multiple=True; Redis: one XACK;
  NATS: one ack per message, as JetStream has no batch ack under AckExplicit);
- **batchpunk**: a Pipeline with the broker's source and PostgresSink(idempotency_key="id"),
  max_size 500, max_wait 0.2 s, 4 concurrent batches, the collector tuned as ``batchpunk run``
  tunes it (batchpunk._memory);
- **FastStream**: its batch subscriber where it has one (Redis streams, NATS pull), with the
  same executemany in the handler; FastStream acknowledges after the handler returns.

--floor adds a diagnostic row per broker, not a contender: the **client floor**, the cheapest use
of the same client library that batchpunk's source makes (RabbitMQ: a consumer callback on the
aiormq channel and one multiple ack per 500; Redis: XREADGROUP COUNT 500 and one XACK; NATS: a
pull request and a callback on its inbox, one ack publish per message), reading and
acknowledging only: no decoding, no database. Its CPU per message is what any consumer on that
client spends before doing anything with a message, the floor under the 7 us budget.

Each is timed on the wall clock from its start (connecting included) until every row is
committed and every message acknowledged (checked afterwards: row count, and nothing pending on
the broker); closing connections afterwards is not timed, for any contender. Ratios are
medians of same-round ratios against the hand-written loop; client CPU (this process's CPU
time) per message stands beside, with the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from batchpunk.config import BatchConfig
from batchpunk.connectors.postgres import PostgresSink
from batchpunk.pipeline import Pipeline

try:
    from batchpunk._memory import tuned_collector
except ImportError:  # a batchpunk from before issue 12 (for "before" figures): default collector
    tuned_collector = contextlib.nullcontext  # type: ignore[assignment]

DSN = "postgresql://postgres@127.0.0.1:5432/test"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
REDIS_URL = "redis://127.0.0.1:6379/0"
NATS_URL = "nats://127.0.0.1:4222"
BROKERS = ("rabbitmq", "redis", "nats")
COLUMNS = ("id", "customer", "amount_cents")
BATCH = 500
CONFIG = BatchConfig(max_size=BATCH, max_wait=0.2, max_concurrent_batches=4, retry_delay=0.1)
TARGETS = {"redis": 1.3, "rabbitmq": 1.2, "nats": 1.2}
#: Whether batchpunk runs with the collector tuned as `batchpunk run` tunes it (--collector).
TUNED = True


def orders(count: int) -> list[bytes]:
    return [
        json.dumps(
            {"id": i, "customer": f"customer-{i % 977}", "amount_cents": i % 10_000}
        ).encode()
        for i in range(count)
    ]


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def insert_sql(table: str) -> str:
    return (
        f"INSERT INTO {table} (id, customer, amount_cents) VALUES ($1, $2, $3) "
        "ON CONFLICT (id) DO NOTHING"
    )


def row(order: dict[str, Any]) -> tuple[Any, ...]:
    return order["id"], order["customer"], order["amount_cents"]


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
            from nats.js.api import AckPolicy, ConsumerConfig

            nc = await nats.connect(NATS_URL)
            js = nc.jetstream()
            await js.add_stream(name=self.name, subjects=[self.subject])
            await js.add_consumer(
                self.name,
                ConsumerConfig(
                    durable_name=self.group,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=30.0,
                    max_ack_pending=20_000,
                    filter_subject=self.subject,
                ),
            )
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

    async def pending(self) -> int:
        """Messages not yet acknowledged (delivered or not)."""
        if self.broker == "rabbitmq":
            import aio_pika

            connection = await aio_pika.connect(RABBITMQ_URL)
            try:
                channel = await connection.channel()
                queue = await channel.declare_queue(self.name, durable=True, passive=True)
                ready = queue.declaration_result.message_count or 0
            finally:
                await connection.close()
            return int(ready)
        if self.broker == "redis":
            import redis.asyncio

            client = redis.asyncio.Redis.from_url(REDIS_URL)
            try:
                info = await client.xpending(self.name, self.group)
                groups = await client.xinfo_groups(self.name)
            finally:
                await client.aclose()
            lag = sum(int(g.get("lag") or 0) for g in groups if g["name"] == self.group.encode())
            return int(info["pending"]) + lag
        import nats

        nc = await nats.connect(NATS_URL)
        try:
            info = await nc.jetstream().consumer_info(self.name, self.group)
        finally:
            await nc.close()
        return int(info.num_pending + info.num_ack_pending)

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

    async def write(self, batch: Sequence[Any]) -> None:
        await super().write(batch)
        self.written += len(batch)
        if self.written >= self.target:
            self.done.set()


async def batchpunk(place: Place, table: str, count: int, finish: Callable[[], None]) -> None:
    """A Pipeline moves ``count`` messages into the table; stops once all are acknowledged."""
    sink = CountingSink(count, DSN, table, COLUMNS, idempotency_key="id", pool_max=4)
    pipeline = Pipeline(place.source(), sink, CONFIG)
    with tuned_collector() if TUNED else contextlib.nullcontext():
        task = asyncio.create_task(pipeline.run())
        try:
            await asyncio.wait_for(sink.done.wait(), timeout=max(120.0, count / 200))
            # Polling the public stats: a bench may, and 2 ms is below the measurement's noise.
            while (await pipeline.get_stats())["pipeline"]["acked"] < count:  # noqa: ASYNC110
                await asyncio.sleep(0.002)
            await asyncio.sleep(0)  # the sources' flushers write the last acknowledgements
            finish()
        finally:
            pipeline.request_stop()
            await task


# -- the hand-written loops ----------------------------------------------------------------------


async def hand_written(place: Place, table: str, count: int, finish: Callable[[], None]) -> None:
    import asyncpg

    conn = await asyncpg.connect(DSN)
    try:
        sql = insert_sql(table)
        # Each loop calls finish() itself, before closing its broker connection (not timed).
        if place.broker == "rabbitmq":
            await _hand_rabbitmq(place, conn, sql, count, finish)
        elif place.broker == "redis":
            await _hand_redis(place, conn, sql, count, finish)
        else:
            await _hand_nats(place, conn, sql, count, finish)
    finally:
        await conn.close()


async def _hand_rabbitmq(
    place: Place, conn: Any, sql: str, count: int, finish: Callable[[], None]
) -> None:
    import aio_pika

    connection = await aio_pika.connect(RABBITMQ_URL)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=2 * BATCH)
        queue = await channel.declare_queue(place.name, durable=True)
        done = 0
        batch: list[Any] = []
        async with queue.iterator() as messages:
            async for message in messages:
                batch.append(message)
                if len(batch) >= BATCH or done + len(batch) >= count:
                    await conn.executemany(sql, [row(json.loads(m.body)) for m in batch])
                    await batch[-1].ack(multiple=True)
                    done += len(batch)
                    batch = []
                    if done >= count:
                        finish()
                        break
    finally:
        await connection.close()


async def _hand_redis(
    place: Place, conn: Any, sql: str, count: int, finish: Callable[[], None]
) -> None:
    """The hand-written loop; without a connection (``conn`` None), the client floor's."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        done = 0
        while done < count:
            reply = await client.xreadgroup(
                place.group, "hand-1", {place.name: ">"}, count=BATCH, block=1000
            )
            for _, entries in reply or ():
                if conn is not None:
                    await conn.executemany(sql, [row(json.loads(f[b"data"])) for _, f in entries])
                await client.xack(place.name, place.group, *(i for i, _ in entries))
                done += len(entries)
        finish()
    finally:
        await client.aclose()


async def _hand_nats(
    place: Place, conn: Any, sql: str, count: int, finish: Callable[[], None]
) -> None:
    import nats

    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        subscription = await js.pull_subscribe_bind(place.group, stream=place.name)
        done = 0
        while done < count:
            messages = await subscription.fetch(BATCH, timeout=5)
            await conn.executemany(sql, [row(json.loads(m.data)) for m in messages])
            for message in messages:
                await message.ack()
            done += len(messages)
        await nc.flush()
        finish()
    finally:
        await nc.close()


# -- the client floor (--floor) -------------------------------------------------------------------


async def client_floor(place: Place, table: str, count: int, finish: Callable[[], None]) -> None:
    """Read and acknowledge ``count`` messages the cheapest way the client allows; write nothing."""
    if place.broker == "rabbitmq":
        await _floor_rabbitmq(place, count)
    elif place.broker == "redis":
        await _hand_redis(place, None, "", count, lambda: None)
    else:
        await _floor_nats(place, count)
    finish()


async def _floor_rabbitmq(place: Place, count: int) -> None:
    import aiormq

    connection = await aiormq.connect(RABBITMQ_URL)
    try:
        channel = await connection.channel()
        await channel.basic_qos(prefetch_count=2 * BATCH)
        seen = 0
        done = asyncio.Event()

        async def on_message(message: Any) -> None:
            nonlocal seen
            seen += 1
            if seen % BATCH == 0 or seen == count:
                await channel.basic_ack(message.delivery.delivery_tag, multiple=True)
            if seen == count:
                done.set()

        await channel.basic_consume(place.name, on_message, no_ack=False)
        await done.wait()
    finally:
        await connection.close()


async def _floor_nats(place: Place, count: int) -> None:
    import nats

    nc = await nats.connect(NATS_URL)
    try:
        replies: list[str] = []
        need = 0
        arrived = asyncio.Event()

        async def on_message(message: Any) -> None:
            if message.reply:
                replies.append(message.reply)
                if len(replies) >= need:
                    arrived.set()

        inbox = nc.new_inbox()
        await nc.subscribe(inbox, cb=on_message)
        pull = f"$JS.API.CONSUMER.MSG.NEXT.{place.name}.{place.group}"
        done = 0
        while done < count:
            need = min(BATCH, count - done)
            arrived.clear()
            request = json.dumps({"batch": need, "expires": 5_000_000_000}).encode()
            await nc.publish(pull, request, reply=inbox)
            await asyncio.wait_for(arrived.wait(), 10)
            batch, replies[:] = list(replies), []
            for reply in batch:
                await nc.publish(reply, b"+ACK")
            done += len(batch)
        await nc.flush()
    finally:
        await nc.close()


# -- FastStream ----------------------------------------------------------------------------------


async def faststream(place: Place, table: str, count: int, finish: Callable[[], None]) -> None:
    import asyncpg

    conn = await asyncpg.connect(DSN)
    sql = insert_sql(table)
    done = asyncio.Event()
    written = 0

    async def handle(orders: list[dict[str, Any]]) -> None:
        nonlocal written
        # Redis hands over each entry's fields ({"data": "<json>"}); NATS the decoded JSON.
        await conn.executemany(
            sql, [row(json.loads(o["data"]) if "data" in o else o) for o in orders]
        )
        written += len(orders)
        if written >= count:
            done.set()

    if place.broker == "redis":
        from faststream.redis import RedisBroker, StreamSub

        broker: Any = RedisBroker(REDIS_URL, logger=None)
        broker.subscriber(
            stream=StreamSub(
                place.name, group=place.group, consumer="fs-1", batch=True, max_records=BATCH
            )
        )(handle)
    else:
        from faststream.nats import JStream, NatsBroker, PullSub

        broker = NatsBroker(NATS_URL, logger=None)
        broker.subscriber(
            place.subject,
            stream=JStream(place.name, declare=False),
            durable=place.group,
            pull_sub=PullSub(batch_size=BATCH, batch=True, timeout=0.5),
        )(handle)
    try:
        await broker.start()
        await asyncio.wait_for(done.wait(), timeout=max(120.0, count / 200))
        await asyncio.sleep(0)  # the handler's return: FastStream acknowledges then
        await asyncio.sleep(0)
        finish()
    finally:
        await broker.stop()
        await conn.close()


FASTSTREAM_BROKERS = ("redis", "nats")  # RabbitMQ has no batch subscriber in FastStream


# -- driver ------------------------------------------------------------------------------------

Contender = Callable[[Place, str, int, Callable[[], None]], Awaitable[None]]


async def measure(
    broker: str, name: str, run: Contender, count: int, admin: Any
) -> tuple[float, float]:
    """(msg/s wall clock, client CPU microseconds per message) on a fresh place and table."""
    place = Place(broker)
    table = unique("bp_bench_broker_")
    await admin.execute(
        f"CREATE TABLE {table} (id bigint PRIMARY KEY, customer text NOT NULL, "
        "amount_cents bigint NOT NULL CHECK (amount_cents >= 0))"
    )
    try:
        await place.fill(orders(count))
        ended: list[float] = []

        def finish() -> None:
            ended[:] = [time.perf_counter(), time.process_time()]

        wall, cpu = time.perf_counter(), time.process_time()
        await run(place, table, count, finish)
        if not ended:
            raise SystemExit(f"{broker} {name}: never reported the end")
        wall, cpu = ended[0] - wall, ended[1] - cpu
        rows = await admin.fetchval(f"SELECT count(*) FROM {table}")
        expected = 0 if run is client_floor else count  # the floor writes nothing
        if rows != expected:
            raise SystemExit(f"{broker} {name}: {rows} rows in the table, expected {expected}")
        left = await place.pending()
        for _ in range(20):  # a broker may count acknowledgements it received a moment late
            if not left:
                break
            await asyncio.sleep(0.1)
            left = await place.pending()
        if left:
            raise SystemExit(f"{broker} {name}: {left} message(s) still pending")
        return count / wall, cpu / count * 1e6
    finally:
        await place.delete()
        await admin.execute(f"DROP TABLE IF EXISTS {table}")


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--brokers", default=",".join(BROKERS), help="comma-separated subset")
    parser.add_argument("--messages", type=int, help="messages per contender and round")
    parser.add_argument("--rounds", type=int, help="interleaved rounds")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="add the client floor per broker: read and acknowledge only (see above)",
    )
    parser.add_argument(
        "--collector",
        choices=("tuned", "default"),
        default="tuned",
        help="batchpunk's collector: as `batchpunk run` sets it, or CPython's defaults",
    )
    args = parser.parse_args()
    global TUNED
    TUNED = args.collector == "tuned"
    if tuned_collector is contextlib.nullcontext:  # type: ignore[comparison-overlap]
        args.collector = "default (this batchpunk has no _memory)"
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    for broker in brokers:
        if broker not in BROKERS:
            parser.error(f"--brokers: unknown broker {broker!r} (expected {', '.join(BROKERS)})")
    messages = args.messages or (10_000 if args.quick else 50_000)
    rounds = args.rounds or (1 if args.quick else 3)
    has_faststream = importlib.util.find_spec("faststream") is not None

    import asyncpg

    admin = await asyncpg.connect(DSN)
    try:
        version = await admin.fetchval("SHOW server_version")
        print(
            f"broker -> PostgreSQL {version}, {messages:,} JSON orders per run, idempotent on "
            f"id; {rounds} interleaved round(s); batchpunk's collector {args.collector}; "
            "msg/s = best round (wall clock), ratio = median of same-round ratios to the "
            "hand-written loop; client CPU per message = median"
        )
        print(f"  before: {load()}")
        print(f"  {'broker':<10}{'contender':<16}{'msg/s':>10}{'ratio':>8}{'CPU us/msg':>12}")
        for broker in brokers:
            contenders: dict[str, Contender] = {
                "hand-written": hand_written,
                "batchpunk": batchpunk,
            }
            if has_faststream and broker in FASTSTREAM_BROKERS:
                contenders["FastStream"] = faststream
            if args.floor:
                contenders["client floor"] = client_floor
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
            for _ in range(rounds):
                for name, run in contenders.items():
                    results[name].append(await measure(broker, name, run, messages, admin))
            base = results["hand-written"]
            for name, runs in results.items():
                ratio = statistics.median(r[0] / b[0] for r, b in zip(runs, base, strict=True))
                cpu = statistics.median(r[1] for r in runs)
                best = max(r[0] for r in runs)
                target = ""
                if name == "batchpunk":
                    target = f"  (target >= {TARGETS[broker]}x, <= 7 us/msg)"
                print(
                    f"  {broker:<10}{name:<16}{best:>10,.0f}{ratio:>7.2f}x{cpu:>12.1f}{target}",
                    flush=True,
                )
        print(f"  after: {load()}")
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
