"""The status page in a real headless Chromium, against `batchpunk run` and a sink that goes down.

Needs the Debian packages chromium and chromium-driver (.ci/run installs them) and Playwright's
Python package (extra dev), driven with the system browser: no browser download. Skips with a
reason when they are missing, except under CI=true.

The screenshot lands in build/test-artifacts/status-page.png; with BATCHPUNK_DOCS_IMG=1 it is
also written to docs/img/status-page.png (the README's picture).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("BATCHPUNK_ARTIFACTS", ROOT / "build" / "test-artifacts"))
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Written literally in the pipeline file (a URL password) and given through the environment.
FILE_SECRET = "Lit3ral-Pa55word"
ENV_SECRET = "Env-S3cret-Token-4242"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _require_browser() -> None:
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium chromium-driver)")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install 'batchpunk[dev]')")
    if not missing:
        return
    message = "status page browser test needs " + " and ".join(missing)
    if IN_CI:
        pytest.fail(f"{message}; CI=true requires it (.ci/run installs it)")
    pytest.skip(message)


class Downstream:
    """An HTTP bulk endpoint on localhost that accepts batches, or refuses them with 503."""

    def __init__(self) -> None:
        self.refusing = False
        self.accepted = 0
        self.refused = 0
        self.url = ""

    async def handle(self, request: Any) -> Any:
        from aiohttp import web

        batch = await request.json()
        if self.refusing:
            self.refused += 1
            return web.Response(status=503, text="down for maintenance")
        self.accepted += len(batch)
        return web.json_response({"ok": True})


@pytest.fixture
async def downstream() -> AsyncIterator[Downstream]:
    """A Downstream served by aiohttp on an OS-chosen port for the test's duration."""
    from aiohttp import web

    sink = Downstream()
    app = web.Application()
    app.router.add_post("/bulk", sink.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    sink.url = f"http://ingest:{FILE_SECRET}@127.0.0.1:{port}/bulk"
    yield sink
    await runner.cleanup()


def _pipeline_file(directory: Path, sink_url: str) -> Path:
    path = directory / "orders.toml"
    path.write_text(
        f"""
[source]
type = "generator"
count = 5000000
rate = 3000
malformed = 3000
seed = 7

[batch]
max_size = 100
max_wait = 0.05
max_retries = 200
retry_delay = 0.05
retry_max_delay = 0.25
circuit_breaker_threshold = 3
circuit_breaker_cooldown = 0.5

[sink]
type = "http"
url = "{sink_url}"
headers = {{ Authorization = "Bearer ${{SINK_TOKEN}}" }}

[dead_letter]
type = "jsonl"
path = "dead-letters.jsonl"

[metrics]
prometheus_port = 0
live = false
""",
        encoding="utf-8",
    )
    return path


def _spawn_worker(directory: Path, pipeline: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "SINK_TOKEN": ENV_SECRET}
    return subprocess.Popen(
        [sys.executable, "-m", "batchpunk", "run", pipeline.name],
        cwd=directory,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def _start_worker(directory: Path, pipeline: Path) -> tuple[subprocess.Popen[str], str]:
    process = await asyncio.to_thread(_spawn_worker, directory, pipeline)
    assert process.stderr is not None
    line = await asyncio.to_thread(process.stderr.readline)
    assert line.startswith("metrics: http://127.0.0.1:"), line
    base = line.split()[1].removesuffix("/metrics")
    return process, base


async def _until(what: str, check: Callable[[], Awaitable[bool]], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.25)


async def test_status_page_draws_a_live_pipeline_through_a_sink_outage(
    tmp_path: Path, downstream: Downstream
) -> None:
    """The page loads with no console error and no request beyond localhost, draws live data,
    shows the circuit (and downstream state, when the engine reports it) leave and regain
    health through a sink outage, lists dead letters, and never shows a secret."""
    _require_browser()
    from playwright.async_api import Request, Route, async_playwright

    process, base = await _start_worker(tmp_path, _pipeline_file(tmp_path, downstream.url))
    console_errors: list[str] = []
    requests: list[str] = []
    outside: list[str] = []

    async def only_localhost(route: Route, request: Request) -> None:
        if urlsplit(request.url).hostname in ("127.0.0.1", "localhost"):
            await route.continue_()
        else:
            outside.append(request.url)
            await route.abort()

    try:
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),
                executable_path=CHROMIUM,
                headless=True,
                args=FLAGS,
                viewport={"width": 1440, "height": 1000},
            )
            try:
                await context.route("**/*", only_localhost)
                page = await context.new_page()
                page.on(
                    "console",
                    lambda m: console_errors.append(m.text) if m.type == "error" else None,
                )
                page.on("pageerror", lambda e: console_errors.append(str(e)))
                page.on("request", lambda r: requests.append(r.url))
                await page.goto(base + "/")

                async def charts_have_data() -> bool:
                    points = await page.eval_on_selector_all(
                        ".chart", "els => els.map(e => Number(e.dataset.points || 0))"
                    )
                    processed = await page.text_content("#k-processed")
                    return min(points) >= 3 and processed not in (None, "-", "0")

                await _until("charts with data", charts_have_data)
                peak = json.loads(
                    await page.get_attribute("#c-throughput", "data-peak") or "[0, 0, 0]"
                )
                assert peak[1] > 0, "the throughput chart drew no processed messages"
                assert await page.text_content("#pill-circuit") == "circuit closed"

                downstream.refusing = True

                async def unhealthy() -> bool:
                    circuit = await page.text_content("#pill-circuit") or ""
                    ds = await page.text_content("#pill-downstream") or ""
                    if "n/a" not in ds:  # the engine reports its downstream state
                        return "unavailable" in ds and circuit != "circuit closed"
                    return circuit != "circuit closed"

                await _until("the outage to show", unhealthy)
                assert "not ready" in (await page.text_content("#pill-ready") or "")
                await asyncio.sleep(2.0)  # let the outage show on the charts
                downstream.refusing = False

                async def healthy() -> bool:
                    circuit = await page.text_content("#pill-circuit") or ""
                    ds = await page.text_content("#pill-downstream") or ""
                    return circuit == "circuit closed" and "unavailable" not in ds

                await _until("the recovery to show", healthy)
                health = json.loads(await page.get_attribute("#c-health", "data-peak") or "[0, 0]")
                assert health[1] >= 1, "the health chart never drew the circuit leaving closed"

                async def letters_listed() -> bool:
                    reasons = await page.eval_on_selector_all(
                        "#letters td.reason", "els => els.map(e => e.textContent)"
                    )
                    return "malformed" in reasons

                await _until("a dead letter in the table", letters_listed)
                await asyncio.sleep(4.0)  # a few more seconds of recovery on the charts
                html = await page.content()
                status = await page.evaluate("fetch('/status').then(r => r.text())")
                stats = await page.evaluate("fetch('/stats').then(r => r.text())")
                await asyncio.to_thread(ARTIFACTS.mkdir, parents=True, exist_ok=True)
                shot = ARTIFACTS / "status-page.png"
                await page.screenshot(path=str(shot), full_page=True)
                if os.environ.get("BATCHPUNK_DOCS_IMG") == "1":
                    shutil.copyfile(shot, ROOT / "docs" / "img" / "status-page.png")
            finally:
                await context.close()
    finally:
        process.send_signal(signal.SIGINT)
        stdout, stderr = await asyncio.to_thread(process.communicate, timeout=60)

    assert process.returncode == 0, stderr
    assert console_errors == []
    assert outside == []
    assert all(urlsplit(url).hostname == "127.0.0.1" for url in requests), requests
    for secret in (FILE_SECRET, ENV_SECRET):
        for text in (html, status, stats, stdout, stderr):
            assert secret not in text
    assert "ingest:***@127.0.0.1" in html  # the configuration is shown, masked
    assert "batchpunk run orders.toml" in html
    assert downstream.refused > 0
    assert downstream.accepted > 0


