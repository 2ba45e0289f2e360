"""The command line's observability: `batchpunk top`, `--log-format json`, the status page URL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from batchpunk import BatchConfig, BatchProcessor
from batchpunk.metrics import serve

POISONED = """
[source]
type = "generator"
count = 3000
poison = 2
seed = 3

[batch]
max_size = 500
max_retries = 1
retry_delay = 0.01

[sink]
type = "sqlite"
path = "out.db"
table = "orders"
columns = ["id", "user", "amount"]

[metrics]
live = true
"""


def batchpunk(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the command line in a subprocess and capture what it prints."""
    return subprocess.run(
        [sys.executable, "-m", "batchpunk", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_log_format_json_writes_one_object_per_line_with_pipeline_batch_and_reason(
    tmp_path: Path,
) -> None:
    """`run --log-format json` writes only JSON objects on stderr: the dead-letter records carry
    pipeline, batch_id and reason, and the live view's summary off a terminal is a record too."""
    (tmp_path / "orders.toml").write_text(POISONED, encoding="utf-8")
    done = batchpunk(
        "run", "orders.toml", "--log-format", "json", "--log-level", "INFO", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    assert records
    assert all(r["pipeline"] == "orders.toml" for r in records)
    dead = [r for r in records if r.get("reason") == "failed"]
    assert len(dead) == 2
    assert all(isinstance(r["batch_id"], int) for r in dead)
    summaries = [r for r in records if r.get("reason") == "summary"]
    assert summaries
    assert summaries[-1]["message"].endswith("(final)")
    assert "processed 2,998" in summaries[-1]["message"]


def test_log_format_refuses_an_unknown_format(tmp_path: Path) -> None:
    """An unknown --log-format is a usage error (exit 2) naming the accepted values."""
    (tmp_path / "orders.toml").write_text(POISONED, encoding="utf-8")
    done = batchpunk("run", "orders.toml", "--log-format", "xml", cwd=tmp_path)
    assert done.returncode == 2
    assert "'human' or 'json'" in done.stderr


async def test_top_once_prints_a_remote_workers_summary(tmp_path: Path) -> None:
    """`batchpunk top URL --once` prints one summary line read from the worker's /stats, and
    sends the bearer token when the worker asks for one."""
    processor = BatchProcessor(BatchConfig(max_size=10), lambda batch: None)
    async with processor:
        for i in range(25):
            await processor.add_message(i)
        await processor.flush()
        async with await serve(
            0, processor=processor, registry=CollectorRegistry(), token="t0ken"
        ) as server:
            refused = await _run_async("top", server.url, "--once", cwd=tmp_path)
            done = await _run_async("top", server.url, "--once", "--token", "t0ken", cwd=tmp_path)
    assert refused.returncode == 1
    assert "401" in refused.stderr
    assert "--token" in refused.stderr
    assert done.returncode == 0, done.stderr
    assert f"batchpunk top {server.url}" in done.stdout
    assert "processed 25" in done.stdout


def test_top_names_an_unreachable_worker(tmp_path: Path) -> None:
    """`top --once` against a closed port exits 1 with the URL in the message."""
    done = batchpunk("top", "127.0.0.1:1", "--once", cwd=tmp_path)
    assert done.returncode == 1
    assert "http://127.0.0.1:1/stats unreachable" in done.stderr


async def _run_async(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    import asyncio

    return await asyncio.to_thread(batchpunk, *args, cwd=cwd)


@pytest.mark.slow
def test_run_prints_the_status_page_url_and_serves_health(tmp_path: Path) -> None:
    """With [metrics] prometheus_port, `run` prints the page's URL, serves the page, /healthz
    and /readyz (200 while healthy) and masks the token in /status."""
    (tmp_path / "p.toml").write_text(
        """
[source]
type = "generator"
count = 10000000
rate = 5000

[sink]
type = "jsonl"
path = "out.jsonl"
fsync = false

[metrics]
prometheus_port = 0
live = false
token = "${METRICS_TOKEN}"
""",
        encoding="utf-8",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "batchpunk", "run", "p.toml"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "METRICS_TOKEN": "s3cret-metrics-token"},
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        assert "status page: http://127.0.0.1:" in line, line
        base = line.split("status page: ")[1].strip().rstrip("/")
        time.sleep(0.5)
        with urllib.request.urlopen(f"{base}/", timeout=10) as response:
            assert b"batchpunk" in response.read()
        with urllib.request.urlopen(f"{base}/healthz", timeout=10) as response:
            assert response.status == 200
        with urllib.request.urlopen(f"{base}/readyz", timeout=10) as response:
            assert response.status == 200
        request = urllib.request.Request(
            f"{base}/status", headers={"Authorization": "Bearer s3cret-metrics-token"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            status = response.read().decode()
        assert "s3cret-metrics-token" not in status
        assert json.loads(status)["config"]["metrics"]["token"] == "***"
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr


_METRICS_RUN = """
[source]
type = "generator"
count = 100000000
rate = 100

[sink]
type = "jsonl"
path = "out.jsonl"
fsync = false

[metrics]
prometheus_port = 0
live = false
"""


@pytest.mark.parametrize("level", ["WARNING", "DEBUG"])
def test_a_malformed_request_to_the_metrics_port_is_answered_400_without_a_traceback(
    tmp_path: Path, level: str
) -> None:
    """Before, `GET /\\xff` and an 8 KiB header got their 400 but stderr got aiohttp.server's
    "Error handling request" with a multi-line traceback at the default level. Now a client's
    malformed request is at most one DEBUG line, and nothing at WARNING."""
    import re
    import socket

    (tmp_path / "p.toml").write_text(_METRICS_RUN, encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, "-m", "batchpunk", "run", "p.toml", "--log-level", level],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        line = ""
        while "metrics: http://" not in line and (line := process.stderr.readline()):
            pass
        found = re.search(r"http://([\d.]+):(\d+)/metrics", line)
        assert found, line
        host, port = found.group(1), int(found.group(2))
        for request in (
            b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        ):
            with socket.create_connection((host, port), timeout=5) as client:
                client.sendall(request)
                assert client.recv(100).split(b"\r\n")[0].endswith(b"400 Bad Request")
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=10) as response:
            assert response.status == 200  # served after them: a client's mistake costs nothing
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    bad = [line for line in stderr.splitlines() if "aiohttp.server" in line]
    if level == "WARNING":
        assert bad == []
    else:
        assert len(bad) == 2, bad
        assert all(" DEBUG " in line and "answered 400" in line for line in bad)


def test_log_format_json_keeps_every_stderr_line_json_to_the_second_signal(
    tmp_path: Path,
) -> None:
    """Before, `run --log-format json` still wrote two plain lines on stderr: "metrics:
    http://.../metrics  stats: ..." and "stopped at once by a second signal: ...". Now they are
    log records like the rest: every stderr line is a JSON object."""
    pytest.importorskip("httpx", reason="the http sink needs the http extra (httpx)")
    import socket

    with socket.socket() as probe:  # bound and closed: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "p.toml").write_text(
        _METRICS_RUN.replace(
            'type = "jsonl"\npath = "out.jsonl"\nfsync = false',
            f'type = "http"\nurl = "http://127.0.0.1:{port}/in"\ntimeout = 0.5',
        ),
        encoding="utf-8",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "batchpunk", "run", "p.toml", "--log-format", "json"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    first = json.loads(process.stderr.readline())  # the metrics addresses, as a record
    assert "metrics: http://127.0.0.1:" in first["message"]
    heard = ""
    while "downstream unavailable" not in heard and (line := process.stderr.readline()):
        heard += line  # the pipeline runs (and handles signals): the sink is down
    process.send_signal(signal.SIGINT)
    while "draining" not in heard and (line := process.stderr.readline()):
        heard += line
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    lines = [json.dumps(first), *(heard + stderr).splitlines()]
    records = [json.loads(line) for line in lines]  # fails on any plain line
    assert any("stopped at once by a second signal" in r["message"] for r in records), lines
    assert all(r["pipeline"] == "p.toml" for r in records)
