"""RabbitMQ cases for the Source and Sink contract suite, and helpers the integration tests share.

Every case works on its own durable queue (a unique name per call) and deletes it on exit.
``outstanding`` asks ``rabbitmqctl`` for ready + unacknowledged messages when it is installed;
without it, the queue's ready count is exact only once no consumer holds the queue.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from batchpunk.envelope import Source
from tests.contract.harness import OpenedSink, SinkCase, SourceCase

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"


def unique_queue(prefix: str = "contract") -> str:
    """A queue name no other test uses."""
    return f"batchpunk-{prefix}-{uuid.uuid4().hex[:16]}"


@asynccontextmanager
async def rabbitmq_channel() -> AsyncIterator[Any]:
    """A plain aio-pika channel with publisher confirms, for setting up and inspecting."""
    import aio_pika

    connection = await aio_pika.connect(RABBITMQ_URL)
    try:
        yield await connection.channel(publisher_confirms=True)
    finally:
        await connection.close()


async def publish_json(channel: Any, queue: str, payloads: Sequence[Any]) -> None:
    """Publish each payload as one persistent JSON message to the queue, confirmed."""
    await publish_raw(channel, queue, [json.dumps(p).encode() for p in payloads])


async def publish_raw(channel: Any, queue: str, bodies: Sequence[bytes], **properties: Any) -> None:
    """Publish raw bodies as persistent messages to the queue, confirmed."""
    import aio_pika

    persistent = aio_pika.DeliveryMode.PERSISTENT
    await asyncio.gather(
        *(
            channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=persistent, **properties), queue
            )
            for body in bodies
        )
    )


async def rabbitmqctl_counts(queue: str) -> tuple[int, int] | None:
    """(ready, unacknowledged) of the queue from ``rabbitmqctl list_queues``.

    None when rabbitmqctl is not installed; (0, 0) when the queue is not listed.
    """
    if shutil.which("rabbitmqctl") is None:
        return None
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "messages_ready",
        "messages_unacknowledged",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    output, _ = await process.communicate()
    for line in output.decode().splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] == queue:
            return int(fields[1]), int(fields[2])
    return 0, 0


async def queue_counts(channel: Any, queue: str) -> tuple[int, int] | None:
    """(ready, unacknowledged) messages of the queue, from rabbitmqctl; None without it."""
    return await rabbitmqctl_counts(queue)


async def outstanding(channel: Any, queue: str) -> int | None:
    """Messages the broker still holds for the queue: ready plus unacknowledged."""
    counts = await queue_counts(channel, queue)
    if counts is not None:
        return sum(counts)
    declared = await channel.declare_queue(queue, passive=True)
    result = declared.declaration_result
    if result.consumer_count:
        return None  # a consumer may hold unacknowledged messages we cannot see
    return int(result.message_count)


async def wait_ready(channel: Any, queue: str, expected: int, seconds: float = 5.0) -> None:
    """Wait until the queue has no consumer and exactly ``expected`` ready messages.

    Cheaper than rabbitmqctl: with every consumer closed nothing can be unacknowledged, so the
    passive declaration's count is the whole story. AssertionError with the last counts if not.
    """
    seen = (-1, -1)
    try:
        async with asyncio.timeout(seconds):
            while True:
                result = (await channel.declare_queue(queue, passive=True)).declaration_result
                seen = (int(result.consumer_count), int(result.message_count))
                if seen == (0, expected):
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(
            f"{queue}: expected 0 consumers and {expected} ready, last seen {seen}"
        ) from None


async def delete_queue(channel: Any, queue: str) -> None:
    """Delete the queue whatever it holds."""
    await channel.queue_delete(queue)


class _RabbitPlace:
    def __init__(self, channel: Any, queue: str) -> None:
        self.channel = channel
        self.queue = queue

    def source(self) -> Source:
        from batchpunk.connectors.rabbitmq import RabbitMQSource

        return RabbitMQSource(RABBITMQ_URL, self.queue, prefetch=100)

    async def outstanding(self) -> int | None:
        return await outstanding(self.channel, self.queue)


@asynccontextmanager
async def _open_source(payloads: Sequence[Any]) -> AsyncIterator[_RabbitPlace]:
    queue = unique_queue()
    async with rabbitmq_channel() as channel:
        await channel.declare_queue(queue, durable=True)
        try:
            await publish_json(channel, queue, payloads)
            yield _RabbitPlace(channel, queue)
        finally:
            await delete_queue(channel, queue)


async def drain(channel: Any, queue: str) -> list[Any]:
    """Take every message now in the queue, acknowledged, as (body, content_type) pairs."""
    declared = await channel.declare_queue(queue, passive=True)
    out: list[Any] = []
    while True:
        message = await declared.get(fail=False)
        if message is None:
            return out
        out.append((message.body, message.content_type))
        await message.ack()


def _sink_opener(mode: str) -> Any:
    @asynccontextmanager
    async def open_sink() -> AsyncIterator[OpenedSink]:
        from batchpunk.codec import decode_batch
        from batchpunk.connectors.rabbitmq import FRAME_CONTENT_TYPE, RabbitMQSink

        queue = unique_queue(f"sink-{mode}")
        async with rabbitmq_channel() as channel:
            await channel.declare_queue(queue, durable=True)
            sink = RabbitMQSink(RABBITMQ_URL, "", queue, mode=mode, queue=queue)
            seen: list[Any] = []

            async def stored() -> list[Any]:
                for body, content_type in await drain(channel, queue):
                    if content_type == FRAME_CONTENT_TYPE:
                        seen.extend(decode_batch(body))
                    else:
                        seen.append(json.loads(body))
                return list(seen)

            try:
                yield OpenedSink(sink=sink, stored=stored)
            finally:
                await sink.close()
                await delete_queue(channel, queue)

    return open_sink


SOURCE_CASES = [SourceCase(name="rabbitmq", server="rabbitmq", open=_open_source)]
SINK_CASES = [
    SinkCase(name="rabbitmq-frame", server="rabbitmq", open=_sink_opener("frame")),
    SinkCase(name="rabbitmq-items", server="rabbitmq", open=_sink_opener("items")),
]
