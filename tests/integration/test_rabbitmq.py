"""RabbitMQSource, RabbitMQSink and RabbitMQDeadLetters against the real broker on localhost.

Each test works on its own queue and deletes it. Broker-side counts come from ``rabbitmqctl``
(ready and unacknowledged messages), so "nothing unacknowledged" is the broker's word.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from batchpunk._cli_app import _read_file
from batchpunk.codec import decode_batch, encode_batch
from batchpunk.config import BatchConfig
from batchpunk.connectors._common import PayloadError
from batchpunk.connectors.rabbitmq import (
    DELIVERY_COUNT_HEADER,
    FRAME_CONTENT_TYPE,
    REDELIVERED_HEADER,
    DeliveryLimitExceeded,
    RabbitMQDeadLetters,
    RabbitMQError,
    RabbitMQSink,
    RabbitMQSource,
)
from batchpunk.deadletter import DeadLetter, letter_from_record, open_dead_letter_file
from batchpunk.envelope import Envelope
from batchpunk.errors import DeadLetterError, FrameError, PartialFailure
from tests.conftest import require_server
from tests.contract.cases_rabbitmq import (
    RABBITMQ_URL,
    delete_queue,
    drain,
    publish_json,
    publish_raw,
    queue_counts,
    rabbitmq_channel,
    unique_queue,
    wait_ready,
)
from tests.contract.harness import take

pytestmark = pytest.mark.integration


@pytest.fixture
async def channel() -> AsyncIterator[Any]:
    """A confirming channel to the local broker (the test is skipped when it is down)."""
    require_server("rabbitmq")
    async with rabbitmq_channel() as opened:
        yield opened


@pytest.fixture
async def queue(channel: Any) -> AsyncIterator[str]:
    """A fresh durable queue, deleted after the test."""
    name = unique_queue("it")
    await channel.declare_queue(name, durable=True)
    yield name
    await delete_queue(channel, name)


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> None:
    """Wait until check() holds (the broker applies acks asynchronously), or fail."""
    async with asyncio.timeout(seconds):
        while not await check():  # noqa: ASYNC110 - the broker offers nothing to wait on
            await asyncio.sleep(0.05)


async def broker_counts(channel: Any, queue: str) -> tuple[int, int]:
    """(ready, unacknowledged) for the queue, as the broker reports them."""
    counts = await queue_counts(channel, queue)
    if counts is None:
        pytest.skip("rabbitmqctl is not installed: cannot see unacknowledged counts")
    return counts


async def counts_become(channel: Any, queue: str, expected: tuple[int, int]) -> None:
    """Wait until the broker reports exactly (ready, unacknowledged) = expected."""
    seen: list[tuple[int, int]] = []

    async def check() -> bool:
        seen.append(await broker_counts(channel, queue))
        return seen[-1] == expected

    try:
        await eventually(check)
    except TimeoutError:
        pytest.fail(f"broker counts for {queue}: expected {expected}, last seen {seen[-1]}")


async def close_from_server(queue: str) -> None:
    """Close the source's connection from the broker side, as a broker or network failure would."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed: cannot close a connection from the server")
    listing = await asyncio.create_subprocess_exec(
        *(
            "rabbitmqctl",
            "list_connections",
            "-q",
            "--no-table-headers",
            "pid",
            "client_properties",
        ),
        stdout=asyncio.subprocess.PIPE,
    )
    output, _ = await listing.communicate()
    marker = f'"connection_name","RabbitMQSource queue={queue}"'
    pids = [line.split("\t", 1)[0] for line in output.decode().splitlines() if marker in line]
    assert len(pids) == 1, f"expected one connection for {queue}, found {pids}"
    closing = await asyncio.create_subprocess_exec(
        *("rabbitmqctl", "close_connection", pids[0], "batchpunk test"),
        stdout=asyncio.subprocess.DEVNULL,
    )
    assert await closing.wait() == 0


