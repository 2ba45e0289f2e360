"""NATS JetStream through a whole Pipeline: poison, malformed and over-delivered messages end as
dead letters, every good one in the sink, nothing left on the consumer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from batchpunk.config import BatchConfig
from batchpunk.connectors.nats import REDELIVERED, NatsJetStreamSink, NatsJetStreamSource
from batchpunk.deadletter import JsonlDeadLetters, MemoryDeadLetters
from batchpunk.pipeline import Pipeline
from batchpunk.pipeline_file import parse_pipeline
from batchpunk.processor import BatchProcessor
from tests.conftest import require_server
from tests.contract.cases_nats import NATS_URL, consumer_counts, fresh_stream, jetstream, unique
from tests.contract.harness import take
from tests.integration.pipeline_support import CONFIG, IdSink, Letters, run_until

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _nats_up() -> None:
    require_server("nats")


async def test_good_messages_reach_the_sink_and_bad_ones_the_dead_letters() -> None:
    """300 messages with 4 poison and 2 malformed: 294 ids stored, 6 letters, nothing pending."""
    poison = {17, 101, 202, 299}
    raw = [
        json.dumps({"id": i, "poison": i in poison}).encode() if i not in (50, 250) else b"{oops"
        for i in range(300)
    ]
    async with fresh_stream(raw, raw=True) as (js, stream, subject):
        durable = unique("D")
        source = NatsJetStreamSource(NATS_URL, stream, subject, durable, fetch_timeout=0.2)
        progress = asyncio.Event()
        sink, letters = IdSink(progress), Letters(progress)
        pipeline = Pipeline(source, sink, CONFIG, dead_letter=letters)
        await run_until(pipeline, lambda: len(sink.ids) + len(letters) >= 300, progress)
        assert sink.ids == set(range(300)) - poison - {50, 250}
        reasons = sorted((letter.reason, str(letter.message)) for letter in letters.letters)
        assert [r for r, _ in reasons] == ["failed"] * 4 + ["malformed"] * 2
        assert {
            letter.message["id"] for letter in letters.letters if letter.reason == "failed"
        } == (poison)
        assert all(letter.headers["stream"] == stream for letter in letters.letters)
        assert await consumer_counts(js, stream, durable) == (0, 0)


async def test_a_message_at_its_last_delivery_is_dead_lettered_as_redelivered() -> None:
    """A message already delivered max_deliver-1 times is dead-lettered, not processed, and gone."""
    async with fresh_stream([{"id": 1}, {"id": 2}]) as (js, stream, subject):
        durable = unique("D")
        first = NatsJetStreamSource(
            NATS_URL, stream, subject, durable, max_deliver=2, fetch_timeout=0.2, nak_delay=0
        )
        envelopes = await take(first, 2)
        await first.nack_many([envelopes[0]], True)  # a worker gave id 1 back once already
        await first.ack_many([envelopes[1]])
        await first.close()
        source = NatsJetStreamSource(
            NATS_URL, stream, subject, durable, max_deliver=2, fetch_timeout=0.2
        )
        progress = asyncio.Event()
        sink, letters = IdSink(progress), Letters(progress)
        pipeline = Pipeline(source, sink, CONFIG, dead_letter=letters)
        await run_until(pipeline, lambda: len(letters) >= 1, progress)
        assert sink.ids == set()
        [letter] = letters.letters
        assert (letter.reason, letter.message) == ("redelivered", {"id": 1})
        assert letter.headers["delivery_count"] == 2
        assert "max_deliver=2" in str(letter.error)
        info = await js.consumer_info(stream, durable)
        assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_a_consumer_without_a_delivery_limit_never_flags_a_message_redelivered() -> None:
    """create=False uses the consumer's own max_deliver; one with none (-1, the server's and
    the nats CLI's default) must not get the source's default of 10, which flagged the 10th
    delivery "redelivered" so the pipeline dead-lettered and terminated a message the server
    would have delivered again."""
    api = pytest.importorskip("nats.js.api")
    async with fresh_stream([{"id": 1}]) as (js, stream, subject):
        durable = unique("D")
        await js.add_consumer(
            stream,
            api.ConsumerConfig(
                durable_name=durable,
                ack_policy=api.AckPolicy.EXPLICIT,
                filter_subject=subject,
                ack_wait=30,
            ),
        )
        assert (await js.consumer_info(stream, durable)).config.max_deliver in (None, -1, 0)
        source = NatsJetStreamSource(
            NATS_URL, stream, subject, durable, create=False, fetch_timeout=0.2, nak_delay=0
        )
        try:
            flagged = []
            for _ in range(12):  # past the default max_deliver=10
                [envelope] = await take(source, 1)
                flagged.append(bool(envelope.headers and envelope.headers.get(REDELIVERED)))
                assert envelope.error is None
                await source.nack_many([envelope], True)
            assert envelope.headers is not None
            assert envelope.headers["delivery_count"] == 12
            assert flagged == [False] * 12
        finally:
            await source.close()


class _GateSink:
    """Keeps the ids it wrote; the first write waits until the test opens the gate."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.writing = asyncio.Event()
        self.gate = asyncio.Event()

    async def write(self, batch: Sequence[Any]) -> None:
        self.writing.set()
        await self.gate.wait()
        self.ids.extend(p["id"] for p in batch)


