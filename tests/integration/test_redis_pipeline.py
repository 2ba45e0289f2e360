"""Redis Streams through a whole Pipeline: poison, malformed and over-delivered entries end as
dead letters, every good one in the sink, nothing left pending in the group."""

from __future__ import annotations

import asyncio
import json
import tomllib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from batchpunk.config import BatchConfig
from batchpunk.connectors.redis_streams import RedisStreamSource
from batchpunk.pipeline import Pipeline
from batchpunk.pipeline_file import parse_pipeline
from tests.conftest import require_server
from tests.contract.cases_redis import REDIS_URL, outstanding, unique_stream
from tests.integration.pipeline_support import CONFIG, IdSink, Letters, run_until

pytestmark = pytest.mark.integration

GROUP = "pipeline"


@pytest.fixture
async def client() -> AsyncIterator[Any]:
    require_server("redis")
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def stream(client: Any) -> AsyncIterator[str]:
    name = unique_stream()
    yield name
    await client.delete(name)


def source(stream: str, consumer: str = "w1", **options: Any) -> RedisStreamSource:
    return RedisStreamSource(REDIS_URL, stream, GROUP, consumer, block=0.2, **options)


async def test_good_entries_reach_the_sink_and_bad_ones_the_dead_letters(
    client: Any, stream: str
) -> None:
    """300 entries with 4 poison and 2 malformed: 294 ids stored, 6 letters, nothing pending."""
    poison = {17, 101, 202, 299}
    pipe = client.pipeline(transaction=False)
    for i in range(300):
        data = b"{oops" if i in (50, 250) else json.dumps({"id": i, "poison": i in poison})
        pipe.xadd(stream, {"data": data})
    await pipe.execute()
    progress = asyncio.Event()
    sink, letters = IdSink(progress), Letters(progress)
    pipeline = Pipeline(source(stream), sink, CONFIG, dead_letter=letters)
    await run_until(pipeline, lambda: len(sink.ids) + len(letters) >= 300, progress)
    assert sink.ids == set(range(300)) - poison - {50, 250}
    reasons = sorted(letter.reason for letter in letters.letters)
    assert reasons == ["failed"] * 4 + ["malformed"] * 2
    failed = {letter.message["id"] for letter in letters.letters if letter.reason == "failed"}
    assert failed == poison
    assert {letter.message for letter in letters.letters if letter.reason == "malformed"} == {
        b"{oops"
    }
    assert all(letter.headers["stream"] == stream for letter in letters.letters)
    assert await outstanding(client, stream, GROUP) == 0


async def test_an_entry_over_max_deliveries_is_dead_lettered_as_redelivered(
    client: Any, stream: str
) -> None:
    """An entry claimed for its 4th delivery with max_deliveries=3 is dead-lettered, unprocessed."""
    await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    crashing = (await client.xadd(stream, {"data": json.dumps({"id": 1})})).decode()
    await client.xadd(stream, {"data": json.dumps({"id": 2})})
    await client.xreadgroup(GROUP, "crashed", {stream: ">"}, count=1)  # took id 1, then died
    await client.xclaim(stream, GROUP, "crashed", 0, [crashing], retrycount=3, idle=60_000)
    progress = asyncio.Event()
    sink, letters = IdSink(progress), Letters(progress)
    claimer = source(stream, "alive", claim_idle=0.2, max_deliveries=3)
    pipeline = Pipeline(claimer, sink, CONFIG, dead_letter=letters)
    await run_until(pipeline, lambda: len(letters) >= 1 and len(sink.ids) >= 1, progress)
    assert sink.ids == {2}
    [letter] = letters.letters
    assert (letter.reason, letter.message) == ("redelivered", {"id": 1})
    assert letter.headers["delivery_count"] == 4
    assert letter.headers["message_id"] == crashing
    assert "max_deliveries=3" in str(letter.error)
    assert await outstanding(client, stream, GROUP) == 0


async def test_a_stopped_pipeline_leaves_nothing_lost_and_the_next_run_finishes(
    client: Any, stream: str
) -> None:
    """Stopping mid-stream acks what was written, gives back the rest; a restart stores them all."""
    pipe = client.pipeline(transaction=False)
    for i in range(2000):
        pipe.xadd(stream, {"data": json.dumps({"id": i})})
    await pipe.execute()
    progress = asyncio.Event()
    sink, letters = IdSink(progress, delay=0.01), Letters(progress)
    # max_pending bounds what the first run reads ahead, so that it stops mid-stream.
    config = BatchConfig(
        max_size=100,
        max_wait=0.05,
        max_concurrent_batches=2,
        drain_timeout=5,
        max_pending=400,
    )
    first = Pipeline(source(stream, claim_idle=30.0), sink, config, dead_letter=letters)
    await run_until(first, lambda: len(sink.ids) >= 300, progress)
    stored_first = len(sink.ids)
    assert 300 <= stored_first < 2000
    assert await outstanding(client, stream, GROUP) == 2000 - stored_first
    second = Pipeline(source(stream, claim_idle=30.0), sink, config, dead_letter=letters)
    await run_until(second, lambda: len(sink.ids) >= 2000, progress)
    assert sink.ids == set(range(2000))
    assert len(letters) == 0
    assert await outstanding(client, stream, GROUP) == 0


EXAMPLE = Path(__file__).parents[2] / "examples" / "redis-to-postgres.toml"


async def test_the_example_pipeline_file_moves_orders_from_redis_to_postgres(
    client: Any, stream: str, tmp_path: Path
) -> None:
    """examples/redis-to-postgres.toml, renamed apart, stores each order once, letters the bad."""
    require_server("postgres")
    asyncpg = pytest.importorskip("asyncpg")
    data = tomllib.loads(EXAMPLE.read_text())
    table = f"orders_{uuid.uuid4().hex[:12]}"
    data["source"].update(stream=stream, block=0.2)
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
        for order in orders + orders[:5]:  # the first five twice, as a redelivery would
            await client.xadd(stream, {"data": json.dumps(order)})
        pipeline = spec.build()
        task = asyncio.create_task(pipeline.run())

        async def finished() -> bool:
            if not letters_file.exists() or not letters_file.read_text().strip():
                return False
            if await db.fetchval("SELECT to_regclass($1)", table) is None:
                return False
            return bool(await db.fetchval(f"SELECT count(*) FROM {table}") == 39)

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
        assert '"amount_cents": -1' in letters[0] or '"amount_cents":-1' in letters[0]
        assert await outstanding(client, stream, data["source"]["group"]) == 0
    finally:
        await db.execute(f"DROP TABLE IF EXISTS {table}")
        await db.close()
