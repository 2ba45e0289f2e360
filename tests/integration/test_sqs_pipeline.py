"""SQS against a local moto_server: end to end, slow batches, killed workers, limits, FIFO order.

- poison messages through ``batchpunk run``: every good id once, dead letters = the poison,
  the queue empty afterwards;
- a batch slower than the visibility timeout keeps its messages invisible (the source extends
  it), so no other consumer receives them meanwhile;
- a worker killed -9 while holding messages: they come back after the visibility timeout and
  another worker processes them, nothing lost, duplicates absorbed by the idempotent sink;
- a message received more than ``max_receives`` times is dead-lettered as "redelivered";
- SqsSink splits a batch into SendMessageBatch calls of 10 within 256 KiB, and a message SQS
  refuses fails alone;
- a FIFO queue read with ``preserve_order`` writes each message group in its order.

Sizes scale with BATCHPUNK_E2E_SCALE (see tests/integration/_harness.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from batchpunk.config import BatchConfig
from batchpunk.connectors._common import PayloadError
from batchpunk.connectors.sqs import MAX_BYTES, SqsError, SqsSink, SqsSource, SqsUnavailable
from batchpunk.errors import PartialFailure
from batchpunk.pipeline import Pipeline
from tests.conftest import require_server
from tests.integration._harness import (
    Report,
    letter_id,
    make_orders,
    read_dead_letters,
    scaled,
    wait_rows,
)
from tests.integration._kafka_sqs import MOTO, new_sqs_place, sqs_client, unique
from tests.integration.pipeline_support import IdSink, Letters, run_until
from tests.integration.test_crash import HARNESS, Scene

pytestmark = [pytest.mark.integration]

#: moto_server answers a few hundred receives a second on this shared machine (and publishing
#: 2,000 messages took 35 s under load), so the SQS proofs use 1,000 messages, not 100,000.
MESSAGES = scaled(1_000, minimum=300)
POISON = 17


class SqsScene(Scene):
    """test_crash's Scene on a fresh SQS queue."""

    def __init__(self, tmp_path: Path, visibility_timeout: int = 5) -> None:
        super().__init__("sqs", tmp_path)
        self.place = new_sqs_place(visibility_timeout=visibility_timeout)


def require() -> None:
    require_server("sqs")
    require_server("postgres")


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_sqs_every_good_message_lands_once_and_every_poison_one_is_dead_lettered(
    tmp_path: Path,
) -> None:
    """1,000 messages (17 poison) -> batchpunk run -> PostgreSQL: rows = the good ids, each
    once; dead letters = exactly the poison, one per delivery; the queue holds nothing
    afterwards."""
    require()
    async with SqsScene(tmp_path, visibility_timeout=30) as scene:
        orders, poison = make_orders(MESSAGES, POISON)
        await scene.place.publish(orders)
        worker = scene.worker(scene.pipeline("worker"), "worker-0")
        await worker.start()
        began = time.monotonic()
        report = await scene.wait_complete(range(MESSAGES), poison, 240)
        elapsed = time.monotonic() - began
        assert report.complete, f"not complete after {elapsed:.0f}s: {report}\n{worker.output()}"
        code, took = await worker.terminate(60)
        assert code == 0, f"exit {code} after SIGTERM ({took:.1f}s)\n{worker.output()}"
        final = await scene.check(range(MESSAGES), poison)
        assert final.lost == set(), str(final)
        assert final.rows == final.distinct == MESSAGES - POISON, str(final)
        assert final.dead_letter_ids == set(poison), str(final)
        assert set(final.reasons) == {"failed"}, str(final)
        await assert_one_letter_per_delivery(scene.dead_letters, final)
        assert (final.outstanding, final.unacknowledged) == (0, 0), str(final)


