"""RabbitMQ through a whole Pipeline: poison, malformed and over-delivered messages end as dead
letters, every good one in the sink, and the queue is left with nothing ready or unacknowledged."""

from __future__ import annotations

import asyncio
import json
import tomllib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from batchpunk.config import BatchConfig, BatchTrigger
from batchpunk.connectors.rabbitmq import RabbitMQSource
from batchpunk.pipeline import Pipeline
from batchpunk.pipeline_file import parse_pipeline
from tests.conftest import require_server
from tests.contract.cases_rabbitmq import (
    RABBITMQ_URL,
    delete_queue,
    publish_json,
    publish_raw,
    rabbitmq_channel,
    unique_queue,
    wait_ready,
)
from tests.contract.harness import take
from tests.integration.pipeline_support import CONFIG, IdSink, Letters, run_until

pytestmark = pytest.mark.integration


@pytest.fixture
async def channel() -> AsyncIterator[Any]:
    """A confirming channel to the local broker (the test is skipped when it is down)."""
    require_server("rabbitmq")
    async with rabbitmq_channel() as opened:
        yield opened


async def test_good_messages_reach_the_sink_and_bad_ones_the_dead_letters(channel: Any) -> None:
    """300 messages with 4 poison and 2 malformed: 294 ids stored, 6 letters, queue empty."""
    queue = unique_queue("pipe")
    poison = {17, 101, 202, 299}
    raw = [
        json.dumps({"id": i, "poison": i in poison}).encode() if i not in (50, 250) else b"{oops"
        for i in range(300)
    ]
    await channel.declare_queue(queue, durable=True)
    try:
        await publish_raw(channel, queue, raw)
        progress = asyncio.Event()
        sink, letters = IdSink(progress), Letters(progress)
        pipeline = Pipeline(RabbitMQSource(RABBITMQ_URL, queue), sink, CONFIG, dead_letter=letters)
        await run_until(pipeline, lambda: len(sink.ids) + len(letters) >= 300, progress)
        assert sink.ids == set(range(300)) - poison - {50, 250}
        reasons = sorted(letter.reason for letter in letters.letters)
        assert reasons == ["failed"] * 4 + ["malformed"] * 2
        failed = {letter.message["id"] for letter in letters.letters if letter.reason == "failed"}
        assert failed == poison
        assert {letter.message for letter in letters.letters if letter.reason == "malformed"} == {
            b"{oops"
        }
        assert all(letter.headers["queue"] == queue for letter in letters.letters)
        await wait_ready(channel, queue, 0)  # all acked: the closed source returned nothing
    finally:
        await delete_queue(channel, queue)


async def test_a_delivery_past_max_deliveries_is_dead_lettered_as_redelivered(
    channel: Any,
) -> None:
    """On a quorum queue a message already delivered max_deliveries times is dead-lettered."""
    queue = unique_queue("pipe-quorum")
    first = RabbitMQSource(RABBITMQ_URL, queue, quorum=True, max_deliveries=2, prefetch=10)
    try:
        await first.start()
        await publish_json(channel, queue, [{"id": 1}, {"id": 2}])
        for _ in range(2):  # two workers took id 1 and died, say
            envelopes = await take(first, 2 if _ == 0 else 1)
            await first.nack_many([e for e in envelopes if e.payload["id"] == 1], True)
            await first.ack_many([e for e in envelopes if e.payload["id"] != 1])
        await first.close()
        source = RabbitMQSource(RABBITMQ_URL, queue, quorum=True, max_deliveries=2)
        progress = asyncio.Event()
        sink, letters = IdSink(progress), Letters(progress)
        pipeline = Pipeline(source, sink, CONFIG, dead_letter=letters)
        await run_until(pipeline, lambda: len(letters) >= 1, progress)
        assert sink.ids == set()
        [letter] = letters.letters
        assert (letter.reason, letter.message) == ("redelivered", {"id": 1})
        # 3, or 4 when id 1 came back a third time before close() requeued it (a quorum
        # queue counts every return, a prefetched but unprocessed one included)
        assert letter.headers["delivery_count"] in (3, 4)
        assert "max_deliveries=2" in str(letter.error)
        await wait_ready(channel, queue, 0)
    finally:
        await delete_queue(channel, queue)