async def test_json_bodies_arrive_in_order_with_their_metadata(channel: Any, queue: str) -> None:
    """JSON bodies decode to payloads, with message id, AMQP headers and priority carried over."""
    await publish_raw(
        channel,
        queue,
        [json.dumps({"id": i}).encode() for i in range(3)],
        message_id="m-1",
        headers={"tenant": "acme"},
        priority=4,
    )
    async with RabbitMQSource(RABBITMQ_URL, queue) as source:
        envelopes = await take(source, 3)
        assert [e.payload for e in envelopes] == [{"id": 0}, {"id": 1}, {"id": 2}]
        first = envelopes[0]
        assert first.headers is not None
        assert first.headers["queue"] == queue
        assert first.headers["message_id"] == "m-1"
        assert first.headers["amqp_headers"] == {"tenant": "acme"}
        assert first.priority == 4
        assert not first.malformed
        await source.ack_many(envelopes)


async def test_bytes_and_text_decoders_return_the_body_as_sent(channel: Any, queue: str) -> None:
    """decode="bytes" yields the raw body and decode="text" its UTF-8 text."""
    await publish_raw(channel, queue, [b"\x00\xffraw", "héllo".encode()])
    async with RabbitMQSource(RABBITMQ_URL, queue, decode="bytes") as source:
        raw = await take(source, 2)
        assert [e.payload for e in raw] == [b"\x00\xffraw", "héllo".encode()]
        await source.nack_many(raw, True)
    async with RabbitMQSource(RABBITMQ_URL, queue, decode="text") as source:
        texts = await take(source, 2)
        assert texts[0].malformed
        assert isinstance(texts[0].error, UnicodeDecodeError)
        assert texts[1].payload == "héllo"
        await source.ack_many(texts)


async def test_malformed_bodies_are_flagged_with_raw_bytes_and_the_source_goes_on(
    channel: Any, queue: str
) -> None:
    """An undecodable body comes out malformed with its bytes and error; the next is fine."""
    await publish_raw(channel, queue, [b"{not json", json.dumps({"id": 7}).encode()])
    async with RabbitMQSource(RABBITMQ_URL, queue) as source:
        bad, good = await take(source, 2)
        assert bad.malformed
        assert bad.payload == b"{not json"
        assert isinstance(bad.error, ValueError)
        assert good.payload == {"id": 7}
        assert not good.malformed
        await source.ack_many([bad])
        await source.ack_many([good])
        assert source.stats().malformed == 1


async def test_a_frame_yields_its_items_and_the_message_is_acked_with_the_last(
    channel: Any, queue: str
) -> None:
    """decode="frame" yields one envelope per item; the message is acked once all items are."""
    frame = encode_batch([{"id": 1}, {"id": 2}, {"id": 3}])
    await publish_raw(channel, queue, [frame, b"not a frame"])
    async with RabbitMQSource(RABBITMQ_URL, queue, decode="frame") as source:
        envelopes = await take(source, 4)
        assert [e.payload for e in envelopes[:3]] == [{"id": 1}, {"id": 2}, {"id": 3}]
        assert envelopes[3].malformed
        assert isinstance(envelopes[3].error, FrameError)
        await source.ack_many([envelopes[3]])
        await source.ack_many([envelopes[0]])
        await source.ack_many([envelopes[1]])
        await source.flush()
        # The frame still has an unsettled item; the other message's ack waits behind it.
        await asyncio.sleep(0.2)
        await counts_become(channel, queue, (0, 2))
        await source.ack_many([envelopes[2]])
        await source.flush()
        await counts_become(channel, queue, (0, 0))


async def test_acks_reach_the_broker_only_for_messages_whose_ack_was_called(
    channel: Any, queue: str
) -> None:
    """Acking out of order never acknowledges an unfinished message; at the end none is left."""
    await publish_json(channel, queue, [{"id": i} for i in range(40)])
    async with RabbitMQSource(RABBITMQ_URL, queue, prefetch=100) as source:
        envelopes = await take(source, 40)
        await source.ack_many(envelopes[10:])
        await source.flush()
        # Acks behind an unsettled delivery wait for it (one multiple ack later covers them):
        # none of the first ten is acknowledged meanwhile.
        await asyncio.sleep(0.2)
        await counts_become(channel, queue, (0, 40))
        await source.ack_many(envelopes[:10:2])
        await source.flush()
        await counts_become(channel, queue, (0, 39))  # only the head (id 0) could go
        await source.ack_many(envelopes[1:10:2])
        await source.flush()
        await counts_become(channel, queue, (0, 0))
        assert source.stats().acked == 40


