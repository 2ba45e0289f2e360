"""HttpSource: events POSTed get 202 only once safe; bad input is refused with a clear reply."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from batchpunk import BatchConfig, Spool
from batchpunk.connectors.http_source import HttpSource
from batchpunk.errors import ConfigError
from batchpunk.pipeline import Pipeline
from batchpunk.pipeline_file import parse_pipeline

aiohttp = pytest.importorskip("aiohttp", reason="HttpSource needs the server extra (aiohttp)")


class Store:
    """A sink that keeps what it wrote and can be held shut."""

    def __init__(self) -> None:
        self.rows: list[Any] = []
        self.open = asyncio.Event()
        self.open.set()

    async def write(self, batch: Sequence[Any]) -> None:
        await self.open.wait()
        self.rows.extend(batch)

    async def close(self) -> None:
        return None


@asynccontextmanager
async def serving(
    source: HttpSource, store: Store, spool: Spool | None, max_pending: int = 10_000
) -> AsyncIterator[tuple[str, Pipeline]]:
    config = BatchConfig(max_size=100, max_wait=0.01, drain_timeout=1.0, max_pending=max_pending)
    pipeline = Pipeline(source, store, config, spool=spool)
    task = asyncio.ensure_future(pipeline.run())
    for _ in range(500):
        if source._runner is not None or task.done():
            break
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{source.port}{source.path}", pipeline
    finally:
        await pipeline.stop()
        await task


async def test_ndjson_array_and_object_get_202_once_durable_and_reach_the_sink(
    tmp_path: Path,
) -> None:
    """Each body form is accepted; 202 comes once the events are in the spool; all are written."""
    store = Store()
    store.open.clear()  # nothing is processed: 202 must come from the spool alone
    source = HttpSource(port=0)
    async with serving(source, store, Spool(tmp_path / "s")) as (url, _):
        async with aiohttp.ClientSession() as http:
            ndjson = b"\n".join(b'{"n": %d}' % i for i in range(100))
            async with http.post(url, data=ndjson) as reply:
                assert reply.status == 202
                assert await reply.json() == {"accepted": 100}
            async with http.post(url, json=[{"n": 100}, {"n": 101}]) as reply:
                assert reply.status == 202
            async with http.post(url, json={"n": 102}) as reply:
                assert reply.status == 202
        assert store.rows == []
        store.open.set()
        for _ in range(500):
            if len(store.rows) == 103:
                break
            await asyncio.sleep(0.01)
    assert sorted(row["n"] for row in store.rows) == list(range(103))


async def test_processed_mode_answers_after_the_sink_wrote(tmp_path: Path) -> None:
    """With reply_after="processed" a 202 means the sink already holds the events."""
    store = Store()
    source = HttpSource(port=0, reply_after="processed")
    async with (
        serving(source, store, None) as (url, _),
        aiohttp.ClientSession() as http,
        http.post(url, data=b'{"a": 1}\n{"a": 2}\n') as reply,
    ):
        assert reply.status == 202
        assert [row["a"] for row in store.rows] == [1, 2]


async def test_bad_input_is_refused_naming_the_problem(tmp_path: Path) -> None:
    """A bad line gets 400 naming it, a wrong token 401, oversize 413, a full queue 429."""
    store = Store()
    source = HttpSource(port=0, token="s3cret", max_body_bytes=2000, max_events=50, max_queue=60)
    auth = {"Authorization": "Bearer s3cret"}
    async with (
        serving(source, store, Spool(tmp_path / "s"), max_pending=200) as (url, _),
        aiohttp.ClientSession() as http,
    ):
        async with http.post(url, data=b'{"a": 1}') as reply:
            assert reply.status == 401
        async with http.post(url, data=b'{"a": 1}', headers={"Authorization": "Bearer no"}):
            pass
        body = b'{"a": 1}\n{"a": 2}\n{"a": 3\n'
        async with http.post(url, data=body, headers=auth) as reply:
            assert reply.status == 400
            assert (await reply.json())["error"].startswith("line 3: not valid JSON")
        async with http.post(url, data=b"[1, 2", headers=auth) as reply:
            assert reply.status == 400
        async with http.post(url, data=b"x" * 5000, headers=auth) as reply:
            assert reply.status == 413
        many = b"\n".join(b"1" for _ in range(51))
        async with http.post(url, data=many, headers=auth) as reply:
            assert reply.status == 413
        # Hold the sink shut and fill the engine: the pipeline stops reading, the queue fills.
        store.open.clear()
        body = b"\n".join(b'{"x": 1}' for _ in range(50))

        async def post() -> tuple[int, str | None]:
            async with http.post(url, data=body, headers=auth) as reply:
                return reply.status, reply.headers.get("Retry-After")

        posts = [asyncio.ensure_future(post()) for _ in range(12)]
        await asyncio.sleep(0.5)
        store.open.set()
        replies = await asyncio.gather(*posts)
        assert (429, "1") in replies
        assert {status for status, _ in replies} == {202, 429}
    assert source.replies[401] == 2


async def test_requests_waiting_at_stop_get_503(tmp_path: Path) -> None:
    """A request whose events are not yet safe when the pipeline stops hears 503, not 202."""
    store = Store()
    store.open.clear()
    source = HttpSource(port=0, reply_after="processed")
    config = BatchConfig(max_size=100, max_wait=0.01, drain_timeout=0.2)
    pipeline = Pipeline(source, store, config)
    task = asyncio.ensure_future(pipeline.run())
    for _ in range(500):
        if source._runner is not None:
            break
        await asyncio.sleep(0.01)
    url = f"http://127.0.0.1:{source.port}/events"
    async with aiohttp.ClientSession() as http:
        request = asyncio.ensure_future(http.post(url, data=b"1\n2\n"))
        await asyncio.sleep(0.2)
        await pipeline.stop()
        reply = await request
        assert reply.status == 503
        reply.release()
    await task


def test_a_pipeline_file_puts_a_spool_between_an_http_source_and_the_sink(tmp_path: Path) -> None:
    """[spool] builds a Spool into the pipeline; its keys are checked like any section's."""
    text = f"""
[source]
type = "http"
port = 0
[sink]
type = "jsonl"
path = "{tmp_path / "out.jsonl"}"
[spool]
path = "{tmp_path / "spool"}"
commit_interval = 0.002
"""
    spec = parse_pipeline(text)
    pipeline = spec.build()
    assert isinstance(pipeline.spool, Spool)
    assert pipeline.spool.commit_interval == 0.002
    assert isinstance(pipeline.source, HttpSource)
    with pytest.raises(ConfigError, match=r"\[spool\] unknown key 'max_byte'"):
        parse_pipeline(text + "max_byte = 3\n")
    with pytest.raises(ConfigError, match=r"\[spool\] sync"):
        parse_pipeline(text + 'sync = "maybe"\n')