async def test_page_asks_for_the_token_and_shows_hostile_letters_as_text(tmp_path: Path) -> None:
    """Behind a token the page shows its prompt, then data once given the token; a dead letter
    whose message is HTML shows as text, with no element made from it; the time window switches;
    no console error."""
    _require_browser()
    from playwright.async_api import async_playwright
    from prometheus_client import CollectorRegistry

    from batchpunk import BatchConfig, BatchProcessor
    from batchpunk.deadletter import DeadLetter, MemoryDeadLetters
    from batchpunk.metrics import RecentDeadLetters, serve

    hostile = '<img id="pwned" src="/x" onerror="document.title=\'pwned\'">'
    letters = RecentDeadLetters(MemoryDeadLetters())
    await letters.put([DeadLetter(message=hostile, reason="malformed", error=ValueError(hostile))])
    console_errors: list[str] = []
    processor = BatchProcessor(BatchConfig(max_size=10), lambda batch: None)
    async with processor:
        for i in range(100):
            await processor.add_message(i)
        server = await serve(
            0,
            processor=processor,
            registry=CollectorRegistry(),
            token="t0ken-for-the-page",
            dead_letters=letters.recent,
        )
        async with server, async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),
                executable_path=CHROMIUM,
                headless=True,
                args=FLAGS,
            )
            try:
                page = await context.new_page()
                page.on(
                    "console",
                    lambda m: console_errors.append(m.text) if m.type == "error" else None,
                )
                page.on("pageerror", lambda e: console_errors.append(str(e)))
                await page.goto(server.url + "/")
                await page.wait_for_selector("#auth:not(.hidden)", timeout=10_000)
                assert await page.text_content("#pill-link") == "token needed"
                console_errors.clear()  # the refused fetches are logged by Chromium itself
                await page.fill("#token", "t0ken-for-the-page")
                await page.click("#auth button")
                await page.wait_for_selector("#auth.hidden", state="attached", timeout=10_000)

                async def letter_shown() -> bool:
                    cells = await page.eval_on_selector_all(
                        "#letters td", "els => els.map(e => e.textContent)"
                    )
                    return hostile in cells

                await _until("the hostile letter as text", letter_shown)
                assert await page.query_selector("#pwned") is None
                assert await page.title() != "pwned"
                assert await page.text_content("#pill-link") == "live"
                await page.click('#window button[data-seconds="60"]')
                active = await page.eval_on_selector_all(
                    "#window button.active", "els => els.map(e => e.textContent)"
                )
                assert active == ["1m"]
            finally:
                await context.close()
    assert console_errors == []