async def test_the_broker_sends_no_more_than_the_prefetch(channel: Any, queue: str) -> None:
    """With prefetch=5 the consumer holds five unacknowledged messages until it acks one."""
    await publish_json(channel, queue, [{"id": i} for i in range(20)])
    async with RabbitMQSource(RABBITMQ_URL, queue, prefetch=5) as source:
        first = await take(source, 5)
        await asyncio.sleep(0.3)  # room for a sixth delivery, were the broker to send one
        assert source.stats().delivered == 5
        declared = await channel.declare_queue(queue, passive=True)
        assert declared.declaration_result.message_count == 15
        await source.ack_many([first[0]])
        sixth = await take(source, 1)
        assert sixth[0].payload == {"id": 5}


async def test_prepare_after_start_applies_the_new_prefetch(channel: Any, queue: str) -> None:
    """A prepare() on a running source changes how many messages the broker sends it."""
    async with RabbitMQSource(RABBITMQ_URL, queue) as source:
        assert source.prefetch == BatchConfig().max_size * (BatchConfig().concurrency + 1)
        await source.prepare(BatchConfig(max_size=2, max_concurrent_batches=1))
        assert source.prefetch == 4
        await publish_json(channel, queue, [{"id": i} for i in range(10)])
        held = await take(source, 4)
        await asyncio.sleep(0.3)  # room for a fifth delivery, were the broker to send one
        assert source.stats().delivered == 4
        await source.ack_many(held)


async def test_close_requeues_what_was_delivered_but_not_settled(channel: Any, queue: str) -> None:
    """close() keeps what was acked and requeues everything else, yielded or buffered."""
    await publish_json(channel, queue, [{"id": i} for i in range(30)])
    source = RabbitMQSource(RABBITMQ_URL, queue, prefetch=20)
    envelopes = await take(source, 5)
    await source.ack_many([envelopes[0]])
    await source.ack_many([envelopes[1]])
    await source.nack_many([envelopes[2]], True)
    await source.close()
    await source.close()  # idempotent
    await wait_ready(channel, queue, 28)
    stats = source.stats()
    assert stats.acked == 2
    assert stats.requeued == stats.delivered - 2  # yielded but unsettled, and buffered
    again = RabbitMQSource(RABBITMQ_URL, queue, prefetch=50)
    rest = await take(again, 28)
    assert sorted(e.payload["id"] for e in rest) == list(range(2, 30))
    assert rest[0].headers is not None
    assert rest[0].headers.get("redelivered") is True
    await again.ack_many(rest)
    await again.close()
    await wait_ready(channel, queue, 0)


async def test_iteration_ends_when_the_source_closes(queue: str) -> None:
    """A consumer waiting on an empty queue stops with StopAsyncIteration once close() runs."""
    source = RabbitMQSource(RABBITMQ_URL, queue)
    seen: list[Envelope] = []

    async def consume() -> None:
        async for envelope in source:
            seen.append(envelope)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.3)
    await source.close()
    await asyncio.wait_for(task, 5)
    assert seen == []
    with pytest.raises(StopAsyncIteration):
        await source.__anext__()


async def test_stop_consuming_hands_buffered_messages_back_and_keeps_yielded_ones(
    channel: Any, queue: str
) -> None:
    """stop_consuming() requeues unyielded messages at once; yielded ones can still be acked."""
    await publish_json(channel, queue, [{"id": i} for i in range(10)])
    source = RabbitMQSource(RABBITMQ_URL, queue, prefetch=10)
    held = await take(source, 3)
    await eventually(lambda: _true(source.stats().delivered == 10))
    source.stop_consuming()
    await counts_become(channel, queue, (7, 3))
    with pytest.raises(StopAsyncIteration):
        await source.__anext__()
    await source.ack_many(held)
    await source.close()
    await wait_ready(channel, queue, 7)


