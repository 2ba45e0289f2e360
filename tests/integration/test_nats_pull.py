"""NatsJetStreamSource's own pull protocol against the real nats-server: batches, latency,
consumers that disappear, and the ack metadata read from reply subjects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from batchpunk.connectors.nats import NatsJetStreamSource, _ack_metadata
from batchpunk.errors import ConfigError
from tests.conftest import require_server
from tests.contract.cases_nats import NATS_URL, consumer_counts, fresh_stream, unique
from tests.contract.harness import take


@pytest.fixture
async def sources() -> AsyncIterator[list[NatsJetStreamSource]]:
    """Sources a test opens; every one is closed at the end, even after a failure."""
    require_server("nats")
    made: list[NatsJetStreamSource] = []
    yield made
    for source in made:
        await source.close()


def make(made: list[NatsJetStreamSource], stream: str, subject: str, **kw: Any):
    kw.setdefault("fetch_timeout", 0.3)
    kw.setdefault("nak_delay", 0.0)
    source = NatsJetStreamSource(NATS_URL, stream, subject, unique("D"), **kw)
    made.append(source)
    return source


@pytest.mark.integration
async def test_a_backlog_comes_in_whole_batches_once_each_and_one_batch_at_a_time(sources) -> None:
    """1,234 messages, batch=100: in order, exactly once, never more than one batch ahead."""
    payloads = [{"id": i} for i in range(1234)]
    async with fresh_stream(payloads) as (js, stream, subject):
        source = make(sources, stream, subject, batch=100)
        first = await take(source, 1)
        for _ in range(300):  # the rest of that pull is still arriving
            if source.unsettled >= 100:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        assert source.unsettled == 100  # one pull's worth fetched, no more until it is taken
        rest = await take(source, 1233)
        got = first + rest
        assert [e.payload["id"] for e in got] == list(range(1234))
        assert [source.headers_of(e)["stream_seq"] for e in got] == list(range(1, 1235))
        assert [source.headers_of(e)["consumer_seq"] for e in got] == list(range(1, 1235))
        assert source.unsettled == 1234
        await source.ack_many(got)
        assert source.unsettled == 0
        await source.close()
        deadline = time.monotonic() + 3.0
        while await consumer_counts(js, stream, source.durable) != (0, 0):
            assert time.monotonic() < deadline, "acks never reached the server"
            await asyncio.sleep(0.05)


@pytest.mark.integration
async def test_a_message_published_while_a_pull_waits_comes_out_at_once(sources) -> None:
    """A waiting reader gets a new message right away, not when its pull expires (3 s here)."""
    async with fresh_stream() as (js, stream, subject):
        source = make(sources, stream, subject, fetch_timeout=3.0)
        await source.start()
        reading = asyncio.create_task(take(source, 1))
        await asyncio.sleep(0.3)  # the pull is waiting on the server now
        published = time.monotonic()
        await js.publish(subject, b'{"id": 1}')
        [envelope] = await reading
        assert time.monotonic() - published < 1.0
        assert envelope.payload == {"id": 1}
        await source.ack_many([envelope])


@pytest.mark.integration
async def test_a_consumer_deleted_under_a_waiting_pull_is_created_again(sources) -> None:
    """With create=True, deleting the durable while a pull waits costs nothing: it is recreated."""
    async with fresh_stream() as (js, stream, subject):
        source = make(sources, stream, subject, fetch_timeout=1.0)
        await source.start()
        reading = asyncio.create_task(take(source, 1, seconds=5.0))
        await asyncio.sleep(0.3)
        await js.delete_consumer(stream, source.durable)
        await asyncio.sleep(0.3)
        await js.publish(subject, b'{"id": 1}')
        [envelope] = await reading
        assert envelope.payload == {"id": 1}
        await source.ack_many([envelope])


@pytest.mark.integration
async def test_a_consumer_deleted_between_pulls_is_noticed_by_the_unanswered_pull(sources) -> None:
    """A pull to a deleted durable gets no answer; the source checks at once and recreates it."""
    async with fresh_stream() as (js, stream, subject):
        source = make(sources, stream, subject, fetch_timeout=0.5)
        await source.start()
        await js.delete_consumer(stream, source.durable)
        await js.publish(subject, b'{"id": 1}')
        [envelope] = await take(source, 1, seconds=5.0)  # not the 30 s idle-check period
        assert envelope.payload == {"id": 1}
        await source.ack_many([envelope])


@pytest.mark.integration
async def test_a_deleted_consumer_without_create_ends_iteration_with_a_config_error(
    sources,
) -> None:
    """With create=False, a durable deleted under a waiting pull fails the reader, naming it."""
    async with fresh_stream() as (js, stream, subject):
        durable = unique("D")
        owner = NatsJetStreamSource(NATS_URL, stream, subject, durable)
        sources.append(owner)
        await owner.start()  # creates the durable
        source = NatsJetStreamSource(
            NATS_URL, stream, subject, durable, create=False, fetch_timeout=1.0
        )
        sources.append(source)
        await source.start()
        reading = asyncio.create_task(take(source, 1, seconds=5.0))
        await asyncio.sleep(0.3)
        await js.delete_consumer(stream, durable)
        with pytest.raises(ConfigError, match=r"NatsJetStreamSource\.durable.*was deleted"):
            await reading


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.ORDERS.writer.3.1234.1200.1700000000123456789.42",
        "$JS.ACK.hub.ACCHASH.ORDERS.writer.1.9.7.1699999999999999999.0.r4nd0m",
        "$JS.ACK.hub.ACCHASH.ORDERS.writer.2.5.5.1600000000000000500.0",
    ],
)
def test_ack_metadata_reads_what_nats_py_reads_from_a_reply_subject(reply: str) -> None:
    """The reply-subject parser gives the values (timestamp too) of nats-py's msg.metadata."""
    from nats.aio.msg import Msg

    meta = Msg.Metadata._from_reply(reply)
    assert _ack_metadata(reply) == (
        meta.stream,
        meta.num_delivered,
        meta.sequence.stream,
        meta.sequence.consumer,
        meta.timestamp.timestamp(),
    )


def test_ack_metadata_refuses_a_reply_that_is_not_jetstream() -> None:
    """A reply subject that is not a JetStream ack subject is an error naming the subject."""
    with pytest.raises(ValueError, match=r"_INBOX\.abc"):
        _ack_metadata("_INBOX.abc")
