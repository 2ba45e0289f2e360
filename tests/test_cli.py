"""The batchpunk command, run as users run it: in subprocesses, with real files and signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batchpunk._cli_app import app
from batchpunk.deadletter import DeadLetter

runner = CliRunner()


def batchpunk(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60):
    """Run ``python -m batchpunk ARGS`` to completion and return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "batchpunk", *args],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write_events(path: Path, count: int, malformed: set[int], poison: set[int]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for i in range(count):
            if i in malformed:
                out.write(f'{{"id": {i}, "body"\n')
            elif i in poison:
                out.write(json.dumps({"id": i}) + "\n")
            else:
                out.write(json.dumps({"id": i, "body": f"event {i}"}) + "\n")


PIPELINE = """
[source]
type = "jsonl"
path = "events.jsonl"
checkpoint = "events.checkpoint"

[batch]
max_size = {max_size}
max_wait = 0.05
retry_delay = 0.001
retry_max_delay = 0.01
max_retries = 1

[sink]
type = "sqlite"
path = "out.db"
table = "events"
columns = ["id", "body"]
idempotency_key = "id"

[dead_letter]
type = "jsonl"
path = "dead.jsonl"

[metrics]
live = false
"""


def letters_in(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def event_id(letter: dict[str, object]) -> int:
    message = letter["message"]
    if isinstance(message, dict):
        return int(message["id"])
    return int(str(message).split(":")[1].split(",")[0])


def test_demo_runs_in_a_subprocess_and_its_summary_adds_up(tmp_path: Path) -> None:
    """`python -m batchpunk demo` exits 0; its summary's row and letter counts match the
    database and the dead-letter file, and add up to the events generated."""
    done = batchpunk("demo", "--events", "40000", "--no-live", "--dir", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "generated: OK" in done.stdout
    assert "40,000 of 40,000" in done.stdout
    with sqlite3.connect(tmp_path / "demo.db") as db:
        rows = db.execute("SELECT count(DISTINCT id) FROM events").fetchone()[0]
    letters = letters_in(tmp_path / "dead-letters.jsonl")
    assert rows + len(letters) == 40_000
    assert len(letters) == 17
    assert f"rows in database: {rows:,}" in done.stdout
    assert "dead letters: 17 (failed 12, malformed 5)" in done.stdout


def test_sigterm_drains_exits_0_and_a_rerun_completes_without_duplicates(tmp_path: Path) -> None:
    """SIGTERM in the middle of `batchpunk run`: exit 0 with every line read in the database or
    the dead-letter file; a second run resumes from the checkpoint, and in the end every line
    is in exactly one place, once (idempotency key, no repeated letters)."""
    count = 60_000
    malformed, poison = {5, 20_000, 59_999}, {7, 30_000, 45_000, 45_001}
    write_events(tmp_path / "events.jsonl", count, malformed, poison)
    (tmp_path / "p.toml").write_text(PIPELINE.format(max_size=50), encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, "-m", "batchpunk", "run", "p.toml"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    rows = 0
    while rows < 2_000 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
        try:
            with sqlite3.connect(tmp_path / "out.db", timeout=5) as db:
                rows = db.execute("SELECT count(*) FROM events").fetchone()[0]
        except sqlite3.OperationalError:
            rows = 0
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "SIGTERM: draining" in stderr
    with sqlite3.connect(tmp_path / "out.db") as db:
        first_rows = db.execute("SELECT count(*) FROM events").fetchone()[0]
    assert 2_000 <= first_rows < count - len(malformed) - len(poison)

    done = batchpunk("run", "p.toml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(tmp_path / "out.db") as db:
        ids = [row[0] for row in db.execute("SELECT id FROM events")]
    letters = letters_in(tmp_path / "dead.jsonl")
    letter_ids = [event_id(letter) for letter in letters]
    assert sorted(ids) == sorted(set(range(count)) - malformed - poison)
    assert sorted(letter_ids) == sorted(malformed | poison)


def test_validate_accepts_a_good_file_and_rejects_a_bad_one_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`validate` exits 0 and prints the resolved file with the secret masked; a wrong key
    exits 2 naming section and key, without the secret."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "events.jsonl").write_text("{}\n", encoding="utf-8")
    good = PIPELINE.format(max_size=10).replace('path = "out.db"', 'path = "${DB_PATH}"')
    (tmp_path / "p.toml").write_text(good, encoding="utf-8")
    secret = str(tmp_path / "very-secret-place.db")
    env = {"DB_PATH": secret}
    result = runner.invoke(app, ["validate", str(tmp_path / "p.toml")], env=env)
    assert result.exit_code == 0, result.output
    assert "valid" in result.output
    assert secret not in result.output
    (tmp_path / "bad.toml").write_text(good.replace("max_wait", "max_weight"), encoding="utf-8")
    result = runner.invoke(app, ["validate", str(tmp_path / "bad.toml")], env=env)
    assert result.exit_code == 2
    assert "[batch] unknown key 'max_weight' (did you mean 'max_wait'?)" in result.output
    result = runner.invoke(app, ["validate", str(tmp_path / "absent.toml")])
    assert result.exit_code == 2
    assert "no such pipeline file" in result.output


def test_every_command_has_help_with_examples() -> None:
    """--help works on every command and shows examples and the exit codes."""
    for args in (
        [],
        ["run"],
        ["demo"],
        ["validate"],
        ["dlq"],
        ["dlq", "show"],
        ["dlq", "replay"],
    ):
        result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (args, result.output)
        assert "Examples" in result.output, args
        assert "Exit codes" in result.output, args


def store_letters(path: Path, messages: list[object], reason: str = "failed") -> None:
    from batchpunk.deadletter import JsonlDeadLetters

    async def put() -> None:
        sink = JsonlDeadLetters(str(path))
        await sink.put(
            [
                DeadLetter(m, reason=reason, error=ValueError(f"bad {i}"))
                for i, m in enumerate(messages)
            ]
        )
        await sink.close()

    asyncio.run(put())


def test_dlq_show_lists_letters_and_filters_by_reason(tmp_path: Path) -> None:
    """`dlq show` prints a table of the letters with their reasons; --reason filters, --json
    prints one parseable object per letter."""
    path = tmp_path / "dead.jsonl"
    store_letters(path, [{"id": 1}, {"id": 2}], reason="failed")
    store_letters(path, ["garbage"], reason="malformed")
    result = runner.invoke(app, ["dlq", "show", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "3 letter(s) by reason: 3 (failed 2, malformed 1)" in result.output
    result = runner.invoke(app, ["dlq", "show", str(path), "--reason", "malformed", "--json"])
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [(line["reason"], line["message"]) for line in lines] == [("malformed", "garbage")]
    result = runner.invoke(app, ["dlq", "show", str(tmp_path / "absent.jsonl")])
    assert result.exit_code == 2


def test_dlq_replay_removes_only_the_letters_that_were_written(tmp_path: Path) -> None:
    """`dlq replay` writes the letters' messages through the pipeline's sink, removes the two
    that succeeded, keeps the one the sink still refuses, and exits 1 because of it."""
    path = tmp_path / "dead.jsonl"
    store_letters(path, [{"id": 1, "body": "a"}, {"id": 2}, {"id": 3, "body": "c"}])
    (tmp_path / "p.toml").write_text(PIPELINE.format(max_size=10), encoding="utf-8")
    done = batchpunk("dlq", "replay", "dead.jsonl", "--pipeline", "p.toml", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "2 written and removed, 1 failed again and kept" in done.stdout
    assert "no column 'body'" in done.stderr
    with sqlite3.connect(tmp_path / "out.db") as db:
        assert sorted(db.execute("SELECT id, body FROM events")) == [(1, "a"), (3, "c")]
    assert [letter["message"] for letter in letters_in(path)] == [{"id": 2}]


def test_dlq_show_and_replay_read_past_a_torn_first_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file whose first put was torn by a crash (an older batchpunk then started the next put
    on a new line) is still a dead-letter file: `dlq show` and `dlq replay` skip the torn line
    with a warning, as read() does, instead of refusing the file for its first line."""
    path = tmp_path / "dead.jsonl"
    store_letters(path, [{"id": 1, "body": "a"}, {"id": 2, "body": "b"}])
    path.write_bytes(b'{"v":1,"id":"0f3c","stored_at":1717.5,"reason":"fai\n' + path.read_bytes())
    result = runner.invoke(app, ["dlq", "show", str(path), "--json"])
    assert result.exit_code == 0, result.output
    shown = [json.loads(line)["message"] for line in result.output.splitlines()]
    assert shown == [{"id": 1, "body": "a"}, {"id": 2, "body": "b"}]
    (tmp_path / "p.toml").write_text(PIPELINE.format(max_size=10), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["dlq", "replay", "dead.jsonl", "--pipeline", "p.toml"])
    assert result.exit_code == 0, result.output
    with sqlite3.connect(tmp_path / "out.db") as db:
        assert sorted(db.execute("SELECT id, body FROM events")) == [(1, "a"), (2, "b")]
    assert path.read_bytes().count(b"\n") == 1  # the torn line is kept, not lost to remove()


def test_without_typer_the_command_prints_the_pip_command() -> None:
    """When typer or rich is missing, batchpunk prints the pip install command and exits 3."""
    code = "import sys; sys.modules['typer'] = None; from batchpunk.cli import main; main(['demo'])"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 3
    assert "pip install 'batchpunk[cli]'" in done.stderr


#: The demo command with a slower handler (100 ms per batch instead of 2 ms), so that a drain takes
#: long enough (up to max_pending=20,000 messages, 4 batches at a time) for a second signal to
#: land while it runs, however busy the machine. Everything else is the real command.
_SLOW_DEMO = (
    "import runpy, batchpunk._demo as demo; demo.DemoSink.__init__.__defaults__ = (0.1,); "
    "runpy.run_module('batchpunk', run_name='__main__')"
)


@pytest.mark.parametrize("signals", [1, 2])
def test_demo_stops_on_signals_with_the_documented_exit_codes(tmp_path: Path, signals: int) -> None:
    """One SIGINT drains the demo (exit 0, the check still adds up); a second one, sent once the
    first was heard and while the drain runs, stops it at once with exit 130."""
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_DEMO, "demo", "--events", "5000000", "--live"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert process.stdout is not None
    assert process.stderr is not None
    assert "batchpunk demo" in process.stdout.readline()  # the live view's first plain line
    time.sleep(0.5)
    assert process.poll() is None
    process.send_signal(signal.SIGINT)
    heard = ""  # printed whatever the log level: the signal was heard
    while "SIGINT: draining" not in heard and (line := process.stderr.readline()):
        heard += line
    assert "SIGINT: draining, then stopping (send it again to stop at once)" in heard
    if signals == 2:
        assert process.poll() is None  # still draining: the second signal lands during it
        process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    stderr = heard + stderr
    if signals == 1:
        assert process.returncode == 0, stderr
        assert "generated: OK" in stdout
    else:
        assert process.returncode == 130, stderr
        assert "SIGINT again: stopping at once" in stderr
        assert "stopped at once by a second signal" in stderr


def test_run_serves_metrics_and_stats_while_it_runs(tmp_path: Path) -> None:
    """With [metrics] prometheus_port, `run` serves Prometheus text and the pipeline's /stats
    JSON while it runs, then drains on SIGTERM with exit 0 and prints its summary."""
    import urllib.request

    (tmp_path / "p.toml").write_text(
        """
[source]
type = "generator"
count = 10000000
rate = 20000

[batch]
max_size = 100
max_wait = 0.05

[sink]
type = "jsonl"
path = "out.jsonl"
fsync = false

[metrics]
prometheus_port = 0
live = false
""",
        encoding="utf-8",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "batchpunk", "run", "p.toml"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    line = process.stderr.readline()
    assert line.startswith("metrics: http://127.0.0.1:"), line
    base = line.split()[1].removesuffix("/metrics")
    time.sleep(1.0)
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    with urllib.request.urlopen(f"{base}/stats", timeout=10) as response:
        stats = json.loads(response.read())
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "batchpunk_messages_processed_total" in metrics
    assert stats["processed"] > 0
    assert stats["pipeline"]["read"] >= stats["processed"]
    assert "acknowledged / nacked" in stdout


#: stdin into an HTTP sink on a port where nothing listens (an outage from the first call).
_STDIN_OUTAGE = """
[source]
type = "jsonl"
path = "-"
[batch]
max_size = 10
max_wait = 0.05
retry_delay = 0.01
retry_max_delay = 0.05
circuit_breaker_cooldown = 0.1
drain_timeout = 0.5
{delivery}
[sink]
type = "http"
url = "http://127.0.0.1:{port}/in"
timeout = 0.5
[dead_letter]
type = "{letters}"
{letters_path}
[metrics]
live = false
"""


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:  # bound and closed: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _stdin_outage(tmp_path: Path, delivery: str, letters: str = "jsonl") -> subprocess.Popen[str]:
    pytest.importorskip("httpx", reason="the http sink needs the http extra (httpx)")
    (tmp_path / "p.toml").write_text(
        _STDIN_OUTAGE.format(
            delivery=delivery,
            port=_closed_port(),
            letters=letters,
            letters_path='path = "dl.jsonl"' if letters == "jsonl" else "",
        ),
        encoding="utf-8",
    )
    lines = tmp_path / "lines.jsonl"
    lines.write_text("".join(json.dumps({"id": i}) + "\n" for i in range(100)), encoding="utf-8")
    with lines.open("rb") as stdin:  # standard input that ends after 100 lines
        return subprocess.Popen(
            [sys.executable, "-m", "batchpunk", "run", "p.toml"],
            cwd=tmp_path,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "COLUMNS": "200"},
        )


def test_stdin_ending_during_an_outage_dead_letters_what_expires_instead_of_losing_it(
    tmp_path: Path,
) -> None:
    """Before, 100 lines from stdin ending while the sink was down were "nacked" after
    drain_timeout (gone: stdin cannot take them back), the dead-letter file stayed empty and
    the exit code was 0. Now the end of the input waits up to delivery_timeout, and the held
    lines are dead-lettered "expired" into the file."""
    process = _stdin_outage(tmp_path, "delivery_timeout = 1.0")
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    letters = letters_in(tmp_path / "dl.jsonl")
    assert sorted(letter["message"]["id"] for letter in letters) == list(range(100))  # type: ignore[index]
    assert {letter["reason"] for letter in letters} == {"expired"}
    assert "dead letters: 100 (expired 100)" in stdout
    assert "acknowledged / nacked: 100 / 0" in stdout


def test_a_signal_while_stdin_waits_for_an_outage_stores_shutdown_letters(
    tmp_path: Path,
) -> None:
    """SIGTERM while the ended stdin input waits for the downstream: within drain_timeout the
    held lines are stored as "shutdown" letters (stdin cannot take them back), the summary
    counts only letters that were stored, and the command exits 0."""
    process = _stdin_outage(tmp_path, "delivery_timeout = 600.0")
    assert process.stderr is not None
    heard = ""
    while "the input ended" not in heard and (line := process.stderr.readline()):
        heard += line
    assert "waiting for them" in heard, heard
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, heard + stderr
    letters = letters_in(tmp_path / "dl.jsonl")
    assert sorted(letter["message"]["id"] for letter in letters) == list(range(100))  # type: ignore[index]
    assert {letter["reason"] for letter in letters} == {"shutdown"}
    assert "dead letters: 100 (shutdown 100)" in stdout
    assert "acknowledged / nacked: 100 / 0" in stdout


def test_run_exits_1_when_messages_were_neither_written_stored_nor_returned(
    tmp_path: Path,
) -> None:
    """A dead-letter sink that fails too: the lines stdin cannot take back are lost, and the
    command says so (a "lost" row and an error line) and exits 1 instead of 0."""
    (tmp_path / "failing_letters.py").write_text(
        "class FailingLetters:\n"
        "    async def put(self, letters):\n"
        "        raise OSError('dead-letter disk unavailable')\n"
        "    async def close(self):\n"
        "        pass\n",
        encoding="utf-8",
    )
    process = _stdin_outage(tmp_path, "delivery_timeout = 600.0", "failing_letters:FailingLetters")
    assert process.stderr is not None
    heard = ""
    while "the input ended" not in heard and (line := process.stderr.readline()):
        heard += line
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, heard + stderr
    assert "lost (not written, stored or returned): 100" in stdout
    assert "error: 100 message(s) lost" in stderr


#: `batchpunk run p.toml` that sends itself a signal when it first imports a given module: a
#: signal at a known point of start-up, before the pipeline installs its handlers.
_SIGNAL_AT_IMPORT = """
import os, signal, sys
import batchpunk.cli as cli

class SignalAtImport:
    def find_spec(self, name, path=None, target=None):
        if name == sys.argv[2]:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        return None

sys.meta_path.insert(0, SignalAtImport())
cli.main(["run", "p.toml"])
"""


@pytest.mark.parametrize(
    "module", ["batchpunk._cli_app", "batchpunk.pipeline_file", "batchpunk.pipeline"]
)
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_during_start_up_is_one_line_and_exit_130(
    tmp_path: Path, signame: str, module: str
) -> None:
    """Before, SIGINT while the command still imported its modules died with a raw
    KeyboardInterrupt traceback (rc -2), or said "stopped at once by a second signal" for a
    first one, and SIGTERM killed it silently (rc -15). Now either is one line saying the
    command was interrupted before the pipeline started, and exit 130 (docs/cli.md)."""
    (tmp_path / "e.jsonl").write_text('{"a": 1}\n', encoding="utf-8")
    (tmp_path / "p.toml").write_text(
        '[source]\ntype="jsonl"\npath="e.jsonl"\n[sink]\ntype="jsonl"\npath="o.jsonl"\n'
        "[metrics]\nlive=false\n",
        encoding="utf-8",
    )
    done = subprocess.run(
        [sys.executable, "-c", _SIGNAL_AT_IMPORT, signame, module],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 130, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, lines
    assert "interrupted" in lines[0]
    assert "second signal" not in lines[0]
    assert not (tmp_path / "o.jsonl").exists()


async def test_the_demo_check_after_a_hard_stop_counts_events_written_twice_not_a_mismatch(
    tmp_path: Path,
) -> None:
    """Before, a batch whose SQLite commit finished after the hard stop had given it back was
    counted twice (rows 115,497 + letters 4 + returned 13,501 = 129,002 of 125,002 generated:
    MISMATCH) though nothing was lost. Now the check compares event ids: every generated event
    is a row, a letter or returned, and the events in two places are reported as written twice
    (at least once), not as a mismatch."""
    from batchpunk._demo import run_demo

    kept: list[asyncio.Future[None]] = []

    def hard_stop_during_a_write(pipeline: object) -> None:
        sink: object = pipeline.sink  # type: ignore[attr-defined]
        write = sink.write  # type: ignore[attr-defined]

        async def stop_then_write(batch: list[object]) -> None:
            if not kept:  # the first batch: a hard stop while its commit is under way
                kept.append(asyncio.ensure_future(write(batch)))
                pipeline.request_stop(drain=False)  # type: ignore[attr-defined]
                await asyncio.shield(kept[0])  # cancelled by the stop; the commit goes on
                return
            await write(batch)

        sink.write = stop_then_write  # type: ignore[attr-defined]

    result = await run_demo(
        20_000, directory=tmp_path, handle_signals=False, on_pipeline=hard_stop_during_a_write
    )
    await kept[0]
    assert result.aborted
    assert result.problems == []
    assert result.consistent
    assert result.written_twice > 0
    letters = letters_in(tmp_path / "dead-letters.jsonl")
    assert {letter["reason"] for letter in letters} <= {"shutdown", "failed", "malformed"}


def test_dlq_show_skips_a_torn_last_line_quietly_and_a_damaged_line_with_a_warning(
    tmp_path: Path,
) -> None:
    """What docs/cli.md now says (it said every torn line was "skipped with a warning"): a
    last line without its newline (a put in progress, or cut by a crash: never confirmed) is
    skipped quietly, exit 0 and nothing on stderr; a damaged line with its newline is skipped
    with a warning naming the file and the line."""
    path = tmp_path / "dead.jsonl"
    store_letters(path, [{"id": 1, "body": "a"}])
    path.write_bytes(path.read_bytes() + b'{"v":1,"id":"abc","reason":"fai')
    done = batchpunk("dlq", "show", "dead.jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "1 letter(s)" in done.stdout
    path.write_bytes(path.read_bytes() + b'led"}\n' + b"not a letter\n")
    done = batchpunk("dlq", "show", "dead.jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "dead.jsonl:3" in done.stderr
    assert "skipped a malformed dead letter" in done.stderr
