"""JSON Lines files as a source and a sink: the embedded default, and the glue to shell tools.

JsonlSource reads one JSON value per line (a file, or "-" for stdin), optionally tailing it, and
with a checkpoint file it resumes after a restart without redelivering what was acknowledged.
JsonlSink appends each batch and fsyncs it before returning, so an acknowledgement that follows a
write never runs ahead of the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import sys
from collections import deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, cast

from batchpunk.codec import decode_value
from batchpunk.connectors._common import PayloadError, Worker, fail_payloads
from batchpunk.deadletter._files import append_or_undo, end_torn_line, open_appending
from batchpunk.envelope import Envelope
from batchpunk.errors import ConfigError

__all__ = ["JsonlSink", "JsonlSource"]

log = logging.getLogger("batchpunk.connectors.jsonl")

#: Bytes read per call in the worker thread: big enough to amortise the thread hop.
_CHUNK = 1 << 20
#: The bytes a line JsonlSink writes can start with (json.dumps of any value).
_JSON_START = frozenset(b'{["-0123456789tfn')


class JsonlSource:
    """One envelope per line of a JSON Lines file (or stdin), in file order.

    Choose it to replay an export, to feed a pipeline from a shell (``-`` reads stdin), or with
    ``follow=True`` to tail a log that another process appends to. A line that is not JSON becomes
    a malformed envelope (its text is the payload) and reading goes on.

    Args:
        path: the file, or "-" for standard input.
        follow: at end of file, wait for more lines (like ``tail -f``) instead of ending.
        checkpoint: a file recording which lines were acknowledged. A new source with the same
            checkpoint starts after the acknowledged prefix and skips lines acknowledged beyond
            it, so a restarted pipeline neither loses nor repeats work. Without one, every
            consumer reads the whole file and acknowledgements are no-ops.
        key_field: a payload field whose value becomes the envelope's lane key.
        priority_field: a payload field whose (integer) value becomes the envelope's priority.
        poll_interval: seconds between looks at the end of the file when following.

    Each envelope's headers hold ``line`` (1-based), which dead letters keep.
    """

    def __init__(
        self,
        path: str,
        follow: bool = False,
        *,
        checkpoint: str | None = None,
        key_field: str | None = None,
        priority_field: str | None = None,
        poll_interval: float = 0.2,
    ) -> None:
        if not isinstance(path, str | os.PathLike) or not str(path):
            raise ConfigError(f"path: expected a file path or '-', got {path!r}")
        if checkpoint is not None and str(path) == "-":
            raise ConfigError("checkpoint: standard input cannot be resumed; remove checkpoint")
        if not isinstance(poll_interval, int | float) or poll_interval <= 0:
            raise ConfigError(f"poll_interval: expected seconds > 0, got {poll_interval!r}")
        self.path = str(path)
        self.follow = follow
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.key_field = key_field
        self.priority_field = priority_field
        self.poll_interval = float(poll_interval)
        self._worker = Worker("batchpunk-jsonl-source")
        self._closed = False
        # Checkpoint bookkeeping: offsets delivered and unsettled, in order; offsets settled (or
        # skipped from an earlier run) beyond the first unsettled one; the next unread offset.
        self._outstanding: deque[tuple[int, int]] = deque()
        self._settled: set[int] = set()
        self._read_pos = (0, 0)
        self._save_scheduled = False
        # (st_dev, st_ino) of the file the checkpoint describes; None until it was looked at.
        self._identity: list[int] | None = None

    @property
    def closed(self) -> bool:
        """True once close() was called: iteration has ended or ends at the next line."""
        return self._closed

    @property
    def redelivers(self) -> bool:
        """Whether a nacked line comes back: only with a checkpoint (the next run reads it).

        Without one the pipeline stores what it would give back as a "shutdown" dead letter.
        """
        return self.checkpoint is not None

    def __aiter__(self) -> AsyncIterator[Envelope]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Envelope]:
        skip: set[int] = set()
        if self.checkpoint is not None:
            self._read_pos, skip = self._load_checkpoint()
            self._settled |= skip
        pos, line_no = self._read_pos
        stream = await self._open(pos)
        # The codec's json path: orjson when installed, with the standard library's meaning.
        decode = decode_value
        key_field, priority_field = self.key_field, self.priority_field
        tracking = self.checkpoint is not None
        remainder = b""
        pending = asyncio.ensure_future(self._worker.call(stream.read1, _CHUNK))
        try:
            while not self._closed:
                chunk = await pending
                if not chunk:
                    if self.follow:
                        await asyncio.sleep(self.poll_interval)
                        pending = asyncio.ensure_future(self._worker.call(stream.read1, _CHUNK))
                        continue
                    if not remainder:
                        break
                    lines, remainder = [remainder], b""
                else:
                    pending = asyncio.ensure_future(self._worker.call(stream.read1, _CHUNK))
                    lines = (remainder + chunk).split(b"\n")
                    remainder = lines.pop()
                for line in lines:
                    offset = pos
                    pos += len(line) + 1
                    line_no += 1
                    if not line.strip() or offset in skip:
                        continue
                    if self.closed:
                        return
                    try:
                        payload = decode(line)
                    except (ValueError, RecursionError) as exc:
                        raw = line.rstrip(b"\r")
                        try:
                            text: str | bytes = raw.decode("utf-8")
                        except UnicodeDecodeError:
                            # Not UTF-8: keep the line's bytes, so its dead letter holds them
                            # exactly (decoding with replacement characters would lose them).
                            text = bytes(raw)
                        envelope = Envelope(
                            text,
                            headers={"line": line_no},
                            receipt=offset if tracking else None,
                            error=ValueError(f"{self.path} line {line_no}: not JSON: {exc}"),
                        )
                    else:
                        key = priority = None
                        if (key_field or priority_field) and isinstance(payload, dict):
                            key = payload.get(key_field) if key_field else None
                            priority = payload.get(priority_field) if priority_field else None
                        envelope = Envelope(
                            payload,
                            key=key,
                            priority=priority if isinstance(priority, int) else 0,
                            headers={"line": line_no},
                            receipt=offset if tracking else None,
                        )
                    if tracking:
                        self._outstanding.append((offset, line_no - 1))
                        self._read_pos = (pos if chunk else offset + len(line), line_no)
                    yield envelope
                if not chunk:
                    break
        finally:
            if not pending.done():
                pending.cancel()
            if stream is not sys.stdin.buffer:
                self._worker.submit(stream.close)

    async def _open(self, offset: int) -> io.BufferedReader:
        if self.path == "-":
            return cast(io.BufferedReader, sys.stdin.buffer)

        def open_at() -> io.BufferedReader:
            stream = open(self.path, "rb")  # noqa: SIM115 - closed by the iterator's finally
            if offset:
                stream.seek(offset)
            return stream

        try:
            return await self._worker.call(open_at)
        except OSError as exc:
            raise ConfigError(f"path: cannot read {self.path!r}: {exc.strerror}") from exc

    # -- acknowledgements (only with a checkpoint) --------------------------------------------

    async def ack_many(self, envelopes: Sequence[Envelope]) -> None:
        """Mark these lines finished; the checkpoint advances past every finished prefix."""
        if self.checkpoint is None:
            return
        settled = self._settled
        for envelope in envelopes:
            if envelope.receipt is not None:
                settled.add(envelope.receipt)
        outstanding = self._outstanding
        while outstanding and outstanding[0][0] in settled:
            settled.discard(outstanding.popleft()[0])
        if not self._save_scheduled:
            self._save_scheduled = True
            asyncio.get_running_loop().call_soon(self._save)

    async def nack_many(self, envelopes: Sequence[Envelope], requeue: bool) -> None:
        """Requeue: leave the lines unsettled, so the next run reads them again."""
        if not requeue:
            await self.ack_many(envelopes)

    def _prefix(self) -> tuple[int, int]:
        """Offset and lines before it of the first line not yet settled (where to resume)."""
        return self._outstanding[0] if self._outstanding else self._read_pos

    def _save(self, *, sync: bool = False) -> None:
        self._save_scheduled = False
        if self.checkpoint is None:
            return
        prefix, lines = self._prefix()
        self._settled = {o for o in self._settled if o >= prefix}
        state = {
            "path": self.path,
            "offset": prefix,
            "lines": lines,
            "acked": sorted(self._settled),
            "file": self._identity,
        }
        tmp = f"{self.checkpoint}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as out:
                json.dump(state, out)
                if sync:
                    out.flush()
                    os.fsync(out.fileno())
            os.replace(tmp, self.checkpoint)
        except OSError as exc:
            # Losing a checkpoint only means redelivery (at least once), never loss.
            log.warning("cannot write checkpoint %s: %s", self.checkpoint, exc)

    def _load_checkpoint(self) -> tuple[tuple[int, int], set[int]]:
        assert self.checkpoint is not None
        with contextlib.suppress(OSError):
            stat = os.stat(self.path)
            self._identity = [stat.st_dev, stat.st_ino]
        try:
            text = Path(self.checkpoint).read_text(encoding="utf-8")
        except FileNotFoundError:
            return (0, 0), set()
        try:
            state = json.loads(text)
            offset = (int(state["offset"]), int(state["lines"]))
            acked = {int(o) for o in state["acked"]}
            recorded = state.get("file")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(
                f"checkpoint: {self.checkpoint!r} is not a JsonlSource checkpoint ({exc})"
            ) from exc
        # A checkpoint belongs to one file: if the file was replaced (another inode) or is now
        # shorter than the acknowledged prefix, resuming would skip lines it never delivered.
        try:
            stat = os.stat(self.path)
        except OSError:
            return offset, acked
        replaced = isinstance(recorded, list) and recorded != self._identity
        if replaced or stat.st_size < offset[0] or any(o >= stat.st_size for o in acked):
            log.warning(
                "checkpoint %s is for another version of %s (the file was replaced or is "
                "shorter than its acknowledged prefix): reading it from the start",
                self.checkpoint,
                self.path,
            )
            return (0, 0), set()
        return offset, acked

    async def close(self) -> None:
        """End iteration and write the checkpoint durably; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self.checkpoint is not None:
            self._save(sync=True)

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, follow={self.follow}, checkpoint={self.checkpoint!r})"