async def test_a_graceful_stop_dead_letters_last_deliveries_instead_of_nak_ing_them() -> None:
    """Fetched but not handed out at a graceful stop, messages on their last delivery were nak'd
    with the rest: JetStream never delivers a nak'd last delivery again, so 5 of 10 ids were in
    neither the sink nor the dead letters. Now they are handed out and dead-lettered before
    iteration ends; only the others are nak'd, and every id is accounted for."""
    async with fresh_stream([{"id": i} for i in range(6)]) as (js, stream, subject):
        durable = unique("D")

        def source(batch: int) -> NatsJetStreamSource:
            return NatsJetStreamSource(
                NATS_URL, stream, subject, durable, max_deliver=3, batch=batch,
                fetch_timeout=0.3, nak_delay=0,
            )  # fmt: skip

        a, b = source(6), source(3)
        held = await take(a, 6)
        await a.nack_many(held[3:], True)
        assert [e.headers["delivery_count"] for e in await take(b, 3)] == [2, 2, 2]
        await a.close()  # ids 0-2 come back for their 2nd delivery
        await b.close()  # ids 3-5 for their 3rd and last
        progress = asyncio.Event()
        sink, letters = _GateSink(), Letters(progress)
        config = BatchConfig(
            max_size=1, max_wait=0.01, max_concurrent_batches=1, max_pending=1, drain_timeout=5
        )
        c = source(20)
        pipeline = Pipeline(c, sink, config, dead_letter=letters)
        task = asyncio.create_task(pipeline.run())
        await asyncio.wait_for(sink.writing.wait(), 5)  # id 0 in the sink, the consumer stuck
        await asyncio.wait_for(c._pull_over.wait(), 5)
        unread = [(e.payload["id"], bool(e.headers.get(REDELIVERED))) for e in c._ready]
        assert (3, True) in unread
        assert (5, True) in unread
        pipeline.request_stop()
        sink.gate.set()
        await asyncio.wait_for(task, 10)
        redelivered = sorted(x.message["id"] for x in letters.letters)
        assert set(redelivered) >= {3, 4, 5}
        # What was nak'd comes back (its last delivery) to the next run: nothing is lost.
        progress = asyncio.Event()
        rest, more = IdSink(progress), Letters(progress)
        pipeline = Pipeline(source(20), rest, CONFIG, dead_letter=more)
        everything = set(range(6))

        def accounted() -> set[int]:
            lettered = {x.message["id"] for x in more.letters}
            return set(sink.ids) | set(redelivered) | rest.ids | lettered

        await run_until(pipeline, lambda: accounted() == everything, progress)
        assert accounted() == everything
        assert await consumer_counts(js, stream, durable) == (0, 0)