async def test_page_shows_contract_4_downstream_state_when_the_engine_reports_it(
    tmp_path: Path,
) -> None:
    """Given stats with a downstream section, the page shows "downstream unavailable"
    with its duration and held messages and "not ready", then "available" once it recovers."""
    _require_browser()
    from playwright.async_api import async_playwright
    from prometheus_client import CollectorRegistry

    from batchpunk.metrics import serve

    class Reporting:
        """Stats of an engine that reports the downstream state (issue 13's fields)."""

        def __init__(self) -> None:
            self.down_since: float | None = None

        async def get_stats(self, history: bool = False) -> dict[str, Any]:
            down = self.down_since is not None
            return {
                "state": "running",
                "circuit": "closed",
                "processed": 10,
                "pipeline": {"acked": 10, "nacked": 0, "source_connected": True},
                "downstream": {
                    "state": "unavailable" if down else "available",
                    "since": self.down_since,
                    "held": 1234 if down else 0,
                    "probes": 3,
                    "outages": 1,
                },
                "history": [],
            }

    stats = Reporting()
    async with (
        await serve(0, processor=stats, registry=CollectorRegistry()) as server,
        async_playwright() as playwright,
    ):
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=FLAGS
        )
        try:
            page = await context.new_page()
            await page.goto(server.url + "/")

            async def pill(text: str) -> bool:
                return text in (await page.text_content("#pill-downstream") or "")

            await _until("available", lambda: pill("downstream available"))
            stats.down_since = time.time() - 65
            await _until("unavailable", lambda: pill("downstream unavailable for 1m"))
            assert await pill("1,234 held")
            assert "downstream unavailable" in (await page.text_content("#pill-ready") or "")
            stats.down_since = None
            await _until("available again", lambda: pill("downstream available"))
            health = json.loads(await page.get_attribute("#c-health", "data-peak") or "[0, 0]")
            assert health[0] == 2  # the downstream series drew the outage
        finally:
            await context.close()