async def assert_one_letter_per_delivery(path: Path, report: Report) -> None:
    """Each poison message has one letter per delivery of it: never two from one delivery.

    A standard queue delivers at least once, and may deliver a message again after it was
    deleted. moto_server does too: it handed one message of 1,000 to two concurrent receives in
    each of two trials, and in one run of this test a poison message whose delete it had
    confirmed came back after the visibility timeout. moto's Queue.delete_message rewrites the
    message list without a lock: 8 threads deleting 1,000 messages in one process (the switch
    interval cut to 10 us to force the interleaving) left 799 to 834 of them in the queue, every
    delete returning without error. That later delivery is dead-lettered again, with a higher
    receive count; what must never happen is one delivery dead-lettered twice.
    """
    counts: dict[int, list[int]] = {}
    for letter in await read_dead_letters([path]):
        order = letter_id(letter)
        assert order is not None, letter
        counts.setdefault(order, []).append(int(letter.headers["receive_count"]))
    twice = {order: seen for order, seen in counts.items() if len(seen) != len(set(seen))}
    assert not twice, f"one delivery dead-lettered twice (id: receive counts): {twice}\n{report}"


@pytest.mark.timeout(60)
async def test_a_slow_batch_keeps_its_messages_invisible_past_the_visibility_timeout() -> None:
    """A batch taking 3x the 2 s visibility timeout: meanwhile another consumer receives
    nothing, and afterwards every message was written once and deleted."""
    require_server("sqs")
    place = new_sqs_place(visibility_timeout=2)
    await place.create()
    try:
        await place.publish([{"id": i} for i in range(20)])
        progress = asyncio.Event()
        sink = IdSink(progress, delay=6.0)
        source = SqsSource(place.url, wait_time=1, **MOTO)
        pipeline = Pipeline(
            source, sink, BatchConfig(max_size=20, max_wait=0.5), dead_letter=Letters(progress)
        )
        task = asyncio.create_task(pipeline.run())
        stolen: list[Any] = []
        async with sqs_client() as client:
            await asyncio.sleep(1.0)  # the worker received the 20 and the batch started
            deadline = time.monotonic() + 4.5
            while time.monotonic() < deadline:
                reply = await client.receive_message(
                    QueueUrl=place.url, MaxNumberOfMessages=10, WaitTimeSeconds=1
                )
                stolen.extend(reply.get("Messages", ()))
        async with asyncio.timeout(20):
            while len(sink.ids) < 20:
                await progress.wait()
                progress.clear()
        await pipeline.stop()
        await task
        assert stolen == [], f"{len(stolen)} message(s) became visible during the slow batch"
        assert sink.ids == set(range(20))
        assert sink.writes == 20  # once each
        assert source.extended > 0
        assert await place.outstanding() == 0
    finally:
        await place.delete()


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_killed_workers_messages_return_after_the_visibility_timeout_and_land_once(
    tmp_path: Path,
) -> None:
    """kill -9 a worker whose slow database holds messages in flight: they become visible
    after the 5 s visibility timeout, a second worker processes them, nothing is lost and the
    idempotent sink holds each id once."""
    require()
    messages = scaled(600, minimum=300)
    orders, poison = make_orders(messages, 0)
    async with SqsScene(tmp_path, visibility_timeout=5) as scene:
        await scene.place.publish(orders)
        slow = scene.pipeline(
            "slow",
            sink=scene.table.sink_options(type=f"{HARNESS}:HarnessPostgresSink", delay=1.0),
            batch={"max_size": 100},
        )
        first = scene.worker(slow, "worker-0")
        await first.start()
        assert await wait_rows(scene.table, 100, seconds=90) >= 100, first.output()
        await first.kill()
        _, in_flight = await scene.place.counts()
        assert in_flight > 0, "the killed worker held no message: nothing to prove"
        second = scene.worker(scene.pipeline("worker"), "worker-1")
        await second.start()
        report = await scene.wait_complete(range(messages), poison, 120)
        code, _ = await second.terminate(60)
        detail = f"{report}\n{scene.output()}"
        assert code == 0, detail
        report = await scene.check(range(messages), poison)
        assert report.lost == set(), detail
        assert report.rows == report.distinct == messages, detail
        assert report.outstanding == 0, detail


