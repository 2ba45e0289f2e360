"""Operator mistakes and hostile inputs from issue 14, one test each: a clear one-line error
with the right exit code, nothing damaged, no secret shown."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from batchpunk._cli_app import app
from batchpunk._redact import redact
from batchpunk.config import BatchConfig
from batchpunk.connectors import JsonlSink, JsonlSource, SqliteSink
from batchpunk.deadletter import DeadLetter, JsonlDeadLetters, SqliteDeadLetters
from batchpunk.errors import ConfigError, FrameError, PartialFailure
from batchpunk.pipeline import Pipeline
from batchpunk.processor import BatchProcessor

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def cli(*args: str, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, list(args), env=env)


def one_line_error(result: Any) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines
    return lines[0]


def write_pipeline(folder: Path, sink: str = "", extra: str = "") -> Path:
    sink = sink or f'type = "jsonl"\npath = "{folder / "out.jsonl"}"'
    path = folder / "p.toml"
    path.write_text(
        f'[source]\ntype = "generator"\ncount = 5\n\n[sink]\n{sink}\n\n[metrics]\nlive = false\n'
        + extra,
        encoding="utf-8",
    )
    return path


def store(path: Path, letters: list[DeadLetter], *, sqlite: bool = False) -> None:
    async def put() -> None:
        sink = SqliteDeadLetters(path) if sqlite else JsonlDeadLetters(path)
        await sink.put(letters)
        await sink.close()

    asyncio.run(put())


# -- the command line -------------------------------------------------------------------------


def test_version_prints_the_version() -> None:
    """`batchpunk --version` prints the version and exits 0 instead of "Missing command"."""
    from batchpunk import __version__

    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"batchpunk {__version__}"


def test_help_texts_render_section_names_literally_and_name_a_real_example() -> None:
    """Help texts keep "[metrics]", "[sink]" and "[batch]" (no markup eats them) and the
    example file `run -h` names exists."""
    assert "[metrics] live" in cli("run", "-h").stdout
    replay = cli("dlq", "replay", "-h").stdout
    assert "[sink]" in replay
    assert "[batch]" in replay
    assert (ROOT / "examples" / "rabbitmq-to-postgres.toml").is_file()
    assert "examples/rabbitmq-to-postgres.toml" in cli("run", "-h").stdout


def test_a_bad_log_level_is_a_usage_error(tmp_path: Path) -> None:
    """`--log-level verbose` exits 2 with one line listing the levels, not a traceback."""
    result = cli("run", str(write_pipeline(tmp_path)), "--log-level", "verbose")
    assert result.exit_code == 2
    assert "--log-level: expected one of DEBUG, INFO" in one_line_error(result)


def test_run_with_a_metrics_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    """A [metrics] port another process holds ends `run` with one line naming the setting."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        extra = f"prometheus_port = {port}\n"
        path = write_pipeline(tmp_path)
        path.write_text(path.read_text().replace("live = false\n", "live = false\n" + extra))
        result = cli("run", str(path))
    assert result.exit_code == 1, result.output
    assert "[metrics] prometheus_port: cannot listen on 127.0.0.1" in one_line_error(result)


def test_output_off_a_terminal_is_plain_and_unwrapped(tmp_path: Path) -> None:
    """Through a pipe `dlq show` writes one tab-separated line per letter, whole, however long
    the path and the message (no table borders, no wrapping at 80 columns)."""
    deep = tmp_path / ("a-very-long-folder-name-" * 6)
    deep.mkdir()
    path = deep / "dead.jsonl"
    store(path, [DeadLetter({"id": 1, "text": "x" * 300}, reason="failed", error=ValueError("e"))])
    result = cli("dlq", "show", str(path), env={"COLUMNS": "80"})
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == f"{path}: 1 letter(s) by reason: 1 (failed 1)"
    assert lines[1].split("\t") == ["#", "reason", "error", "tries", "key", "seen", "message"]
    assert lines[2].split("\t")[-1] == json.dumps({"id": 1, "text": "x" * 300})
    assert "│" not in result.stdout


