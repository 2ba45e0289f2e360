"""NatsJetStreamSource and NatsJetStreamSink against the real nats-server (JetStream) on :4222."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from batchpunk.config import BatchConfig
from batchpunk.connectors.nats import (
    REDELIVERED,
    DeliveryLimitExceeded,
    NatsJetStreamSink,
    NatsJetStreamSource,
    NatsPayloadError,
)
from batchpunk.envelope import Envelope
from batchpunk.errors import ConfigError, PartialFailure
from tests.conftest import require_server
from tests.contract.cases_nats import NATS_URL, consumer_counts, fresh_stream, jetstream, unique
from tests.contract.harness import take

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _nats_up() -> None:
    require_server("nats")


@pytest.fixture
async def sources() -> AsyncIterator[list[NatsJetStreamSource]]:
    """Sources a test opens; every one is closed at the end, even after a failure."""
    made: list[NatsJetStreamSource] = []
    yield made
    for source in made:
        await source.close()


def make(made: list[NatsJetStreamSource], stream: str, subject: str, durable: str, **kw: Any):
    kw.setdefault("fetch_timeout", 0.3)
    kw.setdefault("nak_delay", 0.0)
    source = NatsJetStreamSource(NATS_URL, stream, subject, durable, **kw)
    made.append(source)
    return source


async def settled_counts(js: Any, stream: str, durable: str) -> tuple[int, int]:
    """Consumer counts once the server has applied the acks in flight (they are asynchronous)."""
    deadline = time.monotonic() + 3.0
    while True:
        counts = await consumer_counts(js, stream, durable)
        if counts == (0, 0) or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.05)


async def test_acked_messages_leave_nothing_pending_or_unacknowledged(sources) -> None:
    """Acking every envelope leaves the consumer with no pending and no unacknowledged message."""
    payloads = [{"id": i} for i in range(25)]
    async with fresh_stream(payloads) as (js, stream, subject):
        durable = unique("D")
        source = make(sources, stream, subject, durable)
        await source.prepare(BatchConfig(max_size=8))
        assert source.fetch_size == 8
        got = await take(source, 25)
        assert [e.payload for e in got] == payloads
        assert [source.headers_of(e)["stream_seq"] for e in got] == list(range(1, 26))
        assert source.unsettled == 25
        await source.ack_many(got)
        assert source.unsettled == 0
        await source.close()
        assert await settled_counts(js, stream, durable) == (0, 0)


async def test_prepare_sizes_fetches_and_the_consumer_then_connects(sources) -> None:
    """prepare() takes max_size (unless batch was given), sizes max_ack_pending, and binds."""
    async with fresh_stream() as (js, stream, subject):
        implicit = make(sources, stream, subject, unique("D"))
        explicit = make(sources, stream, subject, unique("D"), batch=7, max_ack_pending=50)
        assert implicit.fetch_size == BatchConfig().max_size
        config = BatchConfig(max_size=250, max_concurrent_batches=3)
        await implicit.prepare(config)
        await explicit.prepare(config)
        assert (implicit.fetch_size, explicit.fetch_size) == (250, 7)
        info = await js.consumer_info(stream, implicit.durable)
        assert info.config.max_ack_pending == 10 * 250 * 4
        assert (await js.consumer_info(stream, explicit.durable)).config.max_ack_pending == 50


async def test_nack_with_requeue_redelivers_the_message(sources) -> None:
    """nack(requeue=True) naks: the same message comes back with its delivery count raised."""
    async with fresh_stream([{"id": 1}]) as (js, stream, subject):
        durable = unique("D")
        source = make(sources, stream, subject, durable)
        [first] = await take(source, 1)
        assert first.headers is None  # a first delivery
        await source.nack_many([first], True)
        [again] = await take(source, 1)
        assert again.payload == {"id": 1}
        assert again.headers["delivery_count"] == 2
        await source.ack_many([again])
        await source.close()
        assert await settled_counts(js, stream, durable) == (0, 0)


async def test_nack_without_requeue_terminates_the_message(sources) -> None:
    """nack(requeue=False) terms: the message is never delivered again, even after ack_wait."""
    async with fresh_stream([{"id": "poison"}]) as (js, stream, subject):
        durable = unique("D")
        source = make(sources, stream, subject, durable, ack_wait=0.5)
        [poison] = await take(source, 1)
        await source.nack_many([poison], False)
        with pytest.raises(TimeoutError):
            await take(source, 1, seconds=1.2)
        info = await js.consumer_info(stream, durable)
        assert (info.num_ack_pending, info.num_pending, info.num_redelivered) == (0, 0, 0)


async def test_in_progress_keeps_a_slow_message_from_being_redelivered(sources) -> None:
    """A message held 2.5 s with ack_wait=1 s is not redelivered, to this or another worker."""
    async with fresh_stream([{"id": "slow"}]) as (js, stream, subject):
        durable = unique("D")
        busy = make(sources, stream, subject, durable, ack_wait=1.0)
        other = make(sources, stream, subject, durable, ack_wait=1.0)
        [held] = await take(busy, 1)

        async def other_worker_gets_nothing() -> None:
            with pytest.raises(TimeoutError):
                await take(other, 1, seconds=2.4)

        await asyncio.gather(asyncio.sleep(2.5), other_worker_gets_nothing())
        await busy.ack_many([held])
        await busy.close()
        info = await js.consumer_info(stream, durable)
        assert info.num_redelivered == 0
        assert await settled_counts(js, stream, durable) == (0, 0)


async def test_last_allowed_delivery_is_flagged_for_dead_lettering(sources) -> None:
    """With max_deliver=3 the third delivery carries batchpunk_redelivered, the earlier ones not."""
    async with fresh_stream([{"id": 7}]) as (_js, stream, subject):
        source = make(sources, stream, subject, unique("D"), max_deliver=3)
        flags = []
        for _ in range(3):
            [envelope] = await take(source, 1)
            flags.append((envelope.headers or {}).get(REDELIVERED, False))
            if not flags[-1]:
                await source.nack_many([envelope], True)
        assert flags == [False, False, True]
        assert envelope.headers["delivery_count"] == 3
        assert envelope.payload == {"id": 7}  # decoded: the pipeline reads the REDELIVERED flag
        assert isinstance(envelope.error, DeliveryLimitExceeded)
        assert "max_deliver=3" in str(envelope.error)
        await source.nack_many([envelope], False)


async def test_undecodable_messages_come_out_malformed_with_their_raw_bytes(sources) -> None:
    """A message that is not JSON comes out malformed with its raw bytes; the next is fine."""
    raw = [b"{not json", json.dumps({"id": 2}).encode(), b"\xff\xfe"]
    async with fresh_stream(raw, raw=True) as (_js, stream, subject):
        source = make(sources, stream, subject, unique("D"))
        bad, good, worse = await take(source, 3)
        assert (bad.malformed, bad.payload) == (True, b"{not json")
        assert isinstance(bad.error, ValueError)
        assert (good.malformed, good.payload, good.error) == (False, {"id": 2}, None)
        assert worse.malformed
        assert worse.payload == b"\xff\xfe"
        text = make(sources, stream, subject, unique("D"), decode="text")
        first, _, undecodable = await take(text, 3)
        assert first.payload == "{not json"
        assert undecodable.malformed
        assert isinstance(undecodable.error, UnicodeDecodeError)


async def test_frames_round_trip_and_settle_their_message_once_all_items_are(sources) -> None:
    """A frame-encoded batch comes out item by item; its message is acked after the last item."""
    async with fresh_stream() as (js, stream, subject):
        sink = NatsJetStreamSink(NATS_URL, subject, stream=stream, encode="frame", hmac_key=b"k")
        batch = [{"id": i} for i in range(5)]
        assert await sink.write(batch) == [1] * 5
        await sink.close()
        durable = unique("D")
        source = make(sources, stream, subject, durable, decode="frame", hmac_key=b"k")
        items = await take(source, 5)
        assert [e.payload for e in items] == batch
        await source.ack_many(items[:4])
        assert source.unsettled == 1
        await source.nack_many(
            [items[4]], True
        )  # one item asks for a requeue: the frame comes back
        again = await take(source, 5)
        assert [e.headers["delivery_count"] for e in again] == [2] * 5
        await source.ack_many(again)
        assert source.unsettled == 0
        await source.close()
        assert await settled_counts(js, stream, durable) == (0, 0)


async def test_a_frame_with_the_wrong_key_is_one_malformed_envelope(sources) -> None:
    """A frame that fails its signature check comes out as one malformed envelope of raw bytes."""
    async with fresh_stream() as (_js, stream, subject):
        sink = NatsJetStreamSink(NATS_URL, subject, stream=stream, encode="frame", hmac_key=b"a")
        await sink.write([{"id": 1}, {"id": 2}])
        await sink.close()
        source = make(sources, stream, subject, unique("D"), decode="frame", hmac_key=b"b")
        [bad] = await take(source, 1)
        assert bad.malformed
        assert isinstance(bad.payload, bytes)
        assert "signature" in str(bad.error)
        await source.ack_many([bad])


async def test_close_returns_promptly_and_ends_iteration(sources) -> None:
    """close() during an idle fetch returns within the fetch timeout and the loop then ends."""
    async with fresh_stream() as (_js, stream, subject):
        source = make(sources, stream, subject, unique("D"), fetch_timeout=1.0)
        received: list[Envelope] = []

        async def consume() -> None:
            async for envelope in source:
                received.append(envelope)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)  # the consumer is now waiting inside a fetch
        started = time.monotonic()
        await source.close()
        assert time.monotonic() - started < 1.5
        await asyncio.wait_for(task, 1.0)
        assert received == []
        await source.close()  # a second close is a no-op
        with pytest.raises(StopAsyncIteration):
            await source.__anext__()


async def test_a_reader_cancelled_mid_fetch_loses_nothing(sources) -> None:
    """Cancelling a caller waiting inside a fetch keeps what that fetch brings for the next call."""
    async with fresh_stream() as (js, stream, subject):
        source = make(sources, stream, subject, unique("D"), fetch_timeout=1.0, ack_wait=30.0)
        await source.start()
        waiting = asyncio.create_task(source.__anext__())
        await asyncio.sleep(0.2)  # inside the fetch now
        waiting.cancel()
        await js.publish(subject, b'{"id": 1}')
        with pytest.raises(asyncio.CancelledError):
            await waiting
        [envelope] = await take(source, 1, seconds=2.0)
        assert envelope.payload == {"id": 1}
        assert envelope.headers is None  # a first delivery
        await source.ack_many([envelope])


async def test_stop_consuming_ends_iteration_and_returns_unread_messages(sources) -> None:
    """stop_consuming() ends iteration, naks what was fetched but not handed out, and acks work."""
    payloads = [{"id": i} for i in range(10)]
    async with fresh_stream(payloads) as (js, stream, subject):
        durable = unique("D")
        source = make(sources, stream, subject, durable, batch=10, ack_wait=30.0)
        handed = await take(source, 4)  # one fetch brought all ten
        source.stop_consuming()
        with pytest.raises(StopAsyncIteration):
            await source.__anext__()
        other = make(sources, stream, subject, durable, ack_wait=30.0)
        rest = await take(other, 6, seconds=3.0)
        assert sorted(e.payload["id"] for e in rest) == [4, 5, 6, 7, 8, 9]
        await source.ack_many(handed)
        await other.ack_many(rest)
        await source.close()
        await other.close()
        assert await settled_counts(js, stream, durable) == (0, 0)


async def test_stop_consuming_hands_out_last_deliveries_and_naks_only_the_others(sources) -> None:
    """stop_consuming() nak'd every unread message, those on their last delivery too, which
    JetStream then never delivers again (lost). Now those still come out, flagged, before
    iteration ends; the others are nak'd as before."""
    async with fresh_stream([{"id": i} for i in range(4)]) as (js, stream, subject):
        durable = unique("D")
        first = make(sources, stream, subject, durable, batch=4, max_deliver=2)
        got = await take(first, 4)
        await first.nack_many(got[2:], True)  # ids 2 and 3: their next delivery is the last
        await first.ack_many(got[:2])
        await js.publish(subject, json.dumps({"id": 4}).encode())
        source = make(sources, stream, subject, durable, batch=4, max_deliver=2)
        [handed] = await take(source, 1)
        source.stop_consuming()
        rest = [e async for e in source]
        assert [(e.payload["id"], e.headers[REDELIVERED]) for e in [handed, *rest]] == [
            (2, True),
            (3, True),
        ]
        await source.ack_many([handed, *rest])
        other = make(sources, stream, subject, durable)
        [nakd] = await take(other, 1, seconds=3.0)  # id 4, on its first delivery, was nak'd
        assert (nakd.payload, nakd.headers["delivery_count"]) == ({"id": 4}, 2)
        await other.ack_many([nakd])
        await source.close()
        await other.close()
        assert await settled_counts(js, stream, durable) == (0, 0)


