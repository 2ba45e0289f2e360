"""HttpSink against a real HTTP server started in the test (asyncio streams, no mocks)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from batchpunk.config import BatchConfig
from batchpunk.connectors import GeneratorSource, HttpSink
from batchpunk.connectors.http import HttpStatusError, HttpTransportError
from batchpunk.deadletter import MemoryDeadLetters
from batchpunk.errors import ConfigError
from batchpunk.pipeline import Pipeline

pytest.importorskip("httpx")

#: (status, body) for one request, given the decoded JSON body and the request's number.
Answer = Callable[[Any, int], tuple[int, str]]


class Server:
    """A tiny HTTP/1.1 server: records each request's headers and JSON body, answers by rule."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        #: (headers, decoded body, status answered) of every request, in order.
        self.requests: list[tuple[dict[str, str], Any, int]] = []
        #: When each request was answered (time.monotonic()).
        self.times: list[float] = []
        #: Extra response headers by status answered.
        self.headers: dict[int, dict[str, str]] = {}
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                json_body = headers.get("content-type") == "application/json"
                payload = json.loads(body) if json_body else body
                status, text = self.answer(payload, len(self.requests) + 1)
                self.requests.append((headers, payload, status))
                self.times.append(time.monotonic())
                data = text.encode()
                extra = "".join(f"{k}: {v}\r\n" for k, v in self.headers.get(status, {}).items())
                writer.write(
                    f"HTTP/1.1 {status} X\r\ncontent-length: {len(data)}\r\n{extra}"
                    f"content-type: text/plain\r\n\r\n".encode()
                    + data
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serving(answer: Answer) -> AsyncIterator[Server]:
    server = Server(answer)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    server.url = f"http://127.0.0.1:{port}/ingest"
    try:
        yield server
    finally:
        listener.close()
        await listener.wait_closed()


async def test_http_sink_posts_one_json_array_per_batch() -> None:
    """write() sends the batch as one JSON array with the configured headers and returns None."""
    async with serving(lambda body, n: (200, "ok")) as server:
        sink = HttpSink(server.url, headers={"Authorization": "Bearer t0ken"})
        assert await sink.write([{"id": 1}, {"id": 2}]) is None
        await sink.close()
        await sink.close()
    headers, body, _ = server.requests[0]
    assert body == [{"id": 1}, {"id": 2}]
    assert headers["content-type"] == "application/json"
    assert headers["authorization"] == "Bearer t0ken"


async def test_http_status_decides_retryability_and_errors_carry_the_body() -> None:
    """429 and 5xx are retryable; another 4xx is not, and its error holds the response body."""
    answers = iter([(503, "busy"), (429, "slow down"), (400, "field 'id' is required")])
    async with serving(lambda body, n: next(answers)) as server:
        sink = HttpSink(server.url)
        errors = []
        for _ in range(3):
            with pytest.raises(HttpStatusError) as info:
                await sink.write([{"id": 1}])
            errors.append(info.value)
        await sink.close()
    assert [(e.status, e.retryable) for e in errors] == [(503, True), (429, True), (400, False)]
    assert "field 'id' is required" in str(errors[2])


async def test_http_transport_error_is_retryable_and_hides_the_password() -> None:
    """A refused connection is a retryable HttpTransportError whose message masks the URL's
    password."""
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    sink = HttpSink(f"http://bob:hunter2@127.0.0.1:{port}/x", timeout=2.0)
    with pytest.raises(HttpTransportError) as info:
        await sink.write([1])
    await sink.close()
    assert info.value.retryable is True
    assert "hunter2" not in str(info.value)
    assert "bob:***@" in str(info.value)
    assert "hunter2" not in repr(sink)


def test_http_sink_checks_its_settings() -> None:
    """A bad URL, method or format fails at construction, naming the setting."""
    with pytest.raises(ConfigError, match="url"):
        HttpSink("ftp://x")
    with pytest.raises(ConfigError, match="method"):
        HttpSink("http://x", method="GET")
    with pytest.raises(ConfigError, match="format"):
        HttpSink("http://x", format="xml")


async def test_pipeline_to_http_retries_503_and_dead_letters_what_gets_400() -> None:
    """Through a pipeline: the first two answers are 503 and are retried; a batch holding a
    poison event gets 400, is split until the poison events are alone, and exactly those are
    dead-lettered with the server's message; every other event reaches the server once."""

    def answer(body: Any, n: int) -> tuple[int, str]:
        if n <= 2:
            return 503, "warming up"
        if any("amount" not in event for event in body):
            return 400, "amount is required"
        return 200, "ok"

    source = GeneratorSource(400, poison=3, seed=3)
    letters = MemoryDeadLetters()
    config = BatchConfig(
        max_size=50, max_wait=0.05, retry_delay=0.001, retry_max_delay=0.01, max_retries=3
    )
    async with serving(answer) as server:
        pipeline = Pipeline(source, HttpSink(server.url), config, dead_letter=letters)
        await asyncio.wait_for(pipeline.run(), 30)
    delivered = [event["id"] for _, body, _ in server.requests for event in body]
    accepted = [
        event["id"] for _, body, status in server.requests if status == 200 for event in body
    ]
    assert sorted(accepted) == sorted(set(range(400)) - source.poison_ids)
    assert {letter.message["id"] for letter in letters.letters} == source.poison_ids
    assert all("amount is required" in str(letter.error) for letter in letters.letters)
    assert len(delivered) > len(accepted)  # the 503s and 400s were real requests
    stats = await pipeline.get_stats()
    assert stats["retries"] >= 2


async def test_http_sink_frame_format_posts_a_decodable_batchpunk_frame() -> None:
    """format="frame" sends the batch as a batchpunk frame that decode_batch reads back."""
    from batchpunk.codec import decode_batch

    async with serving(lambda body, n: (204, "")) as server:
        sink = HttpSink(server.url, format="frame")
        await sink.write([{"id": 1}, {"id": 2}])
        await sink.close()
    headers, body, _ = server.requests[0]
    assert headers["content-type"] == "application/x-batchpunk-frame"
    assert decode_batch(body) == [{"id": 1}, {"id": 2}]


_TOKEN = "s3cr3tT0kenValue42"


@pytest.mark.parametrize(
    ("status", "body", "options"),
    [
        (401, f"the access token {_TOKEN} has expired", {}),
        (401, f'{{"error":"invalid_token","token":"{_TOKEN}"}}', {}),
        (401, f"expired: {_TOKEN}", {"max_error_body": 14}),
    ],
    ids=["plain", "json", "cut-by-max_error_body"],
)
async def test_a_bearer_token_the_server_echoes_is_masked_in_the_error_and_its_body(
    status: int, body: str, options: dict[str, Any]
) -> None:
    """Servers that reject a token echo it without its scheme word ("the access token X has
    expired", ``{"token":"X"}``). Only the whole header value "Bearer X" was a known secret, so
    X reached str(error) and the error's ``body``, which end up in logs and dead letters; the
    results path kept the body unmasked, and cutting at max_error_body before masking could
    leave the token's first characters."""
    async with serving(lambda payload, n: (status, body)) as server:
        sink = HttpSink(server.url, headers={"Authorization": f"Bearer {_TOKEN}"}, **options)
        with pytest.raises(HttpStatusError) as info:
            await sink.write([{"id": 1}])
        await sink.close()
    shown = f"{info.value} | {info.value.body}"
    assert not any(_TOKEN[:n] in shown for n in range(4, len(_TOKEN) + 1)), shown
    assert "***" in info.value.body, shown
    assert f"answered {status}" in str(info.value)


async def test_408_request_timeout_is_an_outage_not_a_bad_payload() -> None:
    """408 means the server timed out waiting for the request, not that a message is bad. It
    was non-retryable, so the engine split the batch and could dead-letter good events; now it
    is retried and held whole, like 429 and 503: every request carries the whole batch."""
    answers = {1: 408, 2: 408}
    config = BatchConfig(
        max_size=10, max_wait=0.05, retry_delay=0.001, retry_max_delay=0.01, max_retries=3
    )
    letters = MemoryDeadLetters()
    async with serving(lambda body, n: (answers.get(n, 200), "request timeout")) as server:
        pipeline = Pipeline(GeneratorSource(10), HttpSink(server.url), config, dead_letter=letters)
        await asyncio.wait_for(pipeline.run(), 30)
    error = HttpStatusError("408", status=408, body="")
    assert (error.retryable, error.unavailable) == (True, True)
    assert [(status, len(body)) for _, body, status in server.requests] == [
        (408, 10),
        (408, 10),
        (200, 10),
    ]
    assert letters.letters == []


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_waited_before_the_next_attempt(status: int) -> None:
    """A 429 or 503 with Retry-After: 1 was retried after the pipeline's own backoff (1 ms
    here), earning another refusal from a server that had said when to come back. The next
    attempt now waits the second the server asked for; the batch is still held whole."""
    config = BatchConfig(
        max_size=10, max_wait=0.05, retry_delay=0.001, retry_max_delay=5, max_retries=3
    )
    letters = MemoryDeadLetters()
    async with serving(lambda body, n: (status if n == 1 else 200, "slow down")) as server:
        server.headers[status] = {"Retry-After": "1"}
        pipeline = Pipeline(GeneratorSource(10), HttpSink(server.url), config, dead_letter=letters)
        await asyncio.wait_for(pipeline.run(), 30)
    assert [(s, len(body)) for _, body, s in server.requests] == [(status, 10), (200, 10)]
    assert server.times[1] - server.times[0] >= 0.95
    assert letters.letters == []


async def test_retry_after_is_capped_by_retry_max_delay() -> None:
    """A server asking for an hour does not hold a batch past the user's retry_max_delay."""
    config = BatchConfig(
        max_size=10, max_wait=0.05, retry_delay=0.001, retry_max_delay=0.2, max_retries=3
    )
    async with serving(lambda body, n: (429 if n == 1 else 200, "")) as server:
        server.headers[429] = {"Retry-After": "3600"}
        pipeline = Pipeline(GeneratorSource(10), HttpSink(server.url), config)
        await asyncio.wait_for(pipeline.run(), 30)
    assert [s for _, _, s in server.requests] == [429, 200]
    assert 0.15 <= server.times[1] - server.times[0] < 2


def test_retry_after_reads_seconds_and_http_dates() -> None:
    """RFC 9110 allows delta-seconds or an HTTP date; anything else is ignored, not an error."""
    from email.utils import format_datetime

    from batchpunk.connectors.http import _retry_after

    future = format_datetime(
        datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=30), usegmt=True
    )
    assert _retry_after("120") == 120.0
    assert _retry_after(" 0 ") == 0.0
    assert 25 < (_retry_after(future) or 0) <= 30
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: no wait
    unreadable = (None, "", "-5", "1.5", "soon", "Fri, 99 Foo", "\u00b2", "\u0663")
    assert [_retry_after(v) for v in unreadable] == [None] * len(unreadable)


