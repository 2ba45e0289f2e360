"""Durable dead-letter sinks: a JSON Lines file and an SQLite table that survive a restart.

Choose JsonlDeadLetters for a file you can read with ``jq`` and ship with the logs; choose
SqliteDeadLetters when letters pile up, several processes share them, or you query them by
reason or error type. Both store the same record per letter, both keep their I/O off the event
loop, and both return from ``put`` only once the letters are durably on disk.

The record (one JSON object: a line of the file, or the ``record`` column of the table)::

    {"v": 1, "id": "<hex>", "stored_at": 1717.5, "reason": "failed", "priority": 0,
     "attempts": 4, "first_seen": 1717.2, "error_type": "ValueError", "error": "bad row",
     "traceback": "Traceback ...", "message": {...}, "key": "tenant-1", "headers": {...}}

``message``, ``key`` and ``headers`` are stored as JSON when they round-trip through JSON
exactly (None, bool, int, finite float, str, and lists and str-keyed dicts of those). Anything
else is stored as ``message_frame`` (``key_frame``, ``headers_frame``): the base64 text of a
batchpunk frame (docs/FORMAT.md) holding ``[value]``, written with the sink's serializer:

* "msgpack" (the default, the ``msgpack`` extra): bytes come back as bytes, tuples, sets and
  frozensets as lists, non-str dict keys stay as they were, NaN stays NaN, datetimes stay
  datetimes, dataclasses come back as dicts. A value msgpack cannot represent is stored as its
  repr (``message_repr``, with ``message_unstorable`` saying why) and a warning is logged, so
  one odd message never blocks the letters behind it; read() gives that repr text back.
* "pickle", only when you ask for it: every picklable value comes back as it was. Such a file
  runs code when read: keep it where only trusted writers can reach it.

Each letter read back carries its stable id in ``headers["dlq_id"]`` (a str); pass ids to
``remove`` once their messages were replayed successfully. ``error`` is a :class:`StoredError`
whose str() is the original error's, with its type name in ``type_name`` and ``error_type``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import math
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, Self, TypeVar
from urllib.parse import quote

from batchpunk._identifiers import SQL_KEYWORDS as _SQL_KEYWORDS
from batchpunk._redact import MASK, is_secret_name, redact
from batchpunk.codec import decode_batch, decode_value, encode_batch, encode_value
from batchpunk.deadletter._record import DeadLetter
from batchpunk.errors import BatchpunkError, DeadLetterError, FrameError

__all__ = [
    "letter_from_record",
    "letter_record",
    "open_dead_letter_file",
    "JsonlDeadLetters",
    "MalformedDeadLetter",
    "SqliteDeadLetters",
    "StoredError",
]

log = logging.getLogger("batchpunk.deadletter")

#: Version of the stored record; readers refuse records of versions they do not know.
RECORD_VERSION = 1
#: Letters read per hop to the worker thread while iterating read().
READ_CHUNK = 500
#: Bytes read per step when looking back for the start of a file's last line.
_TAIL_CHUNK = 1 << 16
#: The header key under which read() returns each letter's stable id.
ID_HEADER = "dlq_id"
#: Set by read() on a letter whose message was stored only as its repr (why, as text): such a
#: letter does not carry the original message and must not be replayed.
UNSTORABLE_HEADER = "dlq_message_unstorable"

_STORED_SERIALIZERS = ("msgpack", "pickle")
_T = TypeVar("_T")


class StoredError(Exception):
    """An error read back from a durable sink: the original's type name and message, no more.

    The original exception object cannot be rebuilt safely from a file, so this stands in for
    it: ``str(error)`` is the original's str(), ``type_name`` its qualified type name.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(type_name, message)
        self.type_name = type_name
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"StoredError({self.type_name}: {self.message!r})"


class MalformedDeadLetter(BatchpunkError, ValueError):
    """A stored record that cannot be read back; the message names the file and line (or row).

    Raised by ``read(strict=True)``; by default read() logs a warning and skips such a record,
    leaving it in place so that nothing is lost.
    """

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


# -- the record -------------------------------------------------------------------------------


#: What encoders raise for a value they cannot hold: a type they do not know (TypeError), an
#: integer out of range (OverflowError, ValueError), a structure nested past the recursion limit.
_UNENCODABLE = (TypeError, ValueError, OverflowError, RecursionError)