async def test_quorum_deliveries_past_max_deliveries_are_flagged_for_dead_lettering(
    channel: Any,
) -> None:
    """On a quorum queue the delivery after max_deliveries carries the redelivered flag."""
    queue = unique_queue("quorum")
    source = RabbitMQSource(RABBITMQ_URL, queue, quorum=True, max_deliveries=2, prefetch=10)
    try:
        await source.start()
        await publish_json(channel, queue, [{"id": 1}])
        counts = []
        for _ in range(2):
            (envelope,) = await take(source, 1)
            counts.append(envelope.headers[DELIVERY_COUNT_HEADER])
            assert REDELIVERED_HEADER not in envelope.headers
            assert envelope.error is None
            await source.nack_many([envelope], True)
        (last,) = await take(source, 1)
        assert counts == [1, 2]
        assert last.headers[DELIVERY_COUNT_HEADER] == 3
        assert last.headers[REDELIVERED_HEADER] is True
        assert isinstance(last.error, DeliveryLimitExceeded)
        assert last.payload == {"id": 1}
        await source.ack_many([last])
        await source.close()
        await wait_ready(channel, queue, 0)  # acked, or close() would have requeued it
        assert source.stats().redelivered == 1
    finally:
        await source.close()
        await delete_queue(channel, queue)


async def test_stop_consuming_yields_flagged_deliveries_instead_of_returning_them(
    channel: Any,
) -> None:
    """stop_consuming() returned every unyielded delivery, those past max_deliveries too: each
    return counts one more delivery, and at the queue's x-delivery-limit the broker dropped the
    message (a reviewer's run: id 0 gone after its 3rd delivery, never dead-lettered). Now the
    flagged ones are still yielded, for the pipeline to dead-letter; only the others go back."""
    queue = unique_queue("quorum")
    first = RabbitMQSource(RABBITMQ_URL, queue, quorum=True, max_deliveries=1, prefetch=10)
    source = RabbitMQSource(RABBITMQ_URL, queue, quorum=True, max_deliveries=1, prefetch=10)
    try:
        await first.start()
        await publish_json(channel, queue, [{"id": 0}, {"id": 1}])
        await first.nack_many(await take(first, 2), True)  # their next delivery is flagged
        await first.close()
        await publish_json(channel, queue, [{"id": 2}, {"id": 3}])
        [handed] = await take(source, 1)
        await eventually(lambda: _true(source.stats().delivered == 4))
        source.stop_consuming()
        rest = [envelope async for envelope in source]
        yielded = [(e.payload["id"], bool(e.headers.get(REDELIVERED_HEADER))) for e in rest]
        assert rest
        assert all(flag for _, flag in yielded)  # only flagged ones after the stop
        assert {i for i, _ in yielded} | {handed.payload["id"]} >= {0, 1}
        await source.ack_many([handed, *rest])
        await source.close()
        await wait_ready(channel, queue, 4 - 1 - len(rest))
    finally:
        await first.close()
        await source.close()
        await delete_queue(channel, queue)


async def test_stale_delivery_tags_after_a_forced_close_do_not_crash(
    channel: Any, queue: str
) -> None:
    """Acks for deliveries of a channel the server closed are counted, and the messages return."""
    await publish_json(channel, queue, [{"id": i} for i in range(5)])
    source = RabbitMQSource(RABBITMQ_URL, queue, prefetch=10, reconnect_interval=0.2)
    try:
        before = await take(source, 5)
        await close_from_server(queue)
        await eventually(lambda: _true(source.stats().reconnects >= 1), seconds=10)
        await source.ack_many(before)  # stale: must neither raise nor reach the new channel
        await source.flush()
        again = await take(source, 5, seconds=10)
        assert sorted(e.payload["id"] for e in again) == list(range(5))
        await source.ack_many(again)
        await source.close()
        await wait_ready(channel, queue, 0)  # acked, or close() would have requeued them
        stats = source.stats()
        assert stats.stale == 5
        assert stats.acked == 5
    finally:
        await source.close()


