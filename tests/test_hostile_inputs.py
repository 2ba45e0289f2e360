"""A careless or hostile user, generated: pipeline files, command lines and frames.

Pipeline files come from the real schema (tests/hostile_support.py). The properties: never a
traceback; a bad file exits 2 with one line naming its section and key; no secret in any
output; what `validate` accepts, `run` accepts (runs use only server-free connectors); frames
decode within their memory bound or fail with FrameError. BATCHPUNK_HOSTILE_EXAMPLES sets the
examples per property (default 40 for CI; the counts run are printed at the end).
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import string
import tempfile
import tracemalloc
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from batchpunk._cli_app import app
from batchpunk.codec import decode_batch
from batchpunk.codec._objects import object_limit
from batchpunk.codec.frame import _PREFIX, MAGIC
from batchpunk.codec.options import COMPRESSION_IDS, SERIALIZER_IDS
from batchpunk.errors import FrameError
from tests.hostile_support import (
    BASES,
    COUNTS,
    NAMED_SECRET_VAR,
    REGISTRIES,
    SECRET_VAR,
    SECRETS,
    kept_logging,
    pipeline_cases,
    secret_forms,
    write_pipeline,
)

EXAMPLES = int(os.environ.get("BATCHPUNK_HOSTILE_EXAMPLES", "40"))
HOSTILE = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
runner = CliRunner()


class Hung(BaseException):
    """A run that did not end within its time: BaseException, so no command swallows it."""


def env_for(secret: str) -> dict[str, str]:
    return {SECRET_VAR: secret, NAMED_SECRET_VAR: secret[::-1] + "T0k", "BP_HOSTILE_NUMBER": "12"}


def invoke(args: list[str], env: dict[str, str], seconds: float = 60) -> Any:
    """The command in this process, with a deadline (a run that hangs is a finding too)."""

    def expire(signum: int, frame: object) -> None:
        raise Hung(f"batchpunk {' '.join(args)} did not end within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    cwd = os.getcwd()
    try:
        # Relative paths in generated files and arguments land in a scratch folder.
        with tempfile.TemporaryDirectory() as scratch, kept_logging():
            os.chdir(scratch)
            try:
                return runner.invoke(app, args, env=env)
            finally:
                os.chdir(cwd)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def assert_clean(result: Any, secret: str, env: dict[str, str]) -> None:
    """No traceback, an exit code from the documented table, no secret anywhere."""
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}\n{result.output}"
    )
    assert "Traceback" not in result.output, result.output
    assert result.exit_code in (0, 1, 2, 3, 130), result.output
    for value in (secret, env[NAMED_SECRET_VAR]):
        for form in secret_forms(value):
            assert form not in result.output, f"secret {form!r} shown:\n{result.output}"
    if result.exit_code not in (0,) and result.stderr.startswith("error:"):
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def names(message: str, section: str, key: str) -> bool:
    """Whether an error message names the section and the key (or the section's type)."""
    return f"[{section}]" in message and (
        key in message or repr(key)[1:-1] in message or f"[{section}] type" in message
    )


def test_the_bases_cover_every_registered_type() -> None:
    """Every connector type in the registries has a base section, so the generated files
    reach every class (a new connector must add one)."""
    for section, registry in REGISTRIES.items():
        assert sorted(BASES[section]) == sorted(registry), section


def strings_in(value: Any) -> list[str]:
    """Every key and string value in a nested structure."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in [str(k), *strings_in(v)]]
    if isinstance(value, list):
        return [t for v in value for t in strings_in(v)]
    return []


def written_in(sections: dict[str, Any], secret: str) -> dict[str, Any]:
    """The sections with the secret written into the file itself (URL-quoted, as a URL needs
    it) instead of taken from the environment: the redactor must find it by shape."""
    reference = "${" + SECRET_VAR + "}"

    def swap(value: Any) -> Any:
        if isinstance(value, str) and "://" in value:
            return value.replace(reference, quote(secret, safe=""))
        if isinstance(value, list):
            return [swap(v) for v in value]
        return value

    return {name: {k: swap(v) for k, v in table.items()} for name, table in sections.items()}


@HOSTILE
@given(case=pipeline_cases(), secret=SECRETS, literal=st.booleans())
def test_validate_refuses_bad_files_in_one_line_naming_section_and_key(
    case: tuple[dict[str, Any], list[tuple[str, str]]], secret: str, literal: bool
) -> None:
    """`validate` on a generated file: exit 0 or 2 (3 for a missing extra), never a
    traceback, never a secret (from the environment, or written in a URL of the file); a
    refusal is one line naming a mutated section and key."""
    sections, mutated = case
    env = env_for(secret)
    if literal:  # the secret only in the file, so that nothing knows its value
        assume(not any(secret in text for text in strings_in(sections)))  # typed in plain
        sections = written_in(sections, secret)
        env[SECRET_VAR] = "Env-Value-1"
    with tempfile.TemporaryDirectory() as folder:
        path = write_pipeline(sections, Path(folder))
        result = invoke(["validate", str(path)], env)
        COUNTS["validate"] += 1
    assert_clean(result, secret, env)
    assert result.exit_code in (0, 2, 3), result.output
    if result.exit_code == 2:
        message = result.stderr
        assert message.startswith("error:"), message
        # A key that is the secret is masked like the secret; a key whose value holds the
        # secret may be refused for it (a raw "[" or "/" in a URL's password).
        masked_key = any(secret in k for _, k in mutated)
        named = mutated + [
            (name, key)
            for name, table in sections.items()
            for key, value in table.items()
            if "${" + SECRET_VAR + "}" in str(value)
        ]
        if not masked_key:
            assert any(names(message, s, k) for s, k in named), (mutated, message)


@settings(HOSTILE, max_examples=EXAMPLES * 5)
@given(case=pipeline_cases(runnable=True), secret=SECRETS)
def test_what_validate_accepts_run_accepts(
    case: tuple[dict[str, Any], list[tuple[str, str]]], secret: str
) -> None:
    """A generated file `validate` accepts is not refused by `run` (exit 0, or 1 for a
    failure at run time, never 2), and the run ends, without a traceback or a secret."""
    sections, _ = case
    env = env_for(secret)
    with tempfile.TemporaryDirectory() as folder:
        path = write_pipeline(sections, Path(folder))
        checked = invoke(["validate", str(path)], env)
        COUNTS["validate"] += 1
        assert_clean(checked, secret, env)
        if checked.exit_code != 0:
            return
        result = invoke(["run", str(path), "--no-live"], env)
        COUNTS["run"] += 1
    assert_clean(result, secret, env)
    if result.exit_code == 2:
        # Only a check against the downstream itself (a table that is not there, found once
        # the sink opens its database) may refuse what validate, which connects to nothing,
        # accepted; never a check of the file.
        assert not re.match(rf"error: ({re.escape(str(path))}: )?\[[a-z_]+\]", result.stderr), (
            f"validate accepted, run refused:\n{result.output}"
        )
        COUNTS["run refused by the downstream"] += 1
    else:
        assert result.exit_code in (0, 1), result.output


# -- command lines ----------------------------------------------------------------------------


def _files(folder: Path) -> dict[str, Path]:
    """Files a user might hand any command, good and bad."""
    import asyncio

    from batchpunk.deadletter import DeadLetter, JsonlDeadLetters, SqliteDeadLetters

    files = {
        "missing": folder / "missing.jsonl",
        "folder": folder,
        "empty": folder / "empty.jsonl",
        "binary": folder / "binary.bin",
        "corrupt": folder / "corrupt.db",
        "plain_db": folder / "plain.db",
        "letters": folder / "letters.jsonl",
        "letters_db": folder / "letters.db",
        "pipeline": folder / "pipeline.toml",
    }
    files["empty"].write_bytes(b"")
    files["binary"].write_bytes(bytes(range(256)) * 4)
    files["corrupt"].write_bytes(b"SQLite format 3\x00" + b"\xff" * 2000)
    with sqlite3.connect(files["plain_db"]) as db:
        db.execute("CREATE TABLE orders (id INTEGER)")
    db.close()

    async def store() -> None:
        letters = [
            DeadLetter({"id": 1}, reason="failed", error=ValueError("bad")),
            DeadLetter({"id": 2}, reason="malformed", error=ValueError("x"), first_seen=1e300),
            DeadLetter(object(), reason="failed", error=ValueError("unstorable message")),
        ]
        for sink in (JsonlDeadLetters(files["letters"]), SqliteDeadLetters(files["letters_db"])):
            await sink.put(letters)
            await sink.close()

    asyncio.run(store())
    with open(files["letters"], "a", encoding="utf-8") as out:  # a first_seen of NaN
        out.write(
            '{"v": 1, "id": "nan", "stored_at": 0, "reason": "failed", "priority": 0, '
            '"attempts": 1, "first_seen": NaN, "error_type": "E", "error": "e", '
            '"traceback": "", "message": 3}\n'
        )
    sections = {
        "source": {"type": "generator", "count": 5},
        "sink": {"type": "jsonl", "path": str(folder / "replayed.jsonl")},
        "metrics": {"live": False},
    }
    write_pipeline(sections, folder).rename(files["pipeline"])
    return files


_TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["failed", "bogus", "INFO", "verbose", "-1", "0", "99999999999999999999"]),
)


@st.composite
def command_lines(draw: st.DrawFn) -> list[str]:
    """An argv for batchpunk: real commands with good and bad files and option values."""
    names = ["missing", "folder", "empty", "binary", "corrupt", "plain_db", "letters",
             "letters_db", "pipeline"]  # fmt: skip
    file = "@" + draw(st.sampled_from(names))
    shapes = ["validate", "show", "replay", "run", "demo", "version", "help", "junk"]
    shape = draw(st.sampled_from(shapes))
    if shape == "validate":
        return ["validate", file, *draw(st.sampled_from([[], ["--json"]]))]
    if shape == "show":
        argv = ["dlq", "show", file]
        if draw(st.booleans()):
            argv += ["--reason", draw(_TEXT)]
        if draw(st.booleans()):
            argv += ["--limit", draw(_TEXT)]
        return argv + draw(st.sampled_from([[], ["--json"]]))
    if shape == "replay":
        argv = ["dlq", "replay", file, "-p", "@" + draw(st.sampled_from(["pipeline", *names]))]
        return argv + (["--reason", draw(_TEXT)] if draw(st.booleans()) else [])
    if shape == "run":
        argv = ["run", file, "--no-live"]
        return argv + (["--log-level", draw(_TEXT)] if draw(st.booleans()) else [])
    if shape == "demo":
        events = draw(st.sampled_from(["-5", "0", "abc", "99999999999999999999", "300", "1e3"]))
        return ["demo", "--events", events, "--no-live", "--dir", "@folder"]
    if shape == "version":
        return ["--version"]
    if shape == "help":
        return [draw(st.sampled_from(["run", "validate", "dlq", "demo"])), "-h"]
    return draw(st.lists(_TEXT, min_size=1, max_size=4))


@HOSTILE
@given(argv=command_lines(), secret=SECRETS)
def test_command_lines_never_trace_back_and_leave_other_files_alone(
    argv: list[str], secret: str
) -> None:
    """Generated command lines: a documented exit code, no traceback, no secret, our own
    errors in one line; an ordinary database handed to the dead-letter tools is refused and
    left exactly as it was (no table created, no switch to WAL)."""
    assume(not any(secret in arg for arg in argv))  # a secret typed on the command line is shown
    env = env_for(secret)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = _files(folder)
        args = [str(files[a[1:]]) if a.startswith("@") and a[1:] in files else a for a in argv]
        result = invoke(args, env)
        COUNTS["command line"] += 1
        with sqlite3.connect(files["plain_db"]) as db:
            tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master")]
            mode = db.execute("PRAGMA journal_mode").fetchone()[0]
        db.close()
    assert_clean(result, secret, env)
    assert tables == ["orders"], (args, tables)
    assert mode != "wal", args
    if args[:2] == ["dlq", "show"] and "--reason" in args:
        reason = args[args.index("--reason") + 1]
        if reason not in ("failed", "malformed", "redelivered", "expired", "dropped", "shutdown"):
            assert result.exit_code == 2, result.output


# -- frames -----------------------------------------------------------------------------------


def frame_of(raw: bytes, serializer: str, compression: str) -> bytes:
    """A frame with a correct header and checksum around any payload bytes."""
    payload = zlib.compress(raw, 9) if compression == "zlib" else raw
    header = _PREFIX.pack(
        MAGIC, 1, SERIALIZER_IDS[serializer], COMPRESSION_IDS[compression], 0, len(raw),
        len(payload),
    )  # fmt: skip
    crc = zlib.crc32(payload, zlib.crc32(header))
    return header + crc.to_bytes(4, "little") + payload


@st.composite
def bombs(draw: st.DrawFn) -> tuple[bytes, str]:
    """Payloads that expand: many empty containers, nested or flat, msgpack or JSON."""
    serializer = draw(st.sampled_from(["msgpack", "json"]))
    count = draw(st.integers(min_value=1, max_value=3_000_000))
    depth = draw(st.integers(min_value=0, max_value=3))
    if serializer == "msgpack":
        inner = b"\x91" * depth + b"\x90"  # [[[...[]]]]
        raw = b"\xdd" + count.to_bytes(4, "big") + inner * count
    else:
        inner = b"[" * depth + b"[]" + b"]" * depth
        raw = b"[" + b",".join([inner] * count) + b"]"
    return raw, serializer


@settings(
    max_examples=max(5, EXAMPLES // 4), deadline=None, suppress_health_check=list(HealthCheck)
)
@given(bomb=bombs(), compression=st.sampled_from(["zlib", "none"]))
def test_frames_that_expand_stay_within_their_memory_bound(
    bomb: tuple[bytes, str], compression: str
) -> None:
    """A frame of many small containers either decodes within about 100 bytes per allowed
    object plus its decompressed size, or is refused with FrameError: never more."""
    raw, serializer = bomb
    frame = frame_of(raw, serializer, compression)
    limit = object_limit(None, len(frame))
    refusal = ""
    tracemalloc.start()
    try:
        decode_batch(frame)
    except FrameError as exc:
        refusal = str(exc)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert not refusal or "too many objects" in refusal, refusal
    COUNTS["frame bomb"] += 1
    assert peak <= 100 * limit + 3 * len(raw) + 2**20, (peak, limit, len(raw))


@settings(max_examples=EXAMPLES * 5, deadline=None)
@given(
    raw=st.binary(max_size=300) | st.builds(lambda b: b"\xdd\xff\xff\xff\xff" + b, st.binary()),
    serializer=st.sampled_from(["msgpack", "json"]),
    compression=st.sampled_from(["zlib", "none"]),
    max_objects=st.none() | st.integers(min_value=1, max_value=64),
)
def test_random_payloads_decode_or_fail_with_frame_error(
    raw: bytes, serializer: str, compression: str, max_objects: int | None
) -> None:
    """Random payload bytes in a well-formed frame: a list or a FrameError, nothing else,
    and never more objects than max_objects allows."""
    frame = frame_of(raw, serializer, compression)
    COUNTS["frame payload"] += 1
    try:
        messages = decode_batch(frame, max_objects=max_objects)
    except FrameError:
        return
    assert isinstance(messages, list)
    if max_objects is not None and len(raw) > max_objects:
        assert _objects(messages) <= max_objects


def _objects(value: Any) -> int:
    if isinstance(value, list):
        return 1 + sum(_objects(v) for v in value)
    if isinstance(value, dict):
        return 1 + sum(_objects(k) + _objects(v) for k, v in value.items())
    return 1


@settings(max_examples=EXAMPLES * 2, deadline=None)
@given(
    secret=SECRETS,
    shape=st.sampled_from(
        [
            "postgresql://app:{s}@db.internal:5432/orders",
            "amqp://guest:{s}@rabbit:5672/vhost",
            "https://api.example/in?token={s}&x=1",
            "https://api.example/in?x=1&api_key={s}",
            "Authorization: Bearer {s}",
            "host=db password={s} port=5432",
            "redis://:{s}@cache:6379/0",
        ]
    ),
    around=st.text(alphabet=string.ascii_letters + " :'\"()[]{},", max_size=20),
)
def test_the_redactor_masks_credentials_of_any_characters_and_keeps_the_host(
    secret: str, shape: str, around: str
) -> None:
    """A credential in a URL's userinfo, a credential-named query parameter or pair, or an
    Authorization header is masked whatever characters it holds, with no known value given;
    the host stays visible."""
    from batchpunk._redact import redact

    if (any(c in secret for c in " &#\"'") and "?" in shape) or "password=" in shape:
        secret = secret.translate(str.maketrans("", "", " &#\"';,)]}"))  # such values need quotes
    if "Bearer" in shape or "password=" in shape:
        secret = secret.translate(str.maketrans("", "", ",;)]}\"'"))
    if len(secret) < 8 or not any(c.isalnum() for c in secret):
        return
    assume(secret not in around + shape)
    text = around + shape.format(s=secret) + around
    shown = redact(text)
    COUNTS["redaction"] += 1
    assert secret not in shown, shown
    for host in ("db.internal:5432", "rabbit:5672", "api.example", "cache:6379"):
        if host in shape:
            assert host in shown, shown
