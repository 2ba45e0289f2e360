"""A MetricsCollector on prometheus-client: counters, histograms and gauges for a scrape.

prometheus-client is the optional extra ``prometheus``; it is imported when a PrometheusMetrics
is built, never when batchpunk is imported.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from typing import Any

from batchpunk.errors import require

__all__ = [
    "BATCH_BYTES_BUCKETS",
    "BATCH_SIZE_BUCKETS",
    "CALL_DURATION_BUCKETS",
    "LATENCY_BUCKETS",
    "PROMETHEUS_METRICS",
    "PrometheusMetrics",
]

#: Messages per batch: 1 to 50,000, roughly 1-2-5 per decade.
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000)
#: Bytes per batch: powers of four from 256 B to 64 MiB.
BATCH_BYTES_BUCKETS = tuple(float(256 * 4**k) for k in range(10))
#: Seconds per processor call: 0.5 ms (an in-memory sink) to 60 s (a struggling downstream).
CALL_DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
#: Seconds from acceptance to completion: 1 ms to 5 min (max_wait plus retries and backoff).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

#: Collector name -> (kind, exported name without namespace, label names, help text, buckets).
#: Counters get the ``_total`` suffix from prometheus-client; docs/observability.md lists them.
PROMETHEUS_METRICS: Mapping[
    str, tuple[str, str, tuple[str, ...], str, tuple[float, ...] | None]
] = {
    "messages_received": ("counter", "messages_received", (), "Messages accepted.", None),
    "messages_processed": (
        "counter",
        "messages_processed",
        (),
        "Messages whose batch succeeded.",
        None,
    ),
    "messages_failed": (
        "counter",
        "messages_failed",
        (),
        "Messages dead-lettered because processing failed (reason failed).",
        None,
    ),
    "messages_dead_lettered": (
        "counter",
        "messages_dead_lettered",
        ("reason",),
        "Messages dead-lettered, by reason.",
        None,
    ),
    "messages_dropped": (
        "counter",
        "messages_dropped",
        (),
        "Messages dropped by the overflow policy (dead-lettered with reason dropped).",
        None,
    ),
    "batches": ("counter", "batches", ("reason",), "Batches cut, by flush reason.", None),
    "retries": ("counter", "retries", (), "Processor calls that were retries.", None),
    "splits": ("counter", "splits", (), "Batches split in halves to isolate failures.", None),
    "batch_size": (
        "histogram",
        "batch_size_messages",
        (),
        "Messages per batch cut.",
        BATCH_SIZE_BUCKETS,
    ),
    "batch_bytes": (
        "histogram",
        "batch_size_bytes",
        (),
        "Bytes per batch cut (when a byte trigger or sizer is configured).",
        BATCH_BYTES_BUCKETS,
    ),
    "call_duration": (
        "histogram",
        "call_duration_seconds",
        ("outcome",),
        "Duration of one processor call, by outcome (ok or error).",
        CALL_DURATION_BUCKETS,
    ),
    "latency": (
        "histogram",
        "latency_seconds",
        (),
        "Seconds from acceptance of the oldest message of a finished group to its success.",
        LATENCY_BUCKETS,
    ),
    "pending": ("gauge", "pending_messages", (), "Messages accepted, not yet in a call.", None),
    "in_flight": ("gauge", "in_flight_messages", (), "Messages in a running call.", None),
    "circuit_state": (
        "gauge",
        "circuit_state",
        (),
        "Circuit breaker state: 0 closed, 1 half_open, 2 open.",
        None,
    ),
    "downstream_unavailable": (
        "gauge",
        "downstream_unavailable",
        (),
        "1 while the downstream is unavailable (an outage holds batches), else 0.",
        None,
    ),
    "downstream_held": (
        "gauge",
        "downstream_held_messages",
        (),
        "Messages of batches held by an outage, waiting for the downstream.",
        None,
    ),
    "downstream_probes": (
        "counter",
        "downstream_probes",
        (),
        "Processor calls made while the downstream was unavailable.",
        None,
    ),
    "downstream_outages": ("counter", "downstream_outages", (), "Outages begun.", None),
}

# One set of instruments per (registry, namespace): prometheus-client refuses to register a name
# twice, and two processors sharing a registry should add up rather than fail.
# Keyed weakly by registry: a registry dropped by its owner takes its instruments with it.
_instruments: weakref.WeakKeyDictionary[Any, dict[str, dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)
_instruments_lock = threading.Lock()


class PrometheusMetrics:
    """Feeds prometheus-client instruments from a BatchProcessor; scrape them with ``serve()``.

    Choose it when Prometheus (or anything that scrapes its text format) watches your services.
    ``registry`` defaults to prometheus-client's global REGISTRY, which its own HTTP server and
    most frameworks already expose. Two PrometheusMetrics on the same registry and namespace share
    their instruments, so their counts add up. The exported names are in
    docs/observability.md; an unknown metric name raises KeyError (logged by the processor).
    """

    def __init__(self, registry: Any = None, namespace: str = "batchpunk") -> None:
        prometheus_client = require("prometheus_client", "prometheus", "PrometheusMetrics")
        if not isinstance(namespace, str) or not namespace.isidentifier():
            raise ValueError(
                f"namespace: expected an identifier like 'batchpunk', got {namespace!r}"
            )
        if registry is None:
            registry = prometheus_client.REGISTRY
        self.registry = registry
        self.namespace = namespace
        with _instruments_lock:
            by_namespace = _instruments.setdefault(registry, {})
            instruments = by_namespace.get(namespace)
            if instruments is None:
                instruments = _build(prometheus_client, registry, namespace)
                by_namespace[namespace] = instruments
        self._instruments = instruments
        # (name, label value) -> bound child, so the hot path skips labels()' lock and checks.
        self._children: dict[tuple[str, str | None], Any] = {}

    def _child(self, name: str, tags: Mapping[str, str] | None) -> Any:
        value = next(iter(tags.values())) if tags else None
        child = self._children.get((name, value))
        if child is None:
            try:
                metric = self._instruments[name]
            except KeyError:
                raise KeyError(
                    f"PrometheusMetrics: unknown metric {name!r}; expected one of "
                    f"{', '.join(sorted(self._instruments))}"
                ) from None
            labels = PROMETHEUS_METRICS[name][2]
            if labels:
                if not tags or set(tags) != set(labels):
                    raise ValueError(
                        f"PrometheusMetrics: metric {name!r} needs tags {list(labels)}, "
                        f"got {dict(tags or {})}"
                    )
                child = metric.labels(**tags)
            else:
                child = metric
            self._children[(name, value)] = child
        return child

    def increment(self, name: str, value: int = 1, tags: Mapping[str, str] | None = None) -> None:
        """Add ``value`` to the counter ``name``."""
        self._child(name, tags).inc(value)

    def timing(self, name: str, seconds: float, tags: Mapping[str, str] | None = None) -> None:
        """Observe one sample of the histogram ``name``."""
        self._child(name, tags).observe(seconds)

    def gauge(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        """Set the gauge ``name``."""
        self._child(name, tags).set(value)

    def __repr__(self) -> str:
        return f"PrometheusMetrics(namespace={self.namespace!r})"


def _build(prometheus_client: Any, registry: Any, namespace: str) -> dict[str, Any]:
    kinds = {
        "counter": prometheus_client.Counter,
        "histogram": prometheus_client.Histogram,
        "gauge": prometheus_client.Gauge,
    }
    instruments: dict[str, Any] = {}
    for name, (kind, exported, labels, help_text, buckets) in PROMETHEUS_METRICS.items():
        kwargs: dict[str, Any] = {"namespace": namespace, "registry": registry}
        if buckets is not None:
            kwargs["buckets"] = buckets
        instruments[name] = kinds[kind](exported, help_text, labels, **kwargs)
    return instruments


#: The pipeline's own counts exported at scrape time: stats key -> (name, kind, help).
_PIPELINE_SERIES: tuple[tuple[str, str, str, str], ...] = (
    ("read", "pipeline_read", "counter", "Envelopes read from the source."),
    ("acked", "pipeline_acked", "counter", "Envelopes acknowledged to the source."),
    ("nacked", "pipeline_nacked", "counter", "Envelopes returned to the source (nack)."),
    ("ack_errors", "pipeline_ack_errors", "counter", "Acknowledgements the source refused."),
    ("unfinished", "pipeline_unfinished", "gauge", "Envelopes read and not yet settled."),
)


def pipeline_exposition(stats: Mapping[str, Any], namespace: str = "batchpunk") -> str:
    """Prometheus text for a pipeline's ``get_stats()["pipeline"]`` (empty without one).

    The pipeline keeps these as plain counts, so they are rendered when scraped instead of
    being pushed through a collector; names are listed in docs/observability.md.
    """
    pipeline = stats.get("pipeline")
    if not isinstance(pipeline, Mapping):
        return ""
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> str:
        full = f"{namespace}_{name}" + ("_total" if kind == "counter" else "")
        lines.append(f"# HELP {full} {help_text}")
        lines.append(f"# TYPE {full} {kind}")
        return full

    for key, name, kind, help_text in _PIPELINE_SERIES:
        value = pipeline.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            lines.append(f"{family(name, kind, help_text)} {float(value)}")
    rejected = pipeline.get("rejected")
    if isinstance(rejected, Mapping):
        full = family(
            "pipeline_rejected", "counter", "Envelopes dead-lettered before the engine, by reason."
        )
        for reason in (
            "malformed",
            "redelivered",
            *sorted(set(rejected) - {"malformed", "redelivered"}),
        ):
            label = str(reason).replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'{full}{{reason="{label}"}} {float(rejected.get(reason, 0))}')
    connected = pipeline.get("source_connected")
    if isinstance(connected, bool):
        full = family("pipeline_source_connected", "gauge", "1 while the source is connected.")
        lines.append(f"{full} {1.0 if connected else 0.0}")
    return "\n".join(lines) + "\n" if lines else ""