async def test_a_consumer_cancelled_by_the_broker_consumes_again(channel: Any) -> None:
    """When the queue is deleted under it, the source declares it again and keeps consuming."""
    queue = unique_queue("cancelled")
    source = RabbitMQSource(RABBITMQ_URL, queue)
    try:
        await source.start()
        await publish_json(channel, queue, [{"id": 1}])
        (first,) = await take(source, 1)
        await source.ack_many([first])
        await source.flush()
        await channel.queue_delete(queue)  # the broker cancels every consumer of the queue

        async def declared_again() -> bool:
            try:
                async with rabbitmq_channel() as probe:
                    await probe.declare_queue(queue, passive=True)
            except Exception:
                return False
            return True

        await eventually(declared_again)
        await publish_json(channel, queue, [{"id": 2}])
        (second,) = await take(source, 1)
        assert second.payload == {"id": 2}
        await source.ack_many([second])
    finally:
        await source.close()
        await delete_queue(channel, queue)


async def _true(value: bool) -> bool:
    return value


async def test_sink_frames_are_persistent_confirmed_and_decodable(channel: Any, queue: str) -> None:
    """mode="frame" publishes one persistent frame per batch, in the queue once write returns."""
    sink = RabbitMQSink(RABBITMQ_URL, "", queue)
    try:
        await sink.write([{"id": 1}, {"id": 2}])
        await sink.write([{"id": 3}])
        declared = await channel.declare_queue(queue, passive=True)
        assert declared.declaration_result.message_count == 2  # confirmed means enqueued
        message = await declared.get()
        assert message.content_type == FRAME_CONTENT_TYPE
        assert message.delivery_mode == 2
        assert message.headers["x-batchpunk-count"] == 2
        assert decode_batch(message.body) == [{"id": 1}, {"id": 2}]
        await message.ack()
    finally:
        await sink.close()
        await sink.close()


async def test_sink_items_fail_alone_when_they_are_not_json(channel: Any, queue: str) -> None:
    """mode="items" publishes the good items and reports the unencodable one by its index."""
    sink = RabbitMQSink(RABBITMQ_URL, "", queue, mode="items")
    try:
        with pytest.raises(PartialFailure) as caught:
            await sink.write([{"id": 1}, {"id": {1, 2}}, {"id": 3}])
        assert set(caught.value.failures) == {1}
        assert [json.loads(body) for body, _ in await drain(channel, queue)] == [
            {"id": 1},
            {"id": 3},
        ]
    finally:
        await sink.close()


#: One byte over RabbitMQ's default max_message_size (128 MiB) once JSON-encoded.
_OVER_MAX_MESSAGE_SIZE = 128 * 1024 * 1024 + 1


async def test_a_message_over_the_broker_max_size_is_a_bad_payload_not_an_outage(
    channel: Any, queue: str
) -> None:
    """The broker refuses a message over its max_message_size (406 PRECONDITION_FAILED,
    "message size N is larger than configured max size M") and closes the channel. That was
    wrapped in RabbitMQError, an outage: held for delivery_timeout, then every item of the
    batch (in frame mode the whole frame) expired. Now it is a PayloadError (not retried) for
    that item alone, the broker's limit is remembered so later ones fail before publishing,
    and the next write publishes on a new channel."""
    big = {"x": "a" * _OVER_MAX_MESSAGE_SIZE}
    items = RabbitMQSink(RABBITMQ_URL, "", queue, mode="items")
    frames = RabbitMQSink(RABBITMQ_URL, "", queue, compression="none")
    letters = RabbitMQDeadLetters(RABBITMQ_URL, "", queue)
    try:
        with pytest.raises(PartialFailure) as caught:
            await items.write([{"id": 0}, big, {"id": 2}])
        failures = caught.value.failures
        assert isinstance(failures[1], PayloadError)
        assert failures[1].retryable is False
        assert "max_message_size (134217728 bytes)" in str(failures[1])
        assert 0 not in failures  # confirmed before the refusal
        assert all(isinstance(failures[i], RabbitMQError) for i in set(failures) - {1})
        # The limit is known now: refused before publishing, the channel stays open.
        with pytest.raises(PayloadError):
            await items.write([big])
        await items.write([{"id": 3}])
        with pytest.raises(PayloadError) as framed:  # the engine bisects the batch
            await frames.write([big, {"id": 4}])
        assert framed.value.retryable is False
        await frames.write([{"id": 5}])
        letter = DeadLetter(big, reason="failed", error=ValueError("x"), headers={"id": 9})
        with pytest.raises(DeadLetterError, match="max_message_size"):
            await letters.put([letter])
        # The retry (the outbox retries a failed put) stores the letter without its message,
        # rather than holding every later letter behind it for good.
        await letters.put([letter])
        bodies = [body for body, _ in await drain(channel, queue)]
        assert [json.loads(b) for b in bodies[:2]] == [{"id": 0}, {"id": 3}]
        assert decode_batch(bodies[2]) == [{"id": 5}]
        stored = letter_from_record(bodies[3])
        assert (stored.reason, stored.headers["id"]) == ("failed", 9)
        assert "message left out" in stored.message
        assert "134217728" in stored.message
    finally:
        for sink in (items, frames, letters):
            await sink.close()