@pytest.mark.timeout(60)
async def test_a_message_received_past_max_receives_is_dead_lettered_as_redelivered() -> None:
    """A message already received twice (each receive left to time out), read by a source with
    max_receives=2: dead-lettered as "redelivered" with its payload, then deleted."""
    require_server("sqs")
    place = new_sqs_place(visibility_timeout=1)
    await place.create()
    try:
        await place.publish([{"id": 1}])
        async with sqs_client() as client:
            for _ in range(2):  # two receives that never delete: ApproximateReceiveCount = 2
                for _ in range(10):
                    reply = await client.receive_message(
                        QueueUrl=place.url, MaxNumberOfMessages=1, WaitTimeSeconds=2
                    )
                    if reply.get("Messages"):
                        break
                await asyncio.sleep(1.2)
        progress = asyncio.Event()
        letters = Letters(progress)
        sink = IdSink(progress)
        source = SqsSource(place.url, wait_time=1, max_receives=2, **MOTO)
        pipeline = Pipeline(
            source, sink, BatchConfig(max_size=10, max_wait=0.1), dead_letter=letters
        )
        await run_until(pipeline, lambda: len(letters.letters) == 1, progress, seconds=20)
        [letter] = letters.letters
        assert letter.reason == "redelivered"
        assert letter.message == {"id": 1}
        assert letter.headers["receive_count"] == 3
        assert sink.ids == set()
        assert await place.outstanding() == 0
    finally:
        await place.delete()


@pytest.mark.timeout(60)
async def test_sqs_sink_sends_groups_of_ten_within_256_kib_and_a_refused_message_fails_alone() -> (
    None
):
    """25 small items and 3 of 100 KiB make calls of at most 10 and at most 256 KiB; an item
    over 256 KiB fails alone (PartialFailure naming it), and every other item arrives."""
    require_server("sqs")
    groups = SqsSink._groups(
        [{"MessageBody": "x" * 100_000}] * 3 + [{"MessageBody": "y"}] * 25  # type: ignore[list-item]
    )
    assert [len(g) for g in groups] == [2, 10, 10, 6]
    assert all(sum(len(e["MessageBody"]) for e in g) <= MAX_BYTES for g in groups)
    place = new_sqs_place()
    await place.create()
    sink = SqsSink(place.url, **MOTO)
    try:
        batch: list[Any] = [{"id": i, "pad": "z" * 10} for i in range(25)]
        batch.insert(7, {"id": 99, "pad": "z" * (MAX_BYTES + 1)})
        with pytest.raises(PartialFailure) as info:
            await sink.write(batch)
        assert list(info.value.failures) == [7]
        assert "262144" in str(info.value.failures[7])
        results = info.value.results
        assert results is not None
        assert sum(r is not None for r in results) == 25
        bodies = await _drain(place.url)
        assert sorted(b["id"] for b in bodies) == list(range(25))
    finally:
        await sink.close()
        await place.delete()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("fifo", "size", "refused", "unsent"),
    [
        (False, 11, [10], []),  # the 2 KiB item alone in its call: a bad message
        (False, 21, [*range(10, 20)], []),  # in a call of ten: the engine splits that call
        (True, 21, [*range(10, 20)], [20]),  # FIFO: the call after it waits, unsent
    ],
    ids=["standard-alone", "standard-shared", "fifo"],
)
async def test_sqs_sink_reports_the_items_other_calls_sent_when_one_call_fails(
    fifo: bool, size: int, refused: list[int], unsent: list[int]
) -> None:
    """A queue whose MaximumMessageSize is 1 KiB refuses a whole SendMessageBatch call holding a
    2 KiB item (item 10). The calls were gathered and that one error failed the whole batch,
    though the other calls had sent their items: the engine retried and split the batch and
    the good items landed again and again. Now only the refused call's items fail: a
    PayloadError when the item was alone in it, else a retryable error the engine splits; the
    sent items come back with their MessageIds. A FIFO batch stops at the refused call: the
    later items fail as an outage, unsent, so they are retried in order."""
    require_server("sqs")
    name = unique("q") + (".fifo" if fifo else "")
    attributes = {"MaximumMessageSize": "1024"}
    if fifo:
        attributes |= {"FifoQueue": "true", "ContentBasedDeduplication": "true"}
    async with sqs_client() as client:
        url = (await client.create_queue(QueueName=name, Attributes=attributes))["QueueUrl"]
    sink = SqsSink(url, group_field="g" if fifo else None, **MOTO)
    try:
        batch: list[Any] = [{"g": "a", "i": i} for i in range(size)]
        batch[10]["pad"] = "x" * 2000  # the first call holds items 0-9
        with pytest.raises(PartialFailure) as info:
            await sink.write(batch)
        failures = info.value.failures
        assert sorted(failures) == refused + unsent
        if refused == [10]:
            assert isinstance(failures[10], PayloadError)
            assert "item 10" in str(failures[10])
        else:
            assert all(type(failures[i]) is SqsError for i in refused)
        assert all(isinstance(failures[i], SqsUnavailable) for i in unsent)
        sent = [i for i in range(size) if i not in failures]
        results = info.value.results
        assert results is not None
        assert [i for i, r in enumerate(results) if r is not None] == sent
        received = [b["i"] for b in await _drain(url)]
        assert (received if fifo else sorted(received)) == sent
    finally:
        await sink.close()
        async with sqs_client() as client:
            await client.delete_queue(QueueUrl=url)


