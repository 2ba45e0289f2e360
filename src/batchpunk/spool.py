"""Spool: a durable, append-only log on local disk that keeps accepted messages across a crash.

A library user has no broker to keep what batchpunk has not finished: without a spool, a message
handed to ``add_message`` lives in memory until its batch succeeds, and a kill -9, an OOM kill or a
deploy that outlives ``drain_timeout`` loses it. With ``BatchProcessor(config, handler,
spool=Spool(path))`` every message is written to the spool before the engine sees it, and leaves
the spool only once it is finished (processed, or its dead letter durably stored). On the next
start, whatever was not finished is replayed into the engine before any new message.

How it plugs in without touching the engine's internals: the spool hands the engine a small
record (sequence number + message) instead of the message, and wraps the user's handler (which
sees a Batch of the user's own messages, same order, same attributes) and the dead-letter sink
(which sees letters carrying the user's messages). The handler wrapper marks a batch's records
finished once the handler returned; the sink wrapper once the sink stored the letters.

Guarantee: at-least-once. A batch that succeeded but whose completion marker had not reached the
disk when the process died is processed again after the restart; a sink should be idempotent
(an upsert, a unique key) if duplicates matter. See docs/spool.md for the format, the fsync
choices and what each costs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import inspect
import logging
import math
import os
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchpunk._admission import check_key
from batchpunk.batch import as_results
from batchpunk.codec.serializers import deserialize, serialize
from batchpunk.config import OverflowPolicy
from batchpunk.deadletter import DeadLetter
from batchpunk.errors import BatchpunkError, BufferFull, MissingDependency, PartialFailure, require

if TYPE_CHECKING:
    from batchpunk.config import BatchConfig
    from batchpunk.processor import BatchProcessor

__all__ = [
    "Spool",
    "SpoolDamaged",
    "SpoolError",
    "SpoolLocked",
    "SpoolReport",
    "inspect_spool",
]

log = logging.getLogger("batchpunk.spool")

#: Record header: CRC-32 of everything after it, record type, payload length (little-endian).
_HEADER = struct.Struct("<IBI")
HEADER_SIZE = _HEADER.size
#: A message group's payload starts with its first sequence number, its message count and the
#: serializer id; then one u32 length per message, then the messages' bytes back to back.
_GROUP = struct.Struct("<QIB")
#: A timed group (type 4, what this version writes): the same with the time it was written
#: (seconds since the epoch, a double) after the serializer id. Type 1 is still read.
_TIMED = struct.Struct("<QIBd")
#: A settled-damage record: segment number and byte offset of the damaged bytes.
_DAMAGE = struct.Struct("<QQ")
_CRC = struct.Struct("<I")
#: Type, length, first sequence number, count, serializer id, write time: a timed group's bytes
#: after its CRC.
_GROUP_HEAD = struct.Struct("<BIQIBd")
MESSAGE, FINISHED, DAMAGE_SETTLED, TIMED_MESSAGE = 1, 2, 3, 4
_KINDS = (MESSAGE, FINISHED, DAMAGE_SETTLED, TIMED_MESSAGE)
_GROUPS = (MESSAGE, TIMED_MESSAGE)
_SERIALIZER_IDS = {"json": 1, "msgpack": 2, "pickle": 3}
_SERIALIZER_NAMES = {v: k for k, v in _SERIALIZER_IDS.items()}
#: Largest payload a record may declare; a bigger length field is damage, not a message.
MAX_RECORD = 64 * 2**20
_SUFFIX = ".seg"
_SYNC_MODES = ("data", "full", "none")
#: Open flags that make each write(2) return only once its bytes are durable, as a write then
#: fdatasync (or fsync, for "full") would: the writer thread then makes one system call per commit
#: instead of two. Each call gives up the GIL and must take it back before the thread goes on, and
#: while the event loop is busy resuming producers that wait is the commit's largest cost
#: (measured: 1.4 to 2.2 ms a commit with a separate fdatasync whose own syscall took 0.35 ms).
#: 0 where the platform lacks the flag: the explicit sync call is made instead.
_SYNC_FLAGS = {"data": getattr(os, "O_DSYNC", 0), "full": getattr(os, "O_SYNC", 0), "none": 0}
#: Seconds finish markers wait for a message commit to ride along with before going alone.
MARKER_DELAY = 0.05
#: Bytes appended that start a write at once when none is running (else: at the end of this
#: loop iteration): small enough that producers fill the next group while this one syncs.
KICK_BYTES = 32 << 10
#: Seconds a commit's hand-off may hold the loop while the writer thread begins (it takes
#: microseconds; the cap bounds the stall when the machine is too busy to run the thread).
HANDOFF_SECONDS = 0.002
#: Seconds close() waits for the last writes (a full disk under BLOCK may never drain).
CLOSE_SECONDS = 10.0


class SpoolError(BatchpunkError):
    """The spool cannot be used: its directory is unusable or its settings are wrong."""


class SpoolLocked(SpoolError):
    """Another process owns this spool (one process at a time may write a spool)."""


class SpoolDamaged(BatchpunkError):
    """The error of a dead letter made from bytes of the spool that do not check out."""


class _Record:
    """What the engine carries for a spooled message: its mark in the spool and the message.

    ``mark`` is the sequence number, a ``(segment, offset)`` tuple for damaged bytes being
    dead-lettered, or None for a message that was never written (refused or dropped).
    """

    __slots__ = ("mark", "message")

    def __init__(self, mark: Any, message: Any) -> None:
        self.mark = mark
        self.message = message

    def __repr__(self) -> str:
        return f"SpoolRecord({self.mark!r}, {self.message!r})"


class _Shared(asyncio.Future[None]):
    """The future every producer of one commit awaits: one wake-up for all, one cancel for none.

    Cancelling one waiter cannot cancel it: a Task cancelled while awaiting a future cancels that
    future, and with one future shared by a thousand producers that would fail them all. Refusing
    the cancel makes the cancelled task raise CancelledError once the commit is done, a few
    milliseconds later, and is cheaper than ``asyncio.shield`` (a future and two callbacks per
    producer).

    Waking: a plain future schedules each done-callback with its own ``loop.call_soon`` (a Handle
    and a pass through the ready queue per waiting producer, the largest per-message cost of a
    durable ``add_message`` once the log itself is cheap). This one keeps its waiters in a list
    and schedules a single callback that resumes them all in order, each in its own context, in
    the same loop iteration they would have run in anyway.
    """

    def __init__(self, *, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        #: Callback, context, callback, context, ...: flat, so that a waiting producer costs
        #: no tuple (one object less per message for the garbage collector to scan).
        self._waiters: list[Any] = []

    def cancel(self, msg: Any = None) -> bool:
        return False

    def add_done_callback(self, fn: Callable[[Any], object], *, context: Any = None) -> None:
        if self.done():
            super().add_done_callback(fn, context=context)
        else:
            waiters = self._waiters
            waiters.append(fn)
            waiters.append(context)

    def remove_done_callback(self, fn: Callable[[Any], object]) -> int:
        waiters = self._waiters
        kept: list[Any] = []
        for index in range(0, len(waiters), 2):
            if waiters[index] != fn:
                kept += waiters[index : index + 2]
        removed = (len(waiters) - len(kept)) // 2
        self._waiters = kept
        return removed + super().remove_done_callback(fn)

    def set_result(self, result: None) -> None:
        super().set_result(result)
        self._release()

    def set_exception(self, exception: type | BaseException) -> None:
        super().set_exception(exception)
        self._release()

    def _release(self) -> None:
        waiters, self._waiters = self._waiters, []
        if waiters:
            self.get_loop().call_soon(self._wake, waiters)

    def _wake(self, waiters: list[Any]) -> None:
        """Run every waiter's callback; one that raises is reported as a Handle's would be."""
        pairs = iter(waiters)
        for fn, context in zip(pairs, pairs, strict=True):
            try:
                if context is None:
                    fn(self)
                else:
                    context.run(fn, self)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self.get_loop().call_exception_handler(
                    {"message": f"Exception in callback {fn!r}", "exception": exc, "future": self}
                )


class _Chunk:
    """Messages appended since the last write, and the future their producers wait on.

    It keeps each message's serialized bytes in a list and is framed only when written, as one
    record for the whole group (one header, one CRC-32): appends run on the event loop once per
    message, and framing each one there cost 0.98 us a message against 0.25 us for the list
    append and bookkeeping (docs/spool.md, "Format").
    """

    __slots__ = ("bodies", "early", "first", "future", "held", "segment", "size")

    def __init__(self, future: _Shared, first: int) -> None:
        self.bodies: list[bytes] = []
        self.size = 0  # bytes in bodies
        #: Its messages' sequence numbers, first .. first + len(bodies) - 1: appends go to the
        #: newest chunk only, so a chunk's numbers are consecutive (a range, not a list).
        self.first = first
        self.future = future
        #: The segment that holds these records once written; messages finished before that.
        self.segment: _Segment | None = None
        self.early = 0
        #: Finish marks of those messages, held back until the chunk is written: a marker that
        #: rode with an older chunk would reach the disk before its record, and a crash in
        #: between left a marker for a sequence number the next start hands out again.
        self.held: list[int] = []

    def framed(self, serializer_id: int) -> bytes:
        """The group record: header and CRC-32, the message lengths, then the messages."""
        bodies = self.bodies
        count = len(bodies)
        lengths = struct.pack(f"<{count}I", *map(len, bodies))
        payload = b"".join(bodies)
        length = _TIMED.size + len(lengths) + len(payload)
        head = _GROUP_HEAD.pack(
            TIMED_MESSAGE, length, self.first, count, serializer_id, time.time()
        )
        crc = zlib.crc32(payload, zlib.crc32(lengths, zlib.crc32(head)))
        return b"".join((_CRC.pack(crc), head, lengths, payload))

    def overhead(self) -> int:
        """Bytes the spool counts as buffered for this chunk (bodies and their lengths)."""
        return self.size + 4 * len(self.bodies)


class _Segment:
    """One file of the log; ``live`` counts its unfinished records (damage included)."""

    __slots__ = ("live", "number", "path", "sealed", "segment", "size")

    def __init__(self, number: int, path: Path, size: int = 0) -> None:
        self.segment = self  # so that a record's holder (chunk or segment) names its segment
        self.number = number
        self.path = path
        self.size = size
        self.live = 0
        self.sealed = False


@dataclass
class SpoolReport:
    """What ``inspect_spool`` (and ``batchpunk spool inspect``) found in a spool directory.

    Attributes:
        path: the directory.
        segments: (file name, bytes, message records, unfinished messages) per segment.
        unfinished: messages written and not finished.
        oldest_age: seconds since the oldest unfinished message was written (the time its
            group records; for a group of the older format without one, the time its file was
            last modified, which later writes to that file move on), or None when nothing is
            unfinished.
        damaged: byte ranges that do not check out: (file name, offset, length, torn tail?).
            A torn tail is reported only when no live process owns the spool.
        locked_by: the pid in the lock file when another process holds the lock, else None.
        writing: while a live process owns the spool, (file name, bytes) of an incomplete
            last record: a write under way when the spool was read, not damage.
    """

    path: str
    segments: list[tuple[str, int, int, int]]
    unfinished: int
    oldest_age: float | None
    damaged: list[tuple[str, int, int, bool]]
    locked_by: int | None
    writing: list[tuple[str, int]] = dataclasses.field(default_factory=list)


# -- reading a log ------------------------------------------------------------------------------


@dataclass
class _Scan:
    """The records of one segment file: messages, finish marks, and damage found."""

    messages: list[tuple[int, int, int, int]]  # (seq, serializer id, offset, length)
    groups: list[tuple[int, int]]  # (offset, length) of each message group record
    finished: list[int]
    settled: list[tuple[int, int]]
    damaged: list[tuple[int, int]]  # (offset, length) of bytes that do not check out
    good_end: int  # where a torn tail starts (the file is cut there); == size when none
    torn: bool
    #: (first seq, count, write time) of each timed group (type 4; type 1 has no time).
    written: list[tuple[int, int, float]] = dataclasses.field(default_factory=list)


def _record_at(data: bytes, offset: int) -> tuple[int, int] | None:
    """(type, total length) of a record that checks out at ``offset``, else None."""
    if offset + HEADER_SIZE > len(data):
        return None
    crc, kind, length = _HEADER.unpack_from(data, offset)
    if kind not in _KINDS or length > MAX_RECORD:
        return None
    end = offset + HEADER_SIZE + length
    if end > len(data):
        return None
    if zlib.crc32(data[offset + 4 : end]) != crc:
        return None
    if kind in _GROUPS and _group_lengths(data, offset + HEADER_SIZE, end, kind) is None:
        return None  # checks out but does not add up: damage all the same
    return kind, HEADER_SIZE + length


def _group_lengths(data: bytes, body: int, end: int, kind: int) -> tuple[int, ...] | None:
    """The message lengths of the group whose payload spans ``body`` .. ``end``, if they fit."""
    head = _TIMED if kind == TIMED_MESSAGE else _GROUP
    if end - body < head.size:
        return None
    count = _GROUP.unpack_from(data, body)[1]
    start = body + head.size
    if start + 4 * count > end:
        return None
    lengths: tuple[int, ...] = struct.unpack_from(f"<{count}I", data, start)
    if start + 4 * count + sum(lengths) != end:
        return None
    return lengths


def _scan(data: bytes, *, last: bool) -> _Scan:
    """Read every record; resynchronise after damage by finding the next record that checks out.

    Bytes at the end of the last segment that are an incomplete record are a torn tail (cut,
    not dead-lettered); any other bytes that do not check out are damage, dead-lettered and left
    on disk until their letter is stored.
    """
    out = _Scan([], [], [], [], [], len(data), False)
    offset, size = 0, len(data)
    while offset < size:
        found = _record_at(data, offset)
        if found is not None:
            kind, total = found
            body = offset + HEADER_SIZE
            if kind in _GROUPS:
                first, count, sid = _GROUP.unpack_from(data, body)
                lengths = _group_lengths(data, body, offset + total, kind)
                assert lengths is not None  # _record_at checked it
                head = _GROUP.size
                if kind == TIMED_MESSAGE:
                    head = _TIMED.size
                    out.written.append((first, count, _TIMED.unpack_from(data, body)[3]))
                at = body + head + 4 * count
                for index, length in enumerate(lengths):
                    out.messages.append((first + index, sid, at, length))
                    at += length
                out.groups.append((offset, total))
            elif kind == FINISHED:
                count = (total - HEADER_SIZE) // 8
                out.finished.extend(struct.unpack_from(f"<{count}Q", data, body))
            elif kind == DAMAGE_SETTLED and total - HEADER_SIZE == _DAMAGE.size:
                out.settled.append(_DAMAGE.unpack_from(data, body))
            offset += total
            continue
        # Damage: look for the next offset where a record checks out.
        nxt = offset + 1
        while nxt < size and _record_at(data, nxt) is None:
            nxt += 1
        if nxt >= size and last and _incomplete(data, offset):
            out.good_end, out.torn = offset, True
            return out
        # Damage stays on disk, even at the end of the last segment: cutting it on start, before
        # its "malformed" letter was stored, lost those bytes to a crash in between. Its segment
        # goes once the letter's DAMAGE_SETTLED marker is written (recovered segments are sealed).
        out.damaged.append((offset, nxt - offset))
        offset = nxt
    return out


def _incomplete(data: bytes, offset: int) -> bool:
    """True when the bytes at ``offset`` are the start of a record that was never fully written.

    A crash mid-write leaves a prefix: a header cut short, a declared length running past the end
    of the file, or (the file system having extended the file first) zeros.
    """
    rest = len(data) - offset
    if rest < HEADER_SIZE:
        return True
    _, kind, length = _HEADER.unpack_from(data, offset)
    if kind not in _KINDS:
        return not any(data[offset:])
    return offset + HEADER_SIZE + int(length) > len(data)


def _segment_files(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for entry in directory.iterdir():
        if entry.suffix == _SUFFIX and entry.stem.isdigit():
            found.append((int(entry.stem), entry))
    found.sort()
    return found


@dataclass
class _Recovered:
    segments: list[_Segment]
    replay: list[tuple[int, int, bytes, _Segment]]  # (seq, serializer id, bytes, segment)
    damaged: list[tuple[_Segment, int, bytes]]
    next_seq: int
    torn: list[tuple[str, int]]
    #: Segment number -> (bytes read, message records), as read once.
    counts: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
    #: (first seq, count, write time) of every timed group read.
    written: list[tuple[int, int, float]] = dataclasses.field(default_factory=list)


def _recover(directory: Path, *, cut: bool) -> _Recovered:
    """Read every segment: what is unfinished, what is damaged; cut torn tails when ``cut``."""
    files = _segment_files(directory)
    scans: list[tuple[_Segment, _Scan, bytes]] = []
    finished: set[int] = set()
    settled: set[tuple[int, int]] = set()
    torn: list[tuple[str, int]] = []
    top = 0
    counts: dict[int, tuple[int, int]] = {}
    written: list[tuple[int, int, float]] = []
    for index, (number, path) in enumerate(files):
        try:
            whole = path.read_bytes()
        except FileNotFoundError:
            if cut:
                raise  # the owner's own directory: nobody else deletes in it
            continue  # inspecting a live spool: its owner deleted a drained segment meanwhile
        scan = _scan(whole, last=index == len(files) - 1)
        counts[number] = (len(whole), len(scan.messages))
        written.extend(scan.written)
        data = whole
        if scan.good_end < len(data):
            torn.append((path.name, len(data) - scan.good_end))
            if cut:
                with open(path, "r+b") as handle:
                    handle.truncate(scan.good_end)
                    handle.flush()
                    os.fsync(handle.fileno())
                log.warning(
                    "spool %s: cut %d byte(s) of a torn tail (a write the crash interrupted)",
                    path,
                    len(data) - scan.good_end,
                )
            data = data[: scan.good_end]
        segment = _Segment(number, path, len(data))
        segment.sealed = True
        scans.append((segment, scan, whole))
        finished.update(scan.finished)
        settled.update(scan.settled)
        for seq, _, _, _ in scan.messages:
            top = max(top, seq)
        # Numbers in finish markers count too: a spool written before markers waited for their
        # records may hold a marker for a number no record on disk has, and handing that number
        # to a new message would mark it finished on the next start.
        top = max(top, max(scan.finished, default=0))
    replay: list[tuple[int, int, bytes, _Segment]] = []
    damaged: list[tuple[_Segment, int, bytes]] = []
    for segment, scan, data in scans:
        for seq, sid, offset, length in scan.messages:
            if seq not in finished:
                replay.append((seq, sid, data[offset : offset + length], segment))
                segment.live += 1
        for offset, length in scan.damaged:
            if (segment.number, offset) not in settled:
                damaged.append((segment, offset, data[offset : offset + length]))
                segment.live += 1
    replay.sort(key=lambda item: item[0])
    return _Recovered([s for s, _, _ in scans], replay, damaged, top + 1, torn, counts, written)


def _decode_message(
    serializer_id: int, body: bytes, *, allow_pickle: bool = False
) -> tuple[Any, Any, int]:
    """(message, key, priority) of one message of a group that checked out.

    Pickle only with ``allow_pickle`` (a Spool built with serializer="pickle"): bytes on disk
    are not trusted because of the id they carry, or a json spool's directory that someone else
    wrote to would run their code on start.
    """
    name = _SERIALIZER_NAMES.get(serializer_id)
    if name is None:
        raise SpoolDamaged(f"unknown serializer id {serializer_id}")
    if name == "pickle" and not allow_pickle:
        raise SpoolDamaged(
            "this message was written with pickle, and a spool never unpickles unless it was "
            "built with serializer='pickle' (untrusted bytes are never unpickled); the bytes "
            "are the message"
        )
    value = deserialize(body, name)
    if not isinstance(value, list) or len(value) != 3:
        raise SpoolDamaged("a message record must hold [message, key, priority]")
    message, key, priority = value
    return message, _as_key(key), priority


#: Key types every serializer gives back as written (a float only when finite: json writes an
#: infinity as null, and a NaN never equals itself, so it never finds its lane again).
_KEY_TYPES = (str, int, float, bool, type(None))


def _check_durable_key(key: Any, serializer: str) -> None:
    """TypeError unless the key comes back from the spool equal and of the same type.

    A key that does not (an Enum comes back as its value, a UUID or datetime as a str) puts a
    replayed message in another lane than a new one of the same key, and preserve_order, which
    holds per lane, no longer orders them. Checked before anything is written.
    """
    if not _round_trips(key, serializer != "json"):
        kinds = "str, int, float, bool, None" + (", bytes" if serializer != "json" else "")
        raise TypeError(
            f"key: {key!r} would not come back as written from the spool (serializer "
            f"{serializer!r}): with a spool a key must be a {kinds} (floats finite) or a tuple "
            "of these; an Enum, UUID or datetime key comes back as a plain value on replay and "
            "breaks preserve_order: pass key=its .value or str(...) instead"
        )


def _round_trips(key: Any, bytes_too: bool) -> bool:
    kind = type(key)
    if kind is tuple:
        return all(_round_trips(item, bytes_too) for item in key)
    if kind is float:
        return math.isfinite(key)
    return kind in _KEY_TYPES or (bytes_too and kind is bytes)


def _as_key(value: Any) -> Any:
    """A key as written, hashable again: json and msgpack return tuples (nested too) as lists."""
    if isinstance(value, list):
        return tuple(_as_key(item) for item in value)
    return value


def inspect_spool(path: str | os.PathLike[str]) -> SpoolReport:
    """Read a spool without changing it: segments, unfinished messages, oldest age, damage.

    Safe while another process owns the spool (it only reads; the lock holder is reported).
    """
    directory = Path(path)
    if not directory.is_dir():
        what = "not a directory" if directory.exists() else "no such directory"
        raise SpoolError(f"spool {directory}: {what}")
    try:
        is_spool = (directory / "lock").is_file() or bool(_segment_files(directory))
    except OSError as exc:
        raise SpoolError(f"spool {directory}: cannot read the directory: {exc}") from None
    if not is_spool:
        raise SpoolError(
            f"spool {directory}: not a spool (no lock file and no segment files); check the path"
        )
    locked_by = _lock_holder(directory)
    recovered = _recover(directory, cut=False)
    unfinished: dict[int, int] = {}
    for item in recovered.replay:
        number = item[3].number
        unfinished[number] = unfinished.get(number, 0) + 1
    rows = []
    for segment in recovered.segments:
        count = unfinished.get(segment.number, 0)
        size, total = recovered.counts[segment.number]
        rows.append((segment.path.name, size, total, count))
    oldest: float | None = None
    if recovered.replay:
        seq, _, _, segment = recovered.replay[0]  # the oldest unfinished message
        for first, count, when in recovered.written:
            if first <= seq < first + count:
                oldest = when
                break
        else:  # a group written before groups recorded their time (type 1)
            with contextlib.suppress(FileNotFoundError):
                oldest = segment.path.stat().st_mtime
    damaged = [(s.path.name, offset, len(raw), False) for s, offset, raw in recovered.damaged]
    writing: list[tuple[str, int]] = []
    if locked_by is None:
        damaged += [(name, -1, length, True) for name, length in recovered.torn]
    else:
        # Its owner runs: an incomplete last record is the write under way, not a torn tail.
        writing = list(recovered.torn)
    age = None if oldest is None or not recovered.replay else max(0.0, time.time() - oldest)
    return SpoolReport(
        str(directory), rows, len(recovered.replay), age, damaged, locked_by, writing
    )


def _lock_holder(directory: Path) -> int | None:
    """The pid written by the owner, if that process is alive (never takes the lock itself)."""
    try:
        text = (directory / "lock").read_text().strip()
    except OSError:
        return None
    if not text.isdigit():
        return None
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return int(text)


# -- the spool ------------------------------------------------------------------------------------


class Spool:
    """A durable disk log between producers and the engine: accepted messages survive a crash.

    Args:
        path: a directory owned by this spool (created if missing). One process at a time.
        max_bytes: disk the spool may use; when a new message would pass it, the processor's
            overflow policy applies as it does in memory (BLOCK waits for finished segments to
            be deleted, RAISE raises BufferFull, the drop policies dead-letter the new message
            with reason "dropped").
        segment_bytes: size at which a segment file is closed and a new one begun. A segment is
            deleted once every message in it (and every older segment) is finished.
        commit_interval: seconds a commit waits to gather more messages before its fsync. 0
            (the default) commits as soon as the previous commit returned, which already groups
            everything appended meanwhile; a few milliseconds trade latency for fewer fsyncs.
        sync: "data" (fdatasync's guarantee, by O_DSYNC writes: survives power loss, the
            default), "full" (fsync's, by O_SYNC: also the file's metadata), or "none" (the
            write reaches the kernel only: survives a crash of the process, not of the
            machine). docs/spool.md gives the measured cost of each.
        serializer: "json" (default) or "msgpack"; "pickle" only if you ask for it, and then it
            is read back on replay (only ever from this spool's own files).
        ack_on_write: pipelines only: acknowledge a broker message once it is in the spool rather
            than once processed (None: the source decides; see docs/spool.md for the trade-off).

    ``await add_message(m)`` and ``await submit(m)`` return only after m is durable (one fsync
    covers every message appended meanwhile: group commit). ``add_message_nowait`` appends and
    returns: its message is durable by the next group commit, a few milliseconds later, so a crash
    in between can lose it. The guarantee is at-least-once: a batch that succeeded but whose
    completion was not yet recorded is processed again after a restart.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = 1 << 30,
        segment_bytes: int = 16 << 20,
        commit_interval: float = 0.0,
        sync: str = "data",
        serializer: str = "json",
        ack_on_write: bool | None = None,
    ) -> None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 4096:
            raise ValueError(f"max_bytes: expected an integer >= 4096, got {max_bytes!r}")
        if (
            not isinstance(segment_bytes, int)
            or isinstance(segment_bytes, bool)
            or not 4096 <= segment_bytes <= max_bytes
        ):
            raise ValueError(
                f"segment_bytes: expected an integer from 4096 to max_bytes, got {segment_bytes!r}"
            )
        if not isinstance(commit_interval, int | float) or not 0 <= commit_interval <= 10:
            raise ValueError(f"commit_interval: expected 0..10 seconds, got {commit_interval!r}")
        if sync not in _SYNC_MODES:
            raise ValueError(f"sync: expected one of {', '.join(_SYNC_MODES)}, got {sync!r}")
        if serializer not in _SERIALIZER_IDS:
            raise ValueError(
                f"serializer: expected 'json', 'msgpack' or 'pickle', got {serializer!r}"
            )
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.commit_interval = float(commit_interval)
        self.sync = sync
        self.serializer = serializer
        self.ack_on_write = ack_on_write
        self._sid = _SERIALIZER_IDS[serializer]
        #: orjson.dumps and the codec's arguments for it, when json and orjson is installed.
        self._fast = _fast_json() if serializer == "json" else None
        #: Set by a Pipeline, whose engine carries envelopes: what of a message is written (its
        #: payload), and what a replayed (message, key, priority) becomes (a new envelope).
        self.extract: Callable[[Any], Any] | None = None
        self.rebuild: Callable[[Any, Any, int], Any] | None = None
        self._processor: BatchProcessor[Any, Any] | None = None
        self._policy = OverflowPolicy.BLOCK
        self._open = False
        self._lock_fd: int | None = None
        self._segments: list[_Segment] = []
        self._numbers: list[int] = []
        self._active: _Segment | None = None
        self._fd: int | None = None
        self._fd_segment: _Segment | None = None
        self._next_seq = 1
        self._next_number = 1
        # seq -> the segment holding it, or None while its write is not yet done.
        # mark -> what holds it: its chunk (which knows its segment once written) or segment.
        self._where: dict[Any, _Chunk | _Segment] = {}
        # Appended records not yet written, in chunks of at most _chunk_bytes (one write each).
        self._chunks: deque[_Chunk] = deque()
        self._last: _Chunk = None  # type: ignore[assignment]  # the chunk of the last append
        self._retry_timer: asyncio.TimerHandle | None = None
        self._buffered = 0
        self._chunk_bytes = min(1 << 20, segment_bytes)
        self._marks: list[int] = []
        self._settle: list[tuple[int, int]] = []
        self._disk = 0  # bytes in segment files
        self._writing = False
        self._retrying = False
        self._kick_pending = False
        self._failures = 0
        self._marker_timer: asyncio.TimerHandle | None = None
        self._closer: asyncio.Future[None] | None = None
        self._closing: asyncio.Task[None] | None = None  # close() under way, or done
        self._opening: asyncio.Future[None] | None = None  # open() under way, or done
        self._space: asyncio.Event | None = None
        self._full_error: BaseException | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dropped: tuple[asyncio.Future[None], BaseException] = (None, None)  # type: ignore[assignment]
        #: Counts: appended, finished, replayed, damaged, commits, fsync seconds.
        self.stats: dict[str, float] = {
            "written": 0,
            "finished": 0,
            "replayed": 0,
            "damaged": 0,
            "torn": 0,
            "commits": 0,
            "commit_seconds": 0.0,
            "refused": 0,
        }

    def __repr__(self) -> str:
        return (
            f"Spool({str(self.path)!r}, segments={len(self._segments)}, "
            f"unfinished={len(self._where)}, bytes={self._disk})"
        )

    def _closed(self) -> bool:
        return not self._open

    @property
    def unfinished(self) -> int:
        """Messages in the spool not yet finished."""
        return len(self._where)

    @property
    def sequence(self) -> int:
        """The sequence number the next appended message gets: a change says one was written."""
        return self._next_seq

    @property
    def disk_bytes(self) -> int:
        """Bytes the spool's segment files use now (what max_bytes bounds)."""
        return self._disk

    # -- wiring into a processor (called by BatchProcessor) ---------------------------------

    def bind(
        self,
        processor: BatchProcessor[Any, Any],
        config: BatchConfig,
        handler: Callable[..., Any],
        dead_letter: object | None,
    ) -> tuple[BatchConfig, Callable[..., Any], Callable[[list[DeadLetter]], Any]]:
        """Wrap the handler, the sizer and the dead-letter sink so the engine can carry records."""
        if self._processor is not None:
            raise SpoolError(f"spool {self.path}: already bound to a processor")
        self._processor = processor
        self._policy = config.overflow
        if config.sizer is not None or config.max_bytes is not None:
            user_sizer = config.sizer
            if user_sizer is None:
                from batchpunk._accumulator import _default_sizer

                user_sizer = _default_sizer
            sizer = user_sizer
            config = dataclasses.replace(config, sizer=lambda record: sizer(record.message))
        return config, self._wrap_handler(handler), self._wrap_dead_letter(dead_letter, processor)

    def _wrap_handler(self, handler: Callable[..., Any]) -> Callable[..., Any]:
        """Hand the user's handler a Batch of its messages; finish what the engine will finish.

        A batch's records are finished once the handler returned None or one result per message
        (any other return is the engine's ResultMismatch: it retries, so nothing is finished),
        and on a PartialFailure that fits the batch, its messages not named as failed.
        """
        from batchpunk._execution import is_async_callable

        finish = self._finish_many

        def unwrap(batch: Any) -> Any:
            return batch.derive([record.message for record in batch])

        if is_async_callable(handler):

            async def call_async(batch: Any) -> Any:
                try:
                    result = await handler(unwrap(batch))
                except PartialFailure as partial:
                    finish(_good_marks(batch, partial))
                    raise
                result = as_results(result)
                if result is None or len(result) == len(batch):
                    finish([record.mark for record in batch])
                return result

            return call_async

        def call_sync(batch: Any) -> Any:
            # Runs on a worker thread: marks go back to the loop's thread.
            loop = self._loop
            assert loop is not None
            try:
                result = handler(unwrap(batch))
                if inspect.isawaitable(result):
                    return _finish_later(self, batch, result)
            except PartialFailure as partial:
                marks = _good_marks(batch, partial)
                if marks:
                    loop.call_soon_threadsafe(finish, marks)
                raise
            result = as_results(result)
            if result is None or len(result) == len(batch):
                loop.call_soon_threadsafe(finish, [record.mark for record in batch])
            return result

        return call_sync

    def _wrap_dead_letter(
        self, target: object | None, processor: BatchProcessor[Any, Any]
    ) -> Callable[[list[DeadLetter]], Any]:
        from batchpunk._outbox import as_put

        put = as_put(target) if target is not None else None

        async def put_letters(letters: list[DeadLetter]) -> None:
            out: list[DeadLetter] = []
            marks: list[Any] = []
            for letter in letters:
                record = letter.message
                if type(record) is not _Record:
                    out.append(letter)
                    continue
                if letter.reason == "shutdown":
                    holder = self._where.get(record.mark) if record.mark is not None else None
                    if holder is not None and holder.segment is None:
                        # Its write is under way: its outcome decides (written, or abandoned
                        # by a disk that stays full).
                        with contextlib.suppress(Exception):
                            await holder.future
                    if self._on_disk(record.mark):
                        # Stays in the spool: replayed on the next start, not parked here.
                        continue
                out.append(dataclasses.replace(letter, message=record.message))
                marks.append(record.mark)
            if out:
                if put is not None:
                    await put(out)
                else:
                    processor.dead_letters.extend(out)
                    log.warning(
                        "%d message(s) dead-lettered (reason: %s); kept in "
                        "processor.dead_letters, pass dead_letter= to store them",
                        len(out),
                        ", ".join(sorted({letter.reason for letter in out})),
                    )
            self._finish_many(marks)

        return put_letters

    def _on_disk(self, mark: Any) -> bool:
        """Whether this record is written and unfinished: the next start replays it.

        Not one still waiting for its write (add_message_nowait's, when stop() comes first):
        the disk may refuse it for good (the write is then abandoned), so its shutdown letter is
        stored instead, and finishing it marks it done should the write still happen.
        """
        holder = self._where.get(mark) if mark is not None else None
        return holder is not None and holder.segment is not None

    def unstored(self, letters: list[DeadLetter]) -> list[DeadLetter]:
        """Letters not stored by stop(), as processor.dead_letters should hold them.

        A spooled message's letter is dropped from the list: the message stays unfinished in the
        spool and is processed again after the next start (its letter stored then). A message
        never written keeps its letter, with the message itself instead of its record.
        """
        out: list[DeadLetter] = []
        kept = 0
        for letter in letters:
            record = letter.message
            if type(record) is not _Record:
                out.append(letter)
            elif self._on_disk(record.mark):
                kept += 1
            else:
                out.append(dataclasses.replace(letter, message=record.message))
        if kept:
            log.warning(
                "spool %s: %d message(s) whose dead letter was not stored stay in the spool; "
                "they are processed again after the next start",
                self.path,
                kept,
            )
        return out

    # -- admitting messages (called by BatchProcessor's add and submit methods) ---------------

    async def admit(self, message: Any, key: Any, priority: int, *, submit: bool = False) -> Any:
        """The record to hand to the engine, once durable; None when the message was dropped.

        Records (replayed ones) pass through. A processor not running gets an unwritten record,
        which the engine then refuses with ProcessorClosed.
        """
        if type(message) is _Record:
            return message
        if not self._open:
            return _Record(None, message)
        body = self._encode(message, key, priority)
        if self._full_error is None and (
            self._disk + self._buffered + len(body) + 64 <= self.max_bytes
        ):
            # The common case first, with _full's test written out: one call less per message.
            record = self._append(body, message)
            await self._last.future  # a _Shared future: one producer's cancel spares the others
            return record
        while self._full(len(body)):
            policy = self._policy
            if policy is OverflowPolicy.BLOCK:
                assert self._space is not None
                self._space.clear()
                await self._space.wait()
                if self._closed():
                    return _Record(None, message)
                continue
            error = self._refusal()
            if policy is OverflowPolicy.RAISE:
                self.stats["refused"] += 1
                raise error
            processor = self._processor
            assert processor is not None
            if processor._letters_fill():
                # Letters wait for a sink that does not store them: as the engine's own drops
                # do, wait for room rather than add more (memory would grow without bound).
                await processor._wait_for_room()
                if self._closed():
                    return _Record(None, message)
                continue
            letter = processor.reject(message, "dropped", error, key=key, priority=priority)
            self._dropped = (letter, error)
            # Returns once the letter is stored: the message was never written, so until then
            # a crash would lose it although its producer was told it was taken care of.
            await letter
            if submit:
                raise error
            return None
        record = self._append(body, message)
        await self._last.future  # a _Shared future: one producer's cancel spares the others
        return record

    def admit_now(self, message: Any, key: Any, priority: int) -> tuple[Any, _Shared] | None:
        """The common case of ``admit`` without a coroutine: (record, commit future) or None.

        Appends the message and returns its record with the future of its group commit, which
        the caller awaits before handing the record to the engine. None leaves every other case
        (a replayed record, a closed spool, a full disk or max_bytes) to ``admit``, before
        anything was appended. ``add_message`` calls this first: one coroutine and one frame
        less per durable message, since every producer of a commit suspends and resumes.
        """
        if type(message) is _Record or not self._open:
            return None
        body = self._encode(message, key, priority)
        if self._full_error is not None or (
            self._disk + self._buffered + len(body) + 64 > self.max_bytes
        ):
            return None
        record = self._append(body, message)
        return record, self._last.future

    def admit_nowait(self, message: Any, key: Any, priority: int, room: bool) -> Any:
        """The record to hand to the engine now (durable by the next commit); None if dropped.

        ``room`` says whether the engine has room for it: without room the message is not
        written, so the engine's refusal (BufferFull, or a drop) leaves nothing behind in the
        spool; except under DROP_OLDEST, where the engine drops an older message and keeps it.
        """
        if type(message) is _Record:
            return message
        if not self._open or (not room and not self._kept_without_room()):
            return _Record(None, message)
        body = self._encode(message, key, priority)
        if self._full(len(body)):
            error = self._refusal()
            policy = self._policy
            if policy in (OverflowPolicy.BLOCK, OverflowPolicy.RAISE):
                self.stats["refused"] += 1
                raise error
            processor = self._processor
            assert processor is not None
            if processor._letters_fill():
                self.stats["refused"] += 1
                raise BufferFull(
                    f"spool {self.path}: full, and max_pending dead letters wait for the "
                    f"dead-letter sink, which is not storing them (overflow={policy.value} drops "
                    "no more); retry later or use await add_message()"
                )
            stored = processor.reject(message, "dropped", error, key=key, priority=priority)
            self._dropped = (stored, error)
            return None
        return self._append(body, message)

    def _kept_without_room(self) -> bool:
        """Whether the engine keeps a message it has no room for: DROP_OLDEST while running.

        It then dead-letters its oldest waiting message and accepts the new one, so the new one
        must be written like any other (the dropped one's letter finishes its own mark; should
        nothing be waiting, the new one's letter finishes it). DROP_NEWEST and the refusals keep
        nothing, and a stopping engine refuses: those stay unwritten.
        """
        processor = self._processor
        return (
            self._policy is OverflowPolicy.DROP_OLDEST
            and processor is not None
            and processor._open
            and not processor._letters_fill()  # else the engine refuses it (BufferFull)
        )

    def refused(self, record: Any) -> None:
        """The engine refused a record already written (its room went while the commit ran):
        finish it, or the next start processes a message whose producer got BufferFull."""
        if type(record) is _Record and record.mark is not None:
            self.stats["refused"] += 1
            self._finish_many([record.mark])

    def when_durable(self, callback: Callable[[Any], None]) -> None:
        """Call ``callback(None)`` once the last appended message is durable (not if refused).

        Pipelines use it to settle a source's message once it is in the spool without waiting
        for each message's commit in turn.
        """

        def done(future: asyncio.Future[None]) -> None:
            if future.exception() is None:
                callback(None)

        self._last.future.add_done_callback(done)

    def settle_dropped(self, callback: Callable[[Any], None]) -> None:
        """Call ``callback(None)`` once the last dropped message's letter is stored."""
        self._dropped[0].add_done_callback(lambda _: callback(None))

    def dropped_future(self) -> asyncio.Future[Any]:
        """For submit_nowait: a future failing with BufferFull once the drop's letter is stored."""
        stored, error = self._dropped
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def fail(_: asyncio.Future[None]) -> None:
            if not future.done():
                future.set_exception(error)

        stored.add_done_callback(fail)
        return future

    def _full(self, size: int) -> bool:
        if self._full_error is not None:
            return True
        if self._disk + self._buffered + size + 64 <= self.max_bytes:
            return False
        return not self._seal_drained() or self._disk + self._buffered + size + 64 > self.max_bytes

    def _seal_drained(self) -> bool:
        """Full: seal (and so delete) the active segment if it is the oldest and all finished.

        Admission stops the active segment at max_bytes, so one that never reaches
        segment_bytes (segment_bytes close to max_bytes, or a message too big for what is left)
        was never sealed, never deleted, and kept the spool full for good although everything
        in it was finished. True when space was freed.
        """
        active = self._active
        if (
            active is None
            or active.live
            or not active.size
            or self._writing  # the writer thread may be using its descriptor
            or not self._segments
            or self._segments[0] is not active
        ):
            return False
        self._seal(active)
        return True

    def _refusal(self) -> BufferFull:
        if self._full_error is not None:
            return BufferFull(f"spool {self.path}: the disk is full ({self._full_error})")
        return BufferFull(
            f"spool {self.path}: max_bytes={self.max_bytes} reached "
            f"(overflow={self._policy.value}); finished segments free space"
        )

    def _encode(self, message: Any, key: Any, priority: int) -> bytes:
        if key is not None or priority != 0 or type(priority) is not int:
            # Before anything is written: a message the engine then refused for its key would
            # stay in the spool, unfinished, and be processed after the next start.
            check_key(key, priority)
            if key is not None and type(key) is not str and type(key) is not int:
                _check_durable_key(key, self.serializer)
        if self.extract is not None:
            message = self.extract(message)
        fast = self._fast
        if fast is not None:
            dumps, default, option = fast
            try:
                data: bytes = dumps([message, key, priority], default, option)
                return data
            except TypeError:
                pass  # orjson refused: the codec's reference path decides (and names the fault)
        return serialize([message, key, priority], self.serializer, "message")

    def _append(self, body: bytes, message: Any) -> _Record:
        seq = self._next_seq
        self._next_seq = seq + 1
        chunks = self._chunks
        if not chunks or chunks[-1].size >= self._chunk_bytes:
            assert self._loop is not None
            chunks.append(_Chunk(_Shared(loop=self._loop), seq))
        chunk = self._last = chunks[-1]
        # Framing and the CRC wait for the write: one header and one checksum per group.
        chunk.bodies.append(body)
        size = len(body)
        chunk.size += size
        self._buffered += size + 4
        self._where[seq] = chunk
        if not self._writing:
            self._schedule(chunk)
        return _Record(seq, message)

    # -- finishing ----------------------------------------------------------------------------

    def _finish_many(self, marks: Sequence[Any]) -> None:
        """Mark records finished: written at the next commit; drained segments are deleted."""
        where = self._where
        drained = False
        pop, missing, done = where.pop, _MISSING, self._marks.append
        count = 0
        for mark in marks:
            holder = pop(mark, missing)
            if holder is missing:
                continue  # finished already (a retried marker), or never spooled (None)
            count += 1
            segment = holder.segment
            if segment is None:
                # Finished before its write returned (a nowait message): its marker waits for
                # that write, so that it never reaches the disk before the record it marks.
                holder.early += 1
                holder.held.append(mark)
                continue
            if type(mark) is tuple:
                self._settle.append(mark)
            else:
                done(mark)
            segment.live -= 1
            if segment.live == 0:
                drained = True
        self.stats["finished"] += count
        if drained:
            self._delete_drained()
            self._wake_if_drained()
        if count and not self._writing:
            self._kick()  # nothing to ride along with: arms the marker delay

    def _wake_if_drained(self) -> None:
        """The active segment holds nothing unfinished: a producer waiting for room may seal it."""
        active, space = self._active, self._space
        if active is not None and active.live == 0 and space is not None:
            space.set()

    def _delete_drained(self) -> None:
        """Delete the oldest segments while they are closed and hold nothing unfinished.

        Only the oldest go, in order: a finish marker is always written after the record it
        marks (so in the same segment or a later one), and deleting oldest first therefore never
        deletes a marker whose record is still on disk, which would replay a finished message.
        """
        segments = self._segments
        freed = 0
        while segments and segments[0].sealed and segments[0].live == 0:
            segment = segments.pop(0)
            self._numbers.pop(0)
            with contextlib.suppress(FileNotFoundError):
                segment.path.unlink()
            freed += segment.size
        if freed:
            self._disk -= freed
            if self._space is not None:
                self._space.set()

    # -- group commit ---------------------------------------------------------------------------

    # Commits are driven by callbacks, not a task: the first records appended start a write at
    # once (or at the end of this loop iteration), and each finished write starts the next with
    # whatever arrived meanwhile. So producers fill the next group while the writer thread syncs
    # the current one: the CPU work and the fsync overlap instead of taking turns.

    def _schedule(self, chunk: _Chunk) -> None:
        """After an append: make sure a write will carry it."""
        if self._writing or self._retrying:
            return  # the running write's completion starts the next one
        if not self.commit_interval and chunk.size >= KICK_BYTES:
            self._kick()
            return
        if not self._kick_pending:
            self._kick_pending = True
            loop = self._loop
            assert loop is not None
            if self.commit_interval:
                loop.call_later(self.commit_interval, self._kick_soon)
            else:
                loop.call_soon(self._kick_soon)

    def _kick_soon(self) -> None:
        self._kick_pending = False
        self._kick()

    def _markers_due(self) -> None:
        self._marker_timer = None
        self._kick(markers=True)

    def _kick(self, *, markers: bool = False) -> None:
        """Start one write if none runs: the oldest chunk, plus every finish marker so far.

        Finish markers alone wait MARKER_DELAY for a message write to ride along with: they are
        not urgent (a lost one costs a duplicate after a crash, never a message).
        """
        if self._writing or self._retrying or self._pool is None:
            return
        has_markers = bool(self._marks or self._settle)
        if not self._chunks and not (markers and has_markers):
            if has_markers and self._marker_timer is None and self._loop is not None:
                self._marker_timer = self._loop.call_later(MARKER_DELAY, self._markers_due)
            return
        loop = self._loop
        assert loop is not None
        chunk = self._chunks.popleft() if self._chunks else None
        data = b""
        if chunk is not None:
            data = chunk.framed(self._sid)
            self._buffered -= chunk.overhead()
        marks, settle = self._marks, self._settle
        self._marks, self._settle = [], []
        payload = data + _marker_records(marks, settle)
        segment = self._target()
        self._writing = True
        # Finish markers alone need no sync (the next message commit syncs them); with a
        # synchronous descriptor they get one anyway, at most once per MARKER_DELAY of quiet.
        # Wait (briefly) until the writer thread has the write under way. Otherwise the thread,
        # woken by the hand-off, waits for the GIL, which this loop keeps while it resumes the
        # last group's producers: up to sys.getswitchinterval() (5 ms), and the write and its
        # sync no longer overlap that work (measured: the loop idled 13 to 16% of the time).
        started = threading.Lock()
        started.acquire()
        begin = partial(self._begin, started)
        future = loop.run_in_executor(self._pool, begin, segment, payload, bool(data))
        if started.acquire(True, HANDOFF_SECONDS):
            started.release()
        future.add_done_callback(
            partial(self._written, chunk, segment, marks, settle, len(payload), time.perf_counter())
        )

    def _written(
        self,
        chunk: _Chunk | None,
        segment: _Segment,
        marks: list[int],
        settle: list[tuple[int, int]],
        size: int,
        began: float,
        future: asyncio.Future[None],
    ) -> None:
        """On the loop, once a write returned: settle its producers, then start the next one."""
        self._writing = False
        error = future.exception()
        if self._pool is None:
            # close() gave up waiting for this write: settle its producers and nothing else (the
            # lock is released; the next owner may be at work in this directory).
            if chunk is not None and error is None and not chunk.future.done():
                chunk.future.set_result(None)
            elif chunk is not None:
                self._abandon([chunk], _STOPPED_UNWRITTEN)
            return
        if error is not None:
            if not isinstance(error, OSError):
                error = OSError(errno.EIO, f"spool write failed: {error!r}")
            self._failures += 1
            self._requeue_after_failure(error, chunk, marks, settle)
            self._retrying = True
            assert self._loop is not None
            delay = min(1.0, 0.01 * 2**self._failures)
            self._retry_timer = self._loop.call_later(delay, self._retry)
            self._wake_closer()
            return
        self._failures = 0
        if self._full_error is not None:
            self._full_error = None
            if self._space is not None:
                self._space.set()
        stats = self.stats
        stats["commits"] += 1
        stats["commit_seconds"] += time.perf_counter() - began
        segment.size += size
        self._disk += size
        if chunk is not None:
            count = len(chunk.bodies)
            stats["written"] += count
            chunk.segment = segment
            segment.live += count - chunk.early
            if chunk.held:
                self._marks += chunk.held  # their records are written now: the next write
                chunk.held = []
        if segment.size >= self.segment_bytes:
            self._seal(segment)
        elif chunk is not None and chunk.early:
            self._wake_if_drained()  # its messages finished before it was written
        if chunk is not None and not chunk.future.done():
            chunk.future.set_result(None)
        self._kick()
        self._wake_closer()

    def _retry(self) -> None:
        self._retry_timer = None
        self._retrying = False
        if self._policy is not OverflowPolicy.BLOCK:
            # Refusing policies retry no message write, so with nothing else to write no write
            # would ever succeed and clear the full disk: every message was refused for good.
            # Admission tries again (a new failure refuses again, with a longer backoff).
            self._full_error = None
        self._kick(markers=True)

    def _wake_closer(self) -> None:
        closer = self._closer
        if closer is not None and not closer.done():
            closer.set_result(None)

    def _requeue_after_failure(
        self,
        exc: OSError,
        chunk: _Chunk | None,
        marks: list[int],
        settle: list[tuple[int, int]],
    ) -> None:
        """A failed write (the file was cut back to its last good size): keep what must stay."""
        self._marks[:0] = marks
        self._settle[:0] = settle
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            self._full_error = exc
            # Close this segment so that, once its messages finish, it can be deleted.
            if self._active is not None and self._active.size > 0:
                self._seal(self._active)
        if chunk is None:
            return
        if self._policy is OverflowPolicy.BLOCK:
            # The same chunk goes out again first; its producers keep waiting.
            self._chunks.appendleft(chunk)
            self._buffered += chunk.overhead()
            log.warning("spool %s: write failed (%s); retrying, producers wait", self.path, exc)
            return
        # Refusing policies: the waiting producers get BufferFull; their messages never entered
        # the engine. Messages added without waiting stay in the engine, in memory only.
        self._abandon([chunk], f"the disk is full ({exc})")
        log.warning("spool %s: write failed (%s); refusing new messages", self.path, exc)

    def _target(self) -> _Segment:
        active = self._active
        if active is None or active.sealed:
            number = self._next_number
            self._next_number += 1
            active = _Segment(number, self.path / f"{number:012d}{_SUFFIX}")
            self._segments.append(active)
            self._numbers.append(number)
            self._active = active
        return active

    def _seal(self, segment: _Segment) -> None:
        """Close a segment for writing (never while a write runs: only the commit loop seals)."""
        segment.sealed = True
        if segment is self._active:
            self._active = None
        if self._fd_segment is segment and self._fd is not None:
            os.close(self._fd)  # an open descriptor would keep a deleted file's space in use
            self._fd, self._fd_segment = None, None
        if segment.live == 0:
            self._delete_drained()

    def _begin(self, started: threading.Lock, segment: _Segment, data: bytes, sync: bool) -> None:
        """On the writer thread: tell the loop the write began (it stops waiting), then write."""
        started.release()
        self._write(segment, data, sync)

    def _write(self, segment: _Segment, data: bytes, sync: bool = True) -> None:
        """On the writer thread: append to the segment and sync; cut back on any failure.

        ``sync`` False (finish markers alone) skips the explicit sync call only: a descriptor
        opened with _SYNC_FLAGS syncs every write.
        """
        if self._fd_segment is not segment:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | _SYNC_FLAGS[self.sync]
            self._fd = os.open(segment.path, flags, 0o644)
            self._fd_segment = segment
            if self.sync != "none":
                _sync_dir(self.path)
        fd = self._fd
        assert fd is not None
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if sync and not _SYNC_FLAGS[self.sync]:  # else each write above was synced
                if self.sync == "data":
                    os.fdatasync(fd)
                elif self.sync == "full":
                    os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, segment.size)
            raise

    # -- life cycle (called by BatchProcessor.start / stop) ----------------------------------

    async def open(self, processor: BatchProcessor[Any, Any]) -> None:
        """Lock the directory, recover it, then replay every unfinished message into the engine.

        Damaged bytes become "malformed" dead letters; a torn tail is cut. Returns once every
        unfinished message is in the engine (waiting for room under any overflow policy), before
        the processor opens its add paths.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._opening = loop.create_future()
        try:
            await self._recover_and_replay(processor, loop)
        except BaseException:
            # Not opened after all (a second owner, or start() cancelled): let go of the lock
            # and the thread, or this path stays locked until the process exits.
            self._open = False
            if self._pool is not None:
                pool, self._pool = self._pool, None
                pool.shutdown(wait=False)
            self._unlock()
            raise
        finally:
            self._opening.set_result(None)

    async def _recover_and_replay(
        self, processor: BatchProcessor[Any, Any], loop: asyncio.AbstractEventLoop
    ) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batchpunk-spool")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"spool {self.path}: cannot create the directory: {exc}") from None
        self._lock()
        recovered = await loop.run_in_executor(self._pool, lambda: _recover(self.path, cut=True))
        self._segments = recovered.segments
        self._numbers = [s.number for s in recovered.segments]
        self._next_number = (self._numbers[-1] + 1) if self._numbers else 1
        self._next_seq = recovered.next_seq
        self._disk = sum(s.size for s in recovered.segments)
        self.stats["torn"] = len(recovered.torn)
        if any(sid == _SERIALIZER_IDS["msgpack"] for _, sid, _, _ in recovered.replay):
            # Before anything is replayed or dead-lettered: without the extra, start() fails
            # with the pip hint and the spool stays as it is (its messages are not bad bytes).
            require("msgspec", "msgpack", f"spool {self.path}: reading its msgpack records")
        self._space = asyncio.Event()
        self._open = True
        if processor.closed:
            return  # stop() began during the recovery: everything stays for the next start
        for segment, offset, raw in recovered.damaged:
            mark = (segment.number, offset)
            self._where[mark] = segment
            self.stats["damaged"] += 1
            error = SpoolDamaged(
                f"spool {segment.path.name}: {len(raw)} byte(s) at offset {offset} do not "
                "check out (CRC-32 mismatch or a broken header); the bytes are the message"
            )
            processor._reject(
                _Record(mark, raw), "malformed", error, headers={"spool_segment": segment.path.name}
            )
        replay = recovered.replay
        for seq, _, _, segment in replay:
            self._where[seq] = segment
        self._delete_drained()
        pickles = self.serializer == "pickle"
        for seq, sid, raw, _segment in replay:
            try:
                message, key, priority = _decode_message(sid, raw, allow_pickle=pickles)
            except MissingDependency:
                raise  # not the message's fault: start() fails with the pip hint
            except (BatchpunkError, ValueError) as exc:
                processor._reject(_Record(seq, raw), "malformed", exc)
                continue
            self.stats["replayed"] += 1
            if self.rebuild is not None:
                message = self.rebuild(message, key, priority)
            # Waits for room whatever the overflow policy: never refused, never dropped.
            if not await processor._replay_record(_Record(seq, message), key, priority):
                break  # stop() began: the rest stays in the spool for the next start
        if replay:
            log.info("spool %s: replayed %d unfinished message(s)", self.path, len(replay))

    async def close(self) -> None:
        """Write the last finish markers, delete drained segments, release the lock.

        A second call (a second stop()) waits for the first: it returned while the first was
        still writing and held the lock.
        """
        opening = self._opening
        if opening is not None and not opening.done():
            # stop() during start(): the recovery ends first (it owns the directory), and the
            # replay gives up at once since stop began; only then is there a spool to close.
            await asyncio.shield(opening)
        if self._closing is None:
            if not self._open:
                return
            self._closing = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self._open = False
        if self._space is not None:
            self._space.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_SECONDS
        while self._writing or self._retrying or self._chunks or self._marks or self._settle:
            self._kick(markers=True)
            self._closer = loop.create_future()
            try:
                await asyncio.wait_for(self._closer, max(0.0, deadline - loop.time()))
            except TimeoutError:
                log.error(
                    "spool %s: the last writes did not finish within %ss; their finish "
                    "markers are lost, so those messages are replayed on the next start",
                    self.path,
                    CLOSE_SECONDS,
                )
                break
        for timer in (self._marker_timer, self._retry_timer):
            if timer is not None:
                timer.cancel()
        self._marker_timer = self._retry_timer = None
        self._retrying = False
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=True)  # a write still running ends first (it owns the fd)
        # Chunks never written (the disk kept failing under BLOCK): their producers would wait
        # for ever, and _Shared refuses their cancel. Their messages were never durable.
        self._abandon(list(self._chunks), _STOPPED_UNWRITTEN)
        self._chunks.clear()
        if self._active is not None and self._active.size > 0 and not self._where:
            self._seal(self._active)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._fd_segment = None
        self._unlock()

    def _abandon(self, chunks: list[_Chunk], why: str) -> None:
        """These chunks will not be written: their producers get BufferFull (not kept)."""
        for chunk in chunks:
            count = len(chunk.bodies)
            for seq in range(chunk.first, chunk.first + count):
                self._where.pop(seq, None)
            self.stats["refused"] += count
            waiter = chunk.future
            if not waiter.done():
                waiter.set_exception(BufferFull(f"spool {self.path}: {why}"))
                waiter.exception()  # retrieved: nobody may be waiting on it

    def _lock(self) -> None:
        lock = self.path / "lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SpoolError(
                f"spool {self.path}: cannot open its lock file {lock} for writing: {exc} (the "
                "directory must be writable by this process)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SpoolLocked(
                f"spool {self.path} is in use by another process (pid {holder}); one process "
                "at a time may own a spool: give each process its own path"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)
            self._lock_fd = None


_MISSING: Any = object()

#: Why a producer's message was not kept when stop() gave up on the last writes.
_STOPPED_UNWRITTEN = (
    "stopped before this message was written (the last writes did not succeed within "
    "CLOSE_SECONDS); it was not kept"
)


async def _finish_later(spool: Spool, batch: Any, result: Any) -> Any:
    """A sync handler's awaitable result, awaited on the loop: finish as the async wrapper does."""
    try:
        value = as_results(await result)
    except PartialFailure as partial:
        spool._finish_many(_good_marks(batch, partial))
        raise
    if value is None or len(value) == len(batch):
        spool._finish_many([record.mark for record in batch])
    return value


