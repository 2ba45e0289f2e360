"""The metrics server on aiohttp: the page and its assets, token, /healthz, /readyz, /status."""

from __future__ import annotations

import asyncio
import re
import sys
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from batchpunk.deadletter import DeadLetter, MemoryDeadLetters
from batchpunk.errors import MissingDependency
from batchpunk.metrics import RecentDeadLetters, serve
from batchpunk.metrics._health import readiness
from batchpunk.metrics._server import _STATIC

SECRET = "Sup3r-Secret-Value"


class Stats:
    """A stats source whose dict the test changes between requests."""

    def __init__(self, **stats: Any) -> None:
        self.stats: dict[str, Any] = {"state": "running", "circuit": "closed", **stats}
        self.history = [{"time": 100.0 + i, "processed": i} for i in range(5)]

    async def get_stats(self, history: bool = False) -> dict[str, Any]:
        out = dict(self.stats)
        if history:
            out["history"] = list(self.history)
        return out


async def get(url: str, **headers: str) -> httpx.Response:
    """GET with a fresh client."""
    async with httpx.AsyncClient() as client:
        return await client.get(url, headers=headers, timeout=10)


async def test_the_page_and_every_asset_it_loads_are_served_from_the_package() -> None:
    """/ is the HTML page; each file it references is served with its content type, and the
    page's Content-Security-Policy allows nothing from elsewhere."""
    async with await serve(0, processor=Stats(), registry=CollectorRegistry()) as server:
        page = await get(server.url + "/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        for name, content_type in _STATIC.items():
            if name == "index.html":
                continue
            answer = await get(f"{server.url}/static/{name}")
            assert answer.status_code == 200, name
            assert answer.headers["content-type"] == content_type
            assert len(answer.content) > 0
            if name.endswith((".js", ".css", ".svg")) and not name.startswith("vendor/"):
                assert f"/static/{name}" in page.text, name
        assert (await get(f"{server.url}/static/../_server.py")).status_code == 404
        assert (await get(f"{server.url}/static/nope.js")).status_code == 404


async def test_the_page_references_no_other_host() -> None:
    """Every src and href in the page is a path on this server (the page works offline)."""
    async with await serve(0, registry=CollectorRegistry()) as server:
        html = (await get(server.url + "/")).text
    links = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert links
    assert all(link.startswith("/") and not link.startswith("//") for link in links), links


async def test_a_token_guards_data_but_not_probes_or_the_page_shell() -> None:
    """With a token, /stats, /status and /metrics answer 401 without the bearer header and 200
    with it; /healthz, /readyz, / and its assets stay open (probes and the token prompt)."""
    async with await serve(
        0, processor=Stats(), registry=CollectorRegistry(), token=SECRET
    ) as server:
        for path in ("/stats", "/status", "/metrics"):
            refused = await get(server.url + path)
            assert refused.status_code == 401, path
            assert refused.headers["www-authenticate"].startswith("Bearer")
            wrong = await get(server.url + path, Authorization="Bearer nope")
            assert wrong.status_code == 401, path
            ok = await get(server.url + path, Authorization=f"Bearer {SECRET}")
            assert ok.status_code == 200, path
        for path in ("/", "/healthz", "/readyz", "/static/status.js"):
            assert (await get(server.url + path)).status_code == 200, path


async def test_stats_since_returns_only_newer_history_and_the_worker_clock() -> None:
    """/stats?since=T keeps the history records after T; history=0 drops it; time is added."""
    async with await serve(0, processor=Stats(), registry=CollectorRegistry()) as server:
        data = (await get(server.url + "/stats?since=102")).json()
        assert [r["time"] for r in data["history"]] == [103.0, 104.0]
        assert isinstance(data["time"], float)
        assert "history" not in (await get(server.url + "/stats?history=0")).json()
        assert (await get(server.url + "/stats?since=x")).status_code == 400


@pytest.mark.parametrize(
    ("stats", "status", "reason"),
    [
        ({}, 200, ""),
        ({"circuit": "open"}, 503, "circuit"),
        ({"downstream": {"state": "unavailable", "since": 1.0}}, 503, "downstream unavailable"),
        ({"pipeline": {"source_connected": False}}, 503, "source disconnected"),
        ({"downstream": {"state": "available"}, "pipeline": {"source_connected": True}}, 200, ""),
    ],
    ids=["fine", "circuit", "downstream", "source", "all-fields-fine"],
)
async def test_readyz_follows_contract_4(stats: dict[str, Any], status: int, reason: str) -> None:
    """/readyz answers 503 naming the reason while the downstream is unavailable, the circuit
    is open or the source is disconnected, else 200; /healthz is 200 throughout."""
    async with await serve(0, processor=Stats(**stats), registry=CollectorRegistry()) as server:
        ready = await get(server.url + "/readyz")
        assert ready.status_code == status
        assert ready.headers["content-type"] == "application/json"
        assert reason in ready.text
        assert (await get(server.url + "/healthz")).status_code == 200
    assert readiness({"circuit": "closed", **stats})[0] == status


async def test_status_shows_configuration_and_recent_letters_redacted() -> None:
    """/status carries the configuration and the newest dead letters with every secret masked:
    the given redactor's and URL passwords alike, in config, errors and message previews."""
    sink = RecentDeadLetters(MemoryDeadLetters(), keep=3)
    letters = [
        DeadLetter(
            message={"n": i, "dsn": f"postgres://app:{SECRET}@db/x"},
            reason="failed",
            error=ValueError(f"rejected with token {SECRET}"),
            attempts=2,
        )
        for i in range(5)
    ]
    await sink.put(letters)
    assert len(sink.sink.letters) == 5  # type: ignore[attr-defined]
    config = {"sink": {"url": f"http://u:{SECRET}@h/bulk", "header": f"token {SECRET}"}}
    async with await serve(
        0,
        processor=Stats(),
        registry=CollectorRegistry(),
        config=config,
        dead_letters=sink.recent,
        redact=lambda text: text.replace(SECRET, "***"),
        title="orders",
    ) as server:
        answer = await get(server.url + "/status")
    assert SECRET not in answer.text
    body = answer.json()
    assert body["title"] == "orders"
    assert body["config"]["sink"]["url"] == "http://u:***@h/bulk"
    assert [letter["message"][:8] for letter in body["dead_letters"]] == [
        "{'n': 4,",
        "{'n': 3,",
        "{'n': 2,",
    ]
    assert body["dead_letters"][0]["error"] == "rejected with token ***"
    assert body["dead_letters"][0]["error_type"] == "ValueError"


async def test_only_get_and_head_are_answered() -> None:
    """The server is read-only: POST and DELETE get 405, HEAD gets headers without a body."""
    async with await serve(0, processor=Stats(), registry=CollectorRegistry()) as server:
        async with httpx.AsyncClient() as client:
            assert (await client.post(server.url + "/stats")).status_code == 405
            assert (await client.delete(server.url + "/")).status_code == 405
            head = await client.head(server.url + "/metrics")
        assert head.status_code == 200
        assert head.content == b""


async def test_serve_without_aiohttp_names_the_pip_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Asking for the server without aiohttp raises MissingDependency with the pip command."""
    for module in [m for m in sys.modules if m.startswith("aiohttp")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # None makes `import aiohttp` fail
    with pytest.raises(MissingDependency, match=r"pip install 'batchpunk\[server\]'"):
        await serve(0)


def test_the_core_imports_without_aiohttp() -> None:
    """Importing batchpunk and batchpunk.metrics loads no aiohttp module (the extra is lazy)."""
    import subprocess

    code = (
        "import sys, batchpunk, batchpunk.metrics, batchpunk.metrics.live;"
        "print(sorted(m for m in sys.modules if m.startswith('aiohttp')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


async def test_recent_dead_letters_keeps_only_what_the_sink_stored() -> None:
    """A put that the wrapped sink refuses leaves nothing in the recent list; other attributes
    are the wrapped sink's."""

    class Refusing:
        calls = 0

        async def put(self, letters: Any) -> None:
            self.calls += 1
            raise ConnectionError("store down")

    sink = RecentDeadLetters(Refusing())  # type: ignore[arg-type]
    with pytest.raises(ConnectionError):
        await sink.put([DeadLetter(message=1)])
    assert sink.recent() == []
    assert sink.calls == 1
    with pytest.raises(ValueError, match="keep"):
        RecentDeadLetters(MemoryDeadLetters(), keep=0)


async def test_a_secret_with_json_special_characters_is_masked_in_the_config() -> None:
    """A secret holding a quote and a backslash is masked in /status although JSON escapes it."""
    secret = 'pa"ss\\word-42'
    config = {"sink": {"options": {"note": f"prefix {secret}"}}}
    async with await serve(
        0,
        processor=Stats(),
        registry=CollectorRegistry(),
        config=config,
        redact=lambda text: text.replace(secret, "***"),
    ) as server:
        answer = await get(server.url + "/status")
    assert answer.json()["config"]["sink"]["options"]["note"] == "prefix ***"


async def test_status_without_a_given_config_shows_the_batch_config_from_stats() -> None:
    """Without config=, /status shows the processor's BatchConfig (from its stats), redacted,
    and says that dead letters are not kept when no source of them was given."""
    stats = Stats(config={"max_size": 7, "dsn": f"postgres://u:{SECRET}@h/db"})
    async with await serve(0, processor=stats, registry=CollectorRegistry()) as server:
        body = (await get(server.url + "/status")).json()
    assert body["config"] == {"batch": {"max_size": 7, "dsn": "postgres://u:***@h/db"}}
    assert body["dead_letters"] == []
    assert body["dead_letters_kept"] is False


async def test_an_authorization_header_that_is_not_utf8_gets_401_not_a_500() -> None:
    """Header bytes aiohttp cannot decode made the token check raise: aiohttp's own 500 with its
    version banner and no security headers, and a traceback logged for every such request."""
    async with await serve(
        0, processor=Stats(), token="s3cret", registry=CollectorRegistry()
    ) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer \xff\xfe\r\n\r\n"
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 401")
    assert b"Server: batchpunk" in answer
    assert b"aiohttp/" not in answer
