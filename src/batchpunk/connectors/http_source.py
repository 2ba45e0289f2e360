"""HttpSource: applications POST events to batchpunk, and hear 202 only once they are safe.

The endpoint takes a JSON object (one event), a JSON array (many), or NDJSON (one per line). It
answers 202 only after every event of the request is durable in the pipeline's spool (or, with
``reply_after="processed"``, after each was processed or durably dead-lettered), 429 with
Retry-After when the pipeline is behind, 400 naming the first bad line (or a body that cannot be
read, such as broken gzip), 401 without the right bearer token, 413 over the size limits (or
more events than ``max_queue`` could ever hold), 503 while stopping (also to a client whose body
was still arriving).

Why aiohttp (the ``server`` extra, shared with the metrics server): a mature asyncio-native HTTP
server that runs inside our event loop with no second framework (uvicorn + Starlette would bring
an ASGI layer and a server process model we do not need), bounds request bodies itself
(``client_max_size``), and is already the choice of the project's HTTP pieces. A hand-written
HTTP parser is not an option for an endpoint that faces the network.

The source settles per batch (contract: ``ack_many`` / ``nack_many`` over Envelopes whose
``receipt`` is the request they came in): a request's reply waits for its last event.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from batchpunk.codec import decode_value
from batchpunk.envelope import Envelope
from batchpunk.errors import ConfigError, FrameError, MissingDependency

if TYPE_CHECKING:
    from batchpunk.config import BatchConfig

__all__ = ["HttpSource"]

log = logging.getLogger("batchpunk.connectors.http_source")

_REPLY_AFTER = ("durable", "processed")

#: Seconds aiohttp gives each connection's handler at close (twice: to finish, then once
#: cancelled) before it gives up on it. Its default, 60 s, let one slow client hold stop();
#: by then every waiting request has had its answer, so only a reply still being written waits.
_SHUTDOWN_GRACE = 1.0


class _Request:
    """One POST waiting for its events: the reply goes out when ``left`` reaches 0."""

    __slots__ = ("future", "left", "total")

    def __init__(self, count: int, future: asyncio.Future[bool]) -> None:
        self.left = self.total = count
        self.future = future


class _BadBody(ValueError):
    pass


class HttpSource:
    """An HTTP endpoint that applications POST events to; one envelope per event.

    Args:
        host: address to bind (keep 127.0.0.1 unless other machines must reach it).
        port: port to bind; 0 picks a free one (read ``port`` after ``prepare``).
        path: the URL path that takes POSTs.
        token: when set, requests need ``Authorization: Bearer <token>``.
        max_body_bytes: largest request body; bigger ones get 413.
        max_events: most events in one request; more get 413.
        max_queue: events received and not yet read by the pipeline; a request that does not
            fit gets 429 with Retry-After (the pipeline is behind: backpressure), and one with
            more events than ``max_queue`` gets 413 (it could never fit).
        reply_after: "durable" (202 once every event is in the spool; needs a [spool] section,
            else it means processed) or "processed" (202 once every event was processed or
            durably dead-lettered).
        retry_after: seconds suggested to clients in 429 and 503 replies.
        reply_timeout: seconds a request waits for its events; then 504 (the events stay in
            the pipeline and are still delivered, so a client that retries may duplicate them).
        key_field: an event field whose value becomes the lane key.

    Events must be JSON objects or values; a body that does not parse gets 400 naming the line.
    NaN and Infinity are not JSON (RFC 8259) and are refused like any other invalid JSON.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8080,
        path: str = "/events",
        token: str | None = None,
        max_body_bytes: int = 10 * 2**20,
        max_events: int = 10_000,
        max_queue: int = 10_000,
        reply_after: str = "durable",
        retry_after: int = 1,
        reply_timeout: float = 30.0,
        key_field: str | None = None,
    ) -> None:
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(f"port: expected 0..65535, got {port!r}")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigError(f"path: expected a URL path starting with '/', got {path!r}")
        if token is not None and (not isinstance(token, str) or not token):
            raise ConfigError("token: expected a non-empty string or None")
        for name, value in (
            ("max_body_bytes", max_body_bytes),
            ("max_events", max_events),
            ("max_queue", max_queue),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {value!r}")
        if reply_after not in _REPLY_AFTER:
            raise ConfigError(
                f"reply_after: expected 'durable' or 'processed', got {reply_after!r}"
            )
        if not isinstance(retry_after, int) or retry_after < 0:
            raise ConfigError(f"retry_after: expected an integer >= 0, got {retry_after!r}")
        if not isinstance(reply_timeout, int | float) or reply_timeout <= 0:
            raise ConfigError(f"reply_timeout: expected seconds > 0, got {reply_timeout!r}")
        self.host = host
        self.port = port
        self.path = path
        self.max_body_bytes = max_body_bytes
        self.max_events = max_events
        self.max_queue = max_queue
        self.reply_after = reply_after
        self.retry_after = retry_after
        self.reply_timeout = float(reply_timeout)
        self.key_field = key_field
        #: Pipelines with a spool acknowledge on spool write when this is True (see docs/spool.md).
        self.ack_on_spool_write = reply_after == "durable"
        self._token = token.encode() if token else None
        self._queue: deque[Envelope] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._runner: Any = None
        self._accepting = True
        self._ending = False
        self._pending: set[_Request] = set()
        #: Bodies still arriving: stop_consuming() cancels them so that their clients hear 503.
        self._reading: set[asyncio.Task[bytes]] = set()
        #: Counts by reply status.
        self.replies: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"HttpSource(http://{self.host}:{self.port}{self.path})"

    # -- life cycle ---------------------------------------------------------------------------

    async def prepare(self, config: BatchConfig | None = None) -> None:
        """Start serving (before the pipeline reads): a port in use fails here, clearly."""
        if self._runner is not None:
            return
        try:
            from aiohttp import web
        except ImportError:
            raise MissingDependency(
                "HttpSource needs aiohttp: pip install 'batchpunk[server]'"
            ) from None
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_post(self.path, self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_GRACE)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(f"port: cannot listen on {self.host}:{self.port}: {exc}") from None
        self._runner = runner
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("listening on http://%s:%d%s", self.host, self.port, self.path)

    def stop_consuming(self) -> None:
        """Refuse new requests (503) and end iteration once the received events are read.

        A request whose body is still arriving is answered 503 at once: waiting for a slow
        client would hold stop() (and its events could no longer be read anyway).
        """
        self._accepting = False
        self._ending = True
        for reading in list(self._reading):
            reading.cancel()
        self._wake()

    async def close(self) -> None:
        """Stop the server; requests still waiting are answered 503 (the client retries)."""
        self.stop_consuming()
        for request in list(self._pending):
            if not request.future.done():
                request.future.set_result(False)
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # -- the Source protocol ------------------------------------------------------------------

    def __aiter__(self) -> HttpSource:
        return self

    async def __anext__(self) -> Envelope:
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._ending:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def ack_many(self, envelopes: Sequence[Envelope]) -> None:
        """These events are safe (durable, or processed): answer requests whose last one it was."""
        for envelope in envelopes:
            request: _Request = envelope.receipt
            request.left -= 1
            if request.left == 0 and not request.future.done():
                request.future.set_result(True)

    async def nack_many(self, envelopes: Sequence[Envelope], requeue: bool) -> None:
        """These events were not kept: their requests get 503 so that the clients send again."""
        for envelope in envelopes:
            request: _Request = envelope.receipt
            if not request.future.done():
                request.future.set_result(False)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- HTTP -----------------------------------------------------------------------------------

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        if not self._accepting:
            return self._reply(503, {"error": "shutting down; retry"}, retry=True)
        if self._token is not None:
            given = request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            # aiohttp hands header bytes that are not UTF-8 over as lone surrogates, which a
            # plain encode() refuses (a 500); "surrogatepass" encodes any str, and what it makes
            # of them is not UTF-8, so it never equals the token.
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                value.strip().encode("utf-8", "surrogatepass"), self._token
            ):
                return self._reply(401, {"error": "missing or wrong bearer token"})
        try:
            body = await self._read(request)
        except web.HTTPRequestEntityTooLarge:
            return self._reply(
                413, {"error": f"body larger than max_body_bytes={self.max_body_bytes}"}
            )
        except web.RequestPayloadError as exc:  # e.g. Content-Encoding: gzip that is not gzip
            detail = str(exc).strip().rpartition("\n")[2].strip()
            reply = self._reply(400, {"error": f"the body cannot be read: {detail}"})
            # The connection cannot parse anything after this. Mark the body finished, or
            # aiohttp reads it again after the reply and logs the error as unhandled; then close.
            request.content.feed_eof()
            reply.force_close()
            return reply
        except ConnectionResetError:
            # The client hung up before its body ended: nothing was accepted and nobody is
            # left to answer. A debug line, not aiohttp's traceback at ERROR per client.
            # (499 is counted in ``replies``, as nginx logs such a request; it is never sent.)
            log.debug("a client closed its connection before its body ended")
            return self._reply(499, {"error": "the client closed the connection"})
        if body is None or not self._accepting:
            return self._reply(503, {"error": "shutting down; retry"}, retry=True)
        try:
            events = self._parse(body)
        except _BadBody as exc:
            return self._reply(400, {"error": str(exc)})
        if len(events) > self.max_events:
            return self._reply(
                413, {"error": f"{len(events)} events; max_events is {self.max_events}"}
            )
        if not events:
            return self._reply(400, {"error": "no events in the body"})
        if len(events) > self.max_queue:
            # 429 would send the client back forever: even an empty queue cannot take it.
            return self._reply(
                413,
                {"error": f"{len(events)} events; max_queue is {self.max_queue}, split them"},
            )
        if len(self._queue) + len(events) > self.max_queue:
            return self._reply(
                429, {"error": "the pipeline is behind; retry after the delay"}, retry=True
            )
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        pending = _Request(len(events), future)
        key_field = self.key_field
        queue = self._queue
        for event in events:
            key = event.get(key_field) if key_field and isinstance(event, dict) else None
            queue.append(Envelope(event, key, 0, None, pending))
        self._pending.add(pending)
        self._wake()
        try:
            kept = await asyncio.wait_for(asyncio.shield(future), self.reply_timeout)
        except TimeoutError:
            return self._reply(504, {"error": f"not confirmed within {self.reply_timeout}s"})
        finally:
            self._pending.discard(pending)
        if not kept:
            # Some events may be safe already (a stop while the pipeline could take no more):
            # say how many, so that a client resending the whole request knows it duplicates.
            safe = pending.total - pending.left
            error = "stopping before the events were kept"
            if safe:
                error = f"stopping: {safe} of the {pending.total} events were kept, the rest not"
            return self._reply(503, {"error": error, "kept": safe}, retry=True)
        return self._reply(202, {"accepted": len(events)})

    async def _read(self, request: Any) -> bytes | None:
        """The body; None when stop_consuming() came while it was still arriving."""
        if request.content.is_eof():  # all there already (the common case): no task needed
            body: bytes = await request.read()
            return body
        reading: asyncio.Task[bytes] = asyncio.ensure_future(request.read())
        self._reading.add(reading)
        try:
            await asyncio.wait((reading,))
        finally:
            self._reading.discard(reading)
            reading.cancel()  # a no-op once done; else this handler itself is being cancelled
        if reading.cancelled():
            return None
        return reading.result()

    def _reply(self, status: int, body: dict[str, Any], *, retry: bool = False) -> Any:
        from aiohttp import web

        self.replies[status] = self.replies.get(status, 0) + 1
        headers = {"Retry-After": str(self.retry_after)} if retry else None
        return web.json_response(body, status=status, headers=headers)

    def _parse(self, body: bytes) -> list[Any]:
        """A JSON object, a JSON array, or NDJSON; _BadBody naming the line that does not parse.

        A body that is one JSON array is its events. One that starts with "[" but is not one
        array is NDJSON when it has several lines and its first line is JSON by itself (an
        array line is then one event that is an array); otherwise the array error is reported.
        """
        text = body.strip()
        if not text:
            return []
        if text[:1] in (b"[", b"{"):
            try:
                value = _loads(text)
            except FrameError:
                if text[:1] == b"[" and not _ndjson_from_line_1(text):
                    raise _BadBody(f"line 1: not a valid JSON array ({_reason(text)})") from None
            else:
                return list(value) if isinstance(value, list) else [value]
        events = []
        for number, line in enumerate(body.split(b"\n"), 1):
            line = line.strip()
            if not line:
                continue
            try:
                events.append(_loads(line))
            except FrameError as exc:
                raise _BadBody(f"line {number}: not valid JSON ({_short(exc)})") from None
        return events


