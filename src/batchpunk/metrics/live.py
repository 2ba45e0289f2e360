"""A live terminal view of a running processor: is it keeping up, why are batches cut, what fails.

``async with LiveView(processor.get_stats): ...`` redraws a rich dashboard a few times a second
while the block runs, and leaves the last frame on screen. Without rich (the ``cli`` extra) it
prints one plain summary line per second; when the output is not a terminal (a pipe, a CI log,
a container's log) one line every 30 seconds, so logs stay readable, optionally as a record on a
logger (``log=``) so that it takes the process's log format (JSON, say).

Cost: each frame is one ``get_stats()`` call (no history) and one render on the event loop, a
few hundred microseconds; bench/live_view.py measures the engine with and without the view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from batchpunk.metrics._health import downstream_line

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live
    from rich.text import Text

__all__ = ["LiveView", "format_duration", "format_rate", "remote_stats", "summary_line"]

logger = logging.getLogger("batchpunk")

_SPARKS = "▁▂▃▄▅▆▇█"
_CIRCUIT_STYLE = {"closed": "green", "half_open": "yellow", "open": "bold red"}


class LiveView:
    """Redraws the stats of a processor while an ``async with`` block runs.

    Args:
        stats: a coroutine function returning the stats dict, usually ``processor.get_stats``.
        refresh_per_second: frames per second of the rich view (the plain view prints one line
            every ``plain_every`` seconds whatever this is).
        console: a rich Console to draw on; by default one on stdout. When it is not a terminal,
            or rich is not installed, the view prints plain lines (to the console's file, or
            ``stream``, or stdout).
        title: shown in the header and at the start of each plain line.
        plain_every: seconds between two plain lines; by default 1 on a terminal and 30
            elsewhere (a log gains a line every 30 s, not 3,600 an hour).
        stream: where plain lines go when there is no console; default stdout.
        log: when given, plain lines go to this logger at INFO (``reason="summary"``) rather
            than to a stream: one format for every line of a service's log.

    A stats function that raises does not end the block: the view shows the error and retries
    at the next frame.
    """

    def __init__(
        self,
        stats: Callable[[], Awaitable[dict[str, Any]]],
        *,
        refresh_per_second: float = 4.0,
        console: Console | None = None,
        title: str = "batchpunk",
        plain_every: float | None = None,
        stream: IO[str] | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        if not callable(stats):
            raise TypeError(f"stats: expected a coroutine function like get_stats, got {stats!r}")
        if not (isinstance(refresh_per_second, int | float) and refresh_per_second > 0):
            raise ValueError(
                f"refresh_per_second: expected a positive number, got {refresh_per_second!r}"
            )
        if plain_every is not None and not (
            isinstance(plain_every, int | float) and plain_every > 0
        ):
            raise ValueError(f"plain_every: expected a positive number, got {plain_every!r}")
        self._stats = stats
        self.refresh_per_second = float(refresh_per_second)
        self.title = title
        #: Seconds between plain lines; None until entered, when the output decides.
        self.plain_every = float(plain_every) if plain_every is not None else None
        self._console = console
        self._stream = stream
        self._log = log
        self._live: Live | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = 0.0
        # (monotonic time, processed) of the last frames: the "now" rate spans about a second.
        self._marks: deque[tuple[float, int]] = deque(maxlen=max(2, round(refresh_per_second) + 1))
        self._rates: deque[float] = deque(maxlen=48)
        self._error: str | None = None
        #: The last stats dict the view drew, or None before the first frame.
        self.last_stats: dict[str, Any] | None = None
        self.frames = 0

    @property
    def rich(self) -> bool:
        """Whether the view draws with rich (else plain lines); known once entered."""
        return self._live is not None

    async def __aenter__(self) -> LiveView:
        self._started = time.monotonic()
        console = self._rich_console()
        if console is not None:
            from rich.live import Live

            self._live = Live(
                console=console,
                auto_refresh=False,
                transient=False,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()
        else:
            self._marks = deque(maxlen=2)  # one line a period: "now" is the last period
            if self.plain_every is None:
                self.plain_every = 1.0 if self._on_terminal() else 30.0
        await self._frame()  # draw at once; it also marks the start of the "now" rate
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batchpunk-live")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self._frame(final=True)  # the final state stays on screen
        except Exception:  # never mask the block's own outcome with a drawing bug
            logger.exception(
                "live view failed to draw its final frame", extra={"reason": "live_view"}
            )
        finally:
            if self._live is not None:
                self._live.stop()
                self._live = None

    def _rich_console(self) -> Console | None:
        try:
            from rich.console import Console
        except ImportError:
            return None
        console = self._console if self._console is not None else Console()
        return console if console.is_terminal else None

    def _on_terminal(self) -> bool:
        if self._log is not None:
            return False
        isatty = getattr(self._plain_stream(), "isatty", None)
        try:
            return bool(isatty()) if callable(isatty) else False
        except ValueError:  # a closed stream
            return False

    def _plain_stream(self) -> IO[str]:
        if self._console is not None:
            return self._console.file
        return self._stream if self._stream is not None else sys.stdout

    async def _run(self) -> None:
        period = (self.plain_every or 1.0) if self._live is None else 1.0 / self.refresh_per_second
        loop = asyncio.get_running_loop()
        next_frame = loop.time() + period
        while True:
            await asyncio.sleep(max(0.0, next_frame - loop.time()))
            next_frame += period
            if next_frame < loop.time():  # the loop was busy: skip frames rather than burst
                next_frame = loop.time() + period
            try:
                await self._frame()
            except Exception:  # a drawing bug must not end the user's block
                logger.exception("live view stopped refreshing", extra={"reason": "live_view"})
                return

    async def _frame(self, final: bool = False) -> None:
        try:
            stats = await self._stats()
        except Exception as exc:  # show it; the processor may be stopping
            self._error = f"{type(exc).__name__}: {exc}"
            stats = self.last_stats or {}
        else:
            self._error = None
            self.last_stats = stats
        now = time.monotonic()
        rate = self._rate(now, int(stats.get("processed", 0) or 0))
        self.frames += 1
        if self._live is not None:
            self._live.update(self.render(stats, rate), refresh=True)
        else:
            line = summary_line(stats, rate, title=self.title)
            if self._error:
                line += f"  [stats error: {self._error}]"
            if final:
                line += "  (final)"
            if self._log is not None:
                self._log.info("%s", line, extra={"reason": "summary"})
                return
            stream = self._plain_stream()
            stream.write(line + "\n")
            stream.flush()

    def _rate(self, now: float, processed: int) -> float:
        marks = self._marks
        marks.append((now, processed))
        then, before = marks[0]
        rate = (processed - before) / (now - then) if now > then else 0.0
        if len(marks) > 1:
            self._rates.append(rate)
        return rate

    def render(self, stats: Mapping[str, Any], rate: float) -> RenderableType:
        """One frame of the rich view for ``stats`` and the current rate (messages/s).

        The frame is a single styled Text laid out in fixed-width columns: rich's nested tables
        and panels measure every cell on every frame and cost ten times more, which would show
        in the engine's throughput.
        """
        from rich.text import Text

        get = stats.get
        circuit = str(get("circuit", "closed"))
        frame = Text(no_wrap=True, overflow="crop")
        frame.append(f" {self.title} ", style="bold reverse")
        frame.append(f"  {get('state', '')}  up ")
        frame.append(format_duration(time.monotonic() - self._started))
        frame.append("  circuit ", style="dim")
        frame.append(circuit, style=_CIRCUIT_STYLE.get(circuit, "bold"))
        if outage := downstream_line(stats):  # issue 13: the downstream's outage, if any
            frame.append(f"  {outage}", style="bold red")
        frame.append("  ")
        frame.append(_sparkline(self._rates), style="cyan")
        if self._error:
            frame.append(f"  stats error: {self._error}", style="bold red")
        frame.append("\n")

        throughput = get("throughput") or {}
        flow: list[_Row] = [("now", format_rate(rate), "msg/s", None)]
        flow += [(w, format_rate(throughput.get(w)), "msg/s", None) for w in ("1m", "5m", "15m")]
        flow.append(("received", f"{_int(get('received')):,}", "", None))
        flow.append(("processed", f"{_int(get('processed')):,}", "", None))

        config = get("config") or {}
        limit = config.get("max_pending") if isinstance(config, Mapping) else None
        pending, in_flight = _int(get("pending")), _int(get("in_flight"))
        buffer: list[_Row] = [
            ("pending", f"{pending:,}", _bar(pending, limit), None),
            ("in flight", f"{in_flight:,}", _bar(in_flight, limit), None),
            ("buffered", f"{_int(get('current_batch_size')):,}", "in lanes", None),
        ]
        if "batches_running" in stats:
            buffer.append(("running", f"{_int(get('batches_running')):,}", "batches", None))
            buffer.append(("waiting", f"{_int(get('batches_waiting')):,}", "batches", None))

        sizes = get("batch_size") or {}
        batches: list[_Row] = [
            ("cut", f"{_int(get('batches')):,}", "", None),
            ("mean size", _num(get("mean_batch_size")), "", None),
            ("size p50", _num(sizes.get("p50")), f"p99 {_num(sizes.get('p99'))}", None),
            ("size max", _num(sizes.get("max")), "", None),
        ]
        reasons: Mapping[str, int] = get("flush_reasons") or {}
        total = sum(reasons.values()) or 1
        for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
            batches.append((f"  {reason}", f"{count:,}", _bar(count, total, width=8), None))

        latency: list[_Row] = []
        for label, key in (("end to end", "latency"), ("call", "call_latency")):
            values = get(key) or {}
            latency.append((label, "", "", None))
            for q in ("p50", "p90", "p99", "max"):
                latency.append((f"  {q}", format_duration(values.get(q)), "", None))

        dead_count = _int(get("dead_lettered"))
        failures: list[_Row] = [
            ("retries", f"{_int(get('retries')):,}", "", None),
            ("splits", f"{_int(get('splits')):,}", "", None),
            ("dead letters", f"{dead_count:,}", "", "red" if dead_count else None),
        ]
        dead: Mapping[str, int] = get("dead_letter_reasons") or {}
        for reason, count in sorted(dead.items(), key=lambda item: -item[1]):
            failures.append((f"  {reason}", f"{count:,}", "", "red" if count else None))
        backlog = _int(get("dead_letter_backlog"))
        if backlog:
            failures.append(("  unwritten", f"{backlog:,}", "", "red"))

        _columns(frame, [("throughput", flow), ("buffer", buffer), ("batches", batches)])
        _columns(frame, [("latency", latency), ("failures", failures)])
        return frame


def summary_line(stats: Mapping[str, Any], rate: float | None = None, *, title: str = "") -> str:
    """One plain line for logs: rates, buffer, batches, latency, failures and circuit."""
    get = stats.get
    throughput = get("throughput") or {}
    latency = get("latency") or {}
    reasons: Mapping[str, int] = get("flush_reasons") or {}
    dead: Mapping[str, int] = get("dead_letter_reasons") or {}
    p50, p99 = format_duration(latency.get("p50")), format_duration(latency.get("p99"))
    now = f"{format_rate(rate)}/s now, " if rate is not None else ""
    parts = [
        title,
        f"processed {_int(get('processed')):,} ({now}{format_rate(throughput.get('1m'))}/s 1m)",
        f"pending {_int(get('pending')):,}",
        f"in_flight {_int(get('in_flight')):,}",
        f"batches {_int(get('batches')):,}" + _counts(reasons),
        f"mean_size {_num(get('mean_batch_size'))}",
        f"latency p50 {p50} p99 {p99}",
        f"retries {_int(get('retries'))}",
        f"dead {_int(get('dead_lettered'))}" + _counts(dead),
        f"circuit {get('circuit', 'closed')}",
        downstream_line(stats),
    ]
    return "  ".join(p for p in parts if p)


def format_rate(value: float | None) -> str:
    """A rate with a k/M suffix, e.g. ``12.3k``; ``-`` when unknown."""
    if value is None:
        return "-"
    for factor, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.1f}{suffix}"
    return f"{value:.1f}"


def format_duration(seconds: float | None) -> str:
    """Seconds in the unit that reads best: ``850us``, ``12.3ms``, ``4.20s``, ``3m05s``."""
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f}ms"
    if seconds < 60.0:
        return f"{seconds:.2f}s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{rest:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


#: One line of a section: label, value, note, and a style for the whole line (or None).
_Row = tuple[str, str, str, str | None]
_LABEL, _VALUE, _COLUMN = 12, 9, 32
_NOTE = _COLUMN - _LABEL - _VALUE - 1


def _columns(frame: Text, sections: list[tuple[str, list[_Row]]]) -> None:
    """Append sections side by side, each a titled column of fixed width."""
    height = max(len(rows) for _, rows in sections)
    rule = "─" * _COLUMN
    frame.append(
        " ".join(f"── {title} {rule}"[:_COLUMN] for title, _ in sections) + "\n", style="cyan"
    )
    for i in range(height):
        for n, (_, rows) in enumerate(sections):
            if n:
                frame.append(" ")
            if i < len(rows):
                label, value, note, style = rows[i]
                frame.append(label[:_LABEL].ljust(_LABEL), style=style or "dim")
                frame.append(value.rjust(_VALUE), style=style)
                frame.append(" " + note[:_NOTE].ljust(_NOTE), style=style)
            else:
                frame.append(" " * _COLUMN)
        frame.append("\n")


def _counts(counts: Mapping[str, int]) -> str:
    return " [" + " ".join(f"{k}={n}" for k, n in sorted(counts.items())) + "]" if counts else ""


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) else 0


def _num(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _bar(value: int, limit: Any, width: int = 10) -> str:
    if not isinstance(limit, int | float) or limit <= 0:
        return ""
    filled = min(width, round(width * value / limit))
    return "█" * filled + "·" * (width - filled)


def _sparkline(rates: deque[float]) -> str:
    if not rates:
        return ""
    top = max(rates) or 1.0
    return "".join(_SPARKS[min(7, int(8 * r / top))] if r > 0 else " " for r in rates)


def remote_stats(
    url: str, *, token: str | None = None, timeout: float = 5.0
) -> Callable[[], Awaitable[dict[str, Any]]]:
    """A ``get_stats`` for a worker elsewhere: GETs its ``/stats`` (without history) each call.

    ``url`` is the worker's metrics server (``http://host:9464``, ``host:9464``, or the /stats
    URL itself). Uses the standard library in a worker thread, so ``batchpunk top`` needs no
    HTTP client extra; an unreachable worker raises ConnectionError naming the URL, which the
    live view shows while it keeps trying.
    """
    import json
    import urllib.error
    import urllib.request

    base = url.strip()
    if "://" not in base:
        base = "http://" + base
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"url: expected an http:// or https:// URL, got {url!r}")
    base = base.rstrip("/").removesuffix("/stats")
    target = base + "/stats?history=0"
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"

    def fetch() -> dict[str, Any]:
        request = urllib.request.Request(target, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                data = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            hint = " (give the token with --token)" if exc.code == 401 else ""
            raise ConnectionError(f"{base}/stats answered HTTP {exc.code}{hint}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConnectionError(f"{base}/stats unreachable: {reason}") from None
        if not isinstance(data, dict):
            raise ConnectionError(f"{base}/stats: expected a JSON object")
        return data

    async def get_stats() -> dict[str, Any]:
        return await asyncio.to_thread(fetch)

    return get_stats