def test_settings_are_checked_at_construction() -> None:
    """Wrong HttpSource settings fail when built, naming the setting."""
    with pytest.raises(ConfigError, match="reply_after"):
        HttpSource(reply_after="never")
    with pytest.raises(ConfigError, match="path"):
        HttpSource(path="events")


async def _raw_reply(port: int, request: bytes) -> bytes:
    """Send bytes no HTTP client would (a bad header); read the reply until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 5.0)
    finally:
        writer.close()


async def test_a_client_still_sending_its_body_hears_503_and_does_not_hold_stop(
    tmp_path: Path,
) -> None:
    """stop() waited on aiohttp's 60 s shutdown_timeout for a handler stuck reading a slow body.

    The request is answered 503 + Retry-After (the client sends again) and stop() ends promptly.
    """
    source = HttpSource(port=0)
    config = BatchConfig(max_size=100, max_wait=0.01, drain_timeout=0.5)
    pipeline = Pipeline(source, Store(), config, spool=Spool(tmp_path / "s"))
    task = asyncio.ensure_future(pipeline.run())
    for _ in range(500):
        if source._runner is not None:
            break
        await asyncio.sleep(0.01)
    reader, writer = await asyncio.open_connection("127.0.0.1", source.port)
    body = b'{"a": 1}\n{"a": 2}\n'
    writer.write(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
    writer.write(body[:5])  # the rest never comes while the pipeline stops
    await writer.drain()
    await asyncio.sleep(0.1)
    stopping = asyncio.ensure_future(pipeline.stop())
    finished, _ = await asyncio.wait({stopping}, timeout=5.0)
    try:
        reply = await asyncio.wait_for(reader.read(65536), 1.0) if finished else b""
    finally:
        writer.close()  # without the fix this lets the server, and the test, finish
        await stopping
        await task
    assert finished, "stop() was held by a client still sending its body"
    assert reply.startswith(b"HTTP/1.1 503 "), reply
    assert b"Retry-After: 1" in reply


async def test_an_authorization_header_that_is_not_utf8_gets_401(tmp_path: Path) -> None:
    """aiohttp passes non-UTF-8 header bytes as lone surrogates; encoding them raised (a 500)."""
    source = HttpSource(port=0, token="s3cret")
    async with serving(source, Store(), Spool(tmp_path / "s")):
        body = b'{"a": 1}'
        reply = await _raw_reply(
            source.port,
            b"POST /events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer \xff\xfe\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
        )
    assert reply.startswith(b"HTTP/1.1 401 "), reply[:200]


async def test_a_body_that_fails_its_content_encoding_gets_400(tmp_path: Path) -> None:
    """A body that is not what its Content-Encoding says is the client's fault: 400, not 500."""
    source = HttpSource(port=0)
    async with (
        serving(source, Store(), Spool(tmp_path / "s")) as (url, _),
        aiohttp.ClientSession() as http,
        http.post(url, data=b"not gzip", headers={"Content-Encoding": "gzip"}) as reply,
    ):
        assert reply.status == 400
        assert "content-encoding: gzip" in (await reply.json())["error"]