def test_run_says_it_is_draining_after_the_first_signal_whatever_the_log_level(
    tmp_path: Path,
) -> None:
    """After Ctrl-C (SIGINT) `run` says on stderr that it drains and that a second one stops at
    once, even with --log-level ERROR, and exits 0."""
    path = tmp_path / "p.toml"
    path.write_text(
        '[source]\ntype = "generator"\ncount = 1000000\nrate = 2000\n\n'
        f'[sink]\ntype = "jsonl"\npath = "{tmp_path / "out.jsonl"}"\n\n[metrics]\nlive = false\n',
        encoding="utf-8",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "batchpunk", "run", str(path), "--log-level", "ERROR"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    out = tmp_path / "out.jsonl"
    while time.monotonic() < deadline and not (out.exists() and out.stat().st_size):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "SIGINT: draining" in stderr
    assert "send it again to stop at once" in stderr


# -- validate refuses what run could not do ---------------------------------------------------


JSONL_SOURCE = 'type = "jsonl"\npath = "@T/events.jsonl"'
SQLITE = 'type = "sqlite"\npath = "@T/out.db"\ntable = "t"\ncolumns = ["id"]'


@pytest.mark.parametrize(
    ("source", "sink", "extra", "expected"),
    [
        ("", "", '[batch]\noverflow = "raise"\n', "[batch] overflow: 'raise'"),
        (JSONL_SOURCE + "\npoll_interval = nan", "", "", "[source] poll_interval"),
        ("", 'type = "http"\nurl = "http://h/x"\ntimeout = nan', "", "[sink] timeout"),
        ("", SQLITE + "\nbusy_timeout = -1.0", "", "[sink] busy_timeout: expected a number >= 0"),
        ('type = "jsonl"\npath = "@T/absent.jsonl"', "", "", "[source] path: no such file"),
        ("", SQLITE.replace("@T/", "@T/nowhere/"), "", "[sink] path: the folder"),
        ("", "", '[dead_letter]\ntype = "sqlite"\npath = "@T/d.db"\ntable = "order"\n',
         "[dead_letter] type 'sqlite': table: 'order' is an SQL keyword"),
        ("", "", '[metrics]\nprometheus_host = ""\n', "[metrics] prometheus_host"),
        ('type = ":"', "", "", "[source] type: ':' is not 'package.module:ClassName'"),
        ('type = ".x:Y"', "", "", "[source] type: '.x:Y' is not 'package.module:ClassName'"),
        ('type = "builtins:dict"', "", "", "[source] type: 'builtins:dict' is not a source"),
        ("count = 18446744073709551616", "", "", "[source] count: 18446744073709551616 does"),
        ("", "", "[metrics]\nrefresh_per_second = nan\n", "[metrics] refresh_per_second"),
        ("", "", "[batch]\nmax_size = 18446744073709551616\n", "[batch] max_size"),
    ],
)  # fmt: skip
def test_validate_refuses_what_run_could_not_do_naming_section_and_key(
    tmp_path: Path, source: str, sink: str, extra: str, expected: str
) -> None:
    """Each of these was accepted by `validate` and then failed (or misbehaved) at run time;
    now `validate` and `run` refuse it with exit 2 and one line naming section and key."""
    (tmp_path / "events.jsonl").write_text("{}\n", encoding="utf-8")
    source = source or 'type = "generator"\ncount = 5'
    if "type" not in source:
        source = 'type = "generator"\n' + source
    sink = sink or 'type = "jsonl"\npath = "@T/out.jsonl"'
    text = f"[source]\n{source}\n\n[sink]\n{sink}\n\n{extra}".replace("@T", str(tmp_path))
    if "[metrics]" not in text:
        text += "\n[metrics]\nlive = false\n"
    path = tmp_path / "p.toml"
    path.write_text(text, encoding="utf-8")
    for command in (["validate", str(path)], ["run", str(path), "--no-live"]):
        result = cli(*command)
        assert result.exit_code == 2, (command, result.output)
        assert expected in one_line_error(result), command


def test_validate_masks_secrets_in_every_section(tmp_path: Path) -> None:
    """Values from the environment are masked in every section `validate` prints, [metrics]
    included, and a URL's password is masked even when written in the file."""
    path = write_pipeline(
        tmp_path,
        sink='type = "http"\nurl = "https://u:p@ss/w@rd@api.example:8443/in?token=tok-12345"',
        extra='prometheus_host = "${METRICS_HOST}"\n',
    )
    result = cli("validate", "--json", str(path), env={"METRICS_HOST": "10.1.2.33"})
    assert result.exit_code == 0, result.output
    described = json.loads(result.stdout)
    assert described["metrics"]["prometheus_host"] == "***"
    assert described["sink"]["url"] == "https://u:***@api.example:8443/in?token=***"
    for secret in ("10.1.2.33", "p@ss/w@rd", "tok-12345"):
        assert secret not in result.output


def test_config_and_processor_raise_config_error() -> None:
    """A wrong setting raises ConfigError (a ValueError) from BatchConfig and BatchProcessor."""
    with pytest.raises(ConfigError, match="max_size: expected an integer >= 1"):
        BatchConfig(max_size=0)
    with pytest.raises(ConfigError, match="trigger: expected one of"):
        BatchConfig(trigger=[])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="does not fit in 64 bits"):
        BatchConfig(max_pending=2**70)
    with pytest.raises(ConfigError, match="config: expected a BatchConfig"):
        BatchProcessor("not a config", print)  # type: ignore[arg-type]


