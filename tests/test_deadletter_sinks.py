"""Durable dead-letter sinks: what they store, what they give back, and what they survive."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import errno
import json
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batchpunk import BatchConfig, BatchProcessor
from batchpunk.deadletter import (
    DeadLetter,
    DeadLetterSink,
    JsonlDeadLetters,
    MalformedDeadLetter,
    SqliteDeadLetters,
    StoredError,
    letter_from_record,
    letter_record,
)
from batchpunk.errors import DeadLetterError

Sink = JsonlDeadLetters | SqliteDeadLetters


class PaymentDeclined(Exception):
    """A user-defined error, to check that its qualified type name is kept."""


def _raised(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as caught:
        return caught


def letter(message: Any, n: int = 0, **fields: Any) -> DeadLetter:
    """A letter with every field set to something recognisable."""
    values: dict[str, Any] = {
        "key": f"tenant-{n % 3}",
        "priority": n % 5,
        "reason": "failed",
        "error": _raised(PaymentDeclined(f"card {n} declined")),
        "attempts": 4,
        "first_seen": 1_700_000_000.25 + n,
        "headers": {"message_id": f"m-{n}", "delivery": 2},
    }
    values.update(fields)
    return DeadLetter(message, **values)


@pytest.fixture(params=["jsonl", "sqlite"])
def open_sink(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Sink]:
    """A factory of sinks on one path, so a test can reopen the same storage with a new object."""
    path = tmp_path / ("dlq.jsonl" if request.param == "jsonl" else "dlq.db")

    def make(**options: Any) -> Sink:
        if request.param == "jsonl":
            return JsonlDeadLetters(path, **options)
        return SqliteDeadLetters(path, **options)

    return make


async def read_all(sink: Sink, **options: Any) -> list[DeadLetter]:
    """Every letter the sink gives back, in order."""
    return [item async for item in sink.read(**options)]


def same_letter(got: DeadLetter, sent: DeadLetter) -> None:
    """Assert that a letter read back carries everything the stored one did."""
    assert got.message == sent.message
    assert got.key == sent.key
    assert got.priority == sent.priority
    assert got.reason == sent.reason
    assert got.attempts == sent.attempts
    assert got.first_seen == sent.first_seen
    assert got.error_type == sent.error_type
    assert got.traceback == sent.traceback
    assert str(got.error) == str(sent.error)
    assert {k: v for k, v in got.headers.items() if k != "dlq_id"} == sent.headers


# -- storing and reading back -----------------------------------------------------------------


async def test_letters_written_then_reopened_read_back_with_every_field(
    open_sink: Callable[..., Sink],
) -> None:
    """A new sink object on the same storage reads back every field of every letter, in order."""
    sent = [letter({"order": n, "items": [1, 2.5, None]}, n) for n in range(7)]
    sink = open_sink()
    assert isinstance(sink, DeadLetterSink)
    await sink.put(sent[:3])
    await sink.put(sent[3:])
    await sink.close()

    reopened = open_sink()
    got = await read_all(reopened)
    await reopened.close()
    assert len(got) == len(sent)
    for back, original in zip(got, sent, strict=True):
        same_letter(back, original)
        assert isinstance(back.error, StoredError)
        assert back.error.type_name == "tests.test_deadletter_sinks.PaymentDeclined"
        assert "PaymentDeclined: card" in back.traceback
    assert len({back.headers["dlq_id"] for back in got}) == len(sent)


async def test_a_letter_without_an_error_reads_back_without_one(
    open_sink: Callable[..., Sink],
) -> None:
    """A letter dead-lettered with no exception (e.g. dropped) has error None when read back."""
    async with open_sink() as sink:
        await sink.put([DeadLetter("m", reason="dropped")])
        (back,) = await read_all(sink)
    assert back.error is None
    assert back.reason == "dropped"


async def test_stored_error_has_the_original_str() -> None:
    """StoredError keeps the original's str() and shows its type name in repr()."""
    error = StoredError("ValueError", "bad row 7")
    assert str(error) == "bad row 7"
    assert repr(error) == "StoredError(ValueError: 'bad row 7')"


