"""PrometheusMetrics, the serve() endpoint and OpenTelemetryMetrics, end to end in memory."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from batchpunk.config import BatchConfig, BatchTrigger
from batchpunk.metrics import (
    OTEL_METRICS,
    PROMETHEUS_METRICS,
    Observer,
    OpenTelemetryMetrics,
    PrometheusMetrics,
    serve,
    stats_json,
)


def feed(observer: Observer) -> None:
    """Drive one of every Observer event, with known totals."""
    observer.received(12)
    observer.batch_cut(10, 2048, "size")
    observer.batch_cut(2, None, "timeout")
    observer.call_finished(10, 0.004, True)
    observer.call_finished(2, 0.3, False)
    observer.retried()
    observer.split()
    observer.processed(10, 0.02)
    observer.dead_lettered(1, "failed")
    observer.dead_lettered(1, "dropped")
    observer.gauges(7, 3, "open")
    observer.outage()
    observer.probed()
    observer.probed()
    observer.downstream(True, 40)


def samples_by_name(text: str) -> dict[str, list[Any]]:
    """Every sample of a Prometheus text exposition, grouped by sample name."""
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    """The value of the sample ``name`` whose labels include ``labels``."""
    matches = [s.value for s in samples[name] if labels.items() <= s.labels.items()]
    assert len(matches) == 1, (name, labels, samples.get(name))
    return float(matches[0])


async def get(url: str) -> httpx.Response:
    """One GET with a fresh client."""
    async with httpx.AsyncClient() as client:
        return await client.get(url, timeout=5.0)


def test_prometheus_collector_exports_every_metric_with_its_labels() -> None:
    """Counters, histograms and gauges land in the registry under the documented names."""
    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    feed(Observer(PrometheusMetrics(registry)))
    samples = samples_by_name(generate_latest(registry).decode())
    assert value(samples, "batchpunk_messages_received_total") == 12
    assert value(samples, "batchpunk_messages_processed_total") == 10
    assert value(samples, "batchpunk_messages_failed_total") == 1
    assert value(samples, "batchpunk_messages_dropped_total") == 1
    assert value(samples, "batchpunk_messages_dead_lettered_total", reason="failed") == 1
    assert value(samples, "batchpunk_messages_dead_lettered_total", reason="dropped") == 1
    assert value(samples, "batchpunk_batches_total", reason="size") == 1
    assert value(samples, "batchpunk_batches_total", reason="timeout") == 1
    assert value(samples, "batchpunk_retries_total") == 1
    assert value(samples, "batchpunk_splits_total") == 1
    assert value(samples, "batchpunk_batch_size_messages_count") == 2
    assert value(samples, "batchpunk_batch_size_messages_sum") == 12
    assert value(samples, "batchpunk_batch_size_bytes_sum") == 2048
    assert value(samples, "batchpunk_call_duration_seconds_count", outcome="ok") == 1
    assert value(samples, "batchpunk_call_duration_seconds_count", outcome="error") == 1
    assert value(samples, "batchpunk_latency_seconds_bucket", le="0.025") == 1
    assert value(samples, "batchpunk_latency_seconds_bucket", le="0.01") == 0
    assert value(samples, "batchpunk_pending_messages") == 7
    assert value(samples, "batchpunk_in_flight_messages") == 3
    assert value(samples, "batchpunk_circuit_state") == 2


def test_two_collectors_on_one_registry_share_their_instruments() -> None:
    """A second PrometheusMetrics on the same registry adds to the same counters."""
    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    PrometheusMetrics(registry).increment("messages_received", 2)
    PrometheusMetrics(registry).increment("messages_received", 3)
    PrometheusMetrics(registry, namespace="other").increment("messages_received", 5)
    samples = samples_by_name(generate_latest(registry).decode())
    assert value(samples, "batchpunk_messages_received_total") == 5
    assert value(samples, "other_messages_received_total") == 5


def test_prometheus_collector_refuses_unknown_names_and_missing_labels() -> None:
    """An unknown metric raises KeyError listing the known ones; a missing label ValueError."""
    metrics = PrometheusMetrics(CollectorRegistry())
    with pytest.raises(KeyError, match="messages_received"):
        metrics.increment("no_such_metric")
    with pytest.raises(ValueError, match="reason"):
        metrics.increment("batches")
    with pytest.raises(ValueError, match="namespace"):
        PrometheusMetrics(CollectorRegistry(), namespace="bad-name")


async def test_endpoint_serves_parseable_metrics_and_json_stats_on_an_os_chosen_port() -> None:
    """serve(0) binds a free port; /metrics parses as Prometheus text and /stats as JSON."""
    registry = CollectorRegistry()
    observer = Observer(PrometheusMetrics(registry))
    feed(observer)

    class FakeProcessor:
        async def get_stats(self, history: bool = False) -> dict[str, Any]:
            stats: dict[str, Any] = {
                "received": 12,
                "flush_reasons": {"size": 1, "timeout": 1},
                "config": BatchConfig(max_size=10, trigger=BatchTrigger.SIZE),
                "batch_age": math.inf,
            }
            stats.update(observer.snapshot(history=history))
            return stats

    async with await serve(0, processor=FakeProcessor(), registry=registry) as server:
        assert server.port > 0
        response = await get(f"{server.url}/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        samples = samples_by_name(response.text)
        assert value(samples, "batchpunk_messages_received_total") == 12

        response = await get(f"{server.url}/stats?pretty=0")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        stats = json.loads(response.text)
        assert stats["received"] == 12
        assert stats["config"]["trigger"] == "size"
        assert stats["batch_age"] is None
        assert "history" in stats
        assert stats["latency"]["p50"] == pytest.approx(0.02, rel=0.01)

        response = await get(f"{server.url}/nope")
        assert response.status_code == 404


async def test_endpoint_without_processor_answers_404_on_stats() -> None:
    """/stats is 404 when serve() was given no processor, while /metrics still works."""
    async with await serve(0, registry=CollectorRegistry()) as server:
        assert (await get(f"{server.url}/stats")).status_code == 404
        assert (await get(f"{server.url}/metrics")).status_code == 200


async def raw_request(port: int, data: bytes) -> bytes:
    """Send raw bytes to the endpoint and return everything it answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5.0)
    writer.close()
    await writer.wait_closed()
    return answer


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"405"),
        (b"garbage\r\n\r\n", b"400"),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", b"400"),
    ],
    ids=["post", "garbage", "huge-head"],
)
async def test_endpoint_rejects_bad_requests_with_a_status(
    request_bytes: bytes, status: bytes
) -> None:
    """Unsupported methods, malformed request lines and oversized header lines get 405, 400
    and 400 (aiohttp bounds each header line to 8 KiB)."""
    async with await serve(0, registry=CollectorRegistry()) as server:
        answer = await raw_request(server.port, request_bytes)
    assert answer.split(b" ", 2)[1] == status