async def test_close_logs_a_last_delivery_it_cannot_return_instead_of_nak_ing_it(
    sources, caplog
) -> None:
    """close() nak'd a message on its last delivery without a word, and JetStream dropped it.
    A nak or ack_wait both end it, so close() now logs an error naming its stream sequence."""
    async with fresh_stream([{"id": 1}]) as (_js, stream, subject):
        durable = unique("D")
        source = make(sources, stream, subject, durable, max_deliver=2)
        [first] = await take(source, 1)
        await source.nack_many([first], True)
        [last] = await take(source, 1)
        assert last.headers[REDELIVERED]
        with caplog.at_level("ERROR", logger="batchpunk.connectors.nats"):
            await source.close()
        [record] = [r for r in caplog.records if r.levelname == "ERROR"]
        assert "last delivery" in record.getMessage()
        assert "stream sequences 1" in record.getMessage()


async def test_close_returns_unsettled_messages_to_other_workers_at_once(sources) -> None:
    """Messages unsettled at close() are nak'd: another worker gets them long before ack_wait."""
    payloads = [{"id": i} for i in range(3)]
    async with fresh_stream(payloads) as (js, stream, subject):
        durable = unique("D")
        first = make(sources, stream, subject, durable, ack_wait=30.0)
        await take(first, 3)
        await first.close()
        second = make(sources, stream, subject, durable, ack_wait=30.0)
        again = await take(second, 3, seconds=3.0)
        assert sorted(e.payload["id"] for e in again) == [0, 1, 2]
        assert all(e.headers["delivery_count"] == 2 for e in again)
        await second.ack_many(again)
        await second.close()
        assert await settled_counts(js, stream, durable) == (0, 0)


