"""The ``batchpunk`` commands, on typer and rich (imported only through ``batchpunk.cli.main``).

Each command maps its outcome to the exit codes documented in ``batchpunk.cli``; errors are
printed without a traceback, with every environment-supplied secret and URL password masked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from batchpunk._redact import env_secrets, redact
from batchpunk.cli import EXIT_ABORTED, EXIT_FAILED, EXIT_MISSING, EXIT_OK, EXIT_USAGE
from batchpunk.errors import ConfigError, MissingDependency

__all__ = ["app"]

T = TypeVar("T")

_EXIT_CODES = (
    "Exit codes: 0 done (or drained after a first SIGINT/SIGTERM), 1 failed, "
    "2 usage or pipeline-file error, 3 missing optional dependency, "
    "130 stopped at once by a second signal (or by a first one during start-up)."
)
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Help texts are printed literally (no rich markup): "[batch]" and "[sink]" must survive, and
# "\b" keeps click from rewrapping an examples block.
app = typer.Typer(
    name="batchpunk",
    help=(
        "Fast, lossless batch pipelines: read a source, batch, write a sink, dead-letter what "
        "fails.\n\n"
        "\b\nExamples:\n"
        "  batchpunk demo\n"
        "  batchpunk validate orders.toml\n"
        "  batchpunk run orders.toml\n"
        "  batchpunk dlq show dead-letters.jsonl --reason failed\n\n" + _EXIT_CODES
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
dlq_app = typer.Typer(
    help=(
        "Inspect dead-letter files and send their letters back through a pipeline's sink.\n\n"
        "\b\nExamples:\n"
        "  batchpunk dlq show dead-letters.jsonl\n"
        "  batchpunk dlq replay dead-letters.jsonl --pipeline orders.toml\n\n" + _EXIT_CODES
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(dlq_app, name="dlq")


# -- output -----------------------------------------------------------------------------------
#
# On a terminal the command draws rich tables; anywhere else (a pipe, a file, a container log)
# it writes plain lines that are never wrapped or truncated, one record per line, so grep and
# awk see whole records. Every line goes through the one redactor.


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def _printable(text: str) -> str:
    """Text any UTF-8 stream can take: lone surrogates become backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _secrets(secrets: Any = ()) -> frozenset[str]:
    return frozenset(secrets or ()) | env_secrets()


#: Set by --log-format json: what a command says on stderr goes through it as a log record, so
#: that every stderr line is JSON (the log handler redacts it as it redacts every record).
_STDERR_LOG: list[logging.Logger] = []


def _say(text: str, secrets: Any = (), *, stderr: bool = False, level: int = logging.INFO) -> None:
    if stderr and _STDERR_LOG:
        if text.startswith("error: "):
            text, level = text.removeprefix("error: "), logging.ERROR
        _STDERR_LOG[0].log(level, "%s", redact(text, _secrets(secrets)))
        return
    stream = sys.stderr if stderr else sys.stdout
    stream.write(_printable(redact(text, _secrets(secrets))) + "\n")
    stream.flush()


def _one_line(text: str) -> str:
    """One line: line breaks become spaces, other control characters backslash escapes."""
    if text.isprintable():
        return text
    text = " ".join(text.replace("\t", "\\t").split())
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _fail(message: str, code: int = EXIT_FAILED, secrets: Any = ()) -> NoReturn:
    _say(f"error: {_one_line(message)}", secrets, stderr=True)
    raise typer.Exit(code)