async def _raw_server(answer: Any) -> tuple[asyncio.Server, int]:
    """A bare asyncio server: ``answer(head, writer)`` replies by hand (byte by byte if it
    likes), which an HTTP framework would not let a test do."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        with contextlib.suppress(ConnectionError):
            await answer(head, writer)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_timeout_bounds_the_whole_request_not_each_read() -> None:
    """A server sending its answer a byte every 0.5 s: with timeout=1 the write returned
    after 5 s (httpx bounds each read). It is now an outage after about 1 s."""

    async def trickle(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n")
        for _ in range(10):
            await asyncio.sleep(0.5)
            writer.write(b"x")
            await writer.drain()

    server, port = await _raw_server(trickle)
    sink = HttpSink(f"http://127.0.0.1:{port}/bulk", timeout=1.0)
    began = time.monotonic()
    try:
        with pytest.raises(HttpTransportError, match=r"within timeout=1\.0s"):
            await sink.write([1, 2, 3])
    finally:
        await sink.close()
        server.close()
    assert time.monotonic() - began < 2.0


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_an_outage_not_a_bad_payload(status: int) -> None:
    """httpx does not follow redirects: a 3xx was classed as the payloads' fault, so every
    item of the batch was bisected into a dead letter while the URL was what needed fixing."""

    async def moved(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 %d Moved\r\nlocation: /new\r\ncontent-length: 0\r\n\r\n" % status)

    server, port = await _raw_server(moved)
    sink = HttpSink(f"http://127.0.0.1:{port}/bulk", timeout=2.0)
    try:
        with pytest.raises(HttpStatusError) as raised:
            await sink.write([1, 2, 3])
    finally:
        await sink.close()
        server.close()
    assert (raised.value.retryable, raised.value.unavailable) == (True, True)


async def test_a_url_password_the_server_echoes_is_masked() -> None:
    """The URL's password was registered as a secret only inside the URL, so a server echoing
    the password alone put it in the error."""

    async def refuse(head: bytes, writer: asyncio.StreamWriter) -> None:
        body = b"invalid credentials for user alice password hunter2secret"
        writer.write(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: %d\r\n\r\n" % len(body) + body)

    server, port = await _raw_server(refuse)
    sink = HttpSink(f"http://alice:hunter2secret@127.0.0.1:{port}/bulk", timeout=2.0)
    try:
        with pytest.raises(HttpStatusError) as raised:
            await sink.write([1])
    finally:
        await sink.close()
        server.close()
    assert "hunter2secret" not in str(raised.value)
    assert "hunter2secret" not in raised.value.body


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (lambda body: f"OK {_TOKEN}", "not JSON"),
        (lambda body: json.dumps([{"ok": True}] * (len(body) - 1)), "19 results for 20"),
        (
            lambda body: json.dumps({"errors": True, "items": [{"index": {}} for _ in body]}),
            "a dict",
        ),
    ],
    ids=["text", "short-array", "bulk-object"],
)
async def test_a_2xx_without_usable_results_is_delivered_once_and_logged(
    answer: Callable[[Any], str], problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With results = true, a 2xx whose body was not a JSON array of one result per payload
    raised a retryable error although the server had taken the payloads: each batch was POSTed
    again and again and then dead-lettered whole (40 messages: 78 POSTs, 216 items received,
    40 dead letters). A 2xx means delivered: the batch completes with no results, after one
    error log per batch naming the problem (secrets masked), and nothing is sent twice."""
    config = BatchConfig(
        max_size=20, max_wait=0.05, retry_delay=0.001, retry_max_delay=0.01, max_retries=2
    )
    letters = MemoryDeadLetters()
    async with serving(lambda body, n: (200, answer(body))) as server:
        sink = HttpSink(server.url, headers={"Authorization": f"Bearer {_TOKEN}"}, results=True)
        pipeline = Pipeline(GeneratorSource(40), sink, config, dead_letter=letters)
        with caplog.at_level("ERROR", logger="batchpunk.connectors.http"):
            await asyncio.wait_for(pipeline.run(), 30)
    assert [len(body) for _, body, _ in server.requests] == [20, 20]
    assert letters.letters == []
    logged = [r.getMessage() for r in caplog.records if r.name == "batchpunk.connectors.http"]
    assert len(logged) == 2
    assert all(problem in line and "delivered" in line for line in logged), logged
    assert not any(_TOKEN[:4] in line for line in logged), logged


