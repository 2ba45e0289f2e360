"""A collector that remembers every call: for tests, yours and ours, without an exporter."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["RecordingCollector"]

#: A metric name with its tags, sorted: the key of RecordingCollector's dicts.
MetricKey = tuple[str, tuple[tuple[str, str], ...]]


def _key(name: str, tags: Mapping[str, str] | None) -> MetricKey:
    return name, tuple(sorted(tags.items())) if tags else ()


class RecordingCollector:
    """Keeps counter totals, timing samples and last gauge values, keyed by name and tags.

    Use it in tests to assert what a processor reported, e.g.
    ``collector.total("messages_dead_lettered", reason="failed")``; every call is also kept in
    order in ``calls``. Memory grows with every call, so it is not for production.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float, dict[str, str] | None]] = []
        self.counters: dict[MetricKey, int] = {}
        self.timings: dict[MetricKey, list[float]] = {}
        self.gauges: dict[MetricKey, float] = {}

    def increment(self, name: str, value: int = 1, tags: Mapping[str, str] | None = None) -> None:
        """Add ``value`` to the counter ``name`` with ``tags``."""
        self.calls.append(("increment", name, value, dict(tags) if tags else None))
        key = _key(name, tags)
        self.counters[key] = self.counters.get(key, 0) + value

    def timing(self, name: str, seconds: float, tags: Mapping[str, str] | None = None) -> None:
        """Keep one sample of ``name`` with ``tags``."""
        self.calls.append(("timing", name, seconds, dict(tags) if tags else None))
        self.timings.setdefault(_key(name, tags), []).append(seconds)

    def gauge(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        """Remember ``value`` as the gauge ``name`` with ``tags``."""
        self.calls.append(("gauge", name, value, dict(tags) if tags else None))
        self.gauges[_key(name, tags)] = value

    def total(self, name: str, **tags: str) -> int:
        """The counter ``name`` summed over every tag set that includes ``tags``."""
        wanted = set(tags.items())
        return sum(
            value
            for (key_name, key_tags), value in self.counters.items()
            if key_name == name and wanted <= set(key_tags)
        )

    def samples(self, name: str, **tags: str) -> list[float]:
        """Every timing sample of ``name`` whose tags include ``tags``, in recording order."""
        wanted = set(tags.items())
        return [
            value
            for method, metric, value, metric_tags in self.calls
            if method == "timing" and metric == name and wanted <= set((metric_tags or {}).items())
        ]

    def __repr__(self) -> str:
        return f"RecordingCollector(calls={len(self.calls)})"
