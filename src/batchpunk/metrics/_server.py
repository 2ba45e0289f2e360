"""A tiny HTTP endpoint on the running event loop: /metrics for Prometheus, /stats as JSON.

Why not prometheus-client's own server: it runs a thread per process and knows nothing of the
processor's async get_stats(). This one is an ``asyncio.start_server`` with a deliberately small
HTTP/1.1 handler: GET and HEAD only, one request per connection, bounded request size and read
time, so a misbehaving client can cost neither memory nor a stuck task.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from batchpunk.errors import require
from batchpunk.metrics._health import liveness, readiness
from batchpunk.metrics._prometheus import pipeline_exposition

__all__ = ["MetricsServer", "StatsSource", "serve", "stats_json"]

logger = logging.getLogger("batchpunk")

#: Bytes allowed for the request line and headers together.
_MAX_HEAD = 16 * 1024
#: Seconds a client may take to send its request head.
_READ_TIMEOUT = 10.0

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class StatsSource(Protocol):
    """Anything with the processor's ``get_stats(history=...)`` coroutine method."""

    def get_stats(self, history: bool = False) -> Awaitable[dict[str, Any]]:
        """The stats dict; /stats asks for history."""


class MetricsServer:
    """Handle of a running ``serve()`` endpoint: its address, and ``close()`` to stop it.

    Also an async context manager: ``async with await serve(0) as server: ...``.
    """

    def __init__(self, server: asyncio.Server, host: str, port: int) -> None:
        self._server = server
        #: The interface listened on.
        self.host = host
        #: The bound port (the one the OS chose when serve() was given port 0).
        self.port = port

    @property
    def url(self) -> str:
        """Base URL of the endpoint, e.g. ``http://127.0.0.1:9464``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        """Stop listening and wait for the requests being answered; safe to call twice."""
        self._server.close()
        await self._server.wait_closed()

    async def __aenter__(self) -> MetricsServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"MetricsServer(url={self.url!r})"


async def serve(
    port: int,
    host: str = "127.0.0.1",
    *,
    processor: StatsSource | None = None,
    registry: Any = None,
) -> MetricsServer:
    """Serve /metrics (Prometheus text of ``registry``) and /stats (the processor's stats).

    Runs on the current event loop until ``close()``; port 0 lets the OS choose (read it from
    the handle's ``port``). ``registry`` defaults to prometheus-client's global REGISTRY, which
    is where ``PrometheusMetrics()`` registers by default. Bind to 127.0.0.1 (the default) unless
    the scraper is remote: the endpoint has no authentication. /stats answers 404 when no
    processor is given.
    """
    prometheus_client = require("prometheus_client", "prometheus", "batchpunk.metrics.serve")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port: expected an int in 0..65535, got {port!r}")
    if registry is None:
        registry = prometheus_client.REGISTRY
    content_type: str = getattr(
        prometheus_client, "CONTENT_TYPE_PLAIN_0_0_4", prometheus_client.CONTENT_TYPE_LATEST
    )

    async def metrics() -> tuple[int, str, bytes]:
        body = prometheus_client.generate_latest(registry)
        if processor is not None:  # the pipeline's own counts, read at scrape time
            try:
                body += pipeline_exposition(await processor.get_stats()).encode()
            except Exception:
                logger.exception("/metrics: get_stats() failed; serving the registry alone")
        return 200, content_type, body

    async def healthz() -> tuple[int, str, bytes]:
        status, data = liveness()
        return status, "application/json", json.dumps(data).encode()

    async def readyz() -> tuple[int, str, bytes]:
        status, data = readiness(await processor.get_stats() if processor is not None else {})
        return status, "application/json", json.dumps(data).encode()

    async def stats() -> tuple[int, str, bytes]:
        if processor is None:
            return 404, "text/plain; charset=utf-8", b"no processor attached to this endpoint\n"
        data = await processor.get_stats(history=True)
        return 200, "application/json", stats_json(data).encode()

    routes: dict[str, Callable[[], Awaitable[tuple[int, str, bytes]]]] = {
        "/metrics": metrics,
        "/stats": stats,
        "/healthz": healthz,
        "/readyz": readyz,
    }

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _answer(reader, writer, routes)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host, port, limit=_MAX_HEAD)
    bound = server.sockets[0].getsockname()
    return MetricsServer(server, str(bound[0]), int(bound[1]))


async def _answer(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    routes: dict[str, Callable[[], Awaitable[tuple[int, str, bytes]]]],
) -> None:
    head_only = False
    try:
        async with asyncio.timeout(_READ_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
    except TimeoutError:
        return await _respond(writer, 408, b"request head not received in time\n", head_only)
    except asyncio.LimitOverrunError:
        return await _respond(writer, 431, b"request head too large\n", head_only)
    request_line = head.split(b"\r\n", 1)[0]
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return await _respond(writer, 400, b"expected an HTTP/1.x request line\n", head_only)
    method, target = parts[0], parts[1]
    if method not in (b"GET", b"HEAD"):
        return await _respond(writer, 405, b"only GET and HEAD are served\n", head_only)
    head_only = method == b"HEAD"
    path = target.split(b"?", 1)[0].decode("latin-1")
    route = routes.get(path)
    if route is None:
        body = b"not found: try /metrics or /stats\n"
        return await _respond(writer, 404, body, head_only)
    try:
        status, content_type, body = await route()
    except Exception:
        logger.exception("metrics endpoint failed to answer %s", path, extra={"reason": path})
        return await _respond(writer, 500, b"internal error, see the server log\n", head_only)
    await _respond(writer, status, body, head_only, content_type)


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    head_only: bool,
    content_type: str = "text/plain; charset=utf-8",
) -> None:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "Cache-Control: no-store\r\n"
        "\r\n"
    ).encode("latin-1")
    writer.write(head if head_only else head + body)
    await writer.drain()


def stats_json(stats: dict[str, Any]) -> str:
    """The stats dict as strict JSON: enums as values, configs as dicts, NaN and inf as null.

    Anything else JSON has no type for (a callable sizer, an exception) becomes its repr, so a
    stats dict always serializes.
    """
    return json.dumps(_plain(stats), allow_nan=False, separators=(",", ":"))


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {
            str(k.value if isinstance(k, enum.Enum) else k): _plain(v) for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return repr(value)
