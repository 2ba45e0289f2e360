"""Observer: forwarded metric names, percentiles, history ring, throughput, failing collectors."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
from collections.abc import Mapping

import pytest

from batchpunk.metrics import MetricsCollector, Observer, RecordingCollector


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def exact_quantile(samples: list[float], q: float) -> float:
    """Nearest-rank quantile, the definition the observer's percentiles approximate."""
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def test_every_event_is_forwarded_under_its_documented_name_and_tags() -> None:
    """Each Observer call reaches the collector under the names and tags the docs list."""
    collector = RecordingCollector()
    observer = Observer(collector, clock=FakeClock())
    observer.received(10)
    observer.batch_cut(10, 400, "size")
    observer.batch_cut(3, None, "timeout")
    observer.call_finished(10, 0.05, True)
    observer.call_finished(3, 0.2, False)
    observer.retried()
    observer.split()
    observer.processed(10, 0.3)
    observer.dead_lettered(2, "failed")
    observer.dead_lettered(1, "dropped")
    observer.dead_lettered(4, "expired")
    observer.gauges(5, 3, "half_open")

    assert collector.total("messages_received") == 10
    assert collector.total("messages_processed") == 10
    assert collector.total("messages_failed") == 2
    assert collector.total("messages_dropped") == 1
    assert collector.total("messages_dead_lettered") == 7
    assert collector.total("messages_dead_lettered", reason="expired") == 4
    assert collector.total("batches", reason="size") == 1
    assert collector.total("batches", reason="timeout") == 1
    assert collector.total("retries") == 1
    assert collector.total("splits") == 1
    assert collector.samples("batch_size") == [10, 3]
    assert collector.samples("batch_bytes") == [400]
    assert collector.samples("call_duration", outcome="ok") == [0.05]
    assert collector.samples("call_duration", outcome="error") == [0.2]
    assert collector.samples("latency") == [0.3]
    assert collector.gauges == {
        ("pending", ()): 5,
        ("in_flight", ()): 3,
        ("circuit_state", ()): 1,
    }


@pytest.mark.parametrize(("state", "value"), [("closed", 0), ("half_open", 1), ("open", 2)])
def test_circuit_state_gauge_encodes_each_state(state: str, value: int) -> None:
    """circuit_state is 0 closed, 1 half_open, 2 open."""
    collector = RecordingCollector()
    Observer(collector).gauges(0, 0, state)
    assert collector.gauges[("circuit_state", ())] == value


def test_recording_collector_satisfies_the_protocol() -> None:
    """The shipped RecordingCollector is a MetricsCollector (runtime-checkable protocol)."""
    assert isinstance(RecordingCollector(), MetricsCollector)


def test_snapshot_percentiles_are_within_one_percent_of_exact_message_percentiles() -> None:
    """Latency percentiles weight each group by its message count and stay within 1 %."""
    rng = random.Random(11)
    observer = Observer(clock=FakeClock())
    per_message: list[float] = []
    calls: list[float] = []
    for _ in range(3000):
        n = rng.randint(1, 50)
        latency = rng.lognormvariate(-3, 1)
        observer.processed(n, latency)
        per_message.extend([latency] * n)
        seconds = rng.expovariate(100.0)
        observer.call_finished(n, seconds, True)
        calls.append(seconds)
    snap = observer.snapshot()
    for key, samples in (("latency", per_message), ("call_latency", calls)):
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            exact = exact_quantile(samples, q)
            assert abs(snap[key][name] - exact) <= 0.01 * exact * (1 + 1e-9), (key, name)
        assert snap[key]["max"] == max(samples)


def test_empty_snapshot_has_none_percentiles_and_zero_rates() -> None:
    """Before any event percentiles are None, the mean batch size and throughputs are zero."""
    snap = Observer(clock=FakeClock()).snapshot(history=True)
    assert snap["latency"] == {"p50": None, "p90": None, "p99": None, "max": None}
    assert snap["call_latency"]["p99"] is None
    assert snap["mean_batch_size"] == 0.0
    assert snap["throughput"] == {"1m": 0.0, "5m": 0.0, "15m": 0.0}
    assert snap["history"] == []