@pytest.mark.timeout(60)
async def test_sqs_sink_fails_an_item_utf8_cannot_encode_alone() -> None:
    """A str with a lone surrogate (JSON keeps it) cannot be sent as UTF-8. Measuring its size
    raised UnicodeEncodeError out of write, failing the whole batch with an error the engine
    retries; it is a PayloadError for that item, and the others are sent."""
    require_server("sqs")
    place = new_sqs_place()
    await place.create()
    sink = SqsSink(place.url, **MOTO)
    try:
        with pytest.raises(PartialFailure) as info:
            await sink.write([{"id": 0}, {"id": 1, "name": "bob\udc80"}, {"id": 2}])
        assert list(info.value.failures) == [1]
        assert isinstance(info.value.failures[1], PayloadError)
        assert "item 1 cannot be encoded as UTF-8" in str(info.value.failures[1])
        assert sorted(b["id"] for b in await _drain(place.url)) == [0, 2]
    finally:
        await sink.close()
        await place.delete()


@pytest.mark.timeout(90)
async def test_a_fifo_queue_with_preserve_order_writes_each_group_in_order() -> None:
    """200 messages in 4 message groups on a FIFO queue, read with preserve_order and the
    group as the batch key: the sink sees each group's ids in increasing order."""
    require_server("sqs")
    place = new_sqs_place(fifo=True)
    await place.create()
    try:
        await place.publish([{"id": i} for i in range(200)])  # MessageGroupId = id % 4
        progress = asyncio.Event()
        seen: list[int] = []

        class OrderSink:
            async def write(self, batch: Sequence[Any]) -> None:
                await asyncio.sleep(0.01)
                seen.extend(p["id"] for p in batch)
                progress.set()

            async def close(self) -> None:
                return None

        source = SqsSource(place.url, wait_time=1, **MOTO)
        config = BatchConfig(max_size=10, max_wait=0.05, preserve_order=True)
        pipeline = Pipeline(source, OrderSink(), config, dead_letter=Letters(progress))
        await run_until(pipeline, lambda: len(set(seen)) == 200, progress, seconds=60)
        for group in range(4):
            ids = [i for i in seen if i % 4 == group]
            assert ids == sorted(ids), f"group {group} out of order"
    finally:
        await place.delete()