def _json_exact(value: Any) -> bool:
    """True when ``value`` comes back from JSON as an equal value of the same types."""
    kind = type(value)
    if value is None or kind is bool or kind is int:
        return True
    if kind is str:  # isascii() is O(1); other strings must be valid UTF-8 (no lone surrogates)
        return value.isascii() or _utf8(value)
    if kind is float:
        return math.isfinite(value)
    try:
        if kind is list:
            return all(_json_exact(item) for item in value)
        if kind is dict:
            return all(type(k) is str and _json_exact(v) for k, v in value.items())
    except RecursionError:
        return False
    return False


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _RecordCodec:
    """Letters to records and back, with the sink's serializer for values JSON cannot hold."""

    def __init__(self, owner: str, serializer: str, allow_pickle: bool | None) -> None:
        if serializer not in _STORED_SERIALIZERS:
            raise ValueError(
                f"serializer: expected 'msgpack' or 'pickle' (for values that are not JSON), "
                f"got {serializer!r}"
            )
        if allow_pickle is not None and not isinstance(allow_pickle, bool):
            raise ValueError(f"allow_pickle: expected True, False or None, got {allow_pickle!r}")
        self.owner = owner
        self.serializer = serializer
        # Asking for pickle is asking to read it back; anyone else must say so.
        self.allow_pickle = serializer == "pickle" if allow_pickle is None else allow_pickle

    def encode(
        self, letter: Any, index: int, letter_id: str | None
    ) -> tuple[dict[str, Any], bytes]:
        """The record of one letter and its JSON text; TypeError naming the letter if it cannot."""
        if not isinstance(letter, DeadLetter):
            raise TypeError(f"letters[{index}]: expected a DeadLetter, got {type(letter).__name__}")
        record: dict[str, Any] = {"v": RECORD_VERSION}
        if letter_id is not None:
            record["id"] = letter_id
        error = letter.error
        record.update(
            stored_at=time.time(),
            reason=str(letter.reason),
            priority=_number(letter.priority, int, 0),
            attempts=_number(letter.attempts, int, 0),
            first_seen=_number(letter.first_seen, float, 0.0),
            error_type=str(letter.error_type),
            error=None if error is None else stored_error_text(error),
            traceback=redact(str(letter.traceback)),
        )
        headers = {
            k: MASK if isinstance(k, str) and is_secret_name(k) and v else v
            for k, v in letter.headers.items()
            if k != ID_HEADER
        }
        for name, value in (("message", letter.message), ("key", letter.key), ("headers", headers)):
            if _json_exact(value):
                record[name] = value
            else:
                try:
                    frame = encode_batch([value], serializer=self.serializer)
                except _UNENCODABLE as exc:
                    _unstorable(record, name, value, exc, self.owner, index)
                    continue
                record[f"{name}_frame"] = base64.b64encode(frame).decode("ascii")
        try:
            return record, encode_value(record)
        except _UNENCODABLE:  # e.g. a str holding a lone surrogate, which UTF-8 cannot hold
            pass
        # Escape the text fields first: a lone surrogate in the traceback or reason must not
        # cost the message, which was storable (a message kept only as its repr is never
        # replayed). Only what still fails after that is kept as its repr.
        for name in ("error", "traceback", "error_type", "reason"):
            if isinstance(record.get(name), str):
                record[name] = _escaped(record[name])
        try:
            return record, encode_value(record)
        except _UNENCODABLE as exc:  # e.g. a str-keyed header whose key holds a lone surrogate
            for name in ("message", "key", "headers"):
                if name in record:
                    _unstorable(record, name, record.pop(name), exc, self.owner, index)
            return record, encode_value(record)

    def decode(self, record: Any, where: str) -> tuple[str | None, DeadLetter]:
        """The id and letter of one record, or MalformedDeadLetter naming ``where``."""
        if not isinstance(record, dict):
            raise MalformedDeadLetter(where, f"expected a JSON object, got {type(record).__name__}")
        version = record.get("v")
        if version != RECORD_VERSION:
            raise MalformedDeadLetter(
                where, f"unsupported record version {version!r} (this batchpunk reads 1)"
            )
        values: dict[str, Any] = {}
        for name in ("message", "key", "headers"):
            values[name] = self._value(record, name, where)
        headers = values["headers"]
        if headers is None:
            headers = {}
        if not isinstance(headers, dict):
            raise MalformedDeadLetter(where, f"headers: expected an object, got {headers!r}")
        if "message_repr" in record:  # only the repr was kept: replaying it would send text
            headers = {**headers, UNSTORABLE_HEADER: str(record.get("message_unstorable", ""))}
        letter_id = record.get("id")
        if letter_id is not None and not isinstance(letter_id, str):
            raise MalformedDeadLetter(where, f"id: expected a string, got {letter_id!r}")
        try:
            reason = _field(record, "reason", str)
            priority = _field(record, "priority", int)
            attempts = _field(record, "attempts", int)
            first_seen = float(_field(record, "first_seen", int | float))
            error_type = _field(record, "error_type", str)
            traceback = _field(record, "traceback", str)
            message = record.get("error")
            if message is not None and not isinstance(message, str):
                raise ValueError(f"error: expected a string or null, got {message!r}")
        except ValueError as exc:
            raise MalformedDeadLetter(where, str(exc)) from None
        error = None if message is None else StoredError(error_type, message)
        letter = DeadLetter(
            values["message"],
            key=values["key"],
            priority=priority,
            reason=reason,
            error=error,
            attempts=attempts,
            first_seen=first_seen,
            error_type=error_type,
            traceback=traceback,
            headers=dict(headers),
        )
        return letter_id, letter

    def _value(self, record: dict[str, Any], name: str, where: str) -> Any:
        if f"{name}_repr" in record:
            return record[f"{name}_repr"]
        framed = record.get(f"{name}_frame")
        if framed is None:
            if name == "message" and "message" not in record:
                raise MalformedDeadLetter(where, "no 'message' or 'message_frame' field")
            return record.get(name)
        if not isinstance(framed, str):
            raise MalformedDeadLetter(where, f"{name}_frame: expected base64 text")
        try:
            frame = base64.b64decode(framed, validate=True)
            (value,) = decode_batch(frame, allow_pickle=self.allow_pickle)
        except (binascii.Error, FrameError, ValueError) as exc:
            raise MalformedDeadLetter(where, f"{name}_frame: {exc}") from None
        return value