async def test_nan_and_infinity_are_refused_as_not_json(tmp_path: Path) -> None:
    """NaN / Infinity are not JSON: the spool would store them as null, so a replay would differ.

    The words inside strings are fine, and big integers keep their value on the strict path.
    """
    store = Store()
    source = HttpSource(port=0)
    async with serving(source, store, Spool(tmp_path / "s")) as (url, _):
        async with aiohttp.ClientSession() as http:
            for body in (b'{"v": 1}\n{"v": NaN}\n', b"[1, -Infinity]", b'{"v": Infinity}'):
                async with http.post(url, data=body) as reply:
                    assert reply.status == 400, body
                    error = (await reply.json())["error"]
                    assert error.startswith("line 2" if b"NaN" in body else "line 1"), error
            fine = b'{"s": "NaN or Infinity", "n": 123456789012345678901234}'
            async with http.post(url, data=fine) as reply:
                assert reply.status == 202
        for _ in range(500):
            if store.rows:
                break
            await asyncio.sleep(0.01)
    assert store.rows == [{"s": "NaN or Infinity", "n": 123456789012345678901234}]


async def test_a_request_larger_than_max_queue_gets_413_not_429(tmp_path: Path) -> None:
    """With max_queue < max_events, such a request could never fit: 429 sent it back forever."""
    source = HttpSource(port=0, max_queue=50, max_events=100)
    body = b"\n".join(b'{"n": %d}' % i for i in range(60))
    async with (
        serving(source, Store(), Spool(tmp_path / "s")) as (url, _),
        aiohttp.ClientSession() as http,
        http.post(url, data=body) as reply,
    ):
        assert reply.status == 413
        assert "max_queue is 50" in (await reply.json())["error"]
        assert "Retry-After" not in reply.headers


