"""A MetricsCollector on the OpenTelemetry metrics API: the same instruments as Prometheus.

Only opentelemetry-api is needed (extra ``otel``); the application chooses the SDK, readers and
exporters, and hands in a Meter. Gauges are observable: the last value set is reported when the
reader collects, which is how OpenTelemetry expects sampled state to be exposed.
"""

from __future__ import annotations

import inspect
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

    def __repr__(self) -> str:
        return f"OpenTelemetryMetrics(meter={getattr(self.meter, 'name', self.meter)!r})"