# -- the redactor -----------------------------------------------------------------------------


def test_the_redactor_keeps_host_and_port_and_masks_every_credential() -> None:
    """URL userinfo with '/' and '@', credential-named query parameters and pairs, bearer
    tokens and known values (also URL-quoted or repr-escaped) are masked; hosts stay."""
    text = (
        "postgresql://app:p@ss/w@rd@db.internal:5432/orders, "
        "https://api.example/in?x=1&access_token=abc@def&y=2, password='hunter 2', "
        "Authorization: Bearer eyJabc.def, "
        "env s3cr%2Ft and 's3c\\\\r/t'"
    )
    shown = redact(text, {"s3cr/t", "s3c\\r/t"})
    assert shown == (
        "postgresql://app:***@db.internal:5432/orders, "
        "https://api.example/in?x=1&access_token=***&y=2, password='***', "
        "Authorization: Bearer ***, "
        "env *** and '***'"
    )


def test_the_redactor_masks_a_credential_named_quoted_key() -> None:
    """A JSON or Python key ends in a quote before its ':' (``"token":"x"``), which the pair
    rule missed, so an unknown token in a JSON error body (an HTTP 401 answer) was shown. Only
    a string value is masked there, so redacted JSON (``validate --json``) still parses."""
    text = (
        '{"error":"invalid_token","token":"eyJ0eXAi.abc","user":"bob","session_ttl": 30,'
        '"auth": null} '
        "{'password': 'hunter 2'}"
    )
    shown = redact(text)
    assert shown == (
        '{"error":"invalid_token","token":"***","user":"bob","session_ttl": 30,"auth": null} '
        "{'password': '***'}"
    )
    json.loads(shown.split("} ")[0] + "}")  # JSON text stays JSON


def test_the_redactor_leaves_words_that_are_no_credential_alone() -> None:
    """The pair rule masked whatever followed a credential-named word: validate showed
    ``token=***`` for no token at all, errors lost their wording (``password: *** str``), and
    a path to a file named like a credential lost the next word (``/etc/passwd: *** such
    file``). An absent value, the word "expected" and a path stay; real values are masked."""
    assert redact("[metrics] token=None host=0.0.0.0") == "[metrics] token=None host=0.0.0.0"
    assert redact("[sink] password: expected str, got 5 (int)") == (
        "[sink] password: expected str, got 5 (int)"
    )
    assert redact("spool /etc/passwd: No such directory") == (
        "spool /etc/passwd: No such directory"
    )
    assert redact("cannot read C:\\keys\\token: denied") == "cannot read C:\\keys\\token: denied"
    assert redact("token=abc password: hunter2 secret: None2") == (
        "token=*** password: *** secret: ***"
    )
    # A credential after a path or a slash is still one.
    assert redact("conn failed: /run/secrets/db_password=abc") == (
        "conn failed: /run/secrets/db_password=***"
    )
    assert redact("https://h/api/token=abc123") == "https://h/api/token=***"
    assert redact("C:\\app\\token=abc123") == "C:\\app\\token=***"
    assert redact("sqlcmd /password:hunter2") == "sqlcmd /password:***"
    # A blank value from the environment is no secret: masking it garbled every space.
    assert redact("bt.toml: [metrics] token: expected", {" ", "\t"}) == (
        "bt.toml: [metrics] token: expected"
    )


def test_mask_secrets_and_mask_url_delegate_to_the_redactor() -> None:
    """The connectors' helpers are the one redactor, so every connector masks alike."""
    from batchpunk.connectors._common import mask_secrets, mask_url
    from batchpunk.connectors.postgres import mask_dsn

    url = "redis://user:pa/ss@cache:6379/0?token=abcd"
    assert mask_url(url) == redact(url) == "redis://user:***@cache:6379/0?token=***"
    assert mask_secrets("x swordfish y", ["swordfish"]) == "x *** y"
    assert mask_dsn("postgresql://a:b/c@db:5432/x") == "postgresql://a:***@db:5432/x"


