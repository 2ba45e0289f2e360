"""The metrics server on the running event loop: /metrics, /stats, /healthz, /readyz and a page.

Why aiohttp rather than a hand-written handler: the server now serves a browser (a page, its
script and style, a dozen requests a minute from each tab), keep-alive, HEAD, conditional
static files and header limits, which is what a well-kept HTTP library is for. aiohttp runs on
the loop the processor already uses (no thread, unlike prometheus-client's own server), and it
is the library the HTTP source uses too (extra ``server``). bench/live_view.py measures what
one attached browser costs the engine.

Read-only by design: GET and HEAD only. Bound to 127.0.0.1 unless told otherwise; with a
``token`` every route but /healthz, /readyz and the page's static shell asks for
``Authorization: Bearer <token>`` (the page asks for the token once and keeps it in the tab's
session storage). The page and its chart library ship inside the package: it makes no request
beyond this server.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

from batchpunk._redact import redact
from batchpunk.errors import require
from batchpunk.metrics._health import liveness, readiness
from batchpunk.metrics._prometheus import pipeline_exposition

if TYPE_CHECKING:
    from aiohttp import web

    from batchpunk.deadletter import DeadLetter

__all__ = ["MetricsServer", "StatsSource", "serve", "stats_json"]

logger = logging.getLogger("batchpunk")

#: Bytes allowed for the request line, and for each header line.
_MAX_LINE = 8 * 1024

#: Files of the page, served from the package (name -> content type).
_STATIC = {
    "index.html": "text/html; charset=utf-8",
    "status.js": "text/javascript; charset=utf-8",
    "status.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
    "vendor/uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "vendor/uPlot.min.css": "text/css; charset=utf-8",
    "vendor/uPlot.LICENSE": "text/plain; charset=utf-8",
}

#: Sent with every answer: the page loads nothing from elsewhere, and is never framed.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class StatsSource(Protocol):
    """Anything with the processor's ``get_stats(history=...)`` coroutine method."""

    def get_stats(self, history: bool = False) -> Awaitable[dict[str, Any]]:
        """The stats dict; /stats asks for history."""