async def test_a_broker_nack_raises_a_retryable_error(channel: Any) -> None:
    """A full queue with reject-publish makes the broker nack: write raises RabbitMQError."""
    queue = unique_queue("full")
    await channel.declare_queue(
        queue, durable=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
    )
    sink = RabbitMQSink(RABBITMQ_URL, "", queue, mode="items")
    try:
        await sink.write([{"id": 1}])
        with pytest.raises(RabbitMQError, match="nacked by the broker") as caught:
            await sink.write([{"id": 2}])
        assert isinstance(caught.value, ConnectionError)
    finally:
        await sink.close()
        await delete_queue(channel, queue)


async def test_items_partly_nacked_fail_alone_and_the_confirmed_ones_are_not_resent(
    channel: Any,
) -> None:
    """mode="items": when the broker confirms some items and nacks others (a full queue with
    reject-publish), write raises PartialFailure naming only the nacked items by their batch
    index, each with a RabbitMQError (an outage: retried, not dead-lettered at once).

    It used to raise one RabbitMQError for the whole batch, so the engine retried every item and
    the confirmed ones were published again. The non-JSON item checks that indices map back to
    the batch, not to the list of published messages.
    """
    queue = unique_queue("full")
    await channel.declare_queue(
        queue, durable=True, arguments={"x-max-length": 2, "x-overflow": "reject-publish"}
    )
    sink = RabbitMQSink(RABBITMQ_URL, "", queue, mode="items")
    try:
        with pytest.raises(PartialFailure) as caught:
            await sink.write([{"id": 0}, {"id": {1}}, {"id": 2}, {"id": 3}, {"id": 4}])
        failures = caught.value.failures
        assert sorted(failures) == [1, 3, 4]
        assert not isinstance(failures[1], RabbitMQError)  # not JSON: the item's own fault
        for index in (3, 4):
            assert isinstance(failures[index], RabbitMQError)
            assert failures[index].unavailable is True
            assert f"payload {index} of the batch not confirmed" in str(failures[index])
            assert "nacked by the broker" in str(failures[index])
        bodies = [json.loads(body) for body, _ in await drain(channel, queue)]
        assert bodies == [{"id": 0}, {"id": 2}]
    finally:
        await sink.close()
        await delete_queue(channel, queue)


async def test_an_unroutable_publish_is_an_error_not_a_silent_drop(channel: Any) -> None:
    """Publishing to an exchange with no bound queue raises instead of losing the batch."""
    exchange = unique_queue("exchange")
    sink = RabbitMQSink(RABBITMQ_URL, exchange, "nowhere")
    try:
        with pytest.raises(RabbitMQError, match="unroutable"):
            await sink.write([{"id": 1}])
    finally:
        await sink.close()
        await channel.exchange_delete(exchange)