async def test_workers_on_one_durable_share_the_messages_without_overlap(sources) -> None:
    """Two sources on one durable consumer split the stream: every message goes to exactly one."""
    payloads = [{"id": i} for i in range(60)]
    async with fresh_stream(payloads) as (js, stream, subject):
        durable = unique("D")
        workers = [make(sources, stream, subject, durable, batch=5) for _ in range(2)]
        seen: list[list[int]] = [[], []]

        done = asyncio.Event()

        async def work(index: int) -> None:
            async for envelope in workers[index]:
                seen[index].append(envelope.payload["id"])
                await workers[index].ack_many([envelope])
                if len(seen[0]) + len(seen[1]) == 60:
                    done.set()
                await asyncio.sleep(0.005)  # let the other worker fetch too

        tasks = [asyncio.create_task(work(i)) for i in range(2)]
        await asyncio.wait_for(done.wait(), 10)
        for worker in workers:
            await worker.close()
        await asyncio.gather(*tasks)
        assert sorted(seen[0] + seen[1]) == list(range(60))
        assert seen[0]
        assert seen[1]
        assert await settled_counts(js, stream, durable) == (0, 0)


async def test_missing_consumer_without_create_is_a_config_error_naming_durable(sources) -> None:
    """create=False on a durable that does not exist fails at start, naming the field."""
    async with fresh_stream() as (_js, stream, subject):
        source = make(sources, stream, subject, unique("D"), create=False)
        with pytest.raises(ConfigError, match=r"NatsJetStreamSource\.durable"):
            await source.start()


