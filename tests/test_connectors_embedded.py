"""The embedded connectors on their own: GeneratorSource, JsonlSource/JsonlSink, SqliteSink."""

from __future__ import annotations

import asyncio
import errno
import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from batchpunk.connectors import GeneratorSource, JsonlSink, JsonlSource, SqliteSink
from batchpunk.connectors._common import PayloadError, mask_secrets
from batchpunk.deadletter import DeadLetter, JsonlDeadLetters
from batchpunk.envelope import Envelope
from batchpunk.errors import ConfigError, PartialFailure
from tests.engine_support import ListSource


async def collect(source: Any) -> list[Envelope]:
    return [envelope async for envelope in source]


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


# -- GeneratorSource ----------------------------------------------------------------------------


async def test_generator_yields_count_events_with_known_bad_ones() -> None:
    """The generator yields exactly count envelopes; the malformed and poison ids it announces
    are exactly the undecodable envelopes and the events without an amount."""
    source = GeneratorSource(200, keys=3, priorities=2, malformed=4, poison=6, seed=7)
    envelopes = await collect(source)
    assert len(envelopes) == 200 == source.produced
    malformed = {e.headers["id"] for e in envelopes if e.malformed}
    poison = {e.payload["id"] for e in envelopes if not e.malformed and "amount" not in e.payload}
    assert malformed == source.malformed_ids
    assert len(malformed) == 4
    assert poison == source.poison_ids
    assert len(poison) == 6
    good = [e for e in envelopes if not e.malformed]
    assert {e.key for e in good} == {"k0", "k1", "k2"}
    assert {e.priority for e in good} == {0, 1}


async def test_generator_is_reproducible_and_validates_arguments() -> None:
    """The same seed picks the same bad events; impossible settings fail naming the argument."""
    assert (
        GeneratorSource(100, poison=5, seed=1).poison_ids
        == GeneratorSource(100, poison=5, seed=1).poison_ids
    )
    with pytest.raises(ValueError, match="malformed \\+ poison"):
        GeneratorSource(3, malformed=2, poison=2)
    with pytest.raises(ValueError, match="keys"):
        GeneratorSource(3, keys=-1)


async def test_generator_close_ends_iteration() -> None:
    """close() ends an endless generator at the next event."""
    source = GeneratorSource(None)
    seen = 0
    async for _ in source:
        seen += 1
        if seen == 10:
            await source.close()
            await source.close()
    assert seen == 10


# -- JsonlSource --------------------------------------------------------------------------------


async def test_jsonl_source_reads_lines_and_flags_malformed_ones(tmp_path: Path) -> None:
    """Every non-blank line becomes one envelope in order; a non-JSON line is malformed with its
    text as payload and an error naming the line, and reading goes on after it."""
    path = tmp_path / "in.jsonl"
    write_lines(path, ['{"id": 1}', "not json", "", '{"id": 2, "user": "a"}', "[1, 2"])
    envelopes = await collect(JsonlSource(str(path), key_field="user"))
    assert [e.malformed for e in envelopes] == [False, True, False, True]
    assert envelopes[0].payload == {"id": 1}
    assert envelopes[1].payload == "not json"
    assert "line 2" in str(envelopes[1].error)
    assert envelopes[2].key == "a"
    assert envelopes[2].headers == {"line": 4}
    assert envelopes[3].headers == {"line": 5}


