"""/healthz and /readyz: the pure readiness decision, and the routes of serve()."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from batchpunk import Batch, BatchConfig, BatchProcessor
from batchpunk.metrics import serve
from batchpunk.metrics._health import downstream_line, liveness, readiness
from batchpunk.metrics.live import summary_line

AVAILABLE = {"state": "available", "since": None, "held": 0, "probes": 0, "outages": 0}
OUT = {"state": "unavailable", "since": 1000.0, "held": 2000, "probes": 3, "outages": 1}


def test_ready_when_the_downstream_answers_and_the_circuit_is_closed() -> None:
    """Healthy stats give 200 and status "ready"; an empty dict (no processor) too."""
    assert readiness({"downstream": AVAILABLE, "circuit": "closed"})[0] == 200
    assert readiness({})[0] == 200
    assert liveness() == (200, {"status": "alive"})


def test_not_ready_while_the_downstream_is_out_the_circuit_open_or_the_source_gone() -> None:
    """Each of the three not-ready conditions gives 503 with its reason."""
    status, body = readiness({"downstream": OUT, "circuit": "closed"})
    assert status == 503
    assert "downstream unavailable" in body["reasons"][0]
    assert "2000 message(s) held" in body["reasons"][0]
    assert readiness({"downstream": AVAILABLE, "circuit": "open"}) == (
        503,
        {
            "status": "unavailable",
            "reasons": ["circuit breaker open"],
            "downstream": "available",
            "circuit": "open",
        },
    )
    status, body = readiness({"pipeline": {"source_connected": False}})
    assert status == 503
    assert body["reasons"] == ["source disconnected"]
    assert body["source_connected"] is False


def test_the_downstream_line_appears_only_during_an_outage() -> None:
    """The live view's status line names the outage's length, held messages and probes."""
    assert downstream_line({"downstream": AVAILABLE}) == ""
    line = downstream_line({"downstream": OUT}, now=1012.0)
    assert line == "downstream UNAVAILABLE for 12s: 2,000 held, 3 probe(s)"
    assert "downstream UNAVAILABLE" in summary_line({"downstream": OUT})


async def _until_unavailable(p: BatchProcessor[Any, Any]) -> None:
    """Wait (bounded) until the processor reports its downstream unavailable."""
    async with asyncio.timeout(5):
        while (await p.get_stats())["downstream"]["state"] != "unavailable":  # noqa: ASYNC110 - polls public stats in a test
            await asyncio.sleep(0.01)


async def test_serve_routes_healthz_readyz_and_pipeline_counters() -> None:
    """A processor whose downstream is out: /readyz 503, /healthz 200, /metrics has counts."""
    down = asyncio.Event()
    down.set()

    async def sink(batch: Batch[Any]) -> None:
        if down.is_set():
            raise ConnectionRefusedError(111, "Connection refused")

    class WithPipeline:
        def __init__(self, processor: BatchProcessor[Any, Any]) -> None:
            self.processor = processor

        async def get_stats(self, history: bool = False) -> dict[str, Any]:
            stats = await self.processor.get_stats(history)
            stats["pipeline"] = {
                "read": 5,
                "acked": 0,
                "nacked": 0,
                "ack_errors": 0,
                "unfinished": 5,
                "rejected": {"malformed": 1},
            }
            return stats

    cfg = BatchConfig(
        max_size=5, max_wait=0.01, retry_delay=0.001, retry_max_delay=0.01, max_retries=1
    )
    async with BatchProcessor(cfg, sink) as p:
        for i in range(5):
            await p.add_message(i)
        async with (
            await serve(0, processor=WithPipeline(p), registry=CollectorRegistry()) as srv,
            httpx.AsyncClient(base_url=srv.url, timeout=5.0) as client,
        ):
            await _until_unavailable(p)
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["status"] == "unavailable"
            assert (await client.get("/healthz")).status_code == 200
            text = (await client.get("/metrics")).text
            down.clear()
            await p.flush()
            assert (await client.get("/readyz")).status_code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("batchpunk_pipeline_read_total", ())] == 5
    assert samples[("batchpunk_pipeline_rejected_total", (("reason", "malformed"),))] == 1
    assert samples[("batchpunk_pipeline_rejected_total", (("reason", "redelivered"),))] == 0
