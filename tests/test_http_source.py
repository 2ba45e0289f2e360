"""HttpSource: events POSTed get 202 only once safe; bad input is refused with a clear reply."""

from __future__ import annotations

import asyncio
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