def _guard(action: Callable[[], T], secrets: Any = ()) -> T:
    """Run ``action``; what goes wrong becomes one line on stderr and an exit code, never a
    traceback: 2 for a mistake in the input, 3 for a missing extra, 1 for a runtime failure
    (an unreachable server, a full disk), 130 for an interrupt."""
    from batchpunk.deadletter import MalformedDeadLetter

    try:
        return action()
    except typer.Exit:
        raise
    except MissingDependency as exc:
        _fail(str(exc), EXIT_MISSING, secrets)
    except (ConfigError, MalformedDeadLetter) as exc:
        _fail(str(exc), EXIT_USAGE, secrets)
    except KeyboardInterrupt:
        _fail("interrupted: stopped at once by a signal", EXIT_ABORTED, secrets)
    except Exception as exc:
        _fail(f"{type(exc).__name__}: {exc}", EXIT_FAILED, secrets)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class _Redact(logging.Filter):
    """Passes every log record through the one redactor (secrets, URL userinfo, tokens)."""

    def __init__(self, secrets: frozenset[str]) -> None:
        super().__init__()
        self.secrets = _secrets(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = _printable(redact(message, self.secrets))
        if masked != message:
            record.msg, record.args = masked, ()
        if record.exc_info and record.exc_info[1] is not None:
            # A traceback quotes the error and source lines: it goes through the redactor too.
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = _printable(redact(text, self.secrets))
            record.exc_info = None
        return True


class _ClientMistakes(logging.Filter):
    """aiohttp.server's record of a malformed request becomes one DEBUG line.

    A client's bad request to the metrics port or the HTTP source (``GET /\\xff``, a header
    over 8 KiB) is answered 400 by aiohttp, which also logs it as an ERROR with a traceback: noise
    any scanner can write into the log. A server's own error (a 5xx) stays as it was.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None or not _client_mistake(error):
            return True
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        peer = record.getMessage().rpartition(" from ")[2]
        text = _one_line(str(error))
        record.msg = f"a malformed request from {peer} was answered 400: {text}"
        record.args, record.exc_info, record.exc_text = (), None, None
        return True


def _client_mistake(error: BaseException) -> bool:
    try:
        from aiohttp.http_exceptions import HttpProcessingError
    except ImportError:  # pragma: no cover - no server extra, no aiohttp.server records
        return False
    code = getattr(error, "code", None)
    return isinstance(error, HttpProcessingError) and isinstance(code, int) and 400 <= code < 500


def _log_level(level: str) -> str:
    name = level.strip().upper()
    if name not in _LOG_LEVELS:
        _fail(f"--log-level: expected one of {', '.join(_LOG_LEVELS)}, got {level!r}", EXIT_USAGE)
    return name


def _logging(level: str, secrets: frozenset[str] = frozenset()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_Redact(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    _STDERR_LOG.clear()  # plain lines unless _json_logs says otherwise
    # "SIGINT: draining, then stopping (send it again to stop at once)" must reach the operator
    # whatever the level: it is the only sign that the first Ctrl-C was heard.
    pipeline_log = logging.getLogger("batchpunk.pipeline")
    pipeline_log.setLevel(min(logging.WARNING, logging.getLevelName(level)))
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientMistakes) for f in server_log.filters):
        server_log.addFilter(_ClientMistakes())


def _log_format(value: str) -> str:
    if value not in ("human", "json"):
        raise typer.BadParameter(f"expected 'human' or 'json', got {value!r}")
    return value


def _json_logs(context: Mapping[str, Any]) -> None:
    """--log-format json: the root handlers (set up by _logging) write one JSON object a line."""
    from batchpunk.metrics import JsonFormatter

    for handler in logging.getLogger().handlers:
        handler.setFormatter(JsonFormatter(context=context))
    log = logging.getLogger("batchpunk.cli")
    log.setLevel(logging.INFO)  # what the human format prints whatever --log-level says
    _STDERR_LOG[:] = [log]


def _live(title: str, refresh: float, as_log: bool = False) -> Callable[[Callable[[], Any]], Any]:
    from batchpunk.metrics.live import LiveView

    log = None
    if as_log:  # --log-format json: off a terminal, summaries are log records like the rest
        log = logging.getLogger("batchpunk.live")
        log.setLevel(logging.INFO)

    def make(stats: Callable[[], Any]) -> Any:
        return LiveView(stats, refresh_per_second=refresh, title=title, log=log)

    return make


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "n/a"
    if value < 1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s"


def _when(timestamp: Any) -> str:
    """A letter's time, or its raw value when it is not a time (NaN, 1e300, garbage)."""
    try:
        return datetime.fromtimestamp(float(timestamp)).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError, TypeError):
        return repr(timestamp)


def _counts(counts: Mapping[str, int] | None) -> str:
    if not counts:
        return "0"
    total = sum(counts.values())
    parts = ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items()))
    return f"{total:,} ({parts})"