async def test_dead_letters_are_published_as_json_with_reason_headers(channel: Any) -> None:
    """Each letter becomes one persistent JSON record; headers carry reason, error, attempts."""
    exchange, queue = unique_queue("dlx"), unique_queue("dead")
    sink = RabbitMQDeadLetters(RABBITMQ_URL, exchange, "dead", queue=queue)
    letters = [
        DeadLetter({"id": 1}, reason="failed", error=ValueError("bad id"), attempts=4),
        DeadLetter(b"\xff\xfe", reason="malformed", error=ValueError("not json")),
        DeadLetter({"id": 2}, reason="redelivered", headers={"delivery_count": 11}),
    ]
    try:
        await sink.put(letters)
        declared = await channel.declare_queue(queue, passive=True)
        received = []
        for _ in letters:
            message = await declared.get()
            received.append((json.loads(message.body), message.headers, message.delivery_mode))
            await message.ack()
        first, headers, mode = received[0]
        assert mode == 2
        assert first["v"] == 1
        assert isinstance(first["id"], str)
        assert first["message"] == {"id": 1}
        assert (first["reason"], first["error"], first["attempts"]) == ("failed", "bad id", 4)
        assert first["error_type"] == "ValueError"
        assert headers["x-batchpunk-reason"] == "failed"
        assert headers["x-batchpunk-error"] == "bad id"
        assert headers["x-batchpunk-attempts"] == 4
        second = received[1][0]
        assert "message" not in second
        assert isinstance(second["message_frame"], str)
        assert received[2][0]["headers"] == {"delivery_count": 11}
    finally:
        await sink.close()
        await delete_queue(channel, queue)
        await channel.exchange_delete(exchange)


async def _publish_letter(letter: DeadLetter, channel: Any) -> tuple[dict[str, Any], Any]:
    """Put one letter through a fresh RabbitMQDeadLetters twice; its first body and headers."""
    exchange, queue = unique_queue("dlx"), unique_queue("dead")
    sink = RabbitMQDeadLetters(RABBITMQ_URL, exchange, "dead", queue=queue)
    try:
        await sink.put([letter])
        await sink.put([letter])
        declared = await channel.declare_queue(queue, passive=True)
        assert declared.declaration_result.message_count == 2
        message = await declared.get()
        await message.ack()
    finally:
        await sink.close()
        await delete_queue(channel, queue)
        await channel.exchange_delete(exchange)
    return json.loads(message.body), message.headers


async def test_the_error_header_masks_the_secrets_the_record_masks(channel: Any) -> None:
    """x-batchpunk-error is the record's own redacted error text, not str(error).

    The header used to be str(letter.error), so a password in an error (a connection URL) that
    the body masks went out in clear in the AMQP header, to every consumer of the queue.
    """
    error = ConnectionError("cannot reach postgresql://app:hunter2SECRET@db.internal:5432/orders")
    record, headers = await _publish_letter(DeadLetter({"id": 1}, error=error), channel)
    assert "hunter2SECRET" not in record["error"]
    assert headers["x-batchpunk-error"] == record["error"]
    assert "db.internal" in headers["x-batchpunk-error"]


class _UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("broken __str__")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ValueError("unknown user \udc80bob"), "unknown user \\udc80bob"),
        (_UnprintableError("x"), "<unprintable _UnprintableError object>"),
    ],
    ids=["lone-surrogate", "broken-str"],
)
async def test_a_letter_whose_error_the_record_can_store_is_published(
    channel: Any, error: BaseException, expected: str
) -> None:
    """An error whose str() raises, or holds a lone surrogate, is published with the record's
    placeholder or escaped text in x-batchpunk-error.

    The header used to be built from str(error): the first raised a bare RuntimeError, the
    second a UnicodeEncodeError in pamqp (as DeadLetterError), on every put, so the engine
    retried the letter forever and the letters behind it were never stored.
    """
    record, headers = await _publish_letter(DeadLetter({"id": 1}, error=error), channel)
    assert record["message"] == {"id": 1}
    assert record["error"] == expected
    assert headers["x-batchpunk-error"] == expected