def test_mean_batch_size_and_batch_size_distribution() -> None:
    """mean_batch_size is messages cut over batches cut; batch_size gives its percentiles."""
    observer = Observer(clock=FakeClock())
    for size in (10, 20, 30, 1000):
        observer.batch_cut(size, None, "size")
    snap = observer.snapshot()
    assert snap["mean_batch_size"] == 265.0
    assert snap["batch_size"]["max"] == 1000
    assert abs(snap["batch_size"]["p50"] - 20) <= 0.2


def test_history_closes_one_record_per_interval_with_that_intervals_counts() -> None:
    """Each interval's record holds exactly the events of that interval and its percentiles."""
    clock = FakeClock(0.0)
    observer = Observer(clock=clock)
    observer.received(5)
    observer.batch_cut(5, None, "size")
    observer.processed(5, 0.1)
    clock.advance(1.0)
    observer.received(7)
    observer.batch_cut(3, None, "timeout")
    observer.batch_cut(4, None, "timeout")
    observer.dead_lettered(2, "failed")
    observer.processed(5, 0.4)
    clock.advance(1.5)
    history = observer.snapshot(history=True)["history"]
    assert [r["start"] for r in history] == [0.0, 1.0]
    first, second = history
    assert (first["received"], first["processed"], first["batches"]) == (5, 5, 1)
    assert first["mean_batch_size"] == 5.0
    assert first["latency_p50"] == first["latency_p99"] == 0.1
    assert (second["received"], second["processed"], second["dead_lettered"]) == (7, 5, 2)
    assert second["batches"] == 2
    assert second["mean_batch_size"] == 3.5
    assert second["latency_p90"] == 0.4
    assert set(first) == {
        "start",
        "time",
        "received",
        "processed",
        "dead_lettered",
        "batches",
        "mean_batch_size",
        "latency_p50",
        "latency_p90",
        "latency_p99",
    }


def test_idle_intervals_become_empty_records_and_the_ring_stays_bounded() -> None:
    """A quiet gap yields empty records, and however long it is the ring keeps ``keep`` records."""
    clock = FakeClock(0.0)
    observer = Observer(interval=1.0, keep=10, clock=clock)
    observer.received(1)
    clock.advance(4.2)
    observer.received(2)
    history = observer.snapshot(history=True)["history"]
    assert [r["start"] for r in history] == [0.0, 1.0, 2.0, 3.0]
    assert [r["received"] for r in history] == [1, 0, 0, 0]
    assert history[1]["latency_p50"] is None
    clock.advance(1_000_000.0)
    observer.received(3)
    history = observer.snapshot(history=True)["history"]
    assert len(history) == 10
    starts = [r["start"] for r in history]
    assert starts == sorted(starts)
    assert starts[-1] == 1_000_003.0
    assert all(b - a == 1.0 for a, b in itertools.pairwise(starts))
    assert sum(r["received"] for r in history) == 0  # the 2 rolled out; the 3 is still open
    clock.advance(1.0)
    assert observer.snapshot(history=True)["history"][-1]["received"] == 3
    for _ in range(100):
        clock.advance(1.0)
        observer.received(1)
    assert len(observer.snapshot(history=True)["history"]) == 10


def test_throughput_windows_count_processed_messages_per_second() -> None:
    """Throughput over 1, 5 and 15 minutes divides processed messages by the window covered."""
    clock = FakeClock(0.0)
    observer = Observer(clock=clock)
    for _ in range(600):  # ten minutes at 100 msg/s
        observer.processed(100, 0.01)
        clock.advance(1.0)
    for _ in range(60):  # then a minute at 10 msg/s
        observer.processed(10, 0.01)
        clock.advance(1.0)
    rates = observer.snapshot()["throughput"]
    assert rates["1m"] == pytest.approx(10.0, rel=0.05)
    assert rates["5m"] == pytest.approx((240 * 100 + 60 * 10) / 300, rel=0.05)
    assert rates["15m"] == pytest.approx((600 * 100 + 60 * 10) / 660, rel=0.05)


def test_throughput_of_a_short_ring_covers_what_it_keeps() -> None:
    """With a ring shorter than a window the rate is over the time the ring covers."""
    clock = FakeClock(0.0)
    observer = Observer(keep=5, clock=clock)
    for _ in range(100):
        observer.processed(20, 0.01)
        clock.advance(1.0)
    assert observer.snapshot()["throughput"]["15m"] == pytest.approx(20.0, rel=0.05)


