"""Redis Streams cases for the Source and Sink contract suite.

Every case works on its own stream (a unique key per call), read through one consumer group
with one stable consumer name, and deletes the stream, group included, on exit.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from batchpunk.envelope import Source
from tests.contract.harness import OpenedSink, SinkCase, SourceCase

REDIS_URL = "redis://127.0.0.1:6379"
GROUP = "contract"


def unique_stream() -> str:
    """A stream key no other test uses."""
    return f"batchpunk-contract:{uuid.uuid4().hex}"


@asynccontextmanager
async def redis_client() -> AsyncIterator[Any]:
    """A plain redis.asyncio client for setting up and inspecting, closed on exit."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


async def outstanding(client: Any, stream: str, group: str) -> int:
    """Entries of the stream the group has not acknowledged: pending plus never delivered."""
    if not await client.exists(stream):
        return 0
    groups = {g["name"].decode(): g for g in await client.xinfo_groups(stream)}
    if group not in groups:
        return int(await client.xlen(stream))
    pending = int((await client.xpending(stream, group))["pending"])
    last = groups[group]["last-delivered-id"].decode()
    undelivered = len(await client.xrange(stream, min=f"({last}", max="+"))
    return pending + undelivered


class _RedisPlace:
    def __init__(self, client: Any, stream: str) -> None:
        self.client = client
        self.stream = stream

    def source(self) -> Source:
        from batchpunk.connectors.redis_streams import RedisStreamSource

        return RedisStreamSource(REDIS_URL, self.stream, GROUP, "worker-1", block=0.2)

    async def outstanding(self) -> int | None:
        return await outstanding(self.client, self.stream, GROUP)


@asynccontextmanager
async def _open_source(payloads: Sequence[Any]) -> AsyncIterator[_RedisPlace]:
    stream = unique_stream()
    async with redis_client() as client:
        try:
            for payload in payloads:
                await client.xadd(stream, {"data": json.dumps(payload)})
            yield _RedisPlace(client, stream)
        finally:
            await client.delete(stream)


@asynccontextmanager
async def _open_sink() -> AsyncIterator[OpenedSink]:
    from batchpunk.connectors.redis_streams import RedisStreamSink

    stream = unique_stream()
    async with redis_client() as client:
        sink = RedisStreamSink(REDIS_URL, stream)

        async def stored() -> list[Any]:
            return [json.loads(fields[b"data"]) for _, fields in await client.xrange(stream)]

        try:
            yield OpenedSink(sink=sink, stored=stored)
        finally:
            await sink.close()
            await client.delete(stream)


SOURCE_CASES = [SourceCase(name="redis-streams", server="redis", open=_open_source)]
SINK_CASES = [SinkCase(name="redis-streams", server="redis", open=_open_sink)]