def _escaped(text: str) -> str:
    """Text UTF-8 can hold: lone surrogates become backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _unstorable(
    record: dict[str, Any], name: str, value: Any, exc: BaseException, owner: str, index: int
) -> None:
    """Keep a value the serializer cannot hold as its repr, rather than refuse the letter.

    A letter that cannot be stored would stall every letter behind it in the engine's outbox;
    its repr (with ``<name>_unstorable`` saying why) keeps the evidence and lets the rest go on.
    """
    record.pop(f"{name}_frame", None)
    try:
        shown = repr(value)
    except Exception as failure:  # nested too deep for repr too, or a repr that raises
        shown = f"<{type(value).__name__} without a usable repr: {type(failure).__name__}>"
    record[f"{name}_repr"] = _escaped(shown)
    record[f"{name}_unstorable"] = _escaped(f"{type(value).__name__}: {exc}")
    log.warning(
        "%s: letters[%d].%s of type %s cannot be serialized (%s); stored as its repr. "
        "Create the sink with serializer='pickle' to keep any picklable value (trusted files "
        "only)",
        owner,
        index,
        name,
        type(value).__name__,
        exc,
    )


def _number(value: Any, kind: type, default: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    if kind is float:
        return float(value) if math.isfinite(value) else default
    return int(value)


def _field(record: dict[str, Any], name: str, kind: Any) -> Any:
    value = record.get(name)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{name}: unexpected value {value!r}")
    return value


def _error_text(error: BaseException) -> str:
    try:
        return str(error)
    except Exception:  # a broken __str__ must not keep the letter from being stored
        return f"<unprintable {type(error).__name__} object>"


def stored_error_text(error: BaseException) -> str:
    """The text every store keeps for an error: what the record's ``error`` field holds.

    str(error) (a placeholder when its __str__ raises), secrets redacted, lone surrogates
    escaped, so that it always encodes. Anything else that shows a letter's error (an AMQP
    header of RabbitMQDeadLetters) uses this too: it must never reveal more than the record,
    nor fail on a letter the record can store.
    """
    return _escaped(redact(_error_text(error)))


def _report(problem: MalformedDeadLetter, strict: bool) -> None:
    if strict:
        raise problem
    log.warning("skipped a malformed dead letter (left in place): %s", problem)


# -- JSON Lines -------------------------------------------------------------------------------


class _Store:
    """What both file stores share: a context manager that closes, refusal once closed, and a
    ``put`` that returns only once its letters are durable (the engine counts a letter, and
    the pipeline acknowledges its message, only then). Each store says how in ``_store``."""

    _closed: bool

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def put(self, letters: Sequence[DeadLetter]) -> None:
        """Store the letters; return only once they are durable."""
        self._check_open()
        if not letters:
            return
        await self._store(list(letters))

    async def _store(self, letters: list[DeadLetter]) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def _check_open(self) -> None:
        if self._closed:
            raise DeadLetterError(f"{self!r} is closed")


class JsonlDeadLetters(_Store):
    """Dead letters appended to a JSON Lines file, one record per line, fsynced per put.

    Attributes:
        path: the file; created on the first put, with its directory entry fsynced.

    Writers (this object, other sinks on the same file, a ``batchpunk dlq`` command in another
    process) serialize through an advisory lock on ``<path>.lock``, so ``remove`` never loses a
    letter appended while it rewrites the file. A put that fails midway (disk full) truncates
    what it wrote, so a retried put never leaves duplicates or a torn line.

    Reading: a line that is not a valid record is skipped with a logged warning naming the file
    and line (``read(strict=True)`` raises MalformedDeadLetter instead) and is kept by
    ``remove``. A last line without its newline is a put still in progress (or one that crashed
    before returning, whose letters were never confirmed): it is skipped quietly, and the next
    put cuts it off (with a warning), so it never becomes a letter.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        serializer: str = "msgpack",
        allow_pickle: bool | None = None,
    ) -> None:
        if not isinstance(path, str | os.PathLike):
            raise ValueError(f"path: expected a file path, got {path!r}")
        self.path = Path(path)
        self._records = _RecordCodec(
            f"JsonlDeadLetters({str(self.path)!r})", serializer, allow_pickle
        )
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._thread_lock = threading.Lock()
        self._dir_synced = False
        self._closed = False

    def __repr__(self) -> str:
        return f"JsonlDeadLetters({str(self.path)!r})"

    async def _store(self, letters: list[DeadLetter]) -> None:
        """Append the letters and fsync, on a worker thread."""
        await asyncio.to_thread(self._append, letters)

    async def read(self, *, strict: bool = False) -> AsyncIterator[DeadLetter]:
        """Every stored letter, oldest first, each with ``headers["dlq_id"]``."""
        self._check_open()
        try:
            handle = await asyncio.to_thread(open, self.path, "rb")
        except FileNotFoundError:
            return
        try:
            line_no = 0
            while True:
                letters, line_no, done = await asyncio.to_thread(
                    self._read_chunk, handle, line_no, strict
                )
                for letter in letters:
                    yield letter
                if done:
                    return
        finally:
            handle.close()

    async def remove(self, ids: Iterable[str]) -> int:
        """Delete the letters with these ids (from ``headers["dlq_id"]``); return how many.

        The file is rewritten to a temporary file, fsynced and renamed over the original, so a
        crash leaves either the old or the new file, never a mix.
        """
        self._check_open()
        wanted = _ids(ids)
        if not wanted:
            return 0
        return await asyncio.to_thread(self._rewrite, wanted)

    async def close(self) -> None:
        """Refuse further use. Nothing stays open between calls, so there is nothing to flush."""
        self._closed = True

    # -- worker-thread side --

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(
                self._lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644
            )
            try:
                _flock(fd, exclusive=True)
                yield
            finally:
                os.close(fd)  # closing the descriptor releases the lock

    def _append(self, letters: list[DeadLetter]) -> None:
        lines = [
            self._records.encode(letter, i, uuid.uuid4().hex)[1] + b"\n"
            for i, letter in enumerate(letters)
        ]
        with self._locked():
            fd = open_appending(self.path, 0o644)
            try:
                # The lock makes this the file's only writer, and a put returns only after
                # fsyncing all it wrote: a last line without its newline is a put that never
                # returned, whose letters were never confirmed (their messages come back).
                start = end_torn_line(fd, str(self.path), _torn_record)
                append_or_undo(fd, b"".join(lines), start, fsync=True)
            finally:
                os.close(fd)
            if not self._dir_synced:
                _fsync_dir(self.path.parent)
                self._dir_synced = True

    def _read_chunk(
        self, handle: IO[bytes], line_no: int, strict: bool
    ) -> tuple[list[DeadLetter], int, bool]:
        letters: list[DeadLetter] = []
        while len(letters) < READ_CHUNK:
            line = handle.readline()
            if not line:
                return letters, line_no, True
            line_no += 1
            if not line.endswith(b"\n"):
                log.debug(
                    "%s:%d: last line incomplete (a put in progress); skipped", self.path, line_no
                )
                return letters, line_no, True
            if not line.strip():
                continue
            where = f"{self.path}:{line_no}"
            try:
                letter = _letter_of(self._records, line, where)
            except MalformedDeadLetter as problem:
                _report(problem, strict)
                continue
            letters.append(letter)
        return letters, line_no, False

    def _rewrite(self, wanted: set[str]) -> int:
        with self._locked():
            if not self.path.exists():
                return 0
            temp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
            removed = 0
            try:
                with open(self.path, "rb") as source, open(temp, "wb") as target:
                    for line in source:
                        if _line_id(line) in wanted:
                            removed += 1
                            continue
                        target.write(line)
                    target.flush()
                    os.fsync(target.fileno())
                if removed:
                    shutil.copymode(self.path, temp)
                    os.replace(temp, self.path)
                    _fsync_dir(self.path.parent)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
            return removed


