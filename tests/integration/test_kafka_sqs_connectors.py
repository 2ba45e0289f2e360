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