def _good_marks(batch: Any, partial: PartialFailure) -> list[Any]:
    """The marks of the messages a PartialFailure completes: none unless it fits the batch.

    One that does not fit is the engine's ResultMismatch for the whole batch, which it retries.
    """
    size = len(batch)
    if not partial.fits(size):
        return []
    failed = partial.failures
    return [batch[i].mark for i in range(size) if i not in failed]


def _marker_records(marks: list[int], settle: list[tuple[int, int]]) -> bytes:
    out = bytearray()
    if marks:
        payload = struct.pack(f"<{len(marks)}Q", *marks)
        body = struct.pack("<BI", FINISHED, len(payload)) + payload
        out += struct.pack("<I", zlib.crc32(body)) + body
    for number, offset in settle:
        payload = _DAMAGE.pack(number, offset)
        body = struct.pack("<BI", DAMAGE_SETTLED, len(payload)) + payload
        out += struct.pack("<I", zlib.crc32(body)) + body
    return bytes(out)


def _fast_json() -> tuple[Callable[[Any, Any, int], bytes], Callable[[Any], Any], int] | None:
    """orjson.dumps, default and option as the codec calls it (same bytes), if installed.

    Apart, not as a ``partial`` with keywords, which merges them into a new dict per call:
    positional arguments took ``Spool._encode`` from 385 ns to 217 ns a message (a 64-byte body).
    """
    from batchpunk.codec.serializers import _orjson_options, _refuse, orjson_module

    orjson = orjson_module()
    if orjson is None:
        return None
    return orjson.dumps, _refuse, _orjson_options(orjson)


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
