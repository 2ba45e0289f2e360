"""LiveView: rich frames on a terminal, plain lines otherwise, robust to a failing stats call."""

from __future__ import annotations

import asyncio
import io
import re
import sys
from typing import Any

import pytest
from rich.console import Console

from batchpunk.metrics.live import LiveView, format_duration, format_rate, summary_line


def fake_stats() -> dict[str, Any]:
    """A stats dict shaped like the engine's, with a distinctive value for each field shown."""
    return {
        "state": "running",
        "received": 123_456,
        "processed": 120_000,
        "failed": 7,
        "dead_lettered": 9,
        "dropped": 2,
        "batches": 321,
        "retries": 17,
        "splits": 5,
        "pending": 2_500,
        "in_flight": 1_000,
        "current_batch_size": 450,
        "batches_running": 3,
        "batches_waiting": 4,
        "flush_reasons": {"size": 300, "timeout": 20, "pressure": 1},
        "dead_letter_reasons": {"failed": 7, "dropped": 2},
        "circuit": "half_open",
        "config": {"max_pending": 10_000},
        "latency": {"p50": 0.0123, "p90": 0.05, "p99": 0.25, "max": 1.5},
        "call_latency": {"p50": 0.002, "p90": 0.004, "p99": 0.009, "max": 0.02},
        "batch_size": {"p50": 400.0, "p90": 990.0, "p99": 1000.0, "max": 1000.0},
        "mean_batch_size": 373.8,
        "throughput": {"1m": 4_321.0, "5m": 3_000.0, "15m": 2_000.0},
    }


class FakeStats:
    """An async stats function whose processed count grows at each call."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls = 0
        self.fail_after = fail_after

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("processor is gone")
        stats = fake_stats()
        stats["processed"] += 1000 * self.calls
        return stats


def terminal() -> tuple[Console, io.StringIO]:
    """A rich console that believes it is a terminal, writing to a buffer."""
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=True, width=110, color_system=None), buffer


async def test_rich_view_shows_every_section_of_the_stats() -> None:
    """On a terminal the frame shows throughput, buffer, batch sizes, reasons, failures, circuit."""
    console, buffer = terminal()
    stats = FakeStats()
    async with LiveView(stats, refresh_per_second=50, console=console, title="unit") as view:
        await asyncio.sleep(0.1)
    assert view.frames >= 3
    assert not view.rich  # stopped on exit
    text = buffer.getvalue()
    for expected in (
        "unit",
        "half_open",
        "4.3k msg/s",  # 1m throughput
        "2,500",  # pending
        "1,000",  # in flight
        "pressure",
        "timeout",
        "374",  # mean batch size, rounded
        "p99 1,000",  # batch size p99
        "12.3ms",  # latency p50
        "1.50s",  # latency max
        "retries",
        "17",
        "failed",
        "dropped",
    ):
        assert expected in text, expected
    assert re.search(r"running +3 batches", text)
    assert re.search(r"waiting +4 batches", text)


async def test_plain_lines_when_the_console_is_not_a_terminal() -> None:
    """A non-terminal console gets one summary line per plain_every and a final line."""
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False)
    async with LiveView(FakeStats(), console=console, plain_every=0.05) as view:
        await asyncio.sleep(0.18)
        assert not view.rich
    lines = buffer.getvalue().splitlines()
    assert len(lines) >= 4  # the first, at least two periodic, the final
    assert lines[-1].endswith("(final)")
    assert "pending 2,500" in lines[0]
    assert "batches 321 [pressure=1 size=300 timeout=20]" in lines[0]
    assert "dead 9 [dropped=2 failed=7]" in lines[0]
    assert "circuit half_open" in lines[0]
    assert "\x1b[" not in buffer.getvalue()  # no escape codes in logs


async def test_plain_lines_without_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    """When rich cannot be imported the view still works, printing plain lines to stream."""
    monkeypatch.setitem(sys.modules, "rich.console", None)
    stream = io.StringIO()
    async with LiveView(FakeStats(), stream=stream, plain_every=0.05) as view:
        await asyncio.sleep(0.07)
    assert not view.rich
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 2
    assert lines[0].startswith("batchpunk  processed 121,000")


async def test_a_failing_stats_call_is_shown_not_raised() -> None:
    """When get_stats raises the view keeps the last stats, shows the error, and exits cleanly."""
    stream = io.StringIO()
    async with LiveView(FakeStats(fail_after=1), stream=stream, plain_every=0.02) as view:
        await asyncio.sleep(0.06)
    assert view.last_stats is not None
    lines = stream.getvalue().splitlines()
    assert "stats error" not in lines[0]
    assert "[stats error: RuntimeError: processor is gone]" in lines[-1]


async def test_rich_view_shows_a_failing_stats_call_in_its_header() -> None:
    """The rich frame carries the stats error in red in its header line."""
    console, buffer = terminal()
    async with LiveView(FakeStats(fail_after=1), console=console, refresh_per_second=50):
        await asyncio.sleep(0.05)
    assert "stats error: RuntimeError: processor is gone" in buffer.getvalue()


def test_now_rate_comes_from_the_processed_delta() -> None:
    """The 'now' rate is the processed count's change over the frames of the last second."""
    view = LiveView(FakeStats(), refresh_per_second=4)
    assert view._rate(10.0, 0) == 0.0
    assert view._rate(10.5, 500) == 1000.0
    assert view._rate(11.0, 1500) == 1500.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"refresh_per_second": 0}, "refresh_per_second"),
        ({"plain_every": -1}, "plain_every"),
    ],
)
def test_bad_settings_name_the_field(kwargs: dict[str, float], field: str) -> None:
    """Non-positive refresh settings raise ValueError naming the field."""
    with pytest.raises(ValueError, match=field):
        LiveView(FakeStats(), **kwargs)  # type: ignore[arg-type]