def _torn_record(tail: bytes) -> bool:
    # Every record starts with "{": anything else was not written by a put, and is kept.
    return tail.startswith(b"{")


# -- appending whole lines (shared with connectors.jsonl.JsonlSink) --------------------------


def open_appending(path: str | os.PathLike[str], mode: int) -> int:
    """An unbuffered descriptor appending to ``path`` (created with ``mode`` if missing).

    Unbuffered, so that bytes of a write that failed are never written by a later one; read
    and write, so that end_torn_line can look at the last line.
    """
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    return os.open(path, flags, mode)


def end_torn_line(fd: int, where: str, torn: Callable[[bytes], bool]) -> int:
    """Make the file end in a newline before appending to it; return its size then.

    For the file's only writer, which fsyncs each append before reporting it done. A last line
    without its newline is then either a write that never returned (the process died in it),
    which ``torn(line)`` recognises and which is cut off (nothing it held was confirmed), or a
    line written by someone else, which is kept and ended with a newline, so that the append
    starts a line of its own either way.
    """
    size = os.fstat(fd).st_size
    if not size or os.pread(fd, 1, size - 1) == b"\n":
        return size
    parts: list[bytes] = []
    start = size
    while start:
        begin = max(0, start - _TAIL_CHUNK)
        chunk = os.pread(fd, start - begin, begin)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            parts.append(chunk[newline + 1 :])
            start = begin + newline + 1
            break
        parts.append(chunk)
        start = begin
    tail = b"".join(reversed(parts))
    if torn(tail):
        log.warning(
            "%s: cut off a last line without its newline (%d bytes, from a write that never "
            "returned)",
            where,
            len(tail),
        )
        os.ftruncate(fd, start)
        return start
    os.write(fd, b"\n")
    return size + 1


