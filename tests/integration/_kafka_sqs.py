"""The Kafka (Tansu) and SQS (moto) places for the cross-broker proofs of tests/integration.

``KafkaPlace`` and ``SqsPlace`` are ``Place``s (see _harness.py): the same publish, count and
checker calls work on them. What each counts as outstanding:

- Kafka: for every partition, the records published minus the group's committed offset
  (taken from the produce acknowledgements, never from ListOffsets LATEST, which the Tansu test
  broker answers wrongly after batched produces).
- SQS: ApproximateNumberOfMessages + ApproximateNumberOfMessagesNotVisible.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.integration._harness import OrdersTable, Place, _pg, encode, unique

KAFKA = "127.0.0.1:9092"
SQS_ENDPOINT = "http://127.0.0.1:4566"
SQS_REGION = "us-east-1"
PARTITIONS = 3
#: What SqsSource and SqsSink need to talk to the local moto_server (any key works there).
MOTO = {
    "endpoint_url": SQS_ENDPOINT,
    "region": SQS_REGION,
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
}


@dataclass
class KafkaPlace(Place):
    """A fresh topic with PARTITIONS partitions and a fresh consumer group."""

    broker: str = "kafka"
    partitions: int = PARTITIONS
    ends: dict[int, int] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return 9092

    def source_options(self, **extra: Any) -> dict[str, Any]:
        return {
            "type": "kafka",
            "bootstrap_servers": KAFKA,
            "topics": [self.name],
            "group_id": self.group,
            "batch_key": "none",
            "session_timeout": 6.0,
            "revoke_timeout": 3.0,
            **extra,
        }

    def build_source(self, consumer: str = "worker-0", **extra: Any) -> Any:
        from batchpunk.connectors.kafka import KafkaSource

        options = self.source_options(**extra)
        options.pop("type")
        return KafkaSource(**options)

    async def create(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(self.name, num_partitions=self.partitions, replication_factor=1)]
            )
        finally:
            await admin.close()

    async def delete(self) -> None:
        """Tansu's memory storage keeps nothing across its restarts; deleting is best effort."""
        from aiokafka.admin import AIOKafkaAdminClient

        with contextlib.suppress(Exception):
            admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
            await admin.start()
            try:
                await admin.delete_topics([self.name])
            finally:
                await admin.close()

    async def publish(self, orders: Sequence[Mapping[str, Any]], *, chunk: int = 2000) -> None:
        """Produce every order with acks=all; remember each partition's end offset."""
        async with kafka_producer() as producer:
            for start in range(0, len(orders), chunk):
                futures = [
                    await producer.send(self.name, encode(o)) for o in orders[start : start + chunk]
                ]
                for meta in await asyncio.gather(*futures):
                    self.ends[meta.partition] = max(
                        self.ends.get(meta.partition, 0), meta.offset + 1
                    )

    async def committed(self) -> dict[int, int]:
        """The group's committed offset per partition (0 where none)."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(
            bootstrap_servers=KAFKA, group_id=self.group, enable_auto_commit=False
        )
        await consumer.start()
        try:
            out: dict[int, int] = {}
            for partition in range(self.partitions):
                offset = await consumer.committed(TopicPartition(self.name, partition))
                out[partition] = offset or 0
            return out
        finally:
            await consumer.stop()

    async def outstanding(self) -> int:
        committed = await self.committed()
        return sum(max(0, end - committed.get(p, 0)) for p, end in self.ends.items())

    async def unacknowledged(self) -> int:
        """Kafka has no per-message acknowledgement: what is not committed."""
        return await self.outstanding()


@contextlib.asynccontextmanager
async def kafka_producer() -> AsyncIterator[Any]:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all", linger_ms=5)
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


# -- SQS -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def sqs_client() -> AsyncIterator[Any]:
    from aiobotocore.session import get_session

    session = get_session()
    async with session.create_client(
        "sqs",
        region_name=SQS_REGION,
        endpoint_url=SQS_ENDPOINT,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ) as client:
        yield client


@dataclass
class SqsPlace(Place):
    """A fresh standard (or FIFO) queue on moto."""

    broker: str = "sqs"
    fifo: bool = False
    visibility_timeout: int = 5
    url: str = ""

    @property
    def port(self) -> int:
        return 4566

    def source_options(self, **extra: Any) -> dict[str, Any]:
        return {
            "type": "sqs",
            "queue_url": self.url,
            **MOTO,
            "wait_time": 1,
            "visibility_timeout": self.visibility_timeout,
            "max_receives": 1000,
            **extra,
        }

    def build_source(self, consumer: str = "worker-0", **extra: Any) -> Any:
        from batchpunk.connectors.sqs import SqsSource

        options = self.source_options(**extra)
        options.pop("type")
        return SqsSource(**options)

    async def create(self) -> None:
        name = self.name + (".fifo" if self.fifo else "")
        attributes = {"VisibilityTimeout": str(self.visibility_timeout)}
        if self.fifo:
            attributes["FifoQueue"] = "true"
        async with sqs_client() as client:
            reply = await client.create_queue(QueueName=name, Attributes=attributes)
        self.url = reply["QueueUrl"]

    async def delete(self) -> None:
        with contextlib.suppress(Exception):
            async with sqs_client() as client:
                await client.delete_queue(QueueUrl=self.url)

    async def publish(self, orders: Sequence[Mapping[str, Any]], *, chunk: int = 2000) -> None:
        async with sqs_client() as client:
            entries = [
                {
                    "Id": str(i),
                    "MessageBody": json.dumps(o, separators=(",", ":")),
                    **(
                        {"MessageGroupId": str(o["id"] % 4), "MessageDeduplicationId": str(o["id"])}
                        if self.fifo
                        else {}
                    ),
                }
                for i, o in enumerate(orders)
            ]
            sends = [
                client.send_message_batch(QueueUrl=self.url, Entries=entries[s : s + 10])
                for s in range(0, len(entries), 10)
            ]
            if self.fifo:  # one call after the other: the queue keeps the publishing order
                for send in sends:
                    reply = await send
                    assert not reply.get("Failed"), reply
                return
            for start in range(0, len(sends), 20):
                for reply in await asyncio.gather(*sends[start : start + 20]):
                    assert not reply.get("Failed"), reply

    async def counts(self) -> tuple[int, int]:
        """(visible, in flight) messages."""
        async with sqs_client() as client:
            reply = await client.get_queue_attributes(
                QueueUrl=self.url,
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                ],
            )
        attrs = reply["Attributes"]
        return (
            int(attrs["ApproximateNumberOfMessages"]),
            int(attrs["ApproximateNumberOfMessagesNotVisible"]),
        )

    async def outstanding(self) -> int:
        visible, in_flight = await self.counts()
        return visible + in_flight

    async def unacknowledged(self) -> int:
        return (await self.counts())[1]


def new_kafka_place() -> KafkaPlace:
    """A KafkaPlace with unique topic and group names."""
    return KafkaPlace(broker="kafka", name=unique("t"), group=unique("g"))


def new_sqs_place(*, fifo: bool = False, visibility_timeout: int = 5) -> SqsPlace:
    """An SqsPlace with a unique queue name (created by ``create()``)."""
    return SqsPlace(
        broker="sqs", name=unique("q"), fifo=fifo, visibility_timeout=visibility_timeout
    )


class AppendOnlyOrdersTable(OrdersTable):
    """The orders table without any unique key (an append-only log of rows), written by
    PostgresSink with ``positions``: only the positions keep a redelivery from adding a row."""

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.positions = f"{self.name}_positions"

    async def create(self) -> None:
        conn = await _pg()
        try:
            await conn.execute(
                f"CREATE TABLE {self.kinds} (kind text PRIMARY KEY);"
                f"INSERT INTO {self.kinds} VALUES ('a'), ('b');"
                f"CREATE TABLE {self.name} ("
                " id bigint NOT NULL,"
                f" kind text NOT NULL REFERENCES {self.kinds} (kind),"
                " amount integer NOT NULL CHECK (amount >= 0),"
                " note text)"
            )
        finally:
            await conn.close()

    async def drop(self) -> None:
        await super().drop()
        conn = await _pg()
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {self.positions}")
        finally:
            await conn.close()

    def sink_options(self, **extra: Any) -> dict[str, Any]:
        options = super().sink_options(positions=self.positions, **extra)
        options.pop("idempotency_key")
        return options