async def test_letters_from_the_dead_letter_exchange_are_what_dlq_show_and_replay_read(
    channel: Any, tmp_path: Path
) -> None:
    """Bodies published by RabbitMQDeadLetters, one per line in a file, read back through dlq."""
    exchange, queue = unique_queue("dlx"), unique_queue("dead")
    sink = RabbitMQDeadLetters(RABBITMQ_URL, exchange, "dead", queue=queue)
    letters = [
        DeadLetter(
            {"id": 1}, key="tenant-1", reason="failed", error=ValueError("bad id"), attempts=4
        ),
        DeadLetter(b"\xff\xfe", reason="malformed", error=ValueError("not json")),
        DeadLetter({"id": 2}, reason="redelivered", priority=3, headers={"delivery_count": 11}),
    ]
    try:
        await sink.put(letters)
        declared = await channel.declare_queue(queue, passive=True)
        bodies = []
        for _ in letters:
            message = await declared.get()
            bodies.append(message.body)
            await message.ack()
    finally:
        await sink.close()
        await delete_queue(channel, queue)
        await channel.exchange_delete(exchange)
    one = letter_from_record(bodies[1])
    assert (one.message, one.reason, str(one.error)) == (b"\xff\xfe", "malformed", "not json")
    path = tmp_path / "from-rabbitmq.jsonl"
    path.write_bytes(b"".join(body + b"\n" for body in bodies))
    read = await _read_file(path)  # what `batchpunk dlq show` and `dlq replay` read
    assert [letter.message for letter in read] == [{"id": 1}, b"\xff\xfe", {"id": 2}]
    assert [letter.reason for letter in read] == ["failed", "malformed", "redelivered"]
    assert [str(letter.error) for letter in read[:2]] == ["bad id", "not json"]
    assert read[2].error is None
    assert read[0].error_type == "ValueError"
    assert read[0].attempts == 4
    assert (read[0].key, read[2].priority) == ("tenant-1", 3)
    assert read[2].headers["delivery_count"] == 11
    ids = [letter.headers["dlq_id"] for letter in read]
    assert len(set(ids)) == 3
    assert all(isinstance(i, str) and i for i in ids)
    store = open_dead_letter_file(path)
    try:
        assert await store.remove(ids[:1]) == 1  # replay removes what succeeded, by these ids
        left = [letter async for letter in store.read()]
    finally:
        await store.close()
    assert [letter.message for letter in left] == [b"\xff\xfe", {"id": 2}]


async def test_the_source_makes_a_dead_letter_sink_for_its_exchange(channel: Any) -> None:
    """dead_letter_sink() publishes to dead_letter_exchange with routing key <queue>.dead."""
    queue, exchange, dead = unique_queue("src"), unique_queue("dlx"), unique_queue("dead")
    source = RabbitMQSource(RABBITMQ_URL, queue, dead_letter_exchange=exchange)
    sink = source.dead_letter_sink()
    assert sink.routing_key == f"{queue}.dead"
    await channel.declare_exchange(exchange, durable=True)
    bound = await channel.declare_queue(dead, durable=True)
    await bound.bind(exchange, f"{queue}.dead")
    try:
        await sink.put([DeadLetter({"id": 9}, reason="failed", error=RuntimeError("x"))])
        ((body, _),) = await drain(channel, dead)
        assert json.loads(body)["message"] == {"id": 9}
    finally:
        await sink.close()
        await source.close()
        await delete_queue(channel, dead)
        await channel.exchange_delete(exchange)


async def test_a_sink_whose_exchange_came_back_publishes_again(queue: str) -> None:
    """The exchange was deleted mid-run: the broker closed the channel and the robust channel's
    restore (a passive declare) failed for good, so every later write failed as "connection
    lost" even after the exchange and its binding were back. It now opens a fresh channel."""
    import aio_pika

    exchange = unique_queue("ex")

    async def with_channel(action: Callable[[Any], Awaitable[Any]]) -> None:
        connection = await aio_pika.connect(RABBITMQ_URL)
        try:
            await action(await connection.channel())
        finally:
            await connection.close()

    async def declare(ch: Any) -> None:
        declared = await ch.declare_exchange(exchange, "direct", durable=True)
        await (await ch.declare_queue(queue, durable=True)).bind(declared, "k")

    await with_channel(declare)
    sink = RabbitMQSink(RABBITMQ_URL, exchange, "k", declare=False, timeout=3)
    try:
        await sink.write([{"n": 1}])
        await with_channel(lambda ch: ch.exchange_delete(exchange))
        with pytest.raises(RabbitMQError):
            await sink.write([{"n": 2}])
        await with_channel(declare)  # the operator puts it back
        await sink.write([{"n": 3}])
    finally:
        await sink.close()
        await with_channel(lambda ch: ch.exchange_delete(exchange))