def append_or_undo(fd: int, data: bytes, start: int, *, fsync: bool) -> None:
    """Write all of ``data`` at the end of the file (``start`` bytes long), fsynced if asked.

    On any error the file is truncated back to ``start``, so a failed append leaves nothing
    behind: its retry writes each line once, and no later append completes a part of it.
    """
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
            os.fsync(fd)
        raise


def letter_record(letter: DeadLetter, *, serializer: str = "msgpack") -> bytes:
    """One letter as the stored record, with a fresh id: one JSON Lines line, without its newline.

    Every dead-letter store writes this record (a line of JsonlDeadLetters' file, the ``record``
    column of SqliteDeadLetters, the body of a RabbitMQDeadLetters message), so whatever holds
    letters can be read by ``batchpunk dlq show`` and ``dlq replay``: append the bodies to a
    ``.jsonl`` file, one per line. ``serializer`` is as for JsonlDeadLetters.
    """
    codec = _RecordCodec("dead-letter record", serializer, None)
    return codec.encode(letter, 0, uuid.uuid4().hex)[1]


def letter_from_record(
    data: bytes | str, where: str = "dead-letter record", *, allow_pickle: bool | None = None
) -> DeadLetter:
    """The letter of one stored record, its id in ``headers["dlq_id"]``: what ``dlq`` reads.

    The same parse as each line of JsonlDeadLetters.read(); MalformedDeadLetter naming
    ``where`` when the record is not one. Pickled values load only with ``allow_pickle=True``.
    """
    line = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    return _letter_of(_RecordCodec(where, "msgpack", bool(allow_pickle)), line, where)