async def test_head_request_gets_headers_without_body() -> None:
    """HEAD /metrics answers 200 with the GET's headers and no body."""
    async with await serve(0, registry=CollectorRegistry()) as server:
        answer = await raw_request(
            server.port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Content-Type: text/plain" in head
    assert body == b""


async def test_serve_refuses_a_bad_port() -> None:
    """A port outside 0..65535 raises ValueError naming port."""
    with pytest.raises(ValueError, match="port"):
        await serve(70000)


async def test_stats_endpoint_answers_500_when_get_stats_raises() -> None:
    """A failing get_stats() gives a 500 and the endpoint keeps serving."""

    class Broken:
        async def get_stats(self, history: bool = False) -> dict[str, Any]:
            raise RuntimeError("boom")

    async with await serve(0, processor=Broken(), registry=CollectorRegistry()) as server:
        assert (await get(f"{server.url}/stats")).status_code == 500
        assert (await get(f"{server.url}/metrics")).status_code == 200


def test_stats_json_is_strict_json() -> None:
    """NaN, inf, enums, sets, dataclasses and callables all serialize to strict JSON."""
    text = stats_json(
        {
            "nan": math.nan,
            "trigger": BatchTrigger.ALL,
            "s": {1},
            "f": len,
            "cfg": BatchConfig(),
            BatchTrigger.SIZE: 1,
        }
    )
    data = json.loads(text)
    assert data["nan"] is None
    assert data["trigger"] == "all"
    assert data["s"] == [1]
    assert data["f"].startswith("<built-in")
    assert data["cfg"]["max_size"] == BatchConfig().max_size
    assert data["size"] == 1


def otel_points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Data points of every metric the reader collected, by instrument name."""
    data = reader.get_metrics_data()
    assert data is not None
    out: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                out[metric.name] = list(metric.data.data_points)
    return out


def test_opentelemetry_collector_records_through_an_in_memory_reader() -> None:
    """Every instrument records what the Observer sent, with its attributes."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        feed(Observer(OpenTelemetryMetrics(provider.get_meter("batchpunk-test"))))
        points = otel_points(reader)
    finally:
        provider.shutdown()
    assert set(points) == {spec[1] for spec in OTEL_METRICS.values()}

    def single(name: str, **attributes: str) -> Any:
        matches = [p for p in points[name] if attributes.items() <= dict(p.attributes).items()]
        assert len(matches) == 1, (name, attributes)
        return matches[0]

    assert single("batchpunk.messages_received").value == 12
    assert single("batchpunk.messages_processed").value == 10
    assert single("batchpunk.messages_failed").value == 1
    assert single("batchpunk.messages_dead_lettered", reason="dropped").value == 1
    assert single("batchpunk.batches", reason="size").value == 1
    assert single("batchpunk.retries").value == 1
    assert single("batchpunk.splits").value == 1
    assert single("batchpunk.batch_size").count == 2
    assert single("batchpunk.batch_size").sum == 12
    assert single("batchpunk.call_duration", outcome="error").sum == pytest.approx(0.3)
    assert single("batchpunk.latency").max == pytest.approx(0.02)
    assert single("batchpunk.pending").value == 7
    assert single("batchpunk.in_flight").value == 3
    assert single("batchpunk.circuit_state").value == 2
    assert single("batchpunk.downstream.unavailable").value == 1
    assert single("batchpunk.downstream.held").value == 40
    assert single("batchpunk.downstream.probes").value == 2
    assert single("batchpunk.downstream.outages").value == 1


def test_opentelemetry_collector_refuses_unknown_names() -> None:
    """Unknown counters and non-gauge gauges raise KeyError naming what is expected."""
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    try:
        metrics = OpenTelemetryMetrics(provider.get_meter("t"))
        with pytest.raises(KeyError, match="messages_received"):
            metrics.increment("nope")
        with pytest.raises(KeyError, match="not a gauge"):
            metrics.gauge("retries", 1)
    finally:
        provider.shutdown()


def test_both_exporters_cover_every_collector_name() -> None:
    """Prometheus and OpenTelemetry exporters know exactly the same collector names."""
    assert set(PROMETHEUS_METRICS) == set(OTEL_METRICS)


async def test_opentelemetry_observes_a_pipelines_own_counts() -> None:
    """observe_pipeline exports read/acked/nacked/ack_errors/rejected/unfinished from get_stats."""

    class FakePipeline:
        async def get_stats(self, history: bool = False) -> dict[str, Any]:
            return {
                "pipeline": {
                    "read": 10,
                    "acked": 7,
                    "nacked": 1,
                    "ack_errors": 0,
                    "unfinished": 2,
                    "rejected": {"malformed": 1, "redelivered": 2},
                }
            }

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        OpenTelemetryMetrics(provider.get_meter("pipeline-test")).observe_pipeline(FakePipeline())
        # A periodic reader collects on its own thread: the counts are read through the loop.
        points = await asyncio.to_thread(otel_points, reader)
    finally:
        provider.shutdown()
    assert points["batchpunk.pipeline.read"][0].value == 10
    assert points["batchpunk.pipeline.acked"][0].value == 7
    assert points["batchpunk.pipeline.nacked"][0].value == 1
    assert points["batchpunk.pipeline.unfinished"][0].value == 2
    rejected = {p.attributes["reason"]: p.value for p in points["batchpunk.pipeline.rejected"]}
    assert rejected == {"malformed": 1, "redelivered": 2}