async def test_events_received_when_stop_begins_are_all_read_and_kept(tmp_path: Path) -> None:
    """A stop requested the moment a request's events arrive: the pipeline reads on until the
    source ends (it promised to hand out what it received), so the request gets 202, not a
    503 for events it would half keep."""
    store = Store()
    started: list[Pipeline] = []

    class StopOnArrival(HttpSource):
        def _wake(self) -> None:
            if self._queue and started and not started[0].stop_requested:
                started[0].request_stop()
            super()._wake()

    source = StopOnArrival(port=0)
    async with serving(source, store, Spool(tmp_path / "s")) as (url, pipeline):
        started.append(pipeline)
        async with aiohttp.ClientSession() as http:
            body = b"\n".join(b'{"n": %d}' % i for i in range(30))
            async with http.post(url, data=body) as reply:
                assert reply.status == 202, await reply.text()
    assert sorted(row["n"] for row in store.rows) == list(range(30))


async def test_a_503_at_stop_says_how_many_events_the_spool_kept(tmp_path: Path) -> None:
    """The sink is stuck and max_pending full when stop begins: the events already in the spool
    are kept (the next start processes them), the rest are not. The 503 says how many were
    kept, and exactly that many come out of the spool after a restart."""
    store = Store()
    store.open.clear()
    source = HttpSource(port=0)
    spool = Spool(tmp_path / "s")
    body = b"\n".join(b'{"n": %d}' % i for i in range(30))
    async with (
        serving(source, store, spool, max_pending=10) as (url, pipeline),
        aiohttp.ClientSession() as http,
    ):
        request = asyncio.ensure_future(http.post(url, data=body))
        await asyncio.sleep(0.3)
        await pipeline.stop()
        reply = await request
        assert reply.status == 503
        answer = await reply.json()
        reply.release()
    assert 0 < answer["kept"] < 30
    assert f"{answer['kept']} of the 30 events were kept" in answer["error"]
    again = Store()
    async with serving(HttpSource(port=0), again, Spool(tmp_path / "s")):
        for _ in range(500):
            if len(again.rows) >= answer["kept"]:
                break
            await asyncio.sleep(0.01)
    assert sorted(row["n"] for row in again.rows) == list(range(answer["kept"]))


async def test_a_client_hanging_up_mid_body_is_not_logged_as_a_server_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that closes its connection before its body ended is ordinary: nothing is
    accepted, no traceback at ERROR (aiohttp logged one per such client), and the server goes
    on serving."""
    source = HttpSource(port=0)
    await source.prepare(BatchConfig())
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", source.port)
        writer.write(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()
        for _ in range(200):
            if source.replies.get(499):
                break
            await asyncio.sleep(0.01)
        assert source.replies == {499: 1}
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(source._queue) == 0
    finally:
        await source.close()


async def test_ndjson_whose_first_event_is_an_array_is_accepted(tmp_path: Path) -> None:
    """A body starting with "[" was parsed as one JSON array only, so valid NDJSON whose first
    event is an array got 400 "line 1: not a valid JSON array (Extra data ...)" while the same
    events in another order got 202. A body of several lines that is not one array is read as
    NDJSON, each line one event (an array line is one event that is an array); the array error
    is kept for a body whose first line is not JSON by itself (a broken multi-line array)."""
    store = Store()
    source = HttpSource(port=0, reply_after="processed")
    async with serving(source, store, None) as (url, _), aiohttp.ClientSession() as http:
        for body, events in [
            (b'{"a":1}\n[1,2]\n', [{"a": 1}, [1, 2]]),
            (b'[1,2]\n{"a":1}\n', [[1, 2], {"a": 1}]),
            (b"[1,2]\n[3,4]\n", [[1, 2], [3, 4]]),
            (b'[\n  {"a": 1},\n  {"a": 2}\n]\n', [{"a": 1}, {"a": 2}]),  # one pretty array
        ]:
            store.rows.clear()
            async with http.post(url, data=body) as reply:
                assert (reply.status, await reply.json()) == (202, {"accepted": len(events)})
            assert store.rows == events, body
        for body, error in [
            (b'[\n  {"a": 1},\n  {"a": 2,}\n]\n', "line 1: not a valid JSON array"),
            (b'[1,2]\n{"a": 3\n', "line 2: not valid JSON"),
            (b"[1,2] [3,4]", "line 1: not a valid JSON array"),
        ]:
            async with http.post(url, data=body) as reply:
                assert reply.status == 400, body
                assert (await reply.json())["error"].startswith(error), body