def _letter_of(codec: _RecordCodec, line: bytes, where: str) -> DeadLetter:
    record = _parse_line(line, where)
    letter_id, letter = codec.decode(record, where)
    if letter_id is None:
        raise MalformedDeadLetter(where, "no 'id' field")
    letter.headers[ID_HEADER] = letter_id
    return letter


def _parse_line(line: bytes, where: str) -> Any:
    try:
        return decode_value(line)
    except FrameError as exc:
        problem = str(exc).replace("payload does not decode as json", "not a JSON object")
        raise MalformedDeadLetter(where, problem) from None


def _line_id(line: bytes) -> str | None:
    try:
        record = decode_value(line)
    except FrameError:
        return None
    letter_id = record.get("id") if isinstance(record, dict) else None
    return letter_id if isinstance(letter_id, str) else None


def _ids(ids: Iterable[str]) -> set[str]:
    if isinstance(ids, str | bytes):
        raise ValueError(f"ids: expected an iterable of ids, got the single value {ids!r}")
    out = set()
    for item in ids:
        if not isinstance(item, str):
            raise ValueError(f"ids: expected str ids from headers['dlq_id'], got {item!r}")
        out.add(item)
    return out


def _flock(fd: int, *, exclusive: bool) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one process per file is then the rule
        return
    fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # platforms that cannot open directories (Windows) have nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- SQLite -----------------------------------------------------------------------------------

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SqliteDeadLetters(_Store):
    """Dead letters in an SQLite table (WAL, synchronous=FULL), one transaction per put.

    Attributes:
        path: the database file; created on first use.
        table: the table name (created if missing), so one database can hold several queues.

    Every statement runs on one worker thread that owns the connection, so the event loop never
    waits for the disk and no connection crosses threads. Other processes may read and write
    the same database; SQLite's locking serializes them (busy timeout 30 s). Ids are the rows'
    AUTOINCREMENT keys as str, never reused after a delete.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table: str = "dead_letters",
        serializer: str = "msgpack",
        allow_pickle: bool | None = None,
        readonly: bool = False,
    ) -> None:
        if not isinstance(path, str | os.PathLike):
            raise ValueError(f"path: expected a file path, got {path!r}")
        if not isinstance(table, str) or not _IDENTIFIER.match(table):
            raise ValueError(f"table: expected a plain SQL identifier, got {table!r}")
        if table.lower() in _SQL_KEYWORDS:
            raise ValueError(f"table: {table!r} is an SQL keyword; choose another table name")
        self.path = Path(path)
        self.table = table
        #: Read only (``dlq show``): the file is opened with mode=ro, nothing is created or
        #: changed (no table, no WAL switch), and a database without the table is refused.
        self.readonly = readonly
        self._records = _RecordCodec(
            f"SqliteDeadLetters({str(self.path)!r})", serializer, allow_pickle
        )
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="batchpunk-dlq-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"SqliteDeadLetters({str(self.path)!r}, table={self.table!r})"

    async def _store(self, letters: list[DeadLetter]) -> None:
        """Insert the letters in one transaction, committed before this returns."""
        await self._run(self._insert, letters)

    async def read(self, *, strict: bool = False) -> AsyncIterator[DeadLetter]:
        """Every stored letter, oldest first, each with ``headers["dlq_id"]``."""
        self._check_open()
        after = 0
        while True:
            letters, after, done = await self._run(self._select, after, strict)
            for letter in letters:
                yield letter
            if done:
                return

    async def remove(self, ids: Iterable[str]) -> int:
        """Delete the letters with these ids (from ``headers["dlq_id"]``) in one transaction."""
        self._check_open()
        rows = []
        for item in _ids(ids):
            if not item.isdigit():
                raise ValueError(f"ids: {item!r} is not an id read from {self!r}")
            rows.append(int(item))
        if not rows:
            return 0
        return await self._run(self._delete, rows)

    async def close(self) -> None:
        """Close the connection and stop the worker thread; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._disconnect)
        finally:
            self._executor.shutdown(wait=False)

    # -- worker-thread side --

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None and self.readonly:
            uri = f"file:{quote(str(self.path.absolute()))}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None)
            try:
                found = conn.execute(
                    "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?",
                    (self.table,),
                ).fetchone()
            except BaseException:
                conn.close()
                raise
            if found is None or "record TEXT" not in str(found[0]):
                conn.close()
                raise MalformedDeadLetter(
                    str(self.path),
                    f"not a batchpunk dead-letter database (no table {self.table!r} of letters)",
                )
            self._conn = conn
        if self._conn is None:
            if str(self.path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self.table} ("
                    "id INTEGER PRIMARY KEY AUTOINCREMENT, "
                    "stored_at REAL NOT NULL, "
                    "reason TEXT NOT NULL, "
                    "error_type TEXT NOT NULL, "
                    "first_seen REAL NOT NULL, "
                    "record TEXT NOT NULL)"
                )
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _insert(self, letters: list[DeadLetter]) -> None:
        encoded = [self._records.encode(letter, i, None) for i, letter in enumerate(letters)]
        rows = [
            (r["stored_at"], r["reason"], r["error_type"], r["first_seen"], text.decode("utf-8"))
            for r, text in encoded
        ]
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                f"INSERT INTO {self.table} (stored_at, reason, error_type, first_seen, record) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _select(self, after: int, strict: bool) -> tuple[list[DeadLetter], int, bool]:
        rows = (
            self._connection()
            .execute(
                f"SELECT id, record FROM {self.table} WHERE id > ? ORDER BY id LIMIT ?",
                (after, READ_CHUNK),
            )
            .fetchall()
        )
        letters = []
        for row_id, text in rows:
            where = f"{self.path} table {self.table} id {row_id}"
            try:
                try:
                    record = decode_value(text.encode("utf-8") if isinstance(text, str) else text)
                except FrameError as exc:
                    raise MalformedDeadLetter(where, str(exc)) from None
                _, letter = self._records.decode(record, where)
            except MalformedDeadLetter as problem:
                _report(problem, strict)
                continue
            letter.headers[ID_HEADER] = str(row_id)
            letters.append(letter)
        last = rows[-1][0] if rows else after
        return letters, last, len(rows) < READ_CHUNK

    def _delete(self, rows: list[int]) -> int:
        conn = self._connection()
        removed = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            for start in range(0, len(rows), READ_CHUNK):
                part = rows[start : start + READ_CHUNK]
                marks = ",".join("?" * len(part))
                cursor = conn.execute(f"DELETE FROM {self.table} WHERE id IN ({marks})", part)
                removed += cursor.rowcount
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return removed

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def open_dead_letter_file(
    path: str | Path, *, readonly: bool = False
) -> JsonlDeadLetters | SqliteDeadLetters:
    """The dead-letter store behind a file: SQLite when it is a SQLite database, else JSON Lines.

    For tools that are handed a file (``batchpunk dlq show`` and ``replay``) and must not guess
    from its name. A file that is neither (a pipeline file, an ordinary database without a
    table of letters) is refused with MalformedDeadLetter before anything is written to it;
    ``readonly`` opens an SQLite store without ever writing to it.
    """
    path = Path(path)
    if path.is_file():
        with path.open("rb") as handle:
            head = handle.read(16)
            if head == b"SQLite format 3\x00":
                probe = SqliteDeadLetters(str(path), readonly=True)
                try:
                    probe._connection()  # refuses a database without a table of letters
                except sqlite3.DatabaseError as exc:
                    raise MalformedDeadLetter(str(path), f"unreadable SQLite file: {exc}") from None
                finally:
                    probe._disconnect()
                    probe._executor.shutdown(wait=False)
                return SqliteDeadLetters(str(path), readonly=readonly)
            handle.seek(0)
            # The first record decides. A line that does not parse (a put torn by a crash,
            # which read() skips with a warning) or lacks its newline proves nothing; a JSON
            # value that is not a record means another kind of file (a pipeline's input).
            first = 0
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                first = first or number
                try:
                    record = decode_value(line)
                except FrameError:
                    continue
                if isinstance(record, dict) and "v" in record:
                    break
                if line.endswith(b"\n"):
                    raise _not_letters(path, number)
            else:
                if first:
                    raise _not_letters(path, first)
    return JsonlDeadLetters(str(path))


def _not_letters(path: Path, number: int) -> MalformedDeadLetter:
    return MalformedDeadLetter(
        f"{path}:{number}", "not a batchpunk dead-letter file (expected one JSON record per line)"
    )