class RaisingCollector:
    """A collector whose every method fails."""

    def __init__(self) -> None:
        self.calls = 0

    def increment(self, name: str, value: int = 1, tags: Mapping[str, str] | None = None) -> None:
        self.calls += 1
        raise RuntimeError("statsd is down")

    def timing(self, name: str, seconds: float, tags: Mapping[str, str] | None = None) -> None:
        self.calls += 1
        raise RuntimeError("statsd is down")

    def gauge(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        self.calls += 1
        raise RuntimeError("statsd is down")


def test_a_raising_collector_is_logged_once_a_minute_and_never_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Collector errors are swallowed, counted, and logged at most once per minute."""
    clock = FakeClock(0.0)
    collector = RaisingCollector()
    observer = Observer(collector, clock=clock)
    with caplog.at_level(logging.ERROR, logger="batchpunk"):
        for _ in range(50):
            observer.received(1)
            observer.processed(1, 0.01)
            clock.advance(0.5)  # 25 s in all
        assert len(caplog.records) == 1
        clock.advance(60.0)
        observer.gauges(1, 1, "closed")
    assert len(caplog.records) == 2
    assert "statsd is down" in caplog.records[0].getMessage()
    assert "RaisingCollector" in caplog.records[0].getMessage()
    snap = observer.snapshot(history=True)
    assert snap["collector_errors"] == collector.calls == 153
    assert sum(r["processed"] for r in snap["history"]) == 50


class AsyncCollector:
    """A collector with async methods that record after yielding to the loop."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.seen: list[tuple[str, float]] = []

    async def increment(
        self, name: str, value: int = 1, tags: Mapping[str, str] | None = None
    ) -> None:
        await asyncio.sleep(0)
        if self.fail:
            raise ConnectionError("exporter unreachable")
        self.seen.append((name, value))

    async def timing(
        self, name: str, seconds: float, tags: Mapping[str, str] | None = None
    ) -> None:
        await asyncio.sleep(0)
        self.seen.append((name, seconds))

    async def gauge(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        await asyncio.sleep(0)
        self.seen.append((name, value))


async def test_async_collector_methods_are_scheduled_without_being_awaited() -> None:
    """An async collector's coroutines run on the loop after the call returns, and drain waits."""
    collector = AsyncCollector()
    observer = Observer(collector)
    observer.received(4)
    observer.processed(4, 0.5)
    observer.gauges(2, 1, "open")
    assert collector.seen == []  # scheduled, not awaited by the caller
    await observer.drain()
    assert sorted(collector.seen) == sorted(
        [
            ("messages_received", 4),
            ("messages_processed", 4),
            ("latency", 0.5),
            ("pending", 2),
            ("in_flight", 1),
            ("circuit_state", 2),
        ]
    )


async def test_async_collector_errors_are_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An async collector method that raises is logged once and counted, never propagated."""
    observer = Observer(AsyncCollector(fail=True))
    with caplog.at_level(logging.ERROR, logger="batchpunk"):
        for _ in range(5):
            observer.received(1)
        await observer.drain()
    assert len(caplog.records) == 1
    assert "exporter unreachable" in caplog.records[0].getMessage()
    assert observer.snapshot()["collector_errors"] == 5


def test_async_collector_without_a_running_loop_is_counted_not_raised() -> None:
    """Outside an event loop an async collector's call is dropped with an error, not raised."""
    observer = Observer(AsyncCollector())
    observer.received(1)
    assert observer.snapshot()["collector_errors"] == 1


def test_collector_missing_a_method_is_refused_by_name() -> None:
    """A collector lacking gauge() fails at construction with a TypeError naming the method."""

    class Partial:
        def increment(self, name: str, value: int = 1, tags: object = None) -> None: ...

        def timing(self, name: str, seconds: float, tags: object = None) -> None: ...

    with pytest.raises(TypeError, match="gauge"):
        Observer(Partial())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"interval": 0}, "interval"), ({"interval": -1.0}, "interval"), ({"keep": 0}, "keep")],
)
def test_bad_interval_or_keep_names_the_field(kwargs: dict[str, float], field: str) -> None:
    """A non-positive interval or keep raises ValueError naming the field."""
    with pytest.raises(ValueError, match=field):
        Observer(**kwargs)  # type: ignore[arg-type]
