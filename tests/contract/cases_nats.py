"""NATS JetStream cases for the Source and Sink contract suite, and the helpers its tests share.

Every case works on its own stream, subject and durable (unique per call) and deletes the
stream, consumers included, on exit.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from batchpunk.envelope import Source
from tests.contract.harness import OpenedSink, SinkCase, SourceCase

NATS_URL = "nats://127.0.0.1:4222"


def unique(prefix: str = "bp") -> str:
    """A name safe for a stream, durable or subject token, different on every call."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


@asynccontextmanager
async def jetstream() -> AsyncIterator[Any]:
    """A plain nats-py JetStream context for setting up and inspecting, closed on exit."""
    import nats

    nc = await nats.connect(NATS_URL)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


@asynccontextmanager
async def fresh_stream(payloads: Sequence[Any] = (), *, raw: bool = False) -> AsyncIterator[Any]:
    """A new stream capturing one subject, holding ``payloads``; yields (js, stream, subject).

    Payloads are JSON-encoded unless ``raw``, when they must already be bytes.
    """
    stream = unique("S")
    subject = f"{unique('bp')}.events"
    async with jetstream() as js:
        await js.add_stream(name=stream, subjects=[subject])
        try:
            for payload in payloads:
                await js.publish(subject, payload if raw else json.dumps(payload).encode())
            yield js, stream, subject
        finally:
            await js.delete_stream(stream)


async def consumer_counts(js: Any, stream: str, durable: str) -> tuple[int, int]:
    """(num_ack_pending, num_pending) of a durable consumer."""
    info = await js.consumer_info(stream, durable)
    return info.num_ack_pending, info.num_pending


class _NatsPlace:
    def __init__(self, js: Any, stream: str, subject: str) -> None:
        self.js = js
        self.stream = stream
        self.subject = subject
        self.durable = unique("D")

    def source(self) -> Source:
        from batchpunk.connectors.nats import NatsJetStreamSource

        return NatsJetStreamSource(
            NATS_URL,
            self.stream,
            self.subject,
            self.durable,
            ack_wait=5.0,
            fetch_timeout=0.3,
            nak_delay=0.0,
        )

    async def outstanding(self) -> int | None:
        import nats.js.errors

        try:
            ack_pending, pending = await consumer_counts(self.js, self.stream, self.durable)
        except nats.js.errors.NotFoundError:  # never consumed: everything is still there
            info = await self.js.stream_info(self.stream)
            return int(info.state.messages)
        return ack_pending + pending


@asynccontextmanager
async def _open_source(payloads: Sequence[Any]) -> AsyncIterator[_NatsPlace]:
    async with fresh_stream(payloads) as (js, stream, subject):
        yield _NatsPlace(js, stream, subject)


@asynccontextmanager
async def _open_sink() -> AsyncIterator[OpenedSink]:
    from batchpunk.connectors.nats import NatsJetStreamSink

    async with fresh_stream() as (js, stream, subject):
        sink = NatsJetStreamSink(NATS_URL, subject, stream=stream)

        async def stored() -> list[Any]:
            state = (await js.stream_info(stream)).state
            if not state.messages:
                return []
            return [
                json.loads((await js.get_msg(stream, seq)).data)
                for seq in range(state.first_seq, state.last_seq + 1)
            ]

        try:
            yield OpenedSink(sink=sink, stored=stored)
        finally:
            await sink.close()


SOURCE_CASES = [SourceCase(name="nats-jetstream", server="nats", open=_open_source)]
SINK_CASES = [SinkCase(name="nats-jetstream", server="nats", open=_open_sink)]