def _pairs(title: str, rows: Sequence[tuple[str, str]], secrets: Any = ()) -> None:
    """A two-column table on a terminal; ``name: value`` lines anywhere else."""
    if not _is_terminal(sys.stdout):
        _say(title, secrets)
        for name, value in rows:
            _say(f"{name}: {value}", secrets)
        return
    known = _secrets(secrets)
    table = Table(title=escape(redact(title, known)), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for name, value in rows:
        table.add_row(escape(name), escape(_printable(redact(value, known))))
    Console(highlight=False).print(table)


def _summary_rows(stats: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The end-of-run rows: counts, flush reasons, throughput, latency, acknowledgements."""
    pipeline = stats.get("pipeline", {})
    elapsed = stats.get("elapsed") or pipeline.get("elapsed") or 0.0
    processed = int(stats.get("processed", 0))
    latency = stats.get("latency") or {}
    reasons = dict(stats.get("dead_letter_reasons") or {})
    if "shutdown_letters" in pipeline:
        # The engine counts every "shutdown" letter; a pipeline stores only those of a source
        # that cannot take its messages back (the rest were returned: see nacked).
        reasons.pop("shutdown", None)
        if pipeline["shutdown_letters"]:
            reasons["shutdown"] = pipeline["shutdown_letters"]
    rows = [
        ("messages read", f"{stats.get('received', 0):,}"),
        ("processed", f"{processed:,}"),
        ("dead letters", _counts(reasons)),
        ("batches", _counts(stats.get("flush_reasons"))),
        (
            "calls / retries / splits",
            f"{stats.get('calls', 0):,} / {stats.get('retries', 0):,} / {stats.get('splits', 0):,}",
        ),
        (
            "throughput",
            f"{processed / elapsed:,.0f} msg/s over {elapsed:.2f} s" if elapsed else "n/a",
        ),
        ("latency p50 / p99", f"{_seconds(latency.get('p50'))} / {_seconds(latency.get('p99'))}"),
        ("acknowledged / nacked", f"{pipeline.get('acked', 0):,} / {pipeline.get('nacked', 0):,}"),
    ]
    if pipeline.get("lost"):
        rows.append(("lost (not written, stored or returned)", f"{pipeline['lost']:,}"))
    return rows


def _version(value: bool) -> None:
    if value:
        from batchpunk import __version__

        sys.stdout.write(f"batchpunk {__version__}\n")
        raise typer.Exit(EXIT_OK)


# -- commands ---------------------------------------------------------------------------------


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the version and exit.",
            is_eager=True,
            callback=_version,
            expose_value=True,
        ),
    ] = False,
) -> None:
    """Fast, lossless batch pipelines."""


@app.command(epilog=_EXIT_CODES)
def run(
    pipeline: Annotated[Path, typer.Argument(help="The pipeline file (TOML).", show_default=False)],
    live: Annotated[
        bool | None,
        typer.Option("--live/--no-live", help="Live terminal view (default: [metrics] live)."),
    ] = None,
    log_level: Annotated[
        str, typer.Option(help="Log level on stderr: DEBUG, INFO, WARNING, ERROR or CRITICAL.")
    ] = "WARNING",
    log_format: Annotated[
        str,
        typer.Option(
            help="Log lines on stderr: human, or json (one object per line, with pipeline, "
            "batch_id and reason fields).",
            callback=_log_format,
        ),
    ] = "human",
) -> None:
    """Run a pipeline file until its source ends, or until SIGINT/SIGTERM.

    The file is checked completely (as `batchpunk validate` does) before anything connects.
    The first SIGINT/SIGTERM (Ctrl-C) drains: no new messages are read, every message already
    read is written or dead-lettered and then acknowledged, and the command exits 0; a line on
    stderr says so. A second one stops at once: unfinished messages are nacked (returned to the
    broker), exit 130.

    \b
    Examples:
      batchpunk run orders.toml
      PG_PASSWORD=... batchpunk run --no-live examples/rabbitmq-to-postgres.toml
      batchpunk run orders.toml --log-level INFO
    """
    from batchpunk.pipeline_file import load_pipeline

    level = _log_level(log_level)
    spec = _guard(lambda: load_pipeline(pipeline))
    _logging(level, spec.secrets)
    if log_format == "json":
        _json_logs({"pipeline": Path(spec.path).name})
    _guard(spec.check, spec.secrets)
    show_live = spec.metrics.live if live is None else live
    as_log = log_format == "json"
    code = _guard(lambda: _run(_run_pipeline(spec, show_live, as_log)), spec.secrets)
    raise typer.Exit(code)


async def _run_pipeline(spec: Any, live: bool, live_as_log: bool = False) -> int:
    collector = None
    port = spec.metrics.prometheus_port
    if port is not None:
        from batchpunk.metrics import PrometheusMetrics

        collector = PrometheusMetrics()
    letters = _Letters(spec)
    pipeline = letters.spec.build(metrics_collector=collector)
    server = None
    if port is not None:
        from batchpunk.metrics import serve

        host = spec.metrics.prometheus_host
        try:
            server = await serve(port, host, **_status_page(spec, pipeline, letters))
        except OSError as exc:
            _fail(
                f"[metrics] prometheus_port: cannot listen on {host}:{port}: {exc.strerror or exc}",
                EXIT_FAILED,
                spec.secrets,
            )
        _say(
            f"metrics: {server.url}/metrics  stats: {server.url}/stats  status page: {server.url}/",
            stderr=True,
        )
    error: BaseException | None = None
    began = time.perf_counter()
    from batchpunk._memory import tune_collector

    tune_collector()  # start-up is over: see batchpunk/_memory.py for the choice and figures
    try:
        if live:
            view = _live(
                f"batchpunk run {Path(spec.path).name}",
                spec.metrics.refresh_per_second,
                live_as_log,
            )
            async with view(pipeline.get_stats):
                await pipeline.run(handle_signals=True)
        else:
            await pipeline.run(handle_signals=True)
    except (MissingDependency, ConfigError):
        raise
    except Exception as exc:
        error = exc
    finally:
        if server is not None:
            await server.close()
    stats = await pipeline.get_stats()
    stats["elapsed"] = time.perf_counter() - began
    _pairs(f"batchpunk run {spec.path}", _summary_rows(stats), spec.secrets)
    if error is not None:
        _fail(f"the pipeline failed: {type(error).__name__}: {error}", EXIT_FAILED, spec.secrets)
    if pipeline.lost:
        _fail(
            f"{pipeline.lost:,} message(s) lost: the source cannot take them back and the "
            "dead-letter sink did not store them (see the log)",
            EXIT_FAILED,
            spec.secrets,
        )
    if pipeline.aborted:
        _say(
            "stopped at once by a second signal: unfinished messages were nacked (returned "
            "to the source, or stored as dead letters if it cannot take them back)",
            stderr=True,
            level=logging.WARNING,
        )
        return EXIT_ABORTED
    return EXIT_OK


class _Letters:
    """Keeps the last dead letters for the status page: the spec it builds from wraps the
    [dead_letter] sink in a RecentDeadLetters (without one, the page reads the in-memory
    default)."""

    def __init__(self, spec: Any) -> None:
        self.recent: Any = None
        self.spec = spec
        if spec.dead_letter is not None:
            self.spec = dataclasses.replace(spec, dead_letter=_Wrapped(spec.dead_letter, self))


class _Wrapped:
    """A [dead_letter] section whose build() returns its sink wrapped in RecentDeadLetters."""

    def __init__(self, section: Any, letters: _Letters) -> None:
        self.section = section
        self.letters = letters

    def build(self) -> Any:
        from batchpunk.metrics import RecentDeadLetters

        self.letters.recent = RecentDeadLetters(self.section.build())
        return self.letters.recent

    def __getattr__(self, name: str) -> Any:
        return getattr(self.section, name)


def _status_page(spec: Any, pipeline: Any, letters: _Letters) -> dict[str, Any]:
    """serve()'s keywords for the status page: redacted configuration and recent letters."""

    def recent() -> list[tuple[float, Any]]:
        if letters.recent is not None:
            return list(letters.recent.recent())
        kept = getattr(pipeline.dead_letter, "letters", None)  # the in-memory default
        return [(letter.first_seen, letter) for letter in reversed(kept[-20:])] if kept else []

    config = spec.describe()
    if spec.metrics.token:  # a token written in the file itself is masked too
        config["metrics"]["token"] = "***"
    return {
        "processor": pipeline,
        "token": spec.metrics.token,
        "config": config,
        "dead_letters": recent,
        "redact": spec.redact,
        "title": f"batchpunk run {Path(spec.path).name}",
    }


@app.command(epilog=_EXIT_CODES)
def demo(
    events: Annotated[int, typer.Option(min=1, max=10**9, help="Events to generate.")] = 300_000,
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir", help="Where to write demo.db and dead-letters.jsonl (default: a new temp dir)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the positions of bad events.")] = 0,
    live: Annotated[bool, typer.Option("--live/--no-live", help="Live terminal view.")] = True,
    log_level: Annotated[
        str, typer.Option(help="Log level on stderr: DEBUG, INFO, WARNING, ERROR or CRITICAL.")
    ] = "ERROR",
) -> None:
    """Run the embedded demo pipeline, with no server, and check that nothing was lost.

    A generator of events (4 keys, 2 priorities, 5 malformed and 12 poison events) feeds
    batches of up to 1000 to a handler that sleeps 2 ms and writes to SQLite; what fails goes
    to a JSON Lines dead-letter file. The summary counts the rows and the letters and checks
    that they add up to the events generated (exit 1 if not).

    \b
    Examples:
      batchpunk demo
      batchpunk demo --events 50000 --dir ./demo-out --no-live
      python -m batchpunk demo
    """
    from batchpunk._demo import run_demo

    _logging(_log_level(log_level))
    factory = _live("batchpunk demo", 4.0) if live else None
    try:
        result = _guard(
            lambda: _run(run_demo(events, directory=directory, seed=seed, live=factory))
        )
    except KeyboardInterrupt:
        # A second SIGINT after the pipeline had already drained and given its signals back
        # (the check was under way): the user still asked to stop at once.
        _say(_LATE_SECOND_SIGNAL, stderr=True)
        raise typer.Exit(EXIT_ABORTED) from None
    # From here to the exit a second SIGINT is noted, not raised: a KeyboardInterrupt in the
    # summary, or the default action during interpreter exit, would hide the exit code.
    late: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: late.append(signum))
    rows = [
        *_summary_rows(result.stats),
        ("rows in database", f"{result.rows:,}  ({result.db_path})"),
        ("letters in file", f"{result.letter_count:,}  ({result.dead_letter_path})"),
        (
            "check",
            f"rows {result.rows:,} + letters {result.letter_count:,}"
            + (f" + returned {result.returned:,}" if result.returned else "")
            + (f" - written twice {result.written_twice:,}" if result.written_twice else "")
            + f" = {result.accounted:,}"
            + f" of {result.generated:,} generated: "
            + ("OK" if result.consistent else "MISMATCH"),
        ),
    ]
    if result.written_twice:
        rows.append(
            (
                "written twice",
                f"{result.written_twice:,} event(s) whose batch the hard stop stored as "
                '"shutdown" letters while its commit was finishing (at least once, none lost)',
            )
        )
    _pairs("batchpunk demo", rows)
    if result.aborted:
        _say(
            'stopped at once by a second signal: unfinished events were stored as "shutdown" '
            "dead letters (the generator cannot take them back)",
            stderr=True,
        )
        _demo_exit(EXIT_ABORTED, late)
    for problem in result.problems:
        _say(f"check failed: {problem}", stderr=True)
    if not result.consistent:
        _demo_exit(EXIT_FAILED, late)
    _say(f"inspect the dead letters: batchpunk dlq show {result.dead_letter_path}")
    _demo_exit(EXIT_OK, late)


#: A second SIGINT that came after the pipeline had drained: the exit code still says it came.
_LATE_SECOND_SIGNAL = "stopped at once by a second signal: the drain had already finished"


def _demo_exit(code: int, late: list[int]) -> NoReturn:
    """Exit the demo with ``code``, 130 instead of 0 if a second SIGINT came after the drain.

    SIGINT is ignored from here on: the exit code is decided, and Python restores the default
    action while it finalizes, which would otherwise let a signal kill the process (-2).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if late and code == EXIT_OK:
        _say(_LATE_SECOND_SIGNAL, stderr=True)
        code = EXIT_ABORTED
    raise typer.Exit(code)


@app.command(epilog=_EXIT_CODES)
def top(
    url: Annotated[
        str,
        typer.Argument(
            help="A worker's metrics server: http://host:9464 (or host:9464).", show_default=False
        ),
    ],
    token: Annotated[
        str | None,
        typer.Option(envvar="BATCHPUNK_TOKEN", help="Bearer token, if the worker asks for one."),
    ] = None,
    refresh: Annotated[float, typer.Option(min=0.1, help="Redraws per second.")] = 1.0,
    once: Annotated[
        bool, typer.Option("--once", help="Print one summary line and exit (1 if unreachable).")
    ] = False,
) -> None:
    """The live terminal view of a worker running elsewhere, from its /stats.

    Read-only: needs the worker's metrics server (prometheus_port). Ctrl-C leaves.

    Examples:

      batchpunk top http://127.0.0.1:9464

      BATCHPUNK_TOKEN=... batchpunk top worker-3:9464 --refresh 2
    """
    from batchpunk.metrics.live import LiveView, remote_stats, summary_line

    secrets = frozenset({token}) if token else frozenset()
    try:
        stats = remote_stats(url, token=token)
    except ValueError as exc:
        _fail(str(exc), EXIT_USAGE, secrets)

    async def watch() -> int:
        if once:
            try:
                line = summary_line(await stats(), title=f"batchpunk top {url}")
                sys.stdout.write(line + "\n")
            except ConnectionError as exc:
                _fail(str(exc), EXIT_FAILED, secrets)
            return EXIT_OK
        view = LiveView(stats, refresh_per_second=refresh, title=f"batchpunk top {url}")
        async with view:
            await asyncio.Event().wait()  # until Ctrl-C
        return EXIT_OK

    try:
        code = _run(watch())
    except KeyboardInterrupt:
        code = EXIT_OK
    raise typer.Exit(code)


@app.command(epilog=_EXIT_CODES)
def validate(
    pipeline: Annotated[Path, typer.Argument(help="The pipeline file (TOML).", show_default=False)],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the resolved file as JSON.")
    ] = False,
) -> None:
    """Check a pipeline file without connecting to anything, and print it resolved.

    Every section, key, type and range is checked and every component is built exactly as
    `batchpunk run` builds it, minus connecting; environment variables are substituted (and
    shown masked). Exit 0 if the file is valid, 2 if not.

    \b
    Examples:
      batchpunk validate orders.toml
      batchpunk validate --json orders.toml
    """
    from batchpunk.pipeline_file import load_pipeline

    spec = _guard(lambda: load_pipeline(pipeline))
    _guard(spec.check, spec.secrets)
    described = spec.describe()
    if as_json:
        _say(json.dumps(_jsonable(described), ensure_ascii=False), spec.secrets)
    else:
        rows = [
            (f"[{section}]", ", ".join(f"{k}={v!r}" for k, v in values.items()))
            for section, values in described.items()
        ]
        _pairs(f"{pipeline}: valid", rows, spec.secrets)
    raise typer.Exit(EXIT_OK)


@dlq_app.command("show", epilog=_EXIT_CODES)
def dlq_show(
    file: Annotated[
        Path, typer.Argument(help="A dead-letter file (JSON Lines or SQLite).", show_default=False)
    ],
    reason: Annotated[
        str | None,
        typer.Option(
            help="Only letters with this reason: failed, malformed, redelivered, expired, "
            "dropped or shutdown."
        ),
    ] = None,
    limit: Annotated[int, typer.Option(min=0, help="Rows shown (0 for all).")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per letter.")] = False,
) -> None:
    """Show the letters of a dead-letter file, optionally of one reason.

    The file is opened read-only: nothing in it changes, and a file that is not a dead-letter
    store (a pipeline file, an ordinary database) is refused with exit 2. On a terminal the
    letters are a table; otherwise one tab-separated line per letter, never truncated.

    \b
    Examples:
      batchpunk dlq show dead-letters.jsonl
      batchpunk dlq show dead-letters.jsonl --reason malformed --limit 0
      batchpunk dlq show dead-letters.db --json | jq .error
    """
    _check_reason(reason)
    _require_file(file)
    letters = _guard(lambda: _run(_read_file(file)))
    total = len(letters)
    if reason is not None:
        letters = [letter for letter in letters if letter.reason == reason]
    shown = letters[: limit or None]
    if as_json:
        for letter in shown:
            _say(json.dumps(_jsonable(_letter_dict(letter)), ensure_ascii=False))
        raise typer.Exit(EXIT_OK)
    counts: dict[str, int] = {}
    for letter in letters:
        counts[letter.reason] = counts.get(letter.reason, 0) + 1
    selected = f"{len(letters):,} of {total:,}" if reason is not None else f"{total:,}"
    title = f"{file}: {selected} letter(s) by reason: {_counts(counts)}"
    columns = ("#", "reason", "error", "tries", "key", "seen", "message")
    rows = []
    for index, letter in enumerate(shown, 1):
        kind = letter.error_type.rpartition(".")[2]
        message = letter.message
        text = message if isinstance(message, str) else json.dumps(_jsonable(message))
        rows.append(
            (
                str(index),
                letter.reason,
                f"{kind}: {letter.error}" if letter.error is not None else "",
                str(letter.attempts),
                "" if letter.key is None else repr(letter.key),
                _when(letter.first_seen),
                text,
            )
        )
    if _is_terminal(sys.stdout):
        console = Console(highlight=False)
        table = Table(title=escape(_printable(redact(title, _secrets()))), title_justify="left")
        # Fixed columns take about 60 characters; error and message share the rest, one line.
        room = max(16, (console.width - 64) // 2)
        for column in columns:
            table.add_column(column, no_wrap=column in ("error", "message"))
        for row in rows:
            cells = [_printable(redact(cell, _secrets())) for cell in row]
            cells[2], cells[6] = _short(cells[2], room), _short(cells[6], room)
            cells[4] = _short(cells[4], 8)
            table.add_row(*(escape(cell) for cell in cells))
        console.print(table)
    else:
        _say(title)
        _say("\t".join(columns))
        for row in rows:
            _say("\t".join(_one_line(cell).replace("\t", " ") for cell in row))
    if len(shown) < len(letters):
        _say(f"... {len(letters) - len(shown):,} more (use --limit 0 to show all)")
    raise typer.Exit(EXIT_OK)


@dlq_app.command("replay", epilog=_EXIT_CODES)
def dlq_replay(
    file: Annotated[
        Path, typer.Argument(help="A dead-letter file (JSON Lines or SQLite).", show_default=False)
    ],
    pipeline: Annotated[
        Path,
        typer.Option("--pipeline", "-p", help="The pipeline file whose [sink] and [batch] to use."),
    ],
    reason: Annotated[str | None, typer.Option(help="Only letters with this reason.")] = None,
    log_level: Annotated[
        str, typer.Option(help="Log level on stderr: DEBUG, INFO, WARNING, ERROR or CRITICAL.")
    ] = "WARNING",
) -> None:
    """Send dead letters back through a pipeline's sink; remove each once it was written.

    The letters' messages are batched with the pipeline's [batch] settings and written to its
    [sink]. A letter leaves the file only after its message was written; one that fails again
    stays as it was. A letter whose message could only be stored as its repr (text, not the
    original message) is never sent: it is reported and kept. Exit 0 if every selected letter
    was written, 1 otherwise.

    \b
    Examples:
      batchpunk dlq replay dead-letters.jsonl --pipeline orders.toml
      batchpunk dlq replay dead-letters.jsonl -p orders.toml --reason failed
    """
    from batchpunk.pipeline_file import load_pipeline

    _check_reason(reason)
    level = _log_level(log_level)
    _require_file(file)
    spec = _guard(lambda: load_pipeline(pipeline))
    _logging(level, spec.secrets)
    succeeded, failed, unsendable, kept = _guard(
        lambda: _run(_replay(file, spec, reason)), spec.secrets
    )
    _say(
        f"replayed {succeeded + len(failed):,} letter(s) from {file}: {succeeded:,} written and "
        f"removed, {len(failed):,} failed again and kept; {kept:,} letter(s) left in the file",
        spec.secrets,
    )
    if unsendable:
        _say(
            f"{len(unsendable):,} letter(s) not sent and kept: their message was stored only as "
            f"its repr, not as the original message ({unsendable[0]})",
            spec.secrets,
            stderr=True,
        )
    for letter, error in failed[:10]:
        _say(f"  {letter.reason} {str(error)[:200]}", spec.secrets, stderr=True)
    raise typer.Exit(EXIT_FAILED if failed or unsendable else EXIT_OK)


async def _read_file(file: Path) -> list[Any]:
    import sqlite3

    from batchpunk._demo import read_letters
    from batchpunk.deadletter import MalformedDeadLetter, open_dead_letter_file

    store = open_dead_letter_file(file, readonly=True)
    try:
        return await read_letters(store)
    except sqlite3.DatabaseError as exc:
        raise MalformedDeadLetter(str(file), f"unreadable SQLite file: {exc}") from None
    finally:
        await store.close()


async def _replay(
    file: Path, spec: Any, reason: str | None
) -> tuple[int, list[Any], list[str], int]:
    from batchpunk._demo import read_letters
    from batchpunk.deadletter import MemoryDeadLetters, open_dead_letter_file
    from batchpunk.deadletter._files import UNSTORABLE_HEADER
    from batchpunk.processor import BatchProcessor

    store = open_dead_letter_file(file)
    try:
        letters = await read_letters(store)
        chosen = [letter for letter in letters if reason is None or letter.reason == reason]
        sendable = [letter for letter in chosen if UNSTORABLE_HEADER not in letter.headers]
        unsendable = [
            f"{letter.headers['dlq_id']}: {letter.headers[UNSTORABLE_HEADER]}"
            for letter in chosen
            if UNSTORABLE_HEADER in letter.headers
        ]
        sink = spec.sink.build()
        try:
            prepare = getattr(sink, "prepare", None)
            if callable(prepare):
                await prepare(spec.batch)
            processor: BatchProcessor[Any, Any] = BatchProcessor(
                spec.batch, sink.write, dead_letter=MemoryDeadLetters()
            )
            async with processor:
                report = await processor.replay(sendable)
        finally:
            await sink.close()
        if report.succeeded:
            await store.remove(letter.headers["dlq_id"] for letter in report.succeeded)
        left = len(await read_letters(store))
        return len(report.succeeded), list(report.failed), unsendable, left
    finally:
        await store.close()


def _check_reason(reason: str | None) -> None:
    from batchpunk.deadletter import REASONS

    if reason is not None and reason not in REASONS:
        _fail(f"--reason: expected one of {', '.join(REASONS)}, got {reason!r}", EXIT_USAGE)


def _require_file(file: Path) -> None:
    if file.is_dir():
        _fail(f"{file}: a folder, not a dead-letter file", EXIT_USAGE)
    if not file.is_file():
        _fail(f"{file}: no such dead-letter file", EXIT_USAGE)


def _letter_dict(letter: Any) -> dict[str, Any]:
    return {
        "reason": letter.reason,
        "error_type": letter.error_type,
        "error": None if letter.error is None else str(letter.error),
        "attempts": letter.attempts,
        "key": letter.key,
        "priority": letter.priority,
        "first_seen": letter.first_seen,
        "headers": letter.headers,
        "message": letter.message,
    }


def _jsonable(value: Any) -> Any:
    """A value ``json.dumps`` writes as real JSON: no NaN or Infinity (null), no lone
    surrogates (escaped), other types as their repr."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return _printable(value)
    if isinstance(value, dict):
        return {_printable(str(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return _printable(repr(value))


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# -- spool (issue 16): a self-contained command block ------------------------------------------

spool_app = typer.Typer(
    help=(
        "Look into a durable spool directory (docs/spool.md).\n\n"
        "\b\nExamples:\n"
        "  batchpunk spool inspect /var/lib/orders/spool\n\n" + _EXIT_CODES
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(spool_app, name="spool")


@spool_app.command("inspect", epilog=_EXIT_CODES)
def spool_inspect(
    path: Annotated[Path, typer.Argument(help="The spool directory.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Show a spool's segments, its unfinished messages, the oldest one's age, and any damage.

    Read-only: safe while the owning process runs.

    \b
    Examples:
      batchpunk spool inspect ./spool
      batchpunk spool inspect ./spool --json | jq .unfinished
    """
    from dataclasses import asdict

    from batchpunk.spool import SpoolError, inspect_spool

    try:
        report = inspect_spool(path)
    except SpoolError as exc:
        _fail(str(exc), EXIT_USAGE)
    if as_json:
        sys.stdout.write(json.dumps(asdict(report)) + "\n")
        raise typer.Exit(EXIT_OK)
    age = "-" if report.oldest_age is None else _seconds(report.oldest_age)
    owner = f"owned by pid {report.locked_by}" if report.locked_by else "not in use"
    title = f"{report.path}: {report.unfinished:,} unfinished message(s), oldest {age}, {owner}"
    columns = ("segment", "bytes", "messages", "unfinished")
    if _is_terminal(sys.stdout):
        table = Table(title=escape(title), title_justify="left")
        for column in columns:
            table.add_column(column, justify="left" if column == "segment" else "right")
        for name, size, messages, unfinished in report.segments:
            table.add_row(escape(name), f"{size:,}", f"{messages:,}", f"{unfinished:,}")
        Console(highlight=False).print(table)
    else:  # plain, one line per segment (see "Output" in docs/cli.md)
        _say(title)
        _say("\t".join(columns))
        for name, size, messages, unfinished in report.segments:
            _say(f"{name}\t{size}\t{messages}\t{unfinished}")
    for name, length in report.writing:
        _say(f"being written: {name}: {length:,} byte(s) of a write under way (not damage)")
    for name, offset, length, torn in report.damaged:
        if torn:
            _say(f"torn tail: {name}: {length:,} byte(s) (cut on the next start)")
        else:
            _say(
                f"damaged: {name} at offset {offset:,}: {length:,} byte(s) "
                "(dead-lettered as malformed on the next start)"
            )
    raise typer.Exit(EXIT_OK)