async def _drain(url: str) -> list[Any]:
    import json

    out: list[Any] = []
    async with sqs_client() as client:
        for _ in range(30):
            reply = await client.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0
            )
            messages = reply.get("Messages", [])
            if not messages:
                break
            for message in messages:
                out.append(json.loads(message["Body"]))
                await client.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    return out


async def _first_envelope(source: SqsSource) -> Any:
    return await asyncio.wait_for(source.__anext__(), 10)


async def test_a_delete_an_outage_failed_is_retried_and_the_message_kept_invisible() -> None:
    """The batch was processed, then SQS was unreachable for 2 s while deleting it: the delete
    was never retried and the message no longer kept invisible, so it came back and was
    processed twice. It is now held (extended) and its delete retried until it succeeds."""
    require_server("sqs")
    place = new_sqs_place(visibility_timeout=3)
    await place.create()
    source = SqsSource(place.url, wait_time=1, **MOTO)
    try:
        await place.publish([{"id": 1}])
        envelope = await _first_envelope(source)
        client = await source._client.get()
        real = client.delete_message_batch
        back = time.monotonic() + 2.0

        async def unreachable_for_a_while(**call: Any) -> Any:
            if time.monotonic() < back:
                raise ConnectionError("SQS unreachable")
            return await real(**call)

        client.delete_message_batch = unreachable_for_a_while
        await source.ack_many([envelope])  # does not raise: the delete is retried
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(source.__anext__(), 6)  # never delivered again
        assert source.deleted == 1
        assert await place.outstanding() == 0
    finally:
        await source.close()
        await place.delete()


async def test_a_message_given_back_at_close_is_not_hidden_again_by_an_extension() -> None:
    """close() gave held messages back (visibility 0) while the keeper's extension for them was
    still on its way; landing afterwards it hid them again for a whole visibility timeout. The
    keeper now ends (and extensions and releases take turns) before anything is given back."""
    require_server("sqs")
    place = new_sqs_place(visibility_timeout=6)
    await place.create()
    source = SqsSource(place.url, wait_time=1, **MOTO)
    try:
        await place.publish([{"id": 1}])
        await _first_envelope(source)
        client = await source._client.get()
        real = client.change_message_visibility_batch
        extending = asyncio.Event()

        async def slow_extension(**call: Any) -> Any:
            if call["Entries"][0]["VisibilityTimeout"] != 0:
                extending.set()
                await asyncio.sleep(0.5)  # still on its way when close() gives it back
            return await real(**call)

        client.change_message_visibility_batch = slow_extension
        await asyncio.wait_for(extending.wait(), 5)
        await source.close()
        await asyncio.sleep(0.2)
        async with sqs_client() as sqs:
            reply = await sqs.receive_message(
                QueueUrl=place.url, WaitTimeSeconds=1, MaxNumberOfMessages=1
            )
        assert reply.get("Messages"), "the message given back is invisible again"
    finally:
        await source.close()
        await place.delete()


@pytest.mark.parametrize("queue_timeout", [0, 1])
async def test_a_short_visibility_timeout_still_keeps_a_running_batch_invisible(
    queue_timeout: int,
) -> None:
    """With a 1 s visibility timeout the keeper's floor of 1 s let every extension arrive after
    the message had become visible; a queue whose own timeout is 0 never hid anything. Another
    worker now receives nothing while the batch holds the message."""
    require_server("sqs")
    place = new_sqs_place(visibility_timeout=queue_timeout)
    await place.create()
    source = SqsSource(place.url, wait_time=1, **MOTO)  # the queue's timeout: 0 or 1 s
    try:
        await place.publish([{"id": 1}])
        envelope = await _first_envelope(source)
        stolen: list[Any] = []
        async with sqs_client() as sqs:
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                reply = await sqs.receive_message(
                    QueueUrl=place.url, MaxNumberOfMessages=1, WaitTimeSeconds=0
                )
                stolen += reply.get("Messages", ())
                await asyncio.sleep(0.1)
        assert stolen == []
        await source.ack_many([envelope])
    finally:
        await source.close()
        await place.delete()