def test_dead_letters_store_errors_and_secret_headers_redacted(tmp_path: Path) -> None:
    """An error naming a URL with ?token= and an Authorization header never reach the
    dead-letter file or `dlq show` whole."""
    path = tmp_path / "dead.jsonl"
    error = ValueError("POST https://api.example/in?token=tok-98765 answered 400")
    letter = DeadLetter({"id": 1}, error=error, headers={"Authorization": "Bearer tok-98765"})
    store(path, [letter])
    assert "tok-98765" not in path.read_text(encoding="utf-8")
    assert "tok-98765" not in cli("dlq", "show", str(path)).output


# -- dead-letter tools ------------------------------------------------------------------------


def test_dlq_show_refuses_other_files_and_unknown_reasons(tmp_path: Path) -> None:
    """`dlq show` on a pipeline file, a corrupt SQLite file or with `--reason bogus` exits 2
    with one line; an ordinary database is refused and left exactly as it was."""
    pipeline = write_pipeline(tmp_path)
    result = cli("dlq", "show", str(pipeline))
    assert result.exit_code == 2
    assert "not a batchpunk dead-letter file" in one_line_error(result)
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4096)
    result = cli("dlq", "show", str(corrupt))
    assert result.exit_code == 2
    assert str(corrupt) in one_line_error(result)
    plain = tmp_path / "plain.db"
    with sqlite3.connect(plain) as db:
        db.execute("CREATE TABLE orders (id INTEGER)")
    db.close()
    before = plain.read_bytes()
    for command in (
        ["dlq", "show", str(plain)],
        ["dlq", "replay", str(plain), "-p", str(pipeline)],
    ):
        result = cli(*command)
        assert result.exit_code == 2, result.output
        assert "not a batchpunk dead-letter database" in one_line_error(result)
    assert plain.read_bytes() == before
    assert not (tmp_path / "plain.db-wal").exists()
    letters = tmp_path / "dead.jsonl"
    store(letters, [DeadLetter(1, error=ValueError("e"))])
    result = cli("dlq", "show", str(letters), "--reason", "bogus")
    assert result.exit_code == 2
    assert "--reason: expected one of" in one_line_error(result)


def test_dlq_show_opens_sqlite_stores_read_only(tmp_path: Path) -> None:
    """`dlq show` reads an SQLite dead-letter store without writing to it."""
    path = tmp_path / "dead.db"
    store(path, [DeadLetter({"id": 1}, error=ValueError("e"))], sqlite=True)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=DELETE")
    db.close()
    before = path.read_bytes()
    result = cli("dlq", "show", str(path), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["message"] == {"id": 1}
    assert path.read_bytes() == before


def test_dlq_show_shows_letters_whose_time_is_not_a_time(tmp_path: Path) -> None:
    """A letter whose first_seen is 1e300 or NaN is shown (its raw value), not a traceback;
    --json stays valid JSON."""
    path = tmp_path / "dead.jsonl"
    store(path, [DeadLetter(1, error=ValueError("e"), first_seen=1e300)])
    with path.open("a", encoding="utf-8") as out:
        out.write(
            '{"v": 1, "id": "n", "stored_at": 0, "reason": "failed", "priority": 0, '
            '"attempts": 1, "first_seen": NaN, "error_type": "E", "error": "e", '
            '"traceback": "", "message": 2}\n'
        )
    result = cli("dlq", "show", str(path))
    assert result.exit_code == 0, result.output
    assert "1e+300" in result.stdout
    assert "nan" in result.stdout
    result = cli("dlq", "show", str(path), "--json")
    assert [json.loads(line)["first_seen"] for line in result.stdout.splitlines()] == [1e300, None]


def test_dlq_replay_sends_only_letters_that_carry_their_message(tmp_path: Path) -> None:
    """A letter whose message was stored only as its repr is not sent to the sink as if it
    were the message: it is reported and kept; the others are written and removed."""
    path = tmp_path / "dead.jsonl"
    store(
        path,
        [
            DeadLetter({"id": 1}, error=ValueError("e")),
            DeadLetter(object(), error=ValueError("cannot be stored")),
        ],
    )
    pipeline = write_pipeline(tmp_path)
    result = cli("dlq", "replay", str(path), "-p", str(pipeline))
    assert result.exit_code == 1, result.output
    assert "1 written and removed" in result.stdout
    assert "1 letter(s) not sent and kept: their message was stored only as its repr" in (
        result.stderr
    )
    written = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in written] == [{"id": 1}]
    left = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(left) == 1
    assert "message_repr" in left[0]


