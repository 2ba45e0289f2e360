"""Kafka cases for the Source and Sink contract suite, on the Tansu test broker.

Each case uses its own one-partition topic and consumer group. Kafka keeps one committed offset
per partition, so the redelivery test acknowledges a prefix (``acks_out_of_order=False``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from batchpunk.envelope import Source
from tests.contract.harness import OpenedSink, SinkCase, SourceCase
from tests.integration._kafka_sqs import KAFKA, KafkaPlace


class _Place:
    def __init__(self, place: KafkaPlace) -> None:
        self.place = place

    def source(self) -> Source:
        from batchpunk.connectors.kafka import KafkaSource

        return KafkaSource(
            KAFKA,
            self.place.name,
            self.place.group,
            batch_key="none",
            fetch_timeout=0.2,
            # Short group timeouts: the test broker makes a joining member wait the rebalance
            # timeout, and a closed first member is only dropped when its session expires.
            session_timeout=3.0,
            revoke_timeout=1.0,
        )

    async def outstanding(self) -> int | None:
        return await self.place.outstanding()


@asynccontextmanager
async def _open_source(payloads: Sequence[Any]) -> AsyncIterator[_Place]:
    place = KafkaPlace(
        name=f"contract{uuid.uuid4().hex[:12]}", group=uuid.uuid4().hex, partitions=1
    )
    await place.create()
    try:
        await place.publish(payloads)
        yield _Place(place)
    finally:
        await place.delete()


async def _read_topic(topic: str, count: int) -> list[Any]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=KAFKA, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        out: list[Any] = []
        for _ in range(20):
            if len(out) >= count:
                break
            for records in (await consumer.getmany(timeout_ms=300)).values():
                out.extend(json.loads(r.value) for r in records)
        return out
    finally:
        await consumer.stop()


@asynccontextmanager
async def _open_sink() -> AsyncIterator[OpenedSink]:
    from batchpunk.connectors.kafka import KafkaSink

    place = KafkaPlace(name=f"contract{uuid.uuid4().hex[:12]}", group="unused", partitions=1)
    await place.create()
    sink = KafkaSink(KAFKA, place.name)
    written = 0
    original = sink.write

    async def write(batch: Sequence[Any]) -> Any:
        nonlocal written
        result = await original(batch)
        written += len(batch)
        return result

    sink.write = write  # type: ignore[method-assign]

    async def stored() -> list[Any]:
        return await _read_topic(place.name, written)

    try:
        yield OpenedSink(sink=sink, stored=stored)
    finally:
        await sink.close()
        await place.delete()


SOURCE_CASES = [
    SourceCase(name="kafka", server="kafka", open=_open_source, acks_out_of_order=False)
]
SINK_CASES = [SinkCase(name="kafka", server="kafka", open=_open_sink)]
