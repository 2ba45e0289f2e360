"""SQS cases for the Source and Sink contract suite, on a local moto_server.

Each case uses its own queue. Messages nacked with requeue, or never settled before close(),
are made visible again at once, so a second consumer gets them without waiting.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from batchpunk.envelope import Source
from tests.contract.harness import OpenedSink, SinkCase, SourceCase
from tests.integration._kafka_sqs import MOTO, SqsPlace, new_sqs_place, sqs_client


class _Place:
    def __init__(self, place: SqsPlace) -> None:
        self.place = place

    def source(self) -> Source:
        from batchpunk.connectors.sqs import SqsSource

        return SqsSource(self.place.url, wait_time=1, **MOTO)

    async def outstanding(self) -> int | None:
        return await self.place.outstanding()


@asynccontextmanager
async def _open_source(payloads: Sequence[Any]) -> AsyncIterator[_Place]:
    place = new_sqs_place(visibility_timeout=30)
    await place.create()
    try:
        await place.publish(payloads)
        yield _Place(place)
    finally:
        await place.delete()


@asynccontextmanager
async def _open_sink() -> AsyncIterator[OpenedSink]:
    from batchpunk.connectors.sqs import SqsSink

    place = new_sqs_place(fifo=True)
    await place.create()
    # A FIFO queue, so that stored() can check the order; one group keeps one global order.
    sink = SqsSink(place.url, group_field="g", dedup_field="id", **MOTO)
    original = sink.write

    async def write(batch: Sequence[Any]) -> Any:
        return await original(
            [{**p, "g": "all"} if isinstance(p, dict) and "body" in p else p for p in batch]
        )

    sink.write = write  # type: ignore[method-assign]

    async def stored() -> list[Any]:
        out: list[Any] = []
        async with sqs_client() as client:
            while True:
                reply = await client.receive_message(
                    QueueUrl=place.url, MaxNumberOfMessages=10, WaitTimeSeconds=0
                )
                messages = reply.get("Messages", [])
                if not messages:
                    return out
                for message in messages:
                    body = json.loads(message["Body"])
                    body.pop("g", None)
                    out.append(body)
                    await client.delete_message(
                        QueueUrl=place.url, ReceiptHandle=message["ReceiptHandle"]
                    )

    try:
        yield OpenedSink(sink=sink, stored=stored)
    finally:
        await sink.close()
        await place.delete()


SOURCE_CASES = [SourceCase(name="sqs", server="sqs", open=_open_source)]
SINK_CASES = [SinkCase(name="sqs", server="sqs", open=_open_sink)]