async def test_subject_outside_an_existing_stream_is_a_config_error(sources) -> None:
    """An existing stream that does not capture the subject is reported, naming the durable."""
    async with fresh_stream() as (_js, stream, _subject):
        source = make(sources, stream, "elsewhere.events", unique("D"))
        with pytest.raises(ConfigError, match="not a valid subset"):
            await source.start()


async def test_source_creates_its_stream_when_missing(sources) -> None:
    """With create=True a missing stream is created on the subject, then consumed."""
    stream, subject = unique("S"), f"{unique('bp')}.new"
    source = make(sources, stream, subject, unique("D"))
    await source.start()
    sink = NatsJetStreamSink(NATS_URL, subject, stream=stream)
    try:
        assert await sink.write([{"id": 1}]) == [1]
        [envelope] = await take(source, 1)
        assert envelope.payload == {"id": 1}
        await source.ack_many([envelope])
    finally:
        await sink.close()
        await source.close()
        async with jetstream() as js:
            await js.delete_stream(stream)


async def test_connect_failure_names_the_server_but_never_the_password(caplog) -> None:
    """A refused connection raises ConnectionError without the URL password or the token."""
    source = NatsJetStreamSource(
        "nats://alice:url-s3cret@127.0.0.1:1",
        "S",
        "x.y",
        "D",
        token="tok-s3cret",
        connect_timeout=1.0,
    )
    with pytest.raises(ConnectionError) as caught:
        await source.start()
    message = str(caught.value)
    assert "127.0.0.1:1" in message
    assert "url-s3cret" not in message
    assert "tok-s3cret" not in message
    assert "s3cret" not in caplog.text
    assert "s3cret" not in repr(source)
    await source.close()