async def test_letters_survive_the_writing_process_ending(
    open_sink: Callable[..., Sink], tmp_path: Path
) -> None:
    """Letters put by a process that then dies without closing are read by the next process."""
    sink = open_sink()
    kind = type(sink).__name__
    await sink.close()
    script = textwrap.dedent(
        f"""
        import asyncio, os
        from batchpunk.deadletter import DeadLetter
        from batchpunk.deadletter import {kind}

        async def main():
            sink = {kind}({str(sink.path)!r})
            await sink.put([DeadLetter({{"n": n}}, error=ValueError(f"bad {{n}}"))
                            for n in range(5)])
            os._exit(0)  # no close(), no interpreter shutdown: a crash right after put

        asyncio.run(main())
        """
    )
    await asyncio.to_thread(subprocess.run, [sys.executable, "-c", script], check=True, timeout=60)
    async with open_sink() as reader:
        got = await read_all(reader)
    assert [back.message for back in got] == [{"n": n} for n in range(5)]
    assert [str(back.error) for back in got] == [f"bad {n}" for n in range(5)]
    assert {back.error_type for back in got} == {"ValueError"}


async def test_concurrent_puts_lose_nothing(open_sink: Callable[..., Sink]) -> None:
    """Twenty puts racing on one sink store all their letters, each once."""
    async with open_sink() as sink:
        await asyncio.gather(
            *(sink.put([letter({"p": p, "i": i}) for i in range(10)]) for p in range(20))
        )
        got = await read_all(sink)
    assert sorted((m.message["p"], m.message["i"]) for m in got) == [
        (p, i) for p in range(20) for i in range(10)
    ]


async def test_two_sink_objects_on_one_store_do_not_lose_letters(
    open_sink: Callable[..., Sink],
) -> None:
    """A remove() through one object while another appends keeps every appended letter."""
    writer, janitor = open_sink(), open_sink()
    await writer.put([letter(("old", i)) for i in range(50)])
    old_ids = [back.headers["dlq_id"] async for back in janitor.read()]
    await asyncio.gather(
        janitor.remove(old_ids),
        *(writer.put([letter(("new", p, i)) for i in range(5)]) for p in range(10)),
    )
    got = await read_all(writer)
    await writer.close()
    await janitor.close()
    assert sorted(tuple(back.message) for back in got) == [
        ("new", p, i) for p in range(10) for i in range(5)
    ]


