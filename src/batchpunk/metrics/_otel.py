"""A MetricsCollector on the OpenTelemetry metrics API: the same instruments as Prometheus.

Only opentelemetry-api is needed (extra ``otel``); the application chooses the SDK, readers and
exporters, and hands in a Meter. Gauges are observable: the last value set is reported when the
reader collects, which is how OpenTelemetry expects sampled state to be exposed.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from batchpunk.errors import require
from batchpunk.metrics._prometheus import (
    BATCH_BYTES_BUCKETS,
    BATCH_SIZE_BUCKETS,
    CALL_DURATION_BUCKETS,
    LATENCY_BUCKETS,
)

__all__ = ["OTEL_METRICS", "OpenTelemetryMetrics"]

#: Collector name -> (kind, instrument name, unit, description, bucket advice).
OTEL_METRICS: Mapping[str, tuple[str, str, str, str, tuple[float, ...] | None]] = {
    "messages_received": (
        "counter",
        "batchpunk.messages_received",
        "{message}",
        "Messages accepted.",
        None,
    ),
    "messages_processed": (
        "counter",
        "batchpunk.messages_processed",
        "{message}",
        "Messages whose batch succeeded.",
        None,
    ),
    "messages_failed": (
        "counter",
        "batchpunk.messages_failed",
        "{message}",
        "Messages dead-lettered because processing failed.",
        None,
    ),
    "messages_dead_lettered": (
        "counter",
        "batchpunk.messages_dead_lettered",
        "{message}",
        "Messages dead-lettered, by reason.",
        None,
    ),
    "messages_dropped": (
        "counter",
        "batchpunk.messages_dropped",
        "{message}",
        "Messages dropped by the overflow policy.",
        None,
    ),
    "batches": ("counter", "batchpunk.batches", "{batch}", "Batches cut, by flush reason.", None),
    "retries": (
        "counter",
        "batchpunk.retries",
        "{call}",
        "Processor calls that were retries.",
        None,
    ),
    "splits": ("counter", "batchpunk.splits", "{split}", "Batches split in halves.", None),
    "batch_size": (
        "histogram",
        "batchpunk.batch_size",
        "{message}",
        "Messages per batch cut.",
        tuple(float(b) for b in BATCH_SIZE_BUCKETS),
    ),
    "batch_bytes": (
        "histogram",
        "batchpunk.batch_bytes",
        "By",
        "Bytes per batch cut.",
        BATCH_BYTES_BUCKETS,
    ),
    "call_duration": (
        "histogram",
        "batchpunk.call_duration",
        "s",
        "Duration of one processor call, by outcome.",
        CALL_DURATION_BUCKETS,
    ),
    "latency": (
        "histogram",
        "batchpunk.latency",
        "s",
        "Seconds from acceptance of a finished group's oldest message to its success.",
        LATENCY_BUCKETS,
    ),
    "pending": ("gauge", "batchpunk.pending", "{message}", "Messages not yet in a call.", None),
    "in_flight": ("gauge", "batchpunk.in_flight", "{message}", "Messages in a running call.", None),
    "circuit_state": (
        "gauge",
        "batchpunk.circuit_state",
        "1",
        "Circuit breaker state: 0 closed, 1 half_open, 2 open.",
        None,
    ),
    "downstream_unavailable": (
        "gauge",
        "batchpunk.downstream.unavailable",
        "1",
        "1 while the downstream is unavailable (an outage holds batches), else 0.",
        None,
    ),
    "downstream_held": (
        "gauge",
        "batchpunk.downstream.held",
        "{message}",
        "Messages of batches held by an outage.",
        None,
    ),
    "downstream_probes": (
        "counter",
        "batchpunk.downstream.probes",
        "{call}",
        "Processor calls made while the downstream was unavailable.",
        None,
    ),
    "downstream_outages": (
        "counter",
        "batchpunk.downstream.outages",
        "{outage}",
        "Outages begun.",
        None,
    ),
}


class OpenTelemetryMetrics:
    """Feeds OpenTelemetry instruments created on ``meter`` from a BatchProcessor.

    Choose it when your services already export OpenTelemetry metrics (OTLP to a collector, or
    the SDK's Prometheus exporter). Build it with ``metrics.get_meter("batchpunk")`` or a meter
    of your own MeterProvider. An unknown metric name raises KeyError (logged by the processor).
    """

    def __init__(self, meter: Any) -> None:
        otel_metrics = require("opentelemetry.metrics", "otel", "OpenTelemetryMetrics")
        self._observation = otel_metrics.Observation
        self.meter = meter
        self._instruments: dict[str, Any] = {}
        self._gauge_values: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        histogram_advice = (
            "explicit_bucket_boundaries_advisory"
            in inspect.signature(meter.create_histogram).parameters
        )
        for name, (kind, instrument, unit, description, buckets) in OTEL_METRICS.items():
            if kind == "counter":
                self._instruments[name] = meter.create_counter(
                    instrument, unit=unit, description=description
                )
            elif kind == "histogram":
                extra: dict[str, Any] = {}
                if histogram_advice and buckets is not None:
                    extra["explicit_bucket_boundaries_advisory"] = buckets
                self._instruments[name] = meter.create_histogram(
                    instrument, unit=unit, description=description, **extra
                )
            else:
                values: dict[tuple[tuple[str, str], ...], float] = {}
                self._gauge_values[name] = values
                self._instruments[name] = meter.create_observable_gauge(
                    instrument,
                    callbacks=[self._observer_of(values)],
                    unit=unit,
                    description=description,
                )

    def _observer_of(self, values: dict[tuple[tuple[str, str], ...], float]) -> Any:
        observation = self._observation

        def observe(options: Any) -> Iterable[Any]:
            return [observation(value, dict(tags)) for tags, value in list(values.items())]

        return observe

    def _instrument(self, name: str) -> Any:
        try:
            return self._instruments[name]
        except KeyError:
            raise KeyError(
                f"OpenTelemetryMetrics: unknown metric {name!r}; expected one of "
                f"{', '.join(sorted(self._instruments))}"
            ) from None

    def increment(self, name: str, value: int = 1, tags: Mapping[str, str] | None = None) -> None:
        """Add ``value`` to the counter ``name``, with ``tags`` as attributes."""
        self._instrument(name).add(value, tags)

    def timing(self, name: str, seconds: float, tags: Mapping[str, str] | None = None) -> None:
        """Record one sample of the histogram ``name``."""
        self._instrument(name).record(seconds, tags)

    def gauge(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        """Remember ``value`` as the gauge ``name``; reported at the next collection."""
        values = self._gauge_values.get(name)
        if values is None:
            raise KeyError(
                f"OpenTelemetryMetrics: {name!r} is not a gauge; expected one of "
                f"{', '.join(sorted(self._gauge_values))}"
            )
        values[tuple(sorted(tags.items())) if tags else ()] = value

    def observe_pipeline(self, pipeline: Any) -> None:
        """Also export a pipeline's own counts, read from its ``get_stats()`` at collection.

        ``batchpunk.pipeline.read``, ``.acked``, ``.nacked``, ``.ack_errors`` and ``.rejected``
        (attribute ``reason``: malformed, redelivered, ...) as observable counters, and
        ``.unfinished`` as an observable gauge: the pipeline keeps these as plain counts, so
        they are read when the reader collects rather than pushed. Call it from the pipeline's
        event loop; readers collecting on another thread (the periodic exporting reader) get
        fresh counts, a collection on the loop's own thread gets the last ones read.
        """
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()
        cache: dict[str, Any] = {"at": -1.0, "counts": {}}
        lock = threading.Lock()

        def counts() -> Mapping[str, Any]:
            with lock:  # one get_stats() per collection, not one per instrument
                if time.monotonic() - cache["at"] > 0.2 and threading.get_ident() != loop_thread:
                    future = asyncio.run_coroutine_threadsafe(pipeline.get_stats(), loop)
                    stats = future.result(timeout=5.0)
                    cache["counts"] = stats.get("pipeline") or {}
                    cache["at"] = time.monotonic()
                return dict(cache["counts"])

        observation = self._observation

        def counter(key: str) -> Any:
            def observe(options: Any) -> Iterable[Any]:
                value = counts().get(key)
                return [observation(value)] if isinstance(value, int | float) else []

            return observe

        def rejected(options: Any) -> Iterable[Any]:
            by_reason = counts().get("rejected") or {}
            return [observation(n, {"reason": str(r)}) for r, n in by_reason.items()]

        meter = self.meter
        for key, description in (
            ("read", "Envelopes read from the source."),
            ("acked", "Envelopes acknowledged to the source."),
            ("nacked", "Envelopes returned to the source (nack)."),
            ("ack_errors", "Acknowledgements the source refused."),
        ):
            meter.create_observable_counter(
                f"batchpunk.pipeline.{key}",
                callbacks=[counter(key)],
                unit="{message}",
                description=description,
            )
        meter.create_observable_counter(
            "batchpunk.pipeline.rejected",
            callbacks=[rejected],
            unit="{message}",
            description="Envelopes dead-lettered before the engine, by reason.",
        )
        meter.create_observable_gauge(
            "batchpunk.pipeline.unfinished",
            callbacks=[counter("unfinished")],
            unit="{message}",
            description="Envelopes read and not yet settled.",
        )

    def __repr__(self) -> str:
        return f"OpenTelemetryMetrics(meter={getattr(self.meter, 'name', self.meter)!r})"