def test_stats_must_be_callable() -> None:
    """Passing a stats dict instead of the get_stats function is a TypeError naming stats."""
    with pytest.raises(TypeError, match="stats"):
        LiveView(fake_stats())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0.00085, "850us"), (0.0123, "12.3ms"), (4.2, "4.20s"), (185, "3m05s")],
)
def test_format_duration_picks_a_readable_unit(seconds: float | None, text: str) -> None:
    """Durations print in us, ms, s or minutes as fits."""
    assert format_duration(seconds) == text


def test_format_rate_and_summary_of_an_empty_dict() -> None:
    """Rates get k/M suffixes, and an empty stats dict still makes a summary line."""
    assert format_rate(1_234_567) == "1.2M"
    assert format_rate(999.0) == "999.0"
    assert format_rate(None) == "-"
    assert summary_line({}).startswith("processed 0 (-/s 1m)")


async def test_a_drawing_error_stops_refreshing_without_breaking_the_block(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """If a frame fails to draw, the view logs it and stops refreshing; the block is unharmed."""

    class Broken(LiveView):
        def render(self, stats: Any, rate: float) -> Any:
            if self.frames > 1:
                raise RuntimeError("drawing bug")
            return super().render(stats, rate)

    console, _ = terminal()
    view = Broken(FakeStats(), console=console, refresh_per_second=50)
    async with view:
        await asyncio.sleep(0.1)
        reached = True
    assert reached
    assert "live view stopped refreshing" in caplog.text
    assert "failed to draw its final frame" in caplog.text


class TtyBuffer(io.StringIO):
    """A buffer that says it is a terminal."""

    def isatty(self) -> bool:
        return True


async def test_plain_lines_come_every_30_s_off_a_terminal_and_every_second_on_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without an explicit plain_every, a pipe or a log gets a line every 30 s (not one a
    second forever), while a terminal without rich keeps one a second."""
    monkeypatch.setitem(sys.modules, "rich.console", None)
    async with LiveView(FakeStats(), stream=io.StringIO()) as logged:
        pass
    async with LiveView(FakeStats(), stream=TtyBuffer()) as shown:
        pass
    assert logged.plain_every == 30.0
    assert shown.plain_every == 1.0


async def test_plain_lines_go_to_a_logger_when_given_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With log=, each plain line is an INFO record with reason "summary", the last one marked
    final, and nothing is written to the stream."""
    import logging

    stream = io.StringIO()
    log = logging.getLogger("batchpunk.live.test")
    with caplog.at_level(logging.INFO, logger="batchpunk.live.test"):
        async with LiveView(FakeStats(), stream=stream, log=log, plain_every=0.05):
            await asyncio.sleep(0.07)
    records = [r for r in caplog.records if r.name == "batchpunk.live.test"]
    assert len(records) >= 2
    assert all(getattr(r, "reason", None) == "summary" for r in records)
    assert records[-1].getMessage().endswith("(final)")
    assert stream.getvalue() == ""


@pytest.mark.parametrize(
    ("url", "message"),
    [("ftp://host/stats", "url"), ("http://127.0.0.1:1", "unreachable")],
    ids=["scheme", "closed-port"],
)
async def test_remote_stats_names_a_bad_or_unreachable_url(url: str, message: str) -> None:
    """remote_stats refuses a non-HTTP URL at once and turns a refused connection into a
    ConnectionError naming the /stats URL."""
    from batchpunk.metrics.live import remote_stats

    if message == "url":
        with pytest.raises(ValueError, match="url"):
            remote_stats(url)
        return
    stats = remote_stats(url, timeout=2.0)
    with pytest.raises(ConnectionError, match=r"http://127\.0\.0\.1:1/stats unreachable"):
        await stats()