async def test_sink_returns_stream_sequences_and_stores_every_payload() -> None:
    """The sink publishes each payload and returns its stream sequence, in order."""
    async with fresh_stream() as (js, stream, subject):
        sink = NatsJetStreamSink(NATS_URL, subject, stream=stream)
        batch = [{"id": i, "body": "x" * i} for i in range(50)]
        assert await sink.write(batch) == list(range(1, 51))
        assert await sink.write([]) == []
        await sink.close()
        await sink.close()
        assert json.loads((await js.get_msg(stream, 50)).data) == batch[-1]


async def test_sink_fails_only_the_payloads_it_cannot_encode() -> None:
    """An unserializable payload fails alone (PartialFailure); the others are published once."""
    async with fresh_stream() as (js, stream, subject):
        sink = NatsJetStreamSink(NATS_URL, subject, stream=stream)
        with pytest.raises(PartialFailure) as caught:
            await sink.write([{"id": 1}, {"id": object()}, {"id": 3}])
        assert list(caught.value.failures) == [1]
        assert isinstance(caught.value.failures[1], NatsPayloadError)
        assert caught.value.failures[1].retryable is False
        assert caught.value.results is not None
        assert [caught.value.results[0], caught.value.results[2]] == [1, 2]
        await sink.close()
        assert (await js.stream_info(stream)).state.messages == 2


async def test_sink_refuses_a_payload_that_fits_only_without_its_headers_and_publishes_on() -> None:
    """nats-py checks max_payload on the payload alone; with the Nats-Msg-Id and
    Nats-Expected-Stream headers the server refused the frame, nats-py closed the client for
    good and the sink never reconnected (all 6 messages of a run expired). Now the sink counts
    the headers and raises NatsPayloadError (not retried) before sending, and a closed client
    is replaced by the next write."""
    async with fresh_stream() as (js, stream, subject):
        sink = NatsJetStreamSink(NATS_URL, subject, stream=stream, msg_id="id", timeout=2.0)
        await sink.start()
        limit = sink._conn.nc.max_payload
        headers = len(f"NATS/1.0\r\nNats-Msg-Id: 1\r\nNats-Expected-Stream: {stream}\r\n\r\n")

        def sized(ident: int, size: int) -> dict[str, Any]:
            item: dict[str, Any] = {"id": ident, "x": ""}
            item["x"] = "a" * (size - len(json.dumps(item, separators=(",", ":"))))
            return item

        with pytest.raises(NatsPayloadError) as caught:
            await sink.write([sized(1, limit - headers + 1)])
        assert caught.value.retryable is False
        assert await sink.write([sized(2, limit - headers)]) == [1]  # an exact fit is sent
        await sink._conn.nc.close()  # closed for good, as nats-py does after a refused frame
        assert await sink.write([{"id": 3}]) == [2]
        await sink.close()
        assert (await js.stream_info(stream)).state.messages == 2


async def test_sink_refuses_a_payload_over_max_payload_without_retry() -> None:
    """A payload larger than the server's max_payload fails as a non-retryable NatsPayloadError."""
    async with fresh_stream() as (js, stream, subject):
        sink = NatsJetStreamSink(NATS_URL, subject, stream=stream)
        with pytest.raises(NatsPayloadError, match="max_payload"):
            await sink.write(["x" * (2 * 1024 * 1024)])
        await sink.close()
        assert (await js.stream_info(stream)).state.messages == 0


async def test_sink_msg_id_lets_jetstream_drop_a_republished_payload() -> None:
    """With msg_id, publishing the same payload twice stores it once (JetStream de-duplication)."""
    async with fresh_stream() as (js, stream, subject):
        sink = NatsJetStreamSink(NATS_URL, subject, stream=stream, msg_id="id")
        first = await sink.write([{"id": "a"}, {"id": "b"}])
        second = await sink.write([{"id": "a"}, {"id": "b"}])
        assert first == second == [1, 2]
        await sink.close()
        assert (await js.stream_info(stream)).state.messages == 2


async def test_sink_without_a_stream_for_the_subject_fails_clearly() -> None:
    """Publishing to a subject no stream captures raises ConnectionError naming the subject."""
    sink = NatsJetStreamSink(NATS_URL, f"{unique('none')}.x", timeout=1.0)
    with pytest.raises(ConnectionError, match="no stream captures subject"):
        await sink.write([{"id": 1}])
    await sink.close()
