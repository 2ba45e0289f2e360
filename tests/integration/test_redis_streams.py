"""RedisStreamSource and RedisStreamSink against the real Redis on 127.0.0.1:6379."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.exceptions import AuthenticationError

from batchpunk.config import BatchConfig
from batchpunk.connectors._common import PayloadError
from batchpunk.connectors.redis_streams import (
    REDELIVERED,
    DeliveryLimitExceeded,
    RedisStreamSink,
    RedisStreamSource,
    RedisUnavailable,
    StreamEntryLost,
)
from batchpunk.errors import ConfigError, PartialFailure
from batchpunk.retry import is_retryable
from tests.conftest import require_server
from tests.contract.harness import take
from tests.engine_support import ListSource

pytestmark = pytest.mark.integration

URL = "redis://127.0.0.1:6379"
GROUP = "workers"


@pytest.fixture
async def client() -> AsyncIterator[Any]:
    require_server("redis")
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(URL)
    yield client
    await client.aclose()


@pytest.fixture
async def stream(client: Any) -> AsyncIterator[str]:
    name = f"batchpunk-test:{uuid.uuid4().hex}"
    yield name
    await client.delete(name)


@pytest.fixture
async def sources(stream: str) -> AsyncIterator[Callable[..., RedisStreamSource]]:
    """Makes sources on the test stream and closes them all before the stream is deleted."""
    made: list[RedisStreamSource] = []

    def make(consumer: str = "c1", **options: Any) -> RedisStreamSource:
        options.setdefault("block", 0.2)
        source = RedisStreamSource(URL, stream, GROUP, consumer, **options)
        made.append(source)
        return source

    yield make
    for source in made:
        await source.close()


async def add(client: Any, stream: str, *payloads: Any) -> list[str]:
    """XADD each payload as JSON in the 'data' field; the new entry ids."""
    ids = []
    for payload in payloads:
        raw = await client.xadd(stream, {"data": json.dumps(payload)})
        ids.append(raw.decode())
    return ids


async def pending(client: Any, stream: str) -> int:
    return int((await client.xpending(stream, GROUP))["pending"])


async def test_group_and_stream_are_created_when_missing(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """A source on a stream that does not exist creates it with its group, and sees new entries."""
    source = sources()
    reading = asyncio.create_task(take(source, 1))
    await asyncio.sleep(0.1)
    groups = await client.xinfo_groups(stream)
    assert [g["name"] for g in groups] == [GROUP.encode()]
    await add(client, stream, {"id": 1})
    (envelope,) = await reading
    assert envelope.payload == {"id": 1}


async def test_missing_group_without_create_group_is_a_config_error(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """With create_group=False a missing group fails at once, naming the group and the stream."""
    await add(client, stream, {"id": 1})
    with pytest.raises(ConfigError, match=r"group: consumer group 'workers' does not exist"):
        await take(sources(create_group=False), 1)


async def test_acked_entries_are_xacked_and_nothing_stays_pending(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """ack_many leads to XACK: after close() the PEL is empty and every entry was seen once."""
    ids = await add(client, stream, *({"id": i} for i in range(50)))
    source = sources(count=7)
    envelopes = await take(source, 50)
    assert [e.receipt for e in envelopes] == ids
    assert all(e.headers is None for e in envelopes)  # a first delivery builds no headers dict
    assert source.headers_of(envelopes[0])["message_id"] == ids[0]
    assert await pending(client, stream) == 50
    await source.ack_many(envelopes)
    await source.close()
    assert await pending(client, stream) == 0


async def test_no_entry_is_xacked_before_its_own_ack(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """Acking some envelopes XACKs exactly those; the others stay pending."""
    ids = await add(client, stream, *({"id": i} for i in range(6)))
    source = sources()
    envelopes = await take(source, 6)
    await source.ack_many(envelopes[::2])
    await source.close()
    rows = await client.xpending_range(stream, GROUP, "-", "+", 10)
    assert [r["message_id"].decode() for r in rows] == ids[1::2]


async def test_restarted_consumer_reads_its_own_pending_entries_first(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """A new source with the same consumer name re-reads its unacked entries before new ones."""
    old = await add(client, stream, *({"id": i} for i in range(5)))
    first = sources("w1")
    await take(first, 5)
    await first.close()
    new = await add(client, stream, *({"id": i} for i in range(5, 8)))
    second = sources("w1")
    envelopes = await take(second, 8)
    assert [e.receipt for e in envelopes] == old + new
    assert [(e.headers or {}).get("delivery_count", 1) for e in envelopes] == [2] * 5 + [1] * 3
    await second.ack_many(envelopes)
    await second.close()
    assert await pending(client, stream) == 0


async def test_restart_after_claim_idle_hands_each_pending_entry_out_once(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """A worker back after claim_idle re-reads its entries once, not also through its janitor."""
    await add(client, stream, *({"id": i} for i in range(5)))
    first = sources("w", claim_idle=0.2)
    await take(first, 5)
    await first.close()
    await asyncio.sleep(0.3)
    second = sources("w", claim_idle=0.2, count=2)  # the pending phase takes several reads
    again = await take(second, 1)
    await asyncio.sleep(0.3)  # janitor passes while 3 entries still wait, idle, in the PEL
    again += await take(second, 4)
    assert sorted(e.payload["id"] for e in again) == list(range(5))
    with pytest.raises(TimeoutError):
        await take(second, 1, seconds=0.6)  # nothing is handed out twice
    await second.ack_many(again)


async def test_janitor_claims_the_entries_of_a_dead_consumer(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """Entries a dead consumer read and never acked are claimed after claim_idle and processed."""
    await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    source = sources("alive", claim_idle=0.2)
    ids = await add(client, stream, *({"id": i} for i in range(4)))
    await client.xreadgroup(GROUP, "dead", {stream: ">"}, count=10)  # the consumer then dies
    envelopes = await take(source, 4, seconds=5)
    assert sorted(e.receipt for e in envelopes) == ids
    assert all(e.headers is not None and e.headers["delivery_count"] == 2 for e in envelopes)
    assert not any(e.headers and e.headers.get(REDELIVERED) for e in envelopes)
    await source.ack_many(envelopes)
    await source.close()
    assert await pending(client, stream) == 0


async def test_entries_a_live_consumer_holds_are_not_claimed_by_others(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """A worker's janitor keeps its unacked entries fresh, so a slow batch is not stolen."""
    await add(client, stream, *({"id": i} for i in range(3)))
    slow = sources("slow", claim_idle=0.3)
    held = await take(slow, 3)
    other = sources("other", claim_idle=0.3)
    stolen = asyncio.create_task(take(other, 1, seconds=1.2))
    with pytest.raises(TimeoutError):
        await stolen  # three times claim_idle, and still nothing to claim
    await slow.ack_many(held)
    await slow.close()
    assert await pending(client, stream) == 0