async def test_a_graceful_stop_mid_run_requeues_what_was_not_written(channel: Any) -> None:
    """Stopping a busy pipeline leaves each id either written or back in the queue, none held."""
    queue = unique_queue("pipe-stop")
    await channel.declare_queue(queue, durable=True)
    try:
        await publish_json(channel, queue, [{"id": i} for i in range(2000)])
        progress = asyncio.Event()
        sink, letters = IdSink(progress, delay=0.05), Letters(progress)
        pipeline = Pipeline(RabbitMQSource(RABBITMQ_URL, queue), sink, CONFIG, dead_letter=letters)
        await run_until(pipeline, lambda: len(sink.ids) >= 300, progress)
        assert 300 <= len(sink.ids) < 2000
        assert len(letters) == 0
        await wait_ready(channel, queue, 2000 - len(sink.ids))
        rest = RabbitMQSource(RABBITMQ_URL, queue, prefetch=2000)
        remaining = await take(rest, 2000 - len(sink.ids))
        assert {e.payload["id"] for e in remaining} | sink.ids == set(range(2000))
        await rest.close()
    finally:
        await delete_queue(channel, queue)


async def test_acks_held_behind_a_waiting_lane_do_not_fill_the_prefetch_window(
    channel: Any,
) -> None:
    """Nine urgent messages wait at the head for a tenth (SIZE trigger, a lane per priority):
    the ordinary messages behind them are all written: their acks are not held back until the
    window (prefetch 20) is full and the broker stops delivering."""
    queue = unique_queue("pipe-window")
    await channel.declare_queue(queue, durable=True, arguments={"x-max-priority": 10})
    try:
        urgent = [json.dumps({"id": 1000 + i}).encode() for i in range(9)]
        await publish_raw(channel, queue, urgent, priority=5)
        await publish_json(channel, queue, [{"id": i} for i in range(40)])
        config = BatchConfig(
            max_size=10, trigger=BatchTrigger.SIZE, max_concurrent_batches=1, drain_timeout=2
        )
        progress = asyncio.Event()
        sink, letters = IdSink(progress), Letters(progress)
        source = RabbitMQSource(RABBITMQ_URL, queue, declare=False)
        pipeline = Pipeline(source, sink, config, dead_letter=letters)
        # Before the fix: 10 of the 40 written, then nothing (delivered 20, acked 0).
        await run_until(pipeline, lambda: set(range(40)) <= sink.ids, progress)
        assert source.prefetch == 20
        # stop() drained the urgent lane too: every message written once, the queue empty.
        assert sink.ids == set(range(40)) | {1000 + i for i in range(9)}
        assert len(letters) == 0
        await wait_ready(channel, queue, 0)
    finally:
        await delete_queue(channel, queue)


EXAMPLE = Path(__file__).parents[2] / "examples" / "rabbitmq-to-postgres.toml"


async def test_the_example_pipeline_file_moves_orders_from_rabbitmq_to_postgres(
    channel: Any, tmp_path: Path
) -> None:
    """The example file, renamed apart, stores each order once and dead-letters the bad one."""
    require_server("postgres")
    asyncpg = pytest.importorskip("asyncpg")
    data = tomllib.loads(EXAMPLE.read_text())
    queue, table = unique_queue("orders"), f"orders_{uuid.uuid4().hex[:12]}"
    data["source"]["queue"] = queue
    data["sink"]["table"] = table
    data["sink"]["create_table"] = data["sink"]["create_table"].replace(" orders ", f" {table} ")
    letters_file = tmp_path / "letters.jsonl"
    data["dead_letter"]["path"] = str(letters_file)
    data["batch"].update(max_wait=0.05, retry_delay=0.01)
    spec = parse_pipeline(data, environ={})
    orders = [
        {"id": i, "customer": f"c{i}", "amount_cents": -1 if i == 7 else i} for i in range(40)
    ]
    db = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test")
    try:
        await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
        await publish_json(channel, queue, orders + orders[:5])  # five twice, as on redelivery
        pipeline = spec.build()
        task = asyncio.create_task(pipeline.run())

        async def finished() -> bool:
            if not letters_file.exists() or not letters_file.read_text().strip():
                return False
            found = await db.fetchval("SELECT to_regclass($1)", table)
            return found is not None and await db.fetchval(f"SELECT count(*) FROM {table}") == 39

        for _ in range(150):
            if await finished():
                break
            await asyncio.sleep(0.1)
        await pipeline.stop()
        await task
        rows = await db.fetch(f"SELECT id FROM {table} ORDER BY id")
        assert [r["id"] for r in rows] == [i for i in range(40) if i != 7]
        letters = letters_file.read_text().splitlines()
        assert len(letters) == 1
        assert json.loads(letters[0])["message"]["amount_cents"] == -1
        await wait_ready(channel, queue, 0)
    finally:
        await delete_queue(channel, queue)
        await db.execute(f"DROP TABLE IF EXISTS {table}")
        await db.close()