class MetricsServer:
    """Handle of a running ``serve()`` server: its address, and ``close()`` to stop it.

    Also an async context manager: ``async with await serve(0) as server: ...``.
    """

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self._runner = runner
        #: The interface listened on.
        self.host = host
        #: The bound port (the one the OS chose when serve() was given port 0).
        self.port = port

    @property
    def url(self) -> str:
        """Base URL of the server, e.g. ``http://127.0.0.1:9464``; the status page is at ``/``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        """Stop listening and end open connections; safe to call twice."""
        await self._runner.cleanup()

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
    token: str | None = None,
    config: Mapping[str, Any] | None = None,
    dead_letters: Callable[[], Iterable[tuple[float, DeadLetter]]] | None = None,
    redact: Callable[[str], str] | None = None,
    title: str = "batchpunk",
) -> MetricsServer:
    """Serve the status page and /metrics, /stats, /status, /healthz, /readyz until ``close()``.

    Args:
        port: the TCP port; 0 lets the OS choose (read it from the handle's ``port``).
        host: the interface; keep 127.0.0.1 unless a remote scraper or browser needs it.
        processor: what /stats, /readyz and the page read (a BatchProcessor or a Pipeline).
        registry: the prometheus-client registry of /metrics (its global REGISTRY by default,
            where ``PrometheusMetrics()`` registers).
        token: when set, /metrics, /stats and /status need ``Authorization: Bearer <token>``.
        config: the configuration in force, already redacted (``PipelineSpec.describe()``);
            shown on the page. By default the processor's BatchConfig from its stats.
        dead_letters: returns (time stored, letter) pairs, newest first, for the page's table
            (``RecentDeadLetters.recent``).
        redact: masks secrets in any text the page shows (``PipelineSpec.redact``); URL
            passwords and ``password=`` pairs are masked in any case.
        title: the page's title.

    Needs aiohttp (extra ``server``); /metrics also needs prometheus-client (extra
    ``prometheus``) and answers 501 with the pip command without it.
    """
    web_module = require("aiohttp.web", "server", "batchpunk.metrics.serve")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port: expected an int in 0..65535, got {port!r}")
    if token is not None and (not isinstance(token, str) or not token):
        raise ValueError("token: expected a non-empty string, or None for no authentication")
    app = _application(_Routes(processor, registry, config, dead_letters, redact, title), token)
    runner = web_module.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web_module.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0]
    return MetricsServer(runner, str(bound[0]), int(bound[1]))


class _Routes:
    """The handlers, holding what they read; one instance per server."""

    def __init__(
        self,
        processor: StatsSource | None,
        registry: Any,
        config: Mapping[str, Any] | None,
        dead_letters: Callable[[], Iterable[tuple[float, DeadLetter]]] | None,
        redact: Callable[[str], str] | None,
        title: str,
    ) -> None:
        self.processor = processor
        self.registry = registry
        self.dead_letters = dead_letters
        self.title = title
        self._redact = redact
        # Redacted once, here: the page never sees the configuration unmasked.
        self.config = self.redact_tree(config) if config is not None else None
        self._static: dict[str, bytes] = {}

    def redact(self, text: str) -> str:
        # The caller's redactor first, while the secrets it knows by value are intact.
        masked = self._redact(text) if self._redact is not None else text
        return redact(masked)

    def redact_tree(self, value: Any) -> Any:
        """``value`` made JSON-plain, with every string in it (keys too) redacted.

        String by string rather than over the JSON text: a secret holding a quote or a
        backslash is escaped in JSON and would slip past a search of the text.
        """
        plain = _plain(value)
        if isinstance(plain, str):
            return self.redact(plain)
        if isinstance(plain, dict):
            return {self.redact(k): self.redact_tree(v) for k, v in plain.items()}
        if isinstance(plain, list):
            return [self.redact_tree(v) for v in plain]
        return plain

    def static(self, name: str) -> bytes:
        body = self._static.get(name)
        if body is None:
            body = resources.files("batchpunk.metrics").joinpath("static", name).read_bytes()
            self._static[name] = body
        return body

    async def stats(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        if self.processor is None:
            return web.Response(status=404, text="no processor attached to this server\n")
        history = request.query.get("history", "1") not in ("0", "false", "no")
        data = await self.processor.get_stats(history=history)
        data["time"] = time.time()  # the worker's clock, so a remote page needs no clock sync
        since = request.query.get("since")
        if history and since is not None:
            try:
                after = float(since)
            except ValueError:
                return web.Response(status=400, text="since: expected a Unix time in seconds\n")
            data["history"] = [r for r in data.get("history", ()) if r.get("time", 0) > after]
        return _json(stats_json(data))

    async def status(self, request: web.Request) -> web.StreamResponse:
        """What the page shows beside the charts: title, configuration, recent dead letters."""
        from batchpunk.metrics._recent import letter_summary

        config = self.config
        if config is None and self.processor is not None:
            stats = await self.processor.get_stats()
            config = {"batch": self.redact_tree(stats.get("config") or {})}
        letters = []
        if self.dead_letters is not None:
            for stored, letter in self.dead_letters():
                letters.append(letter_summary(stored, letter, self.redact))
                if len(letters) >= 20:
                    break
        body = {
            "title": self.title,
            "config": config,
            "dead_letters": letters,
            "dead_letters_kept": self.dead_letters is not None,
        }
        return _json(stats_json(body))

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        try:
            prometheus_client = require("prometheus_client", "prometheus", "/metrics")
        except ImportError as exc:
            return web.Response(status=501, text=f"{exc}\n")
        registry = self.registry if self.registry is not None else prometheus_client.REGISTRY
        content_type: str = getattr(
            prometheus_client, "CONTENT_TYPE_PLAIN_0_0_4", prometheus_client.CONTENT_TYPE_LATEST
        )
        body = prometheus_client.generate_latest(registry)
        if self.processor is not None:  # the pipeline's own counts, read at scrape time
            try:
                body += pipeline_exposition(await self.processor.get_stats()).encode()
            except Exception:
                logger.exception("/metrics: get_stats() failed; serving the registry alone")
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        status, body = liveness()
        return _json(stats_json(body), status)

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        stats = await self.processor.get_stats() if self.processor is not None else {}
        status, body = readiness(stats)
        return _json(stats_json(body), status)

    async def page(self, request: web.Request) -> web.StreamResponse:
        return self._file("index.html")

    async def asset(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in _STATIC or name == "index.html":
            from aiohttp import web

            return web.Response(status=404, text="not found\n")
        return self._file(name)

    def _file(self, name: str) -> web.StreamResponse:
        from aiohttp import web

        response = web.Response(body=self.static(name))
        response.headers["Content-Type"] = _STATIC[name]
        response.headers["Cache-Control"] = "no-cache"
        return response


def _application(routes: _Routes, token: str | None) -> web.Application:
    from aiohttp import web

    open_paths = {"/", "/healthz", "/readyz"}
    expected = f"Bearer {token}".encode() if token is not None else b""

    @web.middleware
    async def guard(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        path = request.path
        if token is not None and path not in open_paths and not path.startswith("/static/"):
            # surrogateescape gives back the bytes aiohttp could not decode (a plain encode()
            # raised on them: a 500 with aiohttp's banner and a logged traceback per request).
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, expected):
                refused = web.Response(status=401, text="bearer token required\n")
                refused.headers["WWW-Authenticate"] = 'Bearer realm="batchpunk"'
                _secure(refused)
                return refused
        response: web.StreamResponse
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = web.Response(status=exc.status, text=f"{exc.reason}\n")
        except Exception:
            logger.exception(
                "metrics server failed to answer %s", request.path, extra={"reason": request.path}
            )
            response = web.Response(status=500, text="internal error, see the server log\n")
        _secure(response)
        return response

    app = web.Application(
        middlewares=[guard],
        handler_args={"max_line_size": _MAX_LINE, "max_field_size": _MAX_LINE},
    )
    app.router.add_get("/", routes.page)
    app.router.add_get("/static/{name:.+}", routes.asset)
    app.router.add_get("/stats", routes.stats)
    app.router.add_get("/status", routes.status)
    app.router.add_get("/metrics", routes.metrics)
    app.router.add_get("/healthz", routes.healthz)
    app.router.add_get("/readyz", routes.readyz)
    return app


def _secure(response: web.StreamResponse) -> None:
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers["Server"] = "batchpunk"  # not the library and Python versions
    response.headers.setdefault("Cache-Control", "no-store")


def _json(text: str, status: int = 200) -> web.StreamResponse:
    from aiohttp import web

    response = web.Response(text=text, status=status)
    response.headers["Content-Type"] = "application/json"
    return response


def stats_json(stats: Mapping[str, Any]) -> str:
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
    if isinstance(value, Mapping):
        return {
            str(k.value if isinstance(k, enum.Enum) else k): _plain(v) for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return repr(value)