async def test_a_2xx_with_one_result_per_payload_returns_them() -> None:
    """The usable answer still comes back as the batch's results."""
    async with serving(lambda body, n: (200, json.dumps([e["id"] * 2 for e in body]))) as server:
        sink = HttpSink(server.url, results=True)
        assert await sink.write([{"id": 1}, {"id": 2}]) == [2, 4]
        await sink.close()


@pytest.mark.parametrize("status", [401, 403, 404, 405, 407])
async def test_a_status_refusing_the_endpoint_itself_is_an_outage_not_bad_payloads(
    status: int,
) -> None:
    """401, 403, 404, 405 and 407 say the credentials, the URL or the method are wrong, which
    hits every payload alike; they were the payloads' fault, so each batch was bisected into
    dead letters (40 messages answered 401 or 404: 216 items POSTed, 40 dead letters). They
    are outages now: the batch is held and retried whole, and goes through once the endpoint
    accepts it."""
    answers = {1: status, 2: status}
    config = BatchConfig(
        max_size=10, max_wait=0.05, retry_delay=0.001, retry_max_delay=0.01, max_retries=3
    )
    letters = MemoryDeadLetters()
    async with serving(lambda body, n: (answers.get(n, 200), "no such index")) as server:
        pipeline = Pipeline(GeneratorSource(10), HttpSink(server.url), config, dead_letter=letters)
        await asyncio.wait_for(pipeline.run(), 30)
    error = HttpStatusError("x", status=status, body="")
    assert (error.retryable, error.unavailable) == (True, True)
    assert [(answered, len(body)) for _, body, answered in server.requests] == [
        (status, 10),
        (status, 10),
        (200, 10),
    ]
    assert letters.letters == []


@pytest.mark.parametrize("status", [400, 409, 413, 415, 422])
def test_other_4xx_stay_the_payloads_fault(status: int) -> None:
    """A 4xx about the request's content is still not retried, and bisected to its payload."""
    error = HttpStatusError("x", status=status, body="")
    assert (error.retryable, error.unavailable) == (False, False)