def test_dlq_replay_with_the_sink_down_is_a_one_line_error(tmp_path: Path) -> None:
    """`dlq replay` whose sink cannot connect ends with one line, exit 1, no password, and
    keeps every letter."""
    pytest.importorskip("asyncpg")
    path = tmp_path / "dead.jsonl"
    store(path, [DeadLetter({"id": 1}, error=ValueError("e"))])
    before = path.read_bytes()
    pipeline = write_pipeline(
        tmp_path,
        sink='type = "postgres"\ndsn = "postgresql://app:pw-4242@127.0.0.1:1/x"\n'
        'table = "t"\ncolumns = ["id"]\ntimeout = 2.0',
    )
    result = cli("dlq", "replay", str(path), "-p", str(pipeline), "--log-level", "ERROR")
    assert result.exit_code == 1, result.output
    assert "127.0.0.1', 1" in one_line_error(result)
    assert "pw-4242" not in result.output
    assert path.read_bytes() == before


# -- sinks, sources and frames ----------------------------------------------------------------


def test_jsonl_sink_refuses_nan_and_lone_surrogates_per_payload(tmp_path: Path) -> None:
    """NaN, Infinity and a lone surrogate fail their own payload with a non-retryable
    PayloadError; the rest of the batch is written as real JSON."""
    path = tmp_path / "out.jsonl"

    async def write() -> PartialFailure:
        sink = JsonlSink(str(path))
        try:
            await sink.write([{"a": 1}, {"a": math.nan}, {"a": "x\ud800"}, {"a": math.inf}])
        except PartialFailure as exc:
            return exc
        finally:
            await sink.close()
        raise AssertionError("no failure")

    failure = asyncio.run(write())
    assert sorted(failure.failures) == [1, 2, 3]
    for error in failure.failures.values():
        assert type(error).__name__ == "PayloadError"
        assert getattr(error, "retryable", True) is False
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"a": 1}]


def test_sqlite_sink_fails_a_lone_surrogate_alone(tmp_path: Path) -> None:
    """A str with a lone surrogate fails its own row with a PayloadError; the batch's other
    rows are committed (it is not retried, split and labelled UnicodeEncodeError)."""

    async def write() -> PartialFailure:
        sink = SqliteSink(str(tmp_path / "out.db"), "t", ["id", "v"])
        try:
            await sink.write([{"id": 1, "v": "ok"}, {"id": 2, "v": "bad\ud800"}])
        except PartialFailure as exc:
            return exc
        finally:
            await sink.close()
        raise AssertionError("no failure")

    failure = asyncio.run(write())
    assert list(failure.failures) == [1]
    assert type(failure.failures[1]).__name__ == "PayloadError"
    with sqlite3.connect(tmp_path / "out.db") as db:
        assert db.execute("SELECT id FROM t").fetchall() == [(1,)]
    db.close()


def test_a_checkpoint_of_a_replaced_shorter_file_does_not_skip_its_lines(tmp_path: Path) -> None:
    """A JSONL checkpoint written for one file does not make a replaced, shorter file skip
    its lines: the new file is read from the start (with a warning)."""
    events, out = tmp_path / "events.jsonl", tmp_path / "out.jsonl"
    checkpoint = str(tmp_path / "events.checkpoint")

    async def run() -> None:
        source = JsonlSource(str(events), checkpoint=checkpoint)
        await Pipeline(source, JsonlSink(str(out)), BatchConfig(max_wait=0.01)).run()

    events.write_text("".join(json.dumps({"old": i}) + "\n" for i in range(10)))
    asyncio.run(run())
    replacement = tmp_path / "new.jsonl"
    replacement.write_text("".join(json.dumps({"new": i}) + "\n" for i in range(3)))
    os.replace(replacement, events)
    asyncio.run(run())
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w for w in written if "new" in w] == [{"new": 0}, {"new": 1}, {"new": 2}]


def test_a_tiny_frame_that_decodes_to_hundreds_of_mib_is_refused() -> None:
    """A frame of 3.5 million empty msgpack arrays, about 160 bytes with zstd, is refused by
    the object bound before it is decoded (it used to become 220 MiB of lists)."""
    pytest.importorskip("msgspec")
    pytest.importorskip("zstandard")
    from batchpunk.codec import decode_batch, encode_batch

    empty: list[Any] = []
    frame = encode_batch([empty] * 3_500_000, serializer="msgpack", compression="zstd")
    assert len(frame) < 400
    with pytest.raises(FrameError, match="too many objects"):
        decode_batch(frame)
    small = encode_batch([empty] * 1000, serializer="msgpack", compression="zstd")
    assert decode_batch(small) == [[]] * 1000