async def test_delivery_count_over_max_deliveries_is_flagged_redelivered(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """An entry claimed for its 11th delivery with max_deliveries=10 is marked redelivered."""
    await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    source = sources("alive", claim_idle=0.2, max_deliveries=10)
    poison, fine = await add(client, stream, {"id": "poison"}, {"id": "fine"})
    await client.xreadgroup(GROUP, "dead", {stream: ">"}, count=10)
    await client.xclaim(stream, GROUP, "dead", 0, [poison], retrycount=10)
    await client.xclaim(stream, GROUP, "dead", 0, [fine], retrycount=3)
    envelopes = {e.payload["id"]: e for e in await take(source, 2, seconds=5)}
    flagged, normal = envelopes["poison"], envelopes["fine"]
    assert flagged.headers is not None
    assert flagged.headers[REDELIVERED] is True
    assert flagged.headers["delivery_count"] == 11
    assert isinstance(flagged.error, DeliveryLimitExceeded)
    assert "max_deliveries=10" in str(flagged.error)
    assert normal.headers is not None
    assert REDELIVERED not in normal.headers
    assert normal.headers["delivery_count"] == 4
    await source.nack_many([flagged], requeue=False)  # dead-lettered, then rejected
    await source.ack_many([normal])
    await source.close()
    assert await pending(client, stream) == 0


async def test_undecodable_entries_come_out_malformed_with_their_raw_bytes(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """Bad JSON and a missing field yield malformed envelopes with the raw data; reading goes on."""
    await client.xadd(stream, {"data": b"{not json"})
    await client.xadd(stream, {"other": b"1"})
    await add(client, stream, {"id": 3})
    source = sources()
    bad_json, no_field, good = await take(source, 3)
    assert bad_json.malformed
    assert bad_json.payload == b"{not json"
    assert isinstance(bad_json.error, ValueError)
    assert no_field.malformed
    assert no_field.payload == {"other": b"1"}
    assert "has no field 'data' (other)" in str(no_field.error)
    assert not good.malformed
    assert good.payload == {"id": 3}
    await source.ack_many([bad_json, no_field, good])
    await source.close()
    assert await pending(client, stream) == 0


async def test_text_and_bytes_decodings(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """decode='text' yields str and flags invalid UTF-8; decode='bytes' yields the raw bytes."""
    await client.xadd(stream, {"data": "héllo".encode()})
    await client.xadd(stream, {"data": b"\xff\xfe"})
    text = sources("t", decode="text")
    hello, broken = await take(text, 2)
    assert hello.payload == "héllo"
    assert not hello.malformed
    assert broken.malformed
    assert broken.payload == b"\xff\xfe"
    assert isinstance(broken.error, UnicodeDecodeError)
    await client.xgroup_create(stream, "raw", id="0")
    raw = RedisStreamSource(URL, stream, "raw", "r", decode="bytes", block=0.2)
    try:
        assert [e.payload for e in await take(raw, 2)] == ["héllo".encode(), b"\xff\xfe"]
    finally:
        await raw.close()


async def test_frame_entries_fan_out_and_are_acked_when_every_message_is(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """A batchpunk frame holding three messages yields three envelopes; XACK waits for all three."""
    codec = pytest.importorskip("batchpunk.codec")
    if not hasattr(codec, "encode_batch"):
        pytest.skip("batchpunk.codec.encode_batch is not written yet")
    await client.xadd(stream, {"data": codec.encode_batch([{"n": 1}, {"n": 2}, {"n": 3}])})
    await client.xadd(stream, {"data": b"not a frame"})
    source = sources(decode="frame")
    *messages, broken = await take(source, 4)
    assert [e.payload for e in messages] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert broken.malformed
    assert broken.payload == b"not a frame"
    await source.ack_many([broken])
    await source.ack_many(messages[:2])
    await asyncio.sleep(0.05)
    assert await pending(client, stream) == 1
    await source.ack_many(messages[2:])
    await source.close()
    assert await pending(client, stream) == 0


async def test_a_frame_split_by_a_stop_is_not_claimable_while_its_batch_runs(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """Parts 0 and 1 of a four-message frame are in a running batch when the worker stops
    consuming: the parts it never handed out were requeued at once, so another consumer
    claimed the whole entry and processed 0 and 1 a second time, concurrently. The entry now
    stays held until the batch settles, then comes back once."""
    from batchpunk.codec import encode_batch

    await client.xadd(stream, {"data": encode_batch([{"i": i} for i in range(4)])})
    first = sources("first", claim_idle=0.6, decode="frame")
    running = await take(first, 2)
    assert [e.payload["i"] for e in running] == [0, 1]
    first.stop_consuming()  # a graceful stop: the batch goes on
    other = sources("other", claim_idle=0.6, decode="frame")
    with pytest.raises(TimeoutError):
        await take(other, 1, seconds=2.0)  # over three times claim_idle
    await first.ack_many(running)  # the batch ends: the entry is requeued whole, once
    again = await take(other, 4, seconds=5.0)
    assert [e.payload["i"] for e in again] == [0, 1, 2, 3]
    await other.ack_many(again)
    await first.close()
    await other.close()
    assert await pending(client, stream) == 0


async def test_frames_are_checked_against_the_hmac_key(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """With hmac_key, a frame signed with that key fans out; an unsigned one or one signed with
    another key comes out as one malformed envelope (Redis used to skip the check)."""
    codec = pytest.importorskip("batchpunk.codec")
    await client.xadd(stream, {"data": codec.encode_batch([{"n": 1}, {"n": 2}], hmac_key=b"k")})
    await client.xadd(stream, {"data": codec.encode_batch([{"n": 3}])})
    await client.xadd(stream, {"data": codec.encode_batch([{"n": 4}], hmac_key=b"other")})
    source = sources(decode="frame", hmac_key="k")
    one, two, unsigned, forged = await take(source, 4)
    assert [one.payload, two.payload] == [{"n": 1}, {"n": 2}]
    assert unsigned.malformed
    assert "signature missing" in str(unsigned.error)
    assert forged.malformed
    await source.ack_many([one, two, unsigned, forged])
    await source.close()
    assert await pending(client, stream) == 0


async def test_nack_requeue_keeps_the_entry_pending_and_claimable_at_once(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """nack_many(requeue=True) sends no XACK; another worker can claim the entry without waiting."""
    (entry_id,) = await add(client, stream, {"id": 1})
    first = sources("first", claim_idle=30.0)
    (envelope,) = await take(first, 1)
    await first.nack_many([envelope], requeue=True)
    await first.close()
    assert await pending(client, stream) == 1
    # claim_idle=30 and the entry is a moment old: only the requeue's backdating makes it claimable
    rows = await client.xautoclaim(stream, GROUP, "second", 30_000, "0-0", justid=True)
    assert [r.decode() for r in rows] == [entry_id]


async def test_nack_without_requeue_removes_the_entry(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """nack_many(requeue=False) XACKs the entry (the pipeline has dead-lettered it)."""
    await add(client, stream, {"id": 1})
    source = sources()
    (envelope,) = await take(source, 1)
    await source.nack_many([envelope], requeue=False)
    await source.close()
    assert await pending(client, stream) == 0


async def test_close_during_a_blocking_read_returns_promptly_and_ends_iteration(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """close() while XREADGROUP blocks returns within block plus a small margin; iteration ends."""
    source = sources(block=1.0)
    waiting = asyncio.create_task(source.__anext__())
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await source.close()
    elapsed = time.monotonic() - started
    assert elapsed < 1.0 + 0.3
    with pytest.raises(StopAsyncIteration):
        await waiting
    with pytest.raises(StopAsyncIteration):
        await source.__anext__()
    await source.close()  # idempotent


async def test_entries_read_but_never_handed_out_are_requeued_on_close(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """Read-ahead entries still in the buffer at close() are made claimable by other workers."""
    await add(client, stream, *({"id": i} for i in range(10)))
    source = sources("buffered", count=10, claim_idle=30.0)
    (first,) = await take(source, 1)
    await source.ack_many([first])
    await source.close()
    rows = await client.xautoclaim(stream, GROUP, "other", 30_000, "0-0", justid=True)
    assert len(rows) == 9


async def test_stop_consuming_ends_iteration_while_acks_still_work(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """After stop_consuming() iteration ends, ack_many still XACKs, and read-ahead is given back."""
    await add(client, stream, *({"id": i} for i in range(10)))
    source = sources("draining", count=10, claim_idle=30.0)
    taken = await take(source, 3)
    source.stop_consuming()
    with pytest.raises(StopAsyncIteration):
        await source.__anext__()
    await source.ack_many(taken)
    await source.close()
    assert await pending(client, stream) == 7
    rows = await client.xautoclaim(stream, GROUP, "other", 30_000, "0-0", justid=True)
    assert len(rows) == 7


async def test_cancelling_a_waiting_reader_loses_no_entry(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """Cancelling __anext__ mid-wait never cancels the XREADGROUP: the next call gets the entry."""
    source = sources(block=0.5)
    waiting = asyncio.create_task(source.__anext__())
    await asyncio.sleep(0.2)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await add(client, stream, {"id": 1})
    (envelope,) = await take(source, 1)
    assert envelope.payload == {"id": 1}


async def test_pending_entry_trimmed_away_is_reported_as_lost(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """An unacked entry trimmed from the stream comes back as a malformed envelope, not silence."""
    (entry_id,) = await add(client, stream, {"id": 1})
    first = sources("w")
    await take(first, 1)
    await first.close()
    await client.xdel(stream, entry_id)
    second = sources("w")
    (lost,) = await take(second, 1)
    assert lost.malformed
    assert lost.payload is None
    assert isinstance(lost.error, StreamEntryLost)
    assert lost.headers is not None
    assert lost.headers["message_id"] == entry_id
    await second.ack_many([lost])
    await second.close()
    assert await pending(client, stream) == 0


async def test_a_vanished_stream_and_group_are_recreated_and_reading_goes_on(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """After the key is deleted (a Redis restart without persistence) the source carries on."""
    await add(client, stream, {"id": 1})
    source = sources(claim_idle=0.3)
    (old,) = await take(source, 1)
    await client.delete(stream)
    await source.ack_many([old])  # its entry is gone: the XACK must not hold up later ones
    await asyncio.sleep(0.3)  # the reader hits NOGROUP and recreates the group
    await add(client, stream, {"id": 2})
    (new,) = await take(source, 1, seconds=5)
    assert new.payload == {"id": 2}
    await source.ack_many([new])
    await source.close()
    assert await pending(client, stream) == 0


async def test_acks_after_close_are_sent_by_the_next_close(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """A pipeline that settles envelopes after close() gets them XACKed by a second close()."""
    await add(client, stream, {"id": 1}, {"id": 2})
    source = sources()
    envelopes = await take(source, 2)
    await source.close()
    await source.ack_many(envelopes)
    await source.close()
    assert await pending(client, stream) == 0


async def test_prepare_reads_in_batches_of_max_size(
    client: Any, stream: str, sources: Callable[..., RedisStreamSource]
) -> None:
    """prepare(config) sets count to max_size unless count was given."""
    chosen = sources()
    await chosen.prepare(BatchConfig(max_size=250))
    given = sources("g", count=7)
    await given.prepare(BatchConfig(max_size=250))
    assert (chosen.count, given.count) == (250, 7)


async def test_wrong_password_is_never_shown(
    stream: str, caplog: pytest.LogCaptureFixture, client: Any
) -> None:
    """A failed AUTH raises and logs without the password; repr masks it too."""
    source = RedisStreamSource("redis://user:s3cr3t-pw@127.0.0.1:6379", stream, GROUP, "c")
    caplog.set_level(logging.DEBUG)
    assert "s3cr3t-pw" not in repr(source)
    with pytest.raises(AuthenticationError) as failure:
        await take(source, 1, seconds=10)
    await source.close()
    assert "s3cr3t-pw" not in str(failure.value)
    assert "s3cr3t-pw" not in caplog.text


async def test_sink_xadds_every_item_and_returns_their_ids(client: Any, stream: str) -> None:
    """write() appends each item as one entry, in order, and returns the entry ids."""
    sink = RedisStreamSink(URL, stream)
    ids = await sink.write([{"id": i, "body": "x"} for i in range(5)])
    entries = await client.xrange(stream)
    assert ids == [e[0].decode() for e in entries]
    assert [json.loads(e[1][b"data"]) for e in entries] == [
        {"id": i, "body": "x"} for i in range(5)
    ]
    await sink.close()
    await sink.close()
    with pytest.raises(RuntimeError, match="closed"):
        await sink.write([{"id": 9}])


async def test_sink_trims_to_maxlen(client: Any, stream: str) -> None:
    """With maxlen and approximate=False the stream never holds more than maxlen entries."""
    sink = RedisStreamSink(URL, stream, maxlen=10, approximate=False)
    for start in range(0, 40, 8):
        await sink.write([{"id": i} for i in range(start, start + 8)])
    await sink.close()
    assert await client.xlen(stream) == 10


async def test_sink_fails_only_the_items_it_cannot_encode(client: Any, stream: str) -> None:
    """An item that is not JSON-serializable fails alone; the rest of the batch is written."""
    sink = RedisStreamSink(URL, stream)
    with pytest.raises(PartialFailure) as failure:
        await sink.write([{"id": 1}, {"id": object()}, {"id": 3}])
    await sink.close()
    assert list(failure.value.failures) == [1]
    assert isinstance(failure.value.failures[1], PayloadError)
    results = failure.value.results
    assert results is not None
    assert results[1] is None
    assert results[0]
    assert results[2]
    assert await client.xlen(stream) == 2


async def test_sink_an_item_it_cannot_encode_is_a_payload_error_not_retried(
    client: Any, stream: str
) -> None:
    """The encoder's raw TypeError used to be the item's error: the engine retried it (a plain
    exception is retryable) though no retry can encode it. It is a PayloadError naming the item
    and the encoding, which the engine dead-letters at once."""
    sink = RedisStreamSink(URL, stream, encode="text")
    with pytest.raises(PartialFailure) as failure:
        await sink.write(["a", 5, "c"])
    await sink.close()
    error = failure.value.failures[1]
    assert isinstance(error, PayloadError)
    assert not is_retryable(error, BatchConfig().retry_on)
    assert "item 1 cannot be encoded (text)" in str(error)
    assert await client.xlen(stream) == 2


@pytest.fixture
async def private_redis(tmp_path: Any) -> AsyncIterator[tuple[str, Any]]:
    """A redis-server of this test's own on a free port (its memory limit is the test's to
    change), with a client to it; skipped when redis-server cannot be started."""
    import shutil
    import socket

    import redis.asyncio

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (a private server is needed to fill its memory)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        *(binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
        *("--dir", str(tmp_path), "--maxmemory-policy", "noeviction"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}"
    client = redis.asyncio.Redis.from_url(url)
    try:
        for _ in range(100):
            try:
                await client.ping()
                break
            except Exception:
                if process.returncode is not None:
                    break
                await asyncio.sleep(0.05)
        else:
            pytest.skip(f"a private redis-server on port {port} did not answer within 5 s")
        if process.returncode is not None:
            pytest.skip(f"a private redis-server on port {port} exited at start")
        yield url, client
    finally:
        await client.aclose()
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 10)


async def limit_memory(client: Any, room: int) -> None:
    """Let the server take about ``room`` more bytes, then refuse writes (OOM, noeviction)."""
    used = int((await client.info("memory"))["used_memory"])
    await client.config_set("maxmemory", used + room)


async def test_sink_items_refused_by_a_full_redis_are_outages_and_the_written_ones_keep_ids(
    private_redis: tuple[str, Any],
) -> None:
    """When Redis ran out of memory partway through a batch, write() raised the first OOM error
    for the whole batch although earlier XADDs had succeeded: the engine re-sent those entries
    and, taking OOM for a bad payload, dead-lettered written ones (a pipeline of 150 items: 98
    entries for 95 ids, 97 dead letters, 42 of them written). Now the written items keep their
    entry ids and only the refused ones fail, each with an outage error (held, not bisected);
    a batch Redis took none of fails whole with that outage."""
    url, client = private_redis
    stream = f"batchpunk-test:{uuid.uuid4().hex}"
    await limit_memory(client, 200_000)
    sink = RedisStreamSink(url, stream)
    batch = [{"id": i, "pad": "x" * 20_000} for i in range(30)]
    try:
        with pytest.raises(PartialFailure) as failure:
            await sink.write(batch)
        with pytest.raises(RedisUnavailable, match="OutOfMemoryError"):
            await sink.write(batch[:3])  # Redis took none of it: the whole batch is an outage
    finally:
        await sink.close()
    failures = failure.value.failures
    results = failure.value.results
    assert results is not None
    written = [i for i, entry_id in enumerate(results) if entry_id is not None]
    assert written
    assert failures
    assert sorted(written + list(failures)) == list(range(30))
    for error in failures.values():
        assert getattr(error, "unavailable", None) is True
        assert is_retryable(error, BatchConfig().retry_on)
        assert "OOM" in str(error) or "memory" in str(error)
    entries = await client.xrange(stream)
    assert [e[0].decode() for e in entries] == [results[i] for i in written]
    assert [json.loads(e[1][b"data"])["id"] for e in entries] == written


async def test_sink_a_redis_busy_running_a_script_is_an_outage_not_bad_items(
    private_redis: tuple[str, Any],
) -> None:
    """Redis answers BUSY while a script runs past busy-reply-threshold. That reply was taken
    for the items' own fault (PayloadError, not retried): 10 of 10 messages dead-lettered in
    1.2 s. It is an outage, like OOM: held and written once the script ends."""
    import redis.asyncio

    url, client = private_redis
    await client.config_set("busy-reply-threshold", 100)
    stream = f"batchpunk-test:{uuid.uuid4().hex}"
    sink = RedisStreamSink(url, stream)
    other = redis.asyncio.Redis.from_url(url)
    script = (
        "local t = redis.call('TIME'); local s = t[1] + t[2] / 1e6; while true do "
        "local n = redis.call('TIME'); if n[1] + n[2] / 1e6 - s > 1 then break end end; return 1"
    )
    try:
        await sink.write([{"id": -1}])  # connected before Redis is busy
        busy = asyncio.ensure_future(other.eval(script, 0))
        await asyncio.sleep(0.3)
        with pytest.raises(RedisUnavailable, match="BUSY") as caught:
            await sink.write([{"id": 0}, {"id": 1}])
        assert caught.value.unavailable is True
        await busy
        await sink.write([{"id": 0}, {"id": 1}])
    finally:
        await sink.close()
        await other.aclose()
    assert await client.xlen(stream) == 3


async def test_sink_a_redis_out_of_memory_mid_batch_duplicates_nothing_in_a_pipeline(
    private_redis: tuple[str, Any],
) -> None:
    """Pipeline check of the same: Redis refuses XADDs partway through the first batch, then
    memory is freed. Every message ends in the stream exactly once and none is dead-lettered
    (it was 98 entries for 95 ids, and 42 written messages also dead-lettered)."""
    from batchpunk.pipeline import Pipeline

    url, client = private_redis
    stream = f"batchpunk-test:{uuid.uuid4().hex}"
    await limit_memory(client, 200_000)
    refused = asyncio.Event()

    class FreesMemoryOnRefusal(RedisStreamSink):
        async def write(self, batch: Any) -> list[str | None]:
            try:
                return await super().write(batch)
            except Exception:
                if not refused.is_set():
                    refused.set()
                    await client.config_set("maxmemory", 0)
                raise

    sink = FreesMemoryOnRefusal(url, stream)
    config = BatchConfig(
        max_size=30, max_wait=0.01, retry_delay=0.01, retry_max_delay=0.05, max_retries=2,
        delivery_timeout=10, drain_timeout=10,
    )  # fmt: skip
    pipeline = Pipeline(ListSource({"id": i, "pad": "x" * 20_000} for i in range(60)), sink, config)
    await asyncio.wait_for(pipeline.run(), 30)
    assert refused.is_set()
    ids = [json.loads(e[1][b"data"])["id"] for e in await client.xrange(stream)]
    assert sorted(ids) == list(range(60))
    assert pipeline.dead_letter.letters == []  # type: ignore[attr-defined]
