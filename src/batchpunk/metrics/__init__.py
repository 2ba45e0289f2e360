"""Metrics: the engine's observer, fixed-memory percentiles, exporters and a live view.

Import cost matters here: the engine imports this package, so nothing below imports an optional
dependency at module level. PrometheusMetrics, serve (aiohttp; prometheus-client for /metrics)
and OpenTelemetryMetrics import theirs when first used, and fail with the pip command to run
when it is missing. The live terminal view is in :mod:`batchpunk.metrics.live`.
"""

from batchpunk.metrics._histogram import LogHistogram
from batchpunk.metrics._logging import LOG_FIELDS, JsonFormatter, KeyValueFormatter, log_extra
from batchpunk.metrics._observer import CIRCUIT_STATES, MetricsCollector, Observer
from batchpunk.metrics._otel import OTEL_METRICS, OpenTelemetryMetrics
from batchpunk.metrics._prometheus import PROMETHEUS_METRICS, PrometheusMetrics
from batchpunk.metrics._recent import RecentDeadLetters
from batchpunk.metrics._recording import RecordingCollector
from batchpunk.metrics._server import MetricsServer, serve, stats_json

__all__ = [
    # the collector seam and what the engine calls
    "MetricsCollector",
    "Observer",
    "CIRCUIT_STATES",
    "LogHistogram",
    "RecordingCollector",
    # exporters
    "PrometheusMetrics",
    "PROMETHEUS_METRICS",
    "serve",
    "MetricsServer",
    "stats_json",
    "RecentDeadLetters",
    "OpenTelemetryMetrics",
    "OTEL_METRICS",
    # structured logging
    "LOG_FIELDS",
    "JsonFormatter",
    "KeyValueFormatter",
    "log_extra",
]