async def test_put_read_and_remove_do_their_io_off_the_event_loop(
    open_sink: Callable[..., Sink], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file or database operation runs on a worker thread, never on the loop's thread."""
    sink = open_sink()
    names = (
        ("_append", "_read_chunk", "_rewrite")
        if isinstance(sink, JsonlDeadLetters)
        else ("_insert", "_select", "_delete")
    )
    threads: dict[str, int] = {}
    for name in names:
        real = getattr(type(sink), name)

        def spy(self: Any, *args: Any, _real: Any = real, _name: str = name) -> Any:
            threads[_name] = threading.get_ident()
            return _real(self, *args)

        monkeypatch.setattr(type(sink), name, spy)
    await sink.put([letter(n, n) for n in range(3)])
    got = await read_all(sink)
    await sink.remove([got[0].headers["dlq_id"]])
    await sink.close()
    assert set(threads) == set(names)
    assert threading.get_ident() not in threads.values()


# -- values that are not JSON -----------------------------------------------------------------


@dataclasses.dataclass
class Reading:
    sensor: str
    value: float


NON_JSON = [
    (b"\x00raw\xff", b"\x00raw\xff"),
    (bytearray(b"ba"), b"ba"),
    ((1, "two", (3,)), [1, "two", [3]]),
    ({3, 1, 2}, [1, 2, 3]),
    (frozenset({"x"}), ["x"]),
    ({1: "int key", (2, 3): "tuple key"}, {1: "int key", (2, 3): "tuple key"}),
    (float("inf"), float("inf")),
    (
        datetime.datetime(
            2024, 5, 1, 12, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
        ),
        datetime.datetime(2024, 5, 1, 10, 30, tzinfo=datetime.UTC),
    ),
    (datetime.datetime(2024, 5, 1, 12, 30), "2024-05-01T12:30:00"),
    (Reading("t1", 21.5), {"sensor": "t1", "value": 21.5}),
]


@pytest.mark.parametrize(("message", "expected"), NON_JSON, ids=lambda v: type(v).__name__)
async def test_non_json_messages_round_trip_with_msgpack_semantics(
    open_sink: Callable[..., Sink], message: Any, expected: Any
) -> None:
    """Bytes stay bytes, sets and tuples become lists, odd keys survive: msgpack's semantics.

    Aware datetimes come back in UTC and naive ones as ISO strings (msgpack timestamps need a
    zone); dataclasses come back as dicts.
    """
    async with open_sink() as sink:
        await sink.put([letter(message, key=(1, 2), headers={"raw": b"\x01"})])
        (back,) = await read_all(sink)
    got = sorted(back.message) if isinstance(message, set | frozenset) else back.message
    assert got == expected
    assert back.key == [1, 2]
    assert back.headers["raw"] == b"\x01"


async def test_nan_survives_as_nan(open_sink: Callable[..., Sink]) -> None:
    """A NaN message (not JSON) is stored through msgpack and comes back as NaN."""
    async with open_sink() as sink:
        await sink.put([letter(float("nan"))])
        (back,) = await read_all(sink)
    assert back.message != back.message


async def test_json_native_messages_that_look_like_frames_stay_data(
    open_sink: Callable[..., Sink],
) -> None:
    """A message whose keys mimic the record's own fields is stored and returned verbatim."""
    tricky = {"message_frame": "AAAA", "v": 2, "id": "x", "$codec": "y"}
    async with open_sink() as sink:
        await sink.put([letter(tricky), letter([tricky])])
        got = await read_all(sink)
    assert [back.message for back in got] == [tricky, [tricky]]


async def test_an_unstorable_message_is_kept_as_its_repr_and_blocks_nothing(
    open_sink: Callable[..., Sink], caplog: pytest.LogCaptureFixture
) -> None:
    """A value msgpack cannot hold is stored as its repr with a warning; the other letters too."""
    odd = object()
    async with open_sink() as sink:
        await sink.put([letter("fine"), letter(odd)])
        got = await read_all(sink)
    assert [back.message for back in got] == ["fine", repr(odd)]
    assert any("stored as its repr" in record.getMessage() for record in caplog.records)


async def test_a_message_nested_too_deep_to_encode_is_kept_as_a_placeholder_and_blocks_nothing(
    open_sink: Callable[..., Sink],
) -> None:
    """A list nested 3,000 deep made put() raise RecursionError on every retry (only TypeError
    was caught, and repr() fails on it too): every later letter waited behind it for good. It
    is now kept as a placeholder naming the problem, and the letters after it are stored."""
    deep: list[Any] = []
    for _ in range(3000):
        deep = [deep]
    async with open_sink() as sink:
        await sink.put([letter(deep), letter("after")])
        got = await read_all(sink)
    assert [back.message for back in got] == [
        "<list without a usable repr: RecursionError>",
        "after",
    ]


async def test_a_string_utf8_cannot_hold_is_escaped_or_kept_by_pickle(
    open_sink: Callable[..., Sink],
) -> None:
    """A str with a lone surrogate is kept escaped by the default sink, exactly by pickle."""
    async with open_sink() as sink:
        await sink.put([letter("bad \ud800 text")])
        assert [back.message for back in await read_all(sink)] == [repr("bad \ud800 text")]
    async with open_sink(serializer="pickle") as sink:
        await sink.put([letter("bad \ud800 text")])
        # The same file: the escaped letter from above, then the exact one.
        assert [back.message for back in await read_all(sink)][-1] == "bad \ud800 text"


@pytest.mark.parametrize(
    "fields",
    [
        {"error": _raised(ValueError("unknown user \udc80bob"))},
        {"error": ValueError("unknown user \udc80bob")},
        {"reason": "failed \udc80"},
    ],
    ids=["raised-error", "error", "reason"],
)
def test_a_lone_surrogate_in_the_error_text_does_not_cost_the_message(
    fields: dict[str, Any],
) -> None:
    """A lone surrogate in the error, its traceback or the reason is escaped in place; the
    message, key and headers stay as they were, so ``dlq replay`` can still resend the message.

    The record's fallback used to turn message, key and headers into their reprs before it
    escaped the text fields, so a perfectly storable message ended as ``message_repr``, which
    replay refuses: the message was lost because of how its error was spelled.
    """
    original = DeadLetter(
        {"id": 7, "user": "bob"}, key="tenant-1", headers={"trace": "t1"}, **fields
    )
    body = letter_record(original)
    record = json.loads(body)
    assert not [name for name in record if name.endswith(("_repr", "_unstorable"))], record
    back = letter_from_record(body)
    assert (back.message, back.key, back.headers["trace"]) == (
        {"id": 7, "user": "bob"},
        "tenant-1",
        "t1",
    )
    assert "\\udc80" in f"{back.error} {back.traceback} {back.reason}"


async def test_pickle_stores_anything_only_when_asked(
    open_sink: Callable[..., Sink], caplog: pytest.LogCaptureFixture
) -> None:
    """serializer='pickle' keeps exact types; a default sink refuses to unpickle those records."""
    message = {"when": datetime.date(2024, 1, 2), "tags": {"a"}, "pair": (1, 2)}
    async with open_sink(serializer="pickle") as sink:
        await sink.put([letter(message), letter("plain json")])
        assert [back.message for back in await read_all(sink)] == [message, "plain json"]
    async with open_sink() as cautious:
        with caplog.at_level(logging.WARNING, logger="batchpunk.deadletter"):
            got = await read_all(cautious)
        assert [back.message for back in got] == ["plain json"]
        assert "pickle refused" in caplog.text
        with pytest.raises(MalformedDeadLetter, match="message_frame: pickle refused"):
            await read_all(cautious, strict=True)


def test_options_are_validated_with_the_field_name(tmp_path: Path) -> None:
    """Bad constructor arguments fail at once with the argument's name."""
    with pytest.raises(ValueError, match=r"^serializer: expected 'msgpack' or 'pickle'"):
        JsonlDeadLetters(tmp_path / "x.jsonl", serializer="json")
    with pytest.raises(ValueError, match=r"^path: expected a file path"):
        JsonlDeadLetters(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^table: expected a plain SQL identifier"):
        SqliteDeadLetters(tmp_path / "x.db", table="x; DROP TABLE y")
    with pytest.raises(ValueError, match=r"^allow_pickle: expected True, False or None"):
        SqliteDeadLetters(tmp_path / "x.db", allow_pickle="yes")  # type: ignore[arg-type]


async def test_put_refuses_things_that_are_not_letters(open_sink: Callable[..., Sink]) -> None:
    """put() names the position of an item that is not a DeadLetter, and stores nothing."""
    async with open_sink() as sink:
        with pytest.raises(TypeError, match=r"^letters\[1\]: expected a DeadLetter, got str"):
            await sink.put([letter(1), "oops"])  # type: ignore[list-item]
        assert await read_all(sink) == []


# -- removing replayed letters ----------------------------------------------------------------


async def test_remove_deletes_exactly_the_given_ids(open_sink: Callable[..., Sink]) -> None:
    """remove(ids) deletes those letters, reports how many, and leaves the others readable."""
    async with open_sink() as sink:
        await sink.put([letter(n, n) for n in range(10)])
        got = await read_all(sink)
        even = [back.headers["dlq_id"] for back in got if back.message % 2 == 0]
        assert await sink.remove(even) == 5
        assert await sink.remove(even) == 0
        assert await sink.remove([]) == 0
    async with open_sink() as reopened:
        rest = await read_all(reopened)
    assert [back.message for back in rest] == [1, 3, 5, 7, 9]
    assert [back.headers["dlq_id"] for back in rest] == [
        back.headers["dlq_id"] for back in got if back.message % 2
    ]


async def test_remove_rejects_ids_of_the_wrong_shape(open_sink: Callable[..., Sink]) -> None:
    """A bare string or a non-str id is refused instead of silently removing nothing."""
    async with open_sink() as sink:
        with pytest.raises(ValueError, match=r"^ids: expected an iterable of ids"):
            await sink.remove("abc")
        with pytest.raises(ValueError, match=r"^ids: expected str ids"):
            await sink.remove([1])  # type: ignore[list-item]


async def test_closed_sink_refuses_use_and_closes_twice(open_sink: Callable[..., Sink]) -> None:
    """After close(), put raises DeadLetterError and a second close() is harmless.

    The engine treats a failing put as a sink that is down: it keeps the letters and retries.
    """
    sink = open_sink()
    await sink.close()
    await sink.close()
    with pytest.raises(DeadLetterError, match="is closed"):
        await sink.put([letter(1)])


async def test_replay_then_remove_empties_the_store(open_sink: Callable[..., Sink]) -> None:
    """Letters from a failing run are replayed by a healthy processor, then removed one by one."""
    config = BatchConfig(max_size=4, max_wait=0.01, max_retries=0, retry_delay=0.0)

    def picky(batch: list[Any]) -> None:
        if any(m.get("poison") for m in batch):
            raise ValueError("poison in batch")

    sink = open_sink()
    async with BatchProcessor(config, picky, dead_letter=sink) as processor:
        for n in range(8):
            await processor.add_message({"n": n, "poison": n in (2, 5)}, key="k", priority=1)
    await sink.close()

    store = open_sink()
    letters = await read_all(store)
    assert sorted(back.message["n"] for back in letters) == [2, 5]
    assert {str(back.error) for back in letters} == {"poison in batch"}
    assert {(back.key, back.priority) for back in letters} == {("k", 1)}

    async with BatchProcessor(config, lambda batch: None) as healthy:
        report = await healthy.replay(store.read())
    assert len(report.succeeded) == 2
    assert await store.remove(back.headers["dlq_id"] for back in report.succeeded) == 2
    assert await read_all(store) == []
    await store.close()


# -- damaged storage --------------------------------------------------------------------------


async def test_malformed_jsonl_lines_are_skipped_with_file_and_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bad line is skipped with a warning naming file:line; strict=True raises with the same."""
    path = tmp_path / "dlq.jsonl"
    async with JsonlDeadLetters(path) as sink:
        await sink.put([letter("first")])
        with path.open("ab") as raw:
            raw.write(b'{"v": 1, "id": "abc", "truncated\n')
            raw.write(b'{"v": 9, "id": "def", "message": 1}\n')
            raw.write(b"[1, 2]\n")
        await sink.put([letter("last")])
        with caplog.at_level(logging.WARNING, logger="batchpunk.deadletter"):
            got = await read_all(sink)
        assert [back.message for back in got] == ["first", "last"]
        assert f"{path}:2: not a JSON object" in caplog.text
        assert f"{path}:3: unsupported record version 9" in caplog.text
        assert f"{path}:4: expected a JSON object, got list" in caplog.text
        with pytest.raises(MalformedDeadLetter, match=f"^{path}:2: not a JSON object"):
            await read_all(sink, strict=True)
        # remove() keeps what it cannot read, so nothing is lost to a rewrite.
        assert await sink.remove([got[0].headers["dlq_id"]]) == 1
    assert path.read_bytes().count(b"\n") == 4


async def test_a_torn_last_line_is_kept_apart_from_the_next_put(tmp_path: Path) -> None:
    """After a crash mid-write, the next put starts a fresh line and the letters before and
    after it stay readable."""
    path = tmp_path / "dlq.jsonl"
    async with JsonlDeadLetters(path) as sink:
        await sink.put([letter("before")])
        with path.open("ab") as raw:
            raw.write(b'{"v": 1, "id": "torn", "mess')  # the crash: no newline
        assert [back.message for back in await read_all(sink)] == ["before"]
        await sink.put([letter("after")])
        assert [back.message for back in await read_all(sink)] == ["before", "after"]


async def test_an_unconfirmed_torn_letter_is_not_revived_by_the_next_put(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A put killed just before its newline leaves a whole record without it: read() skips it
    (the put never returned, so the message was not acknowledged and comes again). The next
    put, of that message dead-lettered again, cuts the torn line off instead of completing
    it with a newline, which made it a letter: one message, two letters, replayed twice."""
    path = tmp_path / "dlq.jsonl"
    async with JsonlDeadLetters(path) as sink:
        await sink.put([letter("before")])
        with path.open("ab") as raw:
            raw.write(letter_record(letter("again")))  # the crash: all but the newline
        assert [back.message for back in await read_all(sink)] == ["before"]
        with caplog.at_level(logging.WARNING, logger="batchpunk.deadletter"):
            await sink.put([letter("again")])
        assert [back.message for back in await read_all(sink)] == ["before", "again"]
    assert f"{path}: cut off a last line without its newline" in caplog.text


async def test_a_failed_write_leaves_no_partial_letters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put that fails midway (disk full) is rolled back, so its retry stores each letter once."""
    path = tmp_path / "dlq.jsonl"
    sink = JsonlDeadLetters(path)
    await sink.put([letter("kept")])
    size = path.stat().st_size
    real_write = os.write

    def half_then_full(fd: int, data: Any) -> int:
        if len(data) > 100:
            real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    batch = [letter(f"retry-{n}", n) for n in range(5)]
    with pytest.raises(OSError, match="No space left"):
        await sink.put(batch)
    monkeypatch.setattr(os, "write", real_write)
    assert path.stat().st_size == size
    await sink.put(batch)
    assert [back.message for back in await read_all(sink)] == ["kept"] + [
        f"retry-{n}" for n in range(5)
    ]


async def test_a_malformed_sqlite_row_is_reported_with_its_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A damaged row is skipped with a warning naming the database, table and row id."""
    path = tmp_path / "dlq.db"
    async with SqliteDeadLetters(path) as sink:
        await sink.put([letter("a"), letter("b")])
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE dead_letters SET record = '{oops' WHERE id = 1")
    conn.close()
    async with SqliteDeadLetters(path) as sink:
        with caplog.at_level(logging.WARNING, logger="batchpunk.deadletter"):
            got = await read_all(sink)
        assert [back.message for back in got] == ["b"]
        assert f"{path} table dead_letters id 1: payload does not decode as json" in caplog.text
        with pytest.raises(MalformedDeadLetter, match="table dead_letters id 1"):
            await read_all(sink, strict=True)


async def test_sqlite_uses_wal_and_queryable_columns(tmp_path: Path) -> None:
    """The database is in WAL mode and keeps reason and error type in their own columns."""
    path = tmp_path / "dlq.db"
    async with SqliteDeadLetters(path, table="orders_dlq") as sink:
        await sink.put([letter(1), letter(2, reason="expired", error=TimeoutError("late"))])
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        rows = conn.execute("SELECT reason, error_type FROM orders_dlq ORDER BY id").fetchall()
    conn.close()
    assert rows == [
        ("failed", "tests.test_deadletter_sinks.PaymentDeclined"),
        ("expired", "TimeoutError"),
    ]


async def test_reading_a_missing_file_yields_nothing(tmp_path: Path) -> None:
    """A JSONL sink whose file does not exist yet reads as empty rather than failing."""
    sink = JsonlDeadLetters(tmp_path / "never-written.jsonl")
    assert await read_all(sink) == []
    assert await sink.remove(["abc"]) == 0