class _Proxy:
    """A TCP proxy to the NATS server that can be cut, faking an outage without touching it."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", 4222)
        self.writers += [writer, upstream_writer]

        async def pipe(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await source.read(65536):
                    target.write(data)
                    await target.drain()
            target.close()

        for task in (pipe(reader, upstream_writer), pipe(upstream_reader, writer)):
            self.pipes.add(asyncio.create_task(task))

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()
        for task in self.pipes:
            task.cancel()
        self.pipes.clear()
        await self.server.wait_closed()


async def test_an_outage_past_the_client_buffer_is_held_not_dead_lettered() -> None:
    """While disconnected nats-py buffers publishes up to 2 MB, then every publish raises
    OutboundBufferLimitError. That is the server being unreachable, not a bad message: it must
    be held as an outage and delivered after reconnecting. It was split, retried and
    dead-lettered as "failed" (20 of 40 messages within a second of the cut)."""
    async with fresh_stream() as (js, stream, subject):
        proxy = _Proxy()
        await proxy.start()
        sink = NatsJetStreamSink(f"nats://127.0.0.1:{proxy.port}", subject, timeout=0.3)
        await sink.start()
        letters = MemoryDeadLetters()
        config = BatchConfig(
            max_size=10,
            max_wait=0.05,
            max_retries=1,
            retry_delay=0.01,
            retry_max_delay=0.05,
            retry_jitter=False,
            delivery_timeout=None,
        )
        processor: BatchProcessor[Any, int] = BatchProcessor(
            config, sink.write, dead_letter=letters
        )
        await processor.start()
        try:
            await proxy.cut()
            for _ in range(100):
                if not sink._conn.nc.is_connected:
                    break
                await asyncio.sleep(0.02)
            body = "x" * 100_000  # 40 x 100 kB: twice nats-py's reconnect buffer
            futures = [
                asyncio.ensure_future(processor.submit({"i": i, "body": body})) for i in range(40)
            ]
            await asyncio.sleep(1.5)
            assert [(x.reason, x.error_type) for x in letters.letters] == []
            await proxy.start()  # the server is back, on the same port
            await asyncio.wait_for(asyncio.gather(*futures), 30)
            assert letters.letters == []
            assert (await js.stream_info(stream)).state.messages >= 40
        finally:
            await processor.stop(drain=False)
            await sink.close()
            await proxy.cut()  # stops listening


EXAMPLE = Path(__file__).parents[2] / "examples" / "nats-to-postgres.toml"


async def test_the_example_pipeline_file_moves_orders_from_nats_to_postgres(tmp_path: Path) -> None:
    """examples/nats-to-postgres.toml, renamed apart, stores each order once and letters the bad."""
    require_server("postgres")
    asyncpg = pytest.importorskip("asyncpg")
    data = tomllib.loads(EXAMPLE.read_text())
    stream, table = unique("S"), unique("orders_")
    subject = f"{unique('bp')}.orders"
    data["source"].update(stream=stream, subject=f"{subject}.>", durable=unique("D"))
    data["sink"]["table"] = table
    data["sink"]["create_table"] = data["sink"]["create_table"].replace(" orders ", f" {table} ")
    data["dead_letter"]["path"] = str(tmp_path / "letters.jsonl")
    data["batch"].update(max_wait=0.05, retry_delay=0.01)
    spec = parse_pipeline(data, environ={})
    orders = [
        {"id": i, "customer": f"c{i}", "amount_cents": -1 if i == 7 else i} for i in range(40)
    ]
    letters_file = tmp_path / "letters.jsonl"
    db = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test")
    try:
        async with jetstream() as js:
            await js.add_stream(name=stream, subjects=[f"{subject}.>"])
            for order in orders + orders[:5]:  # the first five twice, as a redelivery would
                await js.publish(f"{subject}.new", json.dumps(order).encode())
            pipeline = spec.build()
            task = asyncio.create_task(pipeline.run())

            async def finished() -> bool:
                if not letters_file.exists() or not letters_file.read_text().strip():
                    return False
                found = await db.fetchval("SELECT to_regclass($1)", table)
                return (
                    found is not None and await db.fetchval(f"SELECT count(*) FROM {table}") == 39
                )

            for _ in range(150):
                if await finished():
                    break
                await asyncio.sleep(0.1)
            await pipeline.stop()
            await task
            rows = await db.fetch(f"SELECT id FROM {table} ORDER BY id")
            assert [r["id"] for r in rows] == [i for i in range(40) if i != 7]
            async with JsonlDeadLetters(letters_file) as stored:
                letters = [letter async for letter in stored.read(strict=True)]
            assert [(x.reason, x.message["id"]) for x in letters] == [("failed", 7)]
            assert letters[0].headers["stream"] == stream
            info = await js.consumer_info(stream, data["source"]["durable"])
            assert (info.num_ack_pending, info.num_pending) == (0, 0)
    finally:
        async with jetstream() as js:
            with contextlib.suppress(Exception):
                await js.delete_stream(stream)
        await db.execute(f"DROP TABLE IF EXISTS {table}")
        await db.close()