def _loads(data: bytes) -> Any:
    """decode_value's json, strict about NaN and Infinity where the text may hold them.

    orjson (decode_value's fast path) refuses them, but the standard library it falls back on
    takes them: text that may hold one is parsed strictly instead.
    """
    if b"NaN" in data or b"Infinity" in data:
        return _strict_loads(data)
    return decode_value(data, "json")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _strict_loads(data: bytes) -> Any:
    """decode_value's json without NaN, Infinity and -Infinity (the codec keeps them, FORMAT.md).

    The same standard-library path that decode_value falls back on, so the values agree.
    """
    try:
        text = data.decode(json.detect_encoding(data))
        return json.loads(text, parse_constant=_no_constant)
    except Exception as exc:  # hostile bytes may raise anything (RecursionError): as decode_value
        raise FrameError(f"payload does not decode as json: {exc}") from exc


def _ndjson_from_line_1(text: bytes) -> bool:
    """Whether a stripped body that is not one JSON value reads as NDJSON: several non-empty
    lines, the first of them JSON by itself (a broken multi-line array's first line, "[", is
    not)."""
    lines = [line for line in text.split(b"\n") if line.strip()]
    if len(lines) < 2:
        return False
    try:
        _loads(lines[0].strip())
    except FrameError:
        return False
    return True


def _reason(text: bytes) -> str:
    try:
        _loads(text)
    except FrameError as exc:
        return _short(exc)
    return "unknown"


def _short(exc: BaseException) -> str:
    return str(exc).removeprefix("payload does not decode as json: ")[:200]
