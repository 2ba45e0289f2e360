"""Metrics: the engine's observer, fixed-memory percentiles, exporters and a live view.

Import cost matters here: the engine imports this package, so nothing below imports an optional
dependency at module level. PrometheusMetrics, serve and OpenTelemetryMetrics import theirs when
first used, and fail with the pip command to run when it is missing.
"""

from batchpunk.metrics._histogram import LogHistogram
from batchpunk.metrics._observer import CIRCUIT_STATES, MetricsCollector, Observer
from batchpunk.metrics._recording import RecordingCollector

__all__ = [
    "MetricsCollector",
    "Observer",
    "RecordingCollector",
    "LogHistogram",
    "CIRCUIT_STATES",
]