class JsonlSink:
    """Appends each batch as JSON lines and fsyncs before ``write`` returns.

    Choose it for an audit trail, a hand-off to batch tools, or as the simplest durable sink.
    One ``write`` is one unbuffered append of whole lines. A write that raises (disk full, file
    too large) is cut back off the file, so its payloads, retried or dead-lettered, are never in
    it too. A crash in a write can leave the batch's first lines, which come again like any
    unacknowledged line (at least once), and the start of the next; the sink cuts that torn
    line on opening the file, so that the next record starts a line of its own. One sink per
    file: the cutting assumes no other process writes to it.

    Args:
        path: the file (created if missing, appended to), or "-" for standard output.
        fsync: flush to disk before returning (off only when the data can be recomputed).

    A payload that is not JSON-serializable fails alone (PayloadError, not retried); the
    batch's other payloads are written.
    """

    def __init__(self, path: str, *, fsync: bool = True) -> None:
        if not isinstance(path, str | os.PathLike) or not str(path):
            raise ConfigError(f"path: expected a file path or '-', got {path!r}")
        self.path = str(path)
        self.fsync = fsync
        self._worker = Worker("batchpunk-jsonl-sink")
        self._fd: int | None = None
        self._closed = False

    async def write(self, batch: Sequence[Any]) -> None:
        """Append the batch's payloads, one line each, durably; None (no per-payload result)."""
        if self._closed:
            raise ConfigError(f"JsonlSink({self.path!r}) is closed")
        failures = await self._worker.call(self._append, list(batch))
        if failures:
            fail_payloads(failures, len(batch))

    def _append(self, batch: list[Any]) -> dict[int, BaseException]:
        failures: dict[int, BaseException] = {}
        parts: list[bytes] = []
        dumps = json.dumps
        for index, payload in enumerate(batch):
            # allow_nan=False: NaN and Infinity are not JSON, and a reader (jq, another
            # language) would refuse the whole file. A str with a lone surrogate cannot be
            # UTF-8: it fails alone here rather than failing the whole write (then retried).
            try:
                text = dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
                parts.append(text.encode("utf-8"))
            except (TypeError, ValueError, RecursionError) as exc:
                failures[index] = PayloadError(
                    f"payload at index {index} is not JSON-serializable: {exc}"
                )
        if parts:
            data = b"\n".join(parts) + b"\n"
            if self.path == "-":  # stdout is not ours to close (or to truncate)
                stream = sys.stdout.buffer
                stream.write(data)
                stream.flush()
            else:
                if self._fd is None:
                    self._fd = self._open()
                # Unbuffered, and cut back on any error: bytes of a write that raised are never
                # in the file (the engine retries or dead-letters them), now or after a later
                # write.
                append_or_undo(self._fd, data, os.fstat(self._fd).st_size, fsync=self.fsync)
        return failures

    def _open(self) -> int:
        fd = open_appending(self.path, 0o666)
        try:
            # A crash in a write leaves a torn last line: cut it (it was never acknowledged,
            # so its messages come again), or the next line would be glued to it.
            end_torn_line(fd, self.path, _torn_line)
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def close(self) -> None:
        """Close the file; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        fd, self._fd = self._fd, None
        if fd is not None:
            await self._worker.call(os.close, fd)
        self._worker.shutdown()

    def __repr__(self) -> str:
        return f"JsonlSink({self.path!r})"


def _torn_line(tail: bytes) -> bool:
    """True for a last line (without its newline) that a write killed midway left: the start of
    a JSON line, not a whole one, in UTF-8 perhaps cut inside a character. Anything else (a
    whole line, text or bytes another program wrote) is kept, ended with a newline."""
    if not tail or tail[0] not in _JSON_START:
        return False
    try:
        decode_value(tail)
    except (ValueError, RecursionError):
        pass
    else:
        return False  # whole: like the lines before it, written but perhaps not acknowledged
    for cut in range(4):
        try:
            tail[: len(tail) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return True
    return False