async def test_jsonl_source_reads_a_last_line_without_newline(tmp_path: Path) -> None:
    """A file whose last line lacks the newline still yields that line."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": 1}\n{"id": 2}', encoding="utf-8")
    assert [e.payload["id"] for e in await collect(JsonlSource(str(path)))] == [1, 2]


async def test_jsonl_source_reads_a_file_larger_than_one_chunk(tmp_path: Path) -> None:
    """Lines that straddle the 1 MiB read chunks come out whole and in order."""
    path = tmp_path / "big.jsonl"
    filler = "x" * 300
    write_lines(path, [json.dumps({"id": i, "pad": filler}) for i in range(5000)])
    ids = [e.payload["id"] for e in await collect(JsonlSource(str(path)))]
    assert ids == list(range(5000))


async def test_jsonl_checkpoint_resumes_without_redelivering_acked_lines(tmp_path: Path) -> None:
    """With a checkpoint, a second source skips every acknowledged line (even beyond the first
    unacknowledged one) and delivers exactly the others, with their original line numbers."""
    path, checkpoint = tmp_path / "in.jsonl", tmp_path / "in.ckpt"
    write_lines(path, [json.dumps({"id": i}) for i in range(10)])
    first = JsonlSource(str(path), checkpoint=str(checkpoint))
    envelopes = await collect(first)
    await first.ack_many([e for e in envelopes if e.payload["id"] not in (3, 6)])
    await first.nack_many([envelopes[6]], True)
    await first.close()
    again = await collect(JsonlSource(str(path), checkpoint=str(checkpoint)))
    assert [e.payload["id"] for e in again] == [3, 6]
    assert [e.headers["line"] for e in again] == [4, 7]


async def test_jsonl_checkpoint_rejects_stdin_and_garbage(tmp_path: Path) -> None:
    """A checkpoint cannot go with stdin, and a file that is not a checkpoint is refused."""
    with pytest.raises(ConfigError, match="checkpoint"):
        JsonlSource("-", checkpoint=str(tmp_path / "c"))
    path, checkpoint = tmp_path / "in.jsonl", tmp_path / "c"
    write_lines(path, ['{"id": 1}'])
    checkpoint.write_text("nonsense", encoding="utf-8")
    with pytest.raises(ConfigError, match="not a JsonlSource checkpoint"):
        await collect(JsonlSource(str(path), checkpoint=str(checkpoint)))


async def test_jsonl_source_keeps_the_bytes_of_a_line_that_is_not_utf8(tmp_path: Path) -> None:
    """A line that is not UTF-8 becomes a malformed envelope holding the line's exact bytes
    (not text with U+FFFD in place of the bad bytes), and its dead letter keeps them."""
    raw = b'{"name": "caf\xe9", "id": 7}'  # Latin-1 text in a UTF-8 file
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": 1}\n' + raw + b"\r\n")
    good, bad = await collect(JsonlSource(str(path)))
    assert good.payload == {"id": 1}
    assert bad.malformed
    assert "line 2" in str(bad.error)
    assert bad.payload == raw
    async with JsonlDeadLetters(tmp_path / "dead.jsonl") as dead:
        await dead.put([DeadLetter(bad.payload, reason="malformed", error=bad.error)])
        assert [letter.message async for letter in dead.read()] == [raw]


async def test_jsonl_source_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """Reading a file that does not exist fails with its name, not a bare OSError."""
    with pytest.raises(ConfigError, match="cannot read"):
        await collect(JsonlSource(str(tmp_path / "missing.jsonl")))


# -- JsonlSink ----------------------------------------------------------------------------------


async def test_jsonl_sink_appends_batches_and_isolates_unserializable_payloads(
    tmp_path: Path,
) -> None:
    """Batches are appended as lines; a payload that is not JSON fails alone (PartialFailure
    naming its index) while the rest of its batch is written."""
    path = tmp_path / "out.jsonl"
    sink = JsonlSink(str(path))
    await sink.write([{"id": 1}, {"id": 2}])
    with pytest.raises(PartialFailure) as info:
        await sink.write([{"id": 3}, {"bad": object()}])
    assert list(info.value.failures) == [1]
    assert "index 1" in str(info.value.failures[1])
    with pytest.raises(PayloadError, match="not JSON-serializable"):
        await sink.write([{1, 2}])
    await sink.close()
    await sink.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"id": 1}, {"id": 2}, {"id": 3}]


def test_jsonl_sink_leaves_no_bytes_of_a_failed_or_torn_write(tmp_path: Path) -> None:
    """A write that raised (here: file too large) is cut back off the file, so its payloads,
    which the engine retries or dead-letters, do not land in it with the next write; and a
    line torn by a crash is cut when the next sink opens the file, instead of being glued to
    that sink's first record."""
    path = tmp_path / "out.jsonl"
    code = textwrap.dedent(
        f"""
        import asyncio, resource, signal
        from batchpunk.connectors.jsonl import JsonlSink
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        async def main():
            sink = JsonlSink({str(path)!r})
            await sink.write([{{"id": 0}}])
            resource.setrlimit(resource.RLIMIT_FSIZE, (200, hard))
            try:
                await sink.write([{{"id": i, "body": "y" * 100}} for i in (1, 2, 3)])
            except OSError as exc:
                print("failed:", exc.errno)
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            await sink.write([{{"id": 4}}])
            await sink.close()
        asyncio.run(main())
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert f"failed: {errno.EFBIG}" in done.stdout, done.stderr
    assert path.read_bytes() == b'{"id":0}\n{"id":4}\n'
    with path.open("ab") as raw:
        raw.write(b'{"id":5,"body":"yy')  # what a crash in a write leaves

    async def next_run() -> None:
        sink = JsonlSink(str(path))
        await sink.write([{"id": 10}, {"id": 11}])
        await sink.close()

    asyncio.run(next_run())
    assert path.read_bytes() == b'{"id":0}\n{"id":4}\n{"id":10}\n{"id":11}\n'


# -- SqliteSink ---------------------------------------------------------------------------------


def rows(path: Path, sql: str = "SELECT * FROM t ORDER BY rowid") -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


async def test_sqlite_sink_inserts_each_batch_and_ignores_repeats_with_a_key(
    tmp_path: Path,
) -> None:
    """Each batch lands in the table; with an idempotency key a redelivered batch adds nothing;
    dicts and lists are stored as JSON text."""
    path = tmp_path / "o.db"
    sink = SqliteSink(str(path), "t", ["id", "body"], idempotency_key="id")
    batch = [{"id": 1, "body": "a"}, {"id": 2, "body": {"x": [1]}}]
    await sink.write(batch)
    await sink.write(batch)
    await sink.close()
    assert rows(path) == [(1, "a"), (2, '{"x":[1]}')]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_sqlite_sink_names_the_missing_column_and_keeps_the_good_rows(
    tmp_path: Path,
) -> None:
    """A payload missing a column, or holding an unstorable value, fails alone with a
    non-retryable error naming index and column; the other rows of the batch are committed."""
    path = tmp_path / "o.db"
    sink = SqliteSink(str(path), "t", ["id", "body"])
    with pytest.raises(PartialFailure) as info:
        await sink.write([{"id": 1, "body": "ok"}, {"id": 2}, {"id": 3, "body": object()}, "x"])
    failures = info.value.failures
    assert sorted(failures) == [1, 2, 3]
    assert "no column 'body'" in str(failures[1])
    assert "column 'body' holds a value of type object" in str(failures[2])
    assert "is a str" in str(failures[3])
    assert all(getattr(error, "retryable", True) is False for error in failures.values())
    with pytest.raises(PayloadError, match="no column 'body'"):
        await sink.write([{"id": 9}])
    await sink.close()
    assert rows(path) == [(1, "ok")]


async def test_sqlite_sink_isolates_constraint_violations(tmp_path: Path) -> None:
    """A row that breaks a table constraint fails alone; the rest of its batch is committed."""
    path = tmp_path / "o.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (id INTEGER NOT NULL, body TEXT)")
    sink = SqliteSink(str(path), "t", ["id", "body"], create=False)
    with pytest.raises(PartialFailure) as info:
        await sink.write(
            [{"id": 1, "body": "a"}, {"id": None, "body": "b"}, {"id": 3, "body": "c"}]
        )
    assert list(info.value.failures) == [1]
    assert "constraint" in str(info.value.failures[1])
    await sink.close()
    assert rows(path) == [(1, "a"), (3, "c")]


async def test_sqlite_sink_fails_a_nan_or_infinite_float_alone_instead_of_storing_null(
    tmp_path: Path,
) -> None:
    """SQLite stores a float NaN as NULL without an error, so a NaN row used to commit with its
    value silently gone. Each row holding a NaN or an infinity fails alone with a PayloadError
    naming its column, whether it takes the fast path or goes through the value conversion
    (a bool beside it); finite floats, huge ones included, are stored."""
    path = tmp_path / "o.db"
    sink = SqliteSink(str(path), "t", ["id", "amount"])
    with pytest.raises(PartialFailure) as info:
        await sink.write(
            [
                {"id": 1, "amount": 2.5},
                {"id": 2, "amount": float("nan")},
                {"id": 3, "amount": 1e308},
                {"id": 4, "amount": float("-inf")},
                {"id": 5, "amount": 1e308},
                {"id": True, "amount": float("nan")},
            ]
        )
    failures = info.value.failures
    assert sorted(failures) == [1, 3, 5]
    assert all(isinstance(error, PayloadError) for error in failures.values())
    assert "column 'amount' holds nan" in str(failures[1])
    assert "column 'amount' holds -inf" in str(failures[3])
    await sink.close()
    assert rows(path) == [(1, 2.5), (3, 1e308), (5, 1e308)]


async def test_sqlite_sink_with_a_mapping_function(tmp_path: Path) -> None:
    """A columns function maps each payload to its row; the table is created from its keys."""
    path = tmp_path / "o.db"
    sink = SqliteSink(str(path), "t", lambda p: {"id": p["n"], "double": p["n"] * 2})
    await sink.write([{"n": 1}, {"n": 2}])
    await sink.close()
    assert rows(path) == [(1, 2), (2, 4)]


async def test_sqlite_sink_checks_names_and_an_existing_table_up_front(tmp_path: Path) -> None:
    """Unsafe identifiers are refused at construction; prepare() finds a missing table or
    column before any batch is written."""
    with pytest.raises(ConfigError, match="table"):
        SqliteSink(str(tmp_path / "o.db"), "t; DROP TABLE x", ["id"])
    with pytest.raises(ConfigError, match="idempotency_key"):
        SqliteSink(str(tmp_path / "o.db"), "t", ["id"], idempotency_key="other")
    path = tmp_path / "o.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (id INTEGER)")
    from batchpunk.config import BatchConfig

    sink = SqliteSink(str(path), "t", ["id", "body"], create=False)
    with pytest.raises(ConfigError, match="no column"):
        await sink.prepare(BatchConfig())
    await sink.close()
    missing = SqliteSink(str(path), "absent", ["id"], create=False)
    with pytest.raises(ConfigError, match="does not exist"):
        await missing.prepare(BatchConfig())
    await missing.close()


async def test_sqlite_sink_a_database_locked_by_another_writer_is_an_outage(
    tmp_path: Path,
) -> None:
    """Another connection holding the write lock past busy_timeout made write() raise a bare
    sqlite3.OperationalError ("database is locked"), which the engine bisected into dead letters
    (lock held 4 s, busy_timeout=0.2: 36 rows written, 4 dead letters). It is a SqliteUnavailable
    now (retryable, unavailable: held and retried whole), and the write succeeds once the lock
    is gone."""
    from batchpunk.connectors.sqlite import SqliteUnavailable
    from batchpunk.retry import is_outage, is_retryable

    path = tmp_path / "o.db"
    sink = SqliteSink(str(path), "t", ["id", "body"], busy_timeout=0.05)
    await sink.write([{"id": 0, "body": "x"}])
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(SqliteUnavailable, match="database is locked") as info:
            await sink.write([{"id": 1, "body": "x"}, {"id": 2, "body": "y"}])
    finally:
        other.execute("COMMIT")
        other.close()
    assert is_retryable(info.value, (Exception,))
    assert is_outage(info.value, None)
    assert "o.db" in str(info.value)
    await sink.write([{"id": 1, "body": "x"}, {"id": 2, "body": "y"}])
    await sink.close()
    assert rows(path, "SELECT id FROM t ORDER BY id") == [(0,), (1,), (2,)]


async def test_sqlite_sink_in_a_pipeline_waits_out_a_lock_instead_of_dead_lettering(
    tmp_path: Path,
) -> None:
    """The pipeline view of the same: the lock is held through more failed writes than the
    retries allow (it took the batch apart into dead letters); now every row is written and
    nothing is dead-lettered."""
    from batchpunk.config import BatchConfig
    from batchpunk.pipeline import Pipeline

    path = tmp_path / "o.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    failed = 0

    class ReleasesTheLockLate(SqliteSink):
        async def write(self, batch: Any) -> None:
            nonlocal failed
            try:
                await super().write(batch)
            except Exception:
                failed += 1
                if failed == 30 and other.in_transaction:
                    other.execute("COMMIT")
                raise

    sink = ReleasesTheLockLate(str(path), "t", ["id", "body"], busy_timeout=0.01)
    await sink.prepare(BatchConfig())
    other.execute("BEGIN IMMEDIATE")
    config = BatchConfig(
        max_size=20, max_wait=0.01, retry_delay=0.01, retry_max_delay=0.02, max_retries=1,
        delivery_timeout=20, drain_timeout=10,
    )  # fmt: skip
    pipeline = Pipeline(ListSource({"id": i, "body": "x"} for i in range(40)), sink, config)
    try:
        await asyncio.wait_for(pipeline.run(), 30)
    finally:
        if other.in_transaction:
            other.execute("COMMIT")
        other.close()
    assert failed >= 30
    assert pipeline.dead_letter.letters == []  # type: ignore[attr-defined]
    assert rows(path, "SELECT id FROM t ORDER BY id") == [(i,) for i in range(40)]


def test_mask_secrets_hides_url_passwords_and_given_values() -> None:
    """URL passwords, password= pairs and every given secret are masked; a short secret is
    masked only as a whole word."""
    text = "amqp://bob:s3cret@host/ dsn password=abc123 token tok-999 max 5 in 250"
    masked = mask_secrets(text, {"tok-999", "5"})
    assert "s3cret" not in masked
    assert "abc123" not in masked
    assert "tok-999" not in masked
    assert "amqp://bob:***@host/" in masked
    assert "max *** in 250" in masked
