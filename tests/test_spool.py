"""The durable spool: messages survive a stop or crash, damage becomes dead letters, one owner."""

from __future__ import annotations

import asyncio
import datetime
import enum
import fcntl
import os
import shutil
import struct
import subprocess
import sys
import threading
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest

from batchpunk import Batch, BatchConfig, BatchProcessor, OverflowPolicy, PartialFailure, Spool
from batchpunk.deadletter import MemoryDeadLetters
from batchpunk.errors import BufferFull, ProcessorClosed
from batchpunk.spool import (
    HANDOFF_SECONDS,
    HEADER_SIZE,
    SpoolLocked,
    _marker_records,
    _scan,
    _Shared,
    inspect_spool,
)

IN_CI = os.environ.get("CI", "").lower() == "true"


def config(**overrides: Any) -> BatchConfig:
    settings: dict[str, Any] = {"max_size": 50, "max_wait": 0.01, "drain_timeout": 0.2}
    settings.update(overrides)
    return BatchConfig(**settings)


class Recorder:
    """An async handler keeping what it saw."""

    def __init__(self) -> None:
        self.seen: list[Any] = []
        self.batches: list[Batch[Any]] = []

    async def __call__(self, batch: Batch[Any]) -> None:
        self.batches.append(batch)
        self.seen.extend(batch)


async def never(batch: Batch[Any]) -> None:
    await asyncio.Event().wait()


async def leave_unfinished(path: Path, messages: list[Any], **spool: Any) -> None:
    """Spool ``messages`` and stop before any batch finished: all stay in the spool."""
    processor = BatchProcessor(config(), never, spool=Spool(path, **spool))
    async with processor:
        for message in messages:
            await processor.add_message(message)


async def replay(path: Path) -> tuple[Recorder, MemoryDeadLetters]:
    recorder, letters = Recorder(), MemoryDeadLetters()
    async with BatchProcessor(config(), recorder, dead_letter=letters, spool=Spool(path)) as p:
        await p.flush()
    return recorder, letters


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("*.seg"))


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as handle:
        handle.write(data)


async def cut_at_every_offset(
    source: Path, tmp_path: Path, start: int, *, whole: int, torn: int
) -> None:
    """Truncate a copy of ``source``'s last segment at every offset from ``start`` to its end:
    each starts cleanly, replays messages 0 .. torn - 1 (0 .. whole - 1 uncut), no dead letter."""
    end = segments(source)[-1].stat().st_size
    for cut in range(start, end + 1):
        path = tmp_path / f"cut{cut}"
        shutil.copytree(source, path)
        os.truncate(segments(path)[-1], cut)
        recorder, letters = await replay(path)
        expected = whole if cut == end else torn
        assert [m["n"] for m in recorder.seen] == list(range(expected)), cut
        assert len(letters) == 0, cut
        assert inspect_spool(path).unfinished == 0
        shutil.rmtree(path)


async def test_every_message_is_processed_and_the_spool_empties(tmp_path: Path) -> None:
    """Messages added every way reach the handler once and their segments are deleted."""
    recorder = Recorder()
    spool = Spool(tmp_path / "s", segment_bytes=4096)
    async with BatchProcessor(config(), recorder, spool=spool) as processor:
        await asyncio.gather(*(processor.add_message({"i": i}) for i in range(500)))
        for i in range(500, 600):
            processor.add_message_nowait({"i": i})
        assert await processor.submit({"i": 600}) is None
        await processor.flush()
    assert sorted(m["i"] for m in recorder.seen) == list(range(601))
    assert all(type(b) is Batch and b.flush_reason for b in recorder.batches)
    assert segments(tmp_path / "s") == []
    assert spool.unfinished == 0


async def test_producers_sharing_one_commit_all_resume_and_one_cancel_spares_the_rest(
    tmp_path: Path,
) -> None:
    """Producers awaiting one group commit each resume once it is durable, and cancelling one of
    them neither cancels the shared commit nor loses the others' messages."""
    recorder = Recorder()
    spool = Spool(tmp_path / "s")
    async with BatchProcessor(config(), recorder, spool=spool) as processor:
        tasks = [asyncio.ensure_future(processor.add_message({"i": i})) for i in range(200)]
        await asyncio.sleep(0)  # every task appended and now awaits the same commit
        tasks[7].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await processor.flush()
    assert isinstance(results[7], asyncio.CancelledError)
    assert all(r is None for i, r in enumerate(results) if i != 7)
    assert sorted(m["i"] for m in recorder.seen) == [i for i in range(200) if i != 7]
    # The cancelled producer's message was durable but never reached the engine: it stays in
    # the spool and the next start replays it (at-least-once), rather than being lost.
    assert spool.stats["written"] == 200
    assert spool.unfinished == 1
    again, letters = await replay(tmp_path / "s")
    assert [m["i"] for m in again.seen] == [7]
    assert not letters.letters


async def test_a_commit_callback_removed_before_the_commit_is_never_called() -> None:
    """The shared commit future keeps waiters without a Handle each; removing one (as
    asyncio.wait does) removes every registration of it and leaves the others in order."""
    future = _Shared(loop=asyncio.get_running_loop())
    called: list[str] = []

    def first(_: object) -> None:
        called.append("first")

    def second(_: object) -> None:
        called.append("second")

    future.add_done_callback(first)
    future.add_done_callback(second)
    future.add_done_callback(first)
    assert future.remove_done_callback(first) == 2
    future.set_result(None)
    await asyncio.sleep(0)
    assert called == ["second"]


async def test_unfinished_messages_are_replayed_before_new_ones(tmp_path: Path) -> None:
    """What a stop left unfinished comes back first on the next start, and is not dead-lettered."""
    path = tmp_path / "s"
    await leave_unfinished(path, [{"i": i} for i in range(120)])
    assert inspect_spool(path).unfinished == 120
    recorder, letters = Recorder(), MemoryDeadLetters()
    async with BatchProcessor(config(), recorder, dead_letter=letters, spool=Spool(path)) as p:
        await p.add_message({"i": "new"})
        await p.flush()
    assert [m["i"] for m in recorder.seen] == [*range(120), "new"]
    assert len(letters) == 0
    assert inspect_spool(path).unfinished == 0


async def test_a_finish_marker_ahead_of_every_record_never_finishes_a_new_message(
    tmp_path: Path,
) -> None:
    """A marker for numbers no record on disk has (a crash between a marker and its record) does
    not make the next start hand those numbers out again, which would lose the new messages."""
    path = tmp_path / "s"
    await leave_unfinished(path, [{"i": 0}])  # sequence number 1, unfinished
    append(segments(path)[-1], _marker_records([2, 3], []))  # records never reached the disk
    await leave_unfinished(path, [{"i": 1}, {"i": 2}])  # replays i=0, then two new messages
    assert inspect_spool(path).unfinished == 3
    recorder, letters = await replay(path)
    assert sorted(m["i"] for m in recorder.seen) == [0, 1, 2]
    assert len(letters) == 0


async def test_a_message_finished_before_its_write_gets_its_marker_after_its_record(
    tmp_path: Path,
) -> None:
    """Nowait messages processed while the disk still holds back their records: every finish
    marker is written after the record it marks (never with an older chunk's write)."""
    spool = Spool(tmp_path / "s", segment_bytes=4096)  # 4 KiB chunks: 300 messages need several
    write = spool._write
    first_write_may_go = threading.Event()
    written: set[int] = set()
    ahead: list[int] = []

    def gated(segment: Any, data: bytes, sync: bool = True) -> None:
        if not written:
            first_write_may_go.wait(10)
        scan = _scan(data, last=False)  # a write's payload is whole records: chunk, then marks
        written.update(seq for seq, _, _, _ in scan.messages)
        ahead.extend(seq for seq in scan.finished if seq not in written)
        write(segment, data, sync)

    spool._write = gated  # type: ignore[method-assign]
    recorder, all_seen = Recorder(), asyncio.Event()

    async def handler(batch: Batch[Any]) -> None:
        await recorder(batch)
        if len(recorder.seen) == 300:
            all_seen.set()

    async with BatchProcessor(config(), handler, spool=spool) as processor:
        for i in range(300):
            processor.add_message_nowait({"i": i})
        await all_seen.wait()  # every message finished before the first write returned
        first_write_may_go.set()
        await processor.flush()
    assert ahead == []
    assert len(written) == 300
    assert sorted(m["i"] for m in recorder.seen) == list(range(300))
    assert segments(tmp_path / "s") == []


async def test_a_sync_handler_and_keys_and_priorities_survive_the_spool(tmp_path: Path) -> None:
    """A sync handler sees the user's messages; key and priority are kept through a replay."""
    path = tmp_path / "s"
    await leave_unfinished(path, [])
    processor = BatchProcessor(config(), never, spool=Spool(path))
    async with processor:
        await processor.add_message("a", key=("tenant", 1), priority=3)
    seen: list[tuple[Any, Any, int]] = []

    def handler(batch: Batch[Any]) -> list[str]:
        seen.extend((m, batch.key, batch.priority) for m in batch)
        return [m.upper() for m in batch]

    async with BatchProcessor(config(), handler, spool=Spool(path)) as p:
        assert await p.submit("b", key="k") == "B"
        await p.flush()
    assert ("a", ("tenant", 1), 3) in seen
    assert ("b", "k", 0) in seen


async def test_a_partial_failure_finishes_the_good_and_dead_letters_the_bad(
    tmp_path: Path,
) -> None:
    """Only the failed message becomes a dead letter (the user's message); the spool empties."""
    letters = MemoryDeadLetters()

    async def handler(batch: Batch[Any]) -> None:
        bad = {i: ValueError("bad") for i, m in enumerate(batch) if m == 7}
        if bad:
            raise PartialFailure(bad)

    cfg = config(retry_on=(), max_retries=0)
    path = tmp_path / "s"
    async with BatchProcessor(cfg, handler, dead_letter=letters, spool=Spool(path)) as p:
        for i in range(20):
            await p.add_message(i)
        await p.flush()
    assert [letter.message for letter in letters.letters] == [7]
    assert inspect_spool(path).unfinished == 0


async def test_a_second_owner_gets_a_clear_error(tmp_path: Path) -> None:
    """A spool directory in use refuses a second owner, naming the holder's pid."""
    path = tmp_path / "s"
    async with BatchProcessor(config(), Recorder(), spool=Spool(path)):
        with pytest.raises(SpoolLocked, match=f"pid {os.getpid()}"):
            async with BatchProcessor(config(), Recorder(), spool=Spool(path)):
                pass
        code = (
            "import asyncio, sys; from batchpunk import BatchProcessor, Spool\n"
            "async def main():\n"
            "    async with BatchProcessor(None, print, spool=Spool(sys.argv[1])): pass\n"
            "asyncio.run(main())\n"
        )
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", code, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0
        assert "in use by another process" in done.stderr
    async with BatchProcessor(config(), Recorder(), spool=Spool(path)):
        pass  # released at stop


async def test_a_torn_tail_is_cut_at_every_byte_offset_of_the_last_record(tmp_path: Path) -> None:
    """Cutting the last record anywhere loses only that record (never written in full), silently."""
    source = tmp_path / "source"
    await leave_unfinished(source, [{"n": i, "pad": "x" * (i % 5)} for i in range(6)])
    last = segments(source)[-1]
    data = last.read_bytes()
    scan = _scan(data, last=True)
    start, length = scan.groups[-1]  # each await add_message above is a group of its own
    assert start + length == len(data)
    await cut_at_every_offset(source, tmp_path, start, whole=6, torn=5)


@pytest.mark.parametrize("where", ["payload", "length field", "crc"])
async def test_a_flipped_byte_in_the_middle_is_one_malformed_letter_with_its_bytes(
    tmp_path: Path, where: str
) -> None:
    """A damaged record in the middle becomes one "malformed" letter; all others are replayed."""
    path = tmp_path / "s"
    await leave_unfinished(path, [{"n": i} for i in range(10)])
    seg = segments(path)[-1]
    data = bytearray(seg.read_bytes())
    offset, length = _scan(bytes(data), last=True).groups[4]  # message 4's own group
    original = bytes(data[offset : offset + length])
    spot = {"payload": offset + length - 3, "length field": offset + 6, "crc": offset}[where]
    data[spot] ^= 0x55
    seg.write_bytes(bytes(data))
    report = inspect_spool(path)
    assert report.unfinished == 9
    assert len(report.damaged) == 1
    recorder, letters = await replay(path)
    assert [m["n"] for m in recorder.seen] == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert [letter.reason for letter in letters.letters] == ["malformed"]
    letter = letters.letters[0]
    assert len(letter.message) == len(original)
    assert letter.message != original
    assert "do not check out" in str(letter.error)
    # Stored and settled: a second start finds nothing left to do.
    again, more = await replay(path)
    assert again.seen == []
    assert len(more) == 0


async def test_a_damaged_record_at_the_end_that_is_complete_is_dead_lettered(
    tmp_path: Path,
) -> None:
    """A full-length last record whose checksum fails was written: its bytes are not dropped."""
    path = tmp_path / "s"
    await leave_unfinished(path, [{"n": i} for i in range(3)])
    seg = segments(path)[-1]
    data = bytearray(seg.read_bytes())
    data[-2] ^= 0xFF
    seg.write_bytes(bytes(data))
    recorder, letters = await replay(path)
    assert [m["n"] for m in recorder.seen] == [0, 1]
    assert [letter.reason for letter in letters.letters] == ["malformed"]


async def leave_groups(path: Path, groups: list[list[Any]]) -> None:
    """Spool each list as one group commit (its producers await together), leave all unfinished."""
    processor = BatchProcessor(config(), never, spool=Spool(path))
    async with processor:
        for group in groups:
            await asyncio.gather(*(processor.add_message(m) for m in group))


GROUPS = [[{"n": 0}], [{"n": n} for n in range(1, 6)], [{"n": 6}], [{"n": n} for n in range(7, 11)]]


async def test_a_torn_group_is_cut_at_every_byte_offset_and_loses_only_its_own_messages(
    tmp_path: Path,
) -> None:
    """A group commit is one record: cut anywhere, its messages go (their producers were never
    told they were durable) and every earlier group is replayed, without a dead letter."""
    source = tmp_path / "source"
    await leave_groups(source, GROUPS)
    data = segments(source)[-1].read_bytes()
    scan = _scan(data, last=True)
    assert len(scan.groups) == len(GROUPS)  # one record per group commit
    start, length = scan.groups[-1]
    assert start + length == len(data)
    await cut_at_every_offset(source, tmp_path, start, whole=11, torn=7)


@pytest.mark.parametrize("where", ["a message", "a length", "the count"])
async def test_a_damaged_group_in_the_middle_is_one_malformed_letter_with_its_bytes(
    tmp_path: Path, where: str
) -> None:
    """A flipped byte anywhere in a group makes the whole group one "malformed" letter holding
    its bytes (the CRC covers the group, not each message); the other groups are replayed."""
    path = tmp_path / "s"
    await leave_groups(path, GROUPS)
    seg = segments(path)[-1]
    data = bytearray(seg.read_bytes())
    offset, length = _scan(bytes(data), last=True).groups[1]  # messages 1 to 5
    original = bytes(data[offset : offset + length])
    # Header 9 bytes, then first sequence number (8), count (4), serializer id (1), write time
    # (8), lengths (4 each): the second length is at 34.
    spot = {"a message": offset + length - 30, "a length": offset + 34, "the count": offset + 17}
    data[spot[where]] ^= 0x55
    seg.write_bytes(bytes(data))
    assert inspect_spool(path).unfinished == 6
    recorder, letters = await replay(path)
    assert [m["n"] for m in recorder.seen] == [0, 6, 7, 8, 9, 10]
    assert [letter.reason for letter in letters.letters] == ["malformed"]
    assert len(letters.letters[0].message) == len(original)
    again, more = await replay(path)
    assert again.seen == []
    assert len(more) == 0


def test_a_group_whose_lengths_do_not_add_up_is_damage_even_with_a_good_crc() -> None:
    """Lengths that overrun or fall short of the record are not trusted because the CRC
    matches (a writer bug, not a disk fault, but replaying a misparse would be worse)."""
    body = b'[{"n":1},null,0]'
    for lengths in ([len(body) + 1], [len(body) - 1], [len(body), 0, 2**31]):
        packed = struct.pack(f"<{len(lengths)}I", *lengths)
        payload = struct.pack("<QIB", 1, len(lengths), 1) + packed + body
        rest = struct.pack("<BI", 1, len(payload)) + payload
        record = struct.pack("<I", zlib.crc32(rest)) + rest
        scan = _scan(record + _marker_records([9], []), last=False)
        assert scan.messages == [], lengths
        assert scan.damaged == [(0, len(record))], lengths
        assert scan.finished == [9]


async def test_max_bytes_refuses_under_raise_and_waits_under_block(tmp_path: Path) -> None:
    """A full spool applies the overflow policy: RAISE refuses, BLOCK waits until space frees."""
    cfg = config(overflow=OverflowPolicy.RAISE, max_pending=100_000)
    spool = Spool(tmp_path / "raise", max_bytes=8192, segment_bytes=4096)
    async with BatchProcessor(cfg, never, spool=spool) as processor:

        async def fill() -> None:
            for i in range(10_000):
                await processor.add_message({"i": i, "pad": "y" * 40})

        with pytest.raises(BufferFull, match="max_bytes=8192"):
            await fill()
    gate = asyncio.Event()
    recorder = Recorder()

    async def slow(batch: Batch[Any]) -> None:
        await gate.wait()
        await recorder(batch)

    spool = Spool(tmp_path / "block", max_bytes=8192, segment_bytes=4096)
    async with BatchProcessor(config(max_pending=100_000), slow, spool=spool) as processor:
        producer = asyncio.ensure_future(
            asyncio.gather(*(processor.add_message({"i": i, "pad": "y" * 40}) for i in range(400)))
        )
        await asyncio.sleep(0.2)
        assert not producer.done()  # blocked on the full spool
        gate.set()
        await asyncio.wait_for(producer, 30)
        await processor.flush()
    assert sorted(m["i"] for m in recorder.seen) == list(range(400))


async def test_a_drop_policy_dead_letters_the_new_message_when_the_spool_is_full(
    tmp_path: Path,
) -> None:
    """Under drop_newest a full spool dead-letters the new message as "dropped"."""
    letters = MemoryDeadLetters()
    cfg = config(overflow=OverflowPolicy.DROP_NEWEST, max_pending=100_000)
    spool = Spool(tmp_path / "s", max_bytes=4096, segment_bytes=4096)
    async with BatchProcessor(cfg, never, dead_letter=letters, spool=spool) as processor:
        for i in range(300):
            await processor.add_message({"i": i, "pad": "z" * 40})
    kept = inspect_spool(tmp_path / "s").unfinished
    dropped = sum(letter.reason == "dropped" for letter in letters.letters)
    assert dropped > 0
    assert kept + dropped == 300


def _mount_tmpfs(path: Path) -> None:
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs: {done.stderr.strip()}"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.mark.parametrize("policy", [OverflowPolicy.BLOCK, OverflowPolicy.RAISE])
async def test_a_full_disk_blocks_or_refuses_and_never_corrupts(
    tmp_path: Path, policy: OverflowPolicy
) -> None:
    """On a 1 MiB tmpfs the spool waits (BLOCK) or refuses (RAISE); the log always reads clean."""
    mount = tmp_path / "disk"
    _mount_tmpfs(mount)
    try:
        path = mount / "s"
        gate = asyncio.Event()
        recorder = Recorder()

        async def slow(batch: Batch[Any]) -> None:
            await gate.wait()
            await recorder(batch)

        cfg = config(overflow=policy, max_pending=1_000_000, max_size=500)
        spool = Spool(path, max_bytes=64 << 20, segment_bytes=64 << 10)
        accepted: list[int] = []
        refused = 0
        async with BatchProcessor(cfg, slow, spool=spool) as processor:

            async def one(i: int) -> None:
                nonlocal refused
                try:
                    await processor.add_message({"i": i, "pad": "p" * 200})
                    accepted.append(i)
                except BufferFull:
                    refused += 1

            producer = asyncio.ensure_future(asyncio.gather(*(one(i) for i in range(8000))))
            await asyncio.sleep(1.0)
            if policy is OverflowPolicy.BLOCK:
                assert not producer.done()  # 8000 x 230 bytes do not fit in 1 MiB
            gate.set()
            await asyncio.wait_for(producer, 60)
            await processor.flush()
        report = inspect_spool(path)
        assert report.damaged == []
        assert report.unfinished == 0
        assert sorted(m["i"] for m in recorder.seen) == sorted(accepted)
        if policy is OverflowPolicy.BLOCK:
            assert refused == 0
            assert len(accepted) == 8000
        else:
            assert refused > 0
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", str(mount)], check=False)


async def test_records_are_checksummed_and_carry_the_codec_payload(tmp_path: Path) -> None:
    """The file holds json (never pickle) behind a header; inspect counts what it holds."""
    path = tmp_path / "s"
    await leave_unfinished(path, [{"hello": "world"}])
    data = segments(path)[0].read_bytes()
    assert b'[{"hello":"world"},null,0]' in data[HEADER_SIZE:]
    report = inspect_spool(path)
    assert report.unfinished == 1
    assert report.oldest_age is not None
    assert report.segments[0][2:] == (1, 1)


@pytest.mark.parametrize("sync", ["data", "full", "none"])
async def test_each_commit_is_synced_by_its_write(tmp_path: Path, sync: str) -> None:
    """The segment is opened with O_DSYNC ("data") or O_SYNC ("full"), so the write of a group
    commit returns once durable, or with neither ("none"); the explicit sync calls are the
    fallback where the platform lacks the flags."""
    spool = Spool(tmp_path / "s", sync=sync)
    async with BatchProcessor(config(), never, spool=spool) as processor:
        await processor.add_message({"i": 0})
        assert spool._fd is not None
        flags = fcntl.fcntl(spool._fd, fcntl.F_GETFL)
    if sync == "none":
        assert flags & (os.O_DSYNC | os.O_SYNC) == 0
    else:
        wanted = os.O_DSYNC if sync == "data" else os.O_SYNC
        assert flags & wanted == wanted


async def test_a_writer_thread_slow_to_start_holds_the_loop_only_briefly(tmp_path: Path) -> None:
    """A commit waits for its write to begin at most HANDOFF_SECONDS; a writer thread that is
    busy longer delays the write, never the loop, and no message is lost."""
    recorder = Recorder()
    spool = Spool(tmp_path / "s")
    async with BatchProcessor(config(), recorder, spool=spool) as processor:
        assert spool._pool is not None
        gate = threading.Event()
        spool._pool.submit(gate.wait, 10)  # the writer thread is busy: no write can begin
        loop = asyncio.get_running_loop()
        began = loop.time()
        tasks = [asyncio.ensure_future(processor.add_message({"i": i})) for i in range(20)]
        await asyncio.sleep(0.05)
        assert spool._writing
        assert not any(task.done() for task in tasks)  # not durable before the write
        assert loop.time() - began < 50 * HANDOFF_SECONDS  # not the 10 s the gate holds
        gate.set()
        await asyncio.gather(*tasks)
        await processor.flush()
    assert sorted(m["i"] for m in recorder.seen) == list(range(20))
    assert segments(tmp_path / "s") == []


def test_settings_are_checked_when_the_spool_is_built(tmp_path: Path) -> None:
    """Wrong settings fail at construction, naming the setting."""
    with pytest.raises(ValueError, match="sync"):
        Spool(tmp_path, sync="sometimes")
    with pytest.raises(ValueError, match="segment_bytes"):
        Spool(tmp_path, max_bytes=8192, segment_bytes=16384)
    with pytest.raises(ValueError, match="serializer"):
        Spool(tmp_path, serializer="yaml")


def test_spool_inspect_command_prints_segments_and_damage(tmp_path: Path) -> None:
    """`batchpunk spool inspect` shows unfinished counts and reports a torn tail."""
    path = tmp_path / "s"
    asyncio.run(leave_unfinished(path, [{"n": i} for i in range(4)]))
    seg = segments(path)[-1]
    seg.write_bytes(seg.read_bytes()[:-3])
    done = subprocess.run(
        [sys.executable, "-m", "batchpunk", "spool", "inspect", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    assert "3 unfinished message(s)" in done.stdout
    assert "torn tail" in done.stdout


async def test_the_byte_trigger_measures_the_users_messages_not_the_records(
    tmp_path: Path,
) -> None:
    """max_bytes batching with a spool sizes the user's messages (default sizer: len of str)."""
    recorder = Recorder()
    cfg = config(max_bytes=30, max_size=1000, max_wait=5.0)
    async with BatchProcessor(cfg, recorder, spool=Spool(tmp_path / "s")) as processor:
        for _ in range(9):
            await processor.add_message("x" * 10)
        await processor.flush()
    assert [len(batch) for batch in recorder.batches] == [3, 3, 3]


class AckingSource:
    """A broker-like source over a list, recording what it acknowledged and when."""

    def __init__(self, payloads: list[Any]) -> None:
        from batchpunk.envelope import Envelope

        self.envelopes = [Envelope(p) for p in payloads]
        self.acked: list[Any] = []

    def __aiter__(self) -> AckingSource:
        self._it = iter(self.envelopes)
        return self

    async def __anext__(self) -> Any:
        try:
            return next(self._it)
        except StopIteration:
            raise StopAsyncIteration from None

    async def ack_many(self, envelopes: Any) -> None:
        self.acked.extend(e.payload for e in envelopes)

    async def close(self) -> None:
        return None


async def test_a_broker_source_may_be_acknowledged_once_its_messages_are_in_the_spool(
    tmp_path: Path,
) -> None:
    """With ack_on_write every message is acknowledged while the sink is still held shut."""
    from batchpunk.pipeline import Pipeline

    gate = asyncio.Event()
    written: list[Any] = []

    class Sink:
        async def write(self, batch: Any) -> None:
            await gate.wait()
            written.extend(batch)

        async def close(self) -> None:
            return None

    source = AckingSource(list(range(50)))
    spool = Spool(tmp_path / "s", ack_on_write=True)
    pipeline = Pipeline(source, Sink(), config(drain_timeout=5.0), spool=spool)
    run = asyncio.ensure_future(pipeline.run())
    for _ in range(500):
        if len(source.acked) == 50:
            break
        await asyncio.sleep(0.01)
    assert sorted(source.acked) == list(range(50))
    assert written == []
    gate.set()
    await run
    assert sorted(written) == list(range(50))
    assert inspect_spool(tmp_path / "s").unfinished == 0


async def test_a_payload_the_spool_cannot_write_is_dead_lettered_and_the_pipeline_goes_on(
    tmp_path: Path,
) -> None:
    """Under json a bytes payload is refused by the spool: a "malformed" letter, not a crash."""
    from batchpunk.pipeline import Pipeline

    written: list[Any] = []

    class Sink:
        async def write(self, batch: Any) -> None:
            written.extend(batch)

        async def close(self) -> None:
            return None

    letters = MemoryDeadLetters()
    source = AckingSource([1, b"\x00raw", 2])
    pipeline = Pipeline(source, Sink(), config(), dead_letter=letters, spool=Spool(tmp_path / "s"))
    await pipeline.run()
    assert sorted(written) == [1, 2]
    assert [(letter.reason, letter.message) for letter in letters.letters] == [
        ("malformed", b"\x00raw")
    ]
    assert "json serializer cannot encode" in str(letters.letters[0].error)
    assert sorted(source.acked, key=repr) == sorted([1, 2, b"\x00raw"], key=repr)


class HeldLetters(MemoryDeadLetters):
    """A dead-letter sink that stores nothing until its gate opens."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def put(self, letters: Any) -> None:
        await self.gate.wait()
        await super().put(letters)


async def wait_for(condition: Any, seconds: float = 5.0) -> None:
    for _ in range(int(seconds * 100)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not true within {seconds} s")


@pytest.mark.parametrize("full", ["spool", "engine"])
async def test_a_dropped_message_is_acknowledged_on_write_only_once_its_letter_is_stored(
    tmp_path: Path, full: str
) -> None:
    """ack_on_write settles a message once it is in the spool; one the drop policy refused
    (the spool or the engine full) is settled when its letter is stored, never on another
    message's commit (its letter could then be lost with nothing left anywhere). The first
    message too big for a fresh spool must not end the consumer either."""
    from batchpunk.pipeline import Pipeline

    gate = asyncio.Event()

    class Sink:
        async def write(self, batch: Any) -> None:
            await gate.wait()

        async def close(self) -> None:
            return None

    if full == "spool":
        payloads: list[Any] = ["x" * 5000, 1, 2]  # the first cannot fit max_bytes
        spool = Spool(tmp_path / "s", max_bytes=4096, segment_bytes=4096, ack_on_write=True)
        settings: dict[str, Any] = {}
    else:
        payloads = [1, 2, 3]  # the third finds max_pending full
        spool = Spool(tmp_path / "s", ack_on_write=True)
        settings = {"max_pending": 2, "max_size": 10, "max_wait": 5.0}
    dropped = payloads[0] if full == "spool" else 3
    letters = HeldLetters()
    overflow = OverflowPolicy.DROP_NEWEST
    pipeline = Pipeline(
        AckingSource(payloads),
        Sink(),
        config(overflow=overflow, drain_timeout=5.0, **settings),
        spool=spool,
        dead_letter=letters,
    )
    source = pipeline.source
    run = asyncio.ensure_future(pipeline.run())
    await wait_for(lambda: len(source.acked) == 2)  # the two written ones, durable
    await asyncio.sleep(0.05)
    assert dropped not in source.acked
    assert not run.done()
    letters.gate.set()
    gate.set()
    await wait_for(lambda: len(source.acked) == 3)
    await run
    assert [(letter.reason, letter.message) for letter in letters.letters] == [("dropped", dropped)]
    assert inspect_spool(tmp_path / "s").unfinished == 0


async def test_a_message_with_an_unusable_key_is_never_written_to_the_spool(
    tmp_path: Path,
) -> None:
    """A list key is refused before the spool write: one "malformed" letter, and nothing left
    in the spool to be processed after the next start (where the key would come back as a
    hashable value and the message would end in two places)."""
    from batchpunk.envelope import Envelope
    from batchpunk.pipeline import Pipeline

    written: list[Any] = []

    async def sink(batch: Any) -> None:
        written.extend(batch)

    source = AckingSource([])
    source.envelopes = [Envelope({"n": 1}, [1, 2]), Envelope({"n": 2}, "k")]
    letters = MemoryDeadLetters()
    spool = Spool(tmp_path / "s")
    pipeline = Pipeline(source, _FunctionSink(sink), config(), dead_letter=letters, spool=spool)
    await pipeline.run()
    assert written == [{"n": 2}]
    assert [(letter.reason, letter.message) for letter in letters.letters] == [
        ("malformed", {"n": 1})
    ]
    assert "key: expected a hashable value" in str(letters.letters[0].error)
    assert inspect_spool(tmp_path / "s").unfinished == 0
    processor = BatchProcessor(config(), Recorder(), spool=Spool(tmp_path / "p"))
    async with processor:
        with pytest.raises(ValueError, match="priority: expected an int"):
            await processor.add_message(1, priority=1.5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="key: expected a hashable value"):
            processor.add_message_nowait(1, key={})
    assert inspect_spool(tmp_path / "p").unfinished == 0


class _FunctionSink:
    def __init__(self, write: Any) -> None:
        self.write = write

    async def close(self) -> None:
        return None


async def test_spooled_messages_whose_letters_were_not_stored_stay_in_the_spool(
    tmp_path: Path,
) -> None:
    """At stop, letters the dead-letter sink did not store are not handed to the source or to
    pipeline.undelivered as the spool's records: their messages stay in the spool and are
    processed again after the next start."""
    from batchpunk.pipeline import Pipeline

    nacked: list[Any] = []

    class Source(AckingSource):
        async def nack_many(self, envelopes: Any, requeue: bool) -> None:
            nacked.extend(envelopes)

    async def failing(batch: Any) -> None:
        raise RuntimeError("sink down")

    letters = HeldLetters()
    pipeline = Pipeline(
        Source([1, 2, 3, 4]),
        _FunctionSink(failing),
        config(max_size=2, drain_timeout=0.3, retry_failed=False),
        spool=Spool(tmp_path / "s"),
        dead_letter=letters,
    )
    await pipeline.run()
    assert [type(e).__name__ for e in nacked] == []
    assert pipeline.undelivered == []
    assert inspect_spool(tmp_path / "s").unfinished == 4
    recorder, _ = await replay(tmp_path / "s")
    assert sorted(recorder.seen) == [1, 2, 3, 4]


async def test_a_message_drop_oldest_keeps_without_waiting_is_in_the_spool(tmp_path: Path) -> None:
    """add_message_nowait under drop_oldest with max_pending reached: the engine dead-letters
    the oldest waiting message and keeps the new one, so the spool must write the new one too
    (it was handed to the engine unwritten: a crash lost a message the engine had accepted)."""
    path = tmp_path / "s"
    letters = MemoryDeadLetters()
    cfg = config(
        max_pending=2, overflow=OverflowPolicy.DROP_OLDEST, max_size=1, max_concurrent_batches=1
    )
    async with BatchProcessor(cfg, never, dead_letter=letters, spool=Spool(path)) as processor:
        for i in range(3):
            processor.add_message_nowait(i)  # 0 runs for ever, 1 waits and is dropped for 2
        await asyncio.sleep(0.3)  # the next group commit and the dropped letter are done
        assert [letter.message for letter in letters.letters] == [1]
        crashed = tmp_path / "crashed"
        shutil.copytree(path, crashed)  # what a kill -9 now leaves on disk
    recorder, _ = await replay(crashed)
    assert sorted(recorder.seen) == [0, 2]


async def test_a_partial_failure_that_does_not_fit_the_batch_finishes_nothing(
    tmp_path: Path,
) -> None:
    """A PartialFailure with one result for a batch of two is the engine's ResultMismatch: the
    whole batch is retried, so the spool must finish none of it (it finished the message not
    named as failed, and a crash during the retry lost it)."""
    calls: list[list[Any]] = []
    hang = asyncio.Event()

    async def handler(batch: Batch[Any]) -> None:
        calls.append(list(batch))
        if len(calls) == 1:
            raise PartialFailure({0: ValueError("a failed")}, results=["ok"])
        await hang.wait()  # the retry is slow; the process dies meanwhile

    path = tmp_path / "s"
    cfg = config(max_size=2, retry_delay=0.0, retry_jitter=False)
    processor = BatchProcessor(cfg, handler, dead_letter=MemoryDeadLetters(), spool=Spool(path))
    await processor.start()
    await processor.add_message("a")
    await processor.add_message("b")
    await wait_for(lambda: len(calls) >= 2)
    await asyncio.sleep(0.2)  # finish markers would be written by now (MARKER_DELAY)
    assert calls[1] == ["a", "b"]  # the engine retries the whole batch
    crashed = tmp_path / "crashed"
    shutil.copytree(path, crashed)  # what a kill -9 now leaves on disk
    hang.set()
    await processor.stop()
    assert inspect_spool(crashed).unfinished == 2
    recorder, letters = await replay(crashed)
    assert sorted(recorder.seen + [letter.message for letter in letters.letters]) == ["a", "b"]


async def test_a_sync_handlers_awaitable_raising_partial_failure_finishes_the_good(
    tmp_path: Path,
) -> None:
    """A sync handler returning a coroutine that raises PartialFailure: the messages it did
    not name are processed, so they must be finished (they stayed in the spool and were
    processed again on every start)."""
    processed: list[Any] = []

    async def work(batch: Batch[Any]) -> None:
        processed.extend(m for m in batch if m != 3)
        bad = {i: ValueError("bad") for i, m in enumerate(batch) if m == 3}
        if bad:
            raise PartialFailure(bad)

    def handler(batch: Batch[Any]) -> Any:  # a plain function returning a coroutine
        return work(batch)

    letters = MemoryDeadLetters()
    path = tmp_path / "s"
    cfg = config(retry_on=(), max_retries=0)
    async with BatchProcessor(cfg, handler, dead_letter=letters, spool=Spool(path)) as processor:
        for i in range(5):
            await processor.add_message(i)
        await processor.flush()
    assert [letter.message for letter in letters.letters] == [3]
    assert sorted(processed) == [0, 1, 2, 4]
    assert inspect_spool(path).unfinished == 0
    again, _ = await replay(path)
    assert again.seen == []


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_handler_may_return_any_iterable_of_results(tmp_path: Path, kind: str) -> None:
    """The engine takes any iterable of results (a generator, a map); the spool's wrapper
    called len() on it, so every batch failed (TypeError) and was dead-lettered. It is now
    read into a list once, and the engine gets that list."""

    async def async_handler(batch: Batch[Any]) -> Any:
        return (m * 2 for m in batch)

    def sync_handler(batch: Batch[Any]) -> Any:
        return (m * 2 for m in batch)

    handler = async_handler if kind == "async" else sync_handler
    letters = MemoryDeadLetters()
    path = tmp_path / "s"
    async with BatchProcessor(
        config(max_retries=0), handler, dead_letter=letters, spool=Spool(path)
    ) as processor:
        results = await asyncio.gather(*(processor.submit(i) for i in range(3)))
    assert results == [0, 2, 4]
    assert letters.letters == []
    assert inspect_spool(path).unfinished == 0


async def test_a_message_added_while_start_replays_is_refused_not_accepted_unwritten(
    tmp_path: Path,
) -> None:
    """start() marked the processor running and opened its room before the spool was open, so
    an add_message during the recovery returned with its message never written (lost by a
    crash). The add paths now open once the replay is done: until then it is refused as before
    start, and nothing unwritten reaches the engine."""
    path = tmp_path / "s"
    await leave_unfinished(path, [{"old": 1}])
    recorder = Recorder()
    processor = BatchProcessor(config(), recorder, spool=Spool(path))
    starting = asyncio.ensure_future(processor.start())
    await asyncio.sleep(0)  # start() now awaits the recovery on the spool's thread
    with pytest.raises(ProcessorClosed, match="await start"):
        await processor.add_message({"new": 1})
    with pytest.raises(ProcessorClosed, match="await start"):
        processor.add_message_nowait({"new": 2})
    await starting
    await processor.add_message({"new": 3})
    await processor.flush()
    await processor.stop()
    assert recorder.seen == [{"old": 1}, {"new": 3}]  # the replayed one first
    assert inspect_spool(path).unfinished == 0


@pytest.mark.parametrize("policy", [OverflowPolicy.RAISE, OverflowPolicy.DROP_NEWEST])
async def test_replay_waits_for_room_whatever_the_overflow_policy(
    tmp_path: Path, policy: OverflowPolicy
) -> None:
    """More unfinished messages than max_pending: replay went through add_message with the
    configured policy, so start() raised BufferFull part-way (RAISE) or dropped replayed
    messages (drop policies). A replayed message was accepted already: it waits for room."""
    path = tmp_path / "s"
    await leave_unfinished(path, list(range(20)))
    recorder, letters = Recorder(), MemoryDeadLetters()
    cfg = config(max_pending=5, overflow=policy, max_size=5)
    async with BatchProcessor(cfg, recorder, dead_letter=letters, spool=Spool(path)) as processor:
        await processor.flush()
    assert sorted(recorder.seen) == list(range(20))
    assert letters.letters == []
    assert inspect_spool(path).unfinished == 0


async def test_a_damaged_last_record_stays_on_disk_until_its_letter_is_stored(
    tmp_path: Path,
) -> None:
    """A complete last record whose CRC fails was cut from the file during start, before its
    "malformed" letter was stored: a crash in between lost those bytes for good. It now stays
    (as damage in the middle does) until its settled marker is written."""
    path = tmp_path / "s"
    await leave_unfinished(path, [{"n": i} for i in range(3)])
    seg = segments(path)[-1]
    data = bytearray(seg.read_bytes())
    data[-2] ^= 0xFF  # the last record is complete but its CRC fails
    seg.write_bytes(bytes(data))
    stuck = asyncio.Event()

    async def slow_sink(letters: list[Any]) -> None:
        await stuck.wait()

    processor = BatchProcessor(config(), never, dead_letter=slow_sink, spool=Spool(path))
    await processor.start()
    await asyncio.sleep(0.1)
    crashed = tmp_path / "crashed"
    shutil.copytree(path, crashed)  # kill -9 now: the letter is not stored yet
    stuck.set()
    await processor.stop()
    assert [(torn, length > 0) for _, _, length, torn in inspect_spool(crashed).damaged] == [
        (False, True)
    ]
    _, letters = await replay(crashed)
    assert [letter.reason for letter in letters.letters] == ["malformed"]
    again, more = await replay(crashed)  # stored and settled: nothing left
    assert (again.seen, len(more)) == ([], 0)


async def test_stop_answers_producers_whose_commit_never_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk keeps failing under BLOCK and stop() gives up on the last writes: close() left
    the chunk's shared future pending, so the producer hung after stop() returned and could not
    even be cancelled (asyncio.run then hung at exit). It now gets BufferFull: not kept."""
    import errno

    import batchpunk.spool as spool_module

    monkeypatch.setattr(spool_module, "CLOSE_SECONDS", 0.3)
    spool = Spool(tmp_path / "s")

    def failing(segment: Any, data: bytes, sync: bool = True) -> None:
        raise OSError(errno.EIO, "I/O error")

    processor = BatchProcessor(config(), Recorder(), spool=spool)
    await processor.start()
    spool._write = failing  # type: ignore[method-assign]  # the disk goes bad
    producer = asyncio.ensure_future(processor.add_message({"i": 1}))
    await asyncio.sleep(0.1)
    assert not producer.done()  # BLOCK: waits while the write is retried
    try:
        await asyncio.wait_for(processor.stop(), 5)
        done, _ = await asyncio.wait({producer}, timeout=1)
        assert producer in done, "add_message still waiting after stop() returned"
        with pytest.raises(BufferFull, match="it was not kept"):
            producer.result()
        assert spool.unfinished == 0
    finally:
        for chunk in spool._chunks:  # unstick it (before the fix) so that the loop can close
            if not chunk.future.done():
                chunk.future.set_exception(RuntimeError("test cleanup"))
        await asyncio.gather(producer, return_exceptions=True)


@pytest.mark.parametrize("policy", [OverflowPolicy.BLOCK, OverflowPolicy.RAISE])
async def test_a_finished_active_segment_that_fills_max_bytes_is_deleted(
    tmp_path: Path, policy: OverflowPolicy
) -> None:
    """segment_bytes == max_bytes: admission stops the active segment at max_bytes before it
    reaches segment_bytes, so it was never sealed nor deleted, and the spool stayed full for
    good (BLOCK waited for ever, RAISE refused everything) with every message finished."""
    pad = "x" * 2500
    gate = asyncio.Event()
    recorder = Recorder()

    async def slow(batch: Batch[Any]) -> None:
        await gate.wait()
        await recorder(batch)

    spool = Spool(tmp_path / "s", max_bytes=8192, segment_bytes=8192)
    async with BatchProcessor(config(overflow=policy), slow, spool=spool) as processor:
        for i in range(3):
            await processor.add_message({"i": i, "pad": pad})
        if policy is OverflowPolicy.BLOCK:
            producer = asyncio.ensure_future(processor.add_message({"i": 3, "pad": pad}))
            await asyncio.sleep(0.2)
            assert not producer.done()  # full while the first three are unfinished
            gate.set()  # they finish: the waiting producer must find room
            await asyncio.wait_for(producer, 3)
        else:
            with pytest.raises(BufferFull):
                await processor.add_message({"i": 3, "pad": pad})
            gate.set()
            await processor.flush()
            await asyncio.sleep(0.2)
            assert spool.unfinished == 0
            await processor.add_message({"i": 3, "pad": pad})
        await processor.flush()
    assert sorted(m["i"] for m in recorder.seen) == [0, 1, 2, 3]
    assert segments(tmp_path / "s") == []


@pytest.mark.parametrize("policy", [OverflowPolicy.RAISE, OverflowPolicy.DROP_NEWEST])
async def test_a_refusing_policy_accepts_again_after_one_full_disk_error(
    tmp_path: Path, policy: OverflowPolicy
) -> None:
    """One transient ENOSPC under a refusing policy: only a successful write cleared the full
    disk, and with the failed chunk not retried nothing was ever written again, so every later
    message was refused for good. Admission tries a write again once the retry timer fired."""
    import errno

    recorder = Recorder()
    spool = Spool(tmp_path / "s")
    real = spool._write
    failures = [OSError(errno.ENOSPC, "No space left on device")]

    def flaky(segment: Any, data: bytes, sync: bool = True) -> None:
        if failures:
            raise failures.pop()
        real(segment, data, sync)

    spool._write = flaky  # type: ignore[method-assign]
    async with BatchProcessor(config(overflow=policy), recorder, spool=spool) as processor:
        with pytest.raises(BufferFull, match="disk is full"):
            await processor.add_message({"i": 0})  # its write failed: refused, as documented
        await asyncio.sleep(0.3)  # the retry timer (20 ms after one failure) fired
        await processor.submit({"i": 1})
        await processor.flush()
    assert recorder.seen == [{"i": 1}]
    assert inspect_spool(tmp_path / "s").unfinished == 0


async def test_a_second_concurrent_stop_returns_once_the_spool_is_closed(tmp_path: Path) -> None:
    """stop() is idempotent and a second call waits for the first; with a spool the second
    returned while the first still wrote the last markers and held the lock, so a restart
    right after it got SpoolLocked."""
    path = tmp_path / "s"
    spool = Spool(path)
    processor = BatchProcessor(config(), Recorder(), spool=spool)
    await processor.start()
    for i in range(10):
        await processor.add_message(i)
    first = asyncio.ensure_future(processor.stop())
    await asyncio.sleep(0)  # it begins stopping
    await processor.stop()
    assert spool._lock_fd is None  # closed and unlocked
    again = BatchProcessor(config(), Recorder(), spool=Spool(path))
    await again.start()  # the spool is free
    await again.stop()
    await first


async def test_a_nested_tuple_key_comes_back_hashable_on_replay(tmp_path: Path) -> None:
    """json returns tuples as lists, nested ones too: ((1, 2), 3) came back as ([1, 2], 3),
    which cannot be hashed, and start() failed on the replay."""
    processor = BatchProcessor(config(), never, spool=Spool(tmp_path / "s"))
    async with processor:
        await processor.add_message("m", key=((1, 2), 3))
    recorder = Recorder()
    async with BatchProcessor(config(), recorder, spool=Spool(tmp_path / "s")) as again:
        await again.flush()
    assert recorder.seen == ["m"]
    assert recorder.batches[0].key == ((1, 2), 3)


async def test_a_message_refused_under_drop_oldest_is_not_written(tmp_path: Path) -> None:
    """DROP_OLDEST writes a message the engine has no room for (the engine keeps it), but not
    one it then refuses with BufferFull because letters for a failing dead-letter sink fill
    max_pending: the caller was told it was not kept, and it stayed in the spool, to be
    processed after the next start."""

    async def poison(batch: Batch[Any]) -> None:
        raise ValueError("poison")

    async def down(letters: Any) -> None:
        raise OSError("the dead-letter store is down")

    settings = {"max_size": 5, "max_wait": 60, "max_pending": 5, "max_retries": 0}
    processor = BatchProcessor(
        config(overflow=OverflowPolicy.DROP_OLDEST, **settings),
        poison,
        dead_letter=down,
        spool=Spool(tmp_path / "s"),
    )
    accepted = 0
    async with processor:
        for i in range(40):
            try:
                processor.add_message_nowait({"n": i})
                accepted += 1
            except BufferFull:
                pass
            await asyncio.sleep(0.01)
    assert accepted < 40
    assert inspect_spool(tmp_path / "s").unfinished <= accepted


@pytest.mark.parametrize("moment", ["recovery", "replay"])
async def test_a_stop_during_start_releases_the_spool_and_keeps_its_messages(
    tmp_path: Path, moment: str
) -> None:
    """stop() while start() was still recovering the spool returned with the spool open and
    locked: close() saw a spool not yet open and did nothing, then the recovery opened it. The
    next processor of this path got SpoolLocked until the process exited. Now stop waits for the
    start under way to let go, the lock is released, and what was not replayed stays on disk."""
    path = tmp_path / "s"
    await leave_unfinished(path, list(range(20)))
    cfg = config(max_pending=5, max_size=5)
    processor = BatchProcessor(cfg, never, spool=Spool(path))
    starting = asyncio.ensure_future(processor.start())
    if moment == "recovery":
        await asyncio.sleep(0)  # start() awaits the recovery on the spool's thread
    else:
        await wait_for(lambda: processor.received == 5)  # the replay now waits for room
    await asyncio.wait_for(processor.stop(), 10)
    await asyncio.wait_for(starting, 10)
    recorder, letters = await asyncio.wait_for(replay(path), 10)  # raised SpoolLocked
    assert sorted(recorder.seen) == list(range(20))
    assert letters.letters == []
    assert inspect_spool(path).unfinished == 0


@pytest.mark.parametrize("call", ["add_message", "submit"])
async def test_a_message_the_full_engine_refuses_under_raise_leaves_nothing_in_the_spool(
    tmp_path: Path, call: str
) -> None:
    """Under overflow=raise, a message refused with BufferFull because max_pending messages were
    unfinished stayed in the spool, unfinished (max_pending=5, 20 adds at once: 15 refused, and
    after every batch finished spool.unfinished was 15; the next start processed them, and until
    then they pinned their segment). Now a message the engine has no room for is refused before
    it is written, and one whose room vanished while it waited for its commit is finished before
    BufferFull reaches its producer."""
    gate = asyncio.Event()
    recorder = Recorder()

    async def slow(batch: Batch[Any]) -> None:
        await gate.wait()
        await recorder(batch)

    cfg = config(max_size=5, max_pending=5, overflow=OverflowPolicy.RAISE, drain_timeout=5.0)
    path = tmp_path / "s"
    refused: list[int] = []
    async with BatchProcessor(cfg, slow, spool=Spool(path)) as processor:
        add = getattr(processor, call)

        async def one(i: int) -> None:
            try:
                await add({"i": i})
            except BufferFull:
                refused.append(i)

        # All twenty find room before their write; five find it once their commit is done.
        tasks = [asyncio.ensure_future(one(i)) for i in range(20)]
        await wait_for(lambda: len(refused) == 15)
        written = processor.spool.sequence  # type: ignore[union-attr]
        for i in range(20, 25):  # no room now: refused before anything is written
            await one(i)
        assert processor.spool.sequence == written  # type: ignore[union-attr]
        gate.set()
        await asyncio.gather(*tasks)
        await processor.flush()
        await wait_for(lambda: processor.spool.unfinished == 0)  # type: ignore[union-attr]
    assert len(refused) == 20
    assert sorted(m["i"] for m in recorder.seen) == sorted(set(range(25)) - set(refused))
    assert inspect_spool(path).unfinished == 0
    again, _ = await replay(path)
    assert again.seen == []


@pytest.mark.parametrize("policy", [OverflowPolicy.DROP_NEWEST, OverflowPolicy.DROP_OLDEST])
async def test_a_message_dropped_after_its_commit_is_finished_by_its_letter(
    tmp_path: Path, policy: OverflowPolicy
) -> None:
    """Under a drop policy, messages written while there was room and dropped once their commit
    was done (max_pending reached meanwhile) are dead-lettered as records, so storing each
    letter finishes its message: nothing is left in the spool for the next start."""
    gate = asyncio.Event()
    recorder = Recorder()

    async def slow(batch: Batch[Any]) -> None:
        await gate.wait()
        await recorder(batch)

    letters = MemoryDeadLetters()
    cfg = config(max_size=5, max_pending=5, overflow=policy, drain_timeout=5.0)
    path = tmp_path / "s"
    async with BatchProcessor(cfg, slow, dead_letter=letters, spool=Spool(path)) as processor:
        await asyncio.gather(*(processor.add_message({"i": i}) for i in range(20)))
        await wait_for(lambda: len(letters.letters) == 15)
        assert processor.spool.unfinished == 5  # type: ignore[union-attr]
        gate.set()
        await processor.flush()
        await wait_for(lambda: processor.spool.unfinished == 0)  # type: ignore[union-attr]
    assert {letter.reason for letter in letters.letters} == {"dropped"}
    dead = {letter.message["i"] for letter in letters.letters}
    assert sorted(m["i"] for m in recorder.seen) == sorted(set(range(20)) - dead)
    again, _ = await replay(path)
    assert again.seen == []


@pytest.mark.parametrize("call", ["add_message", "submit"])
async def test_a_message_dropped_for_a_full_spool_returns_only_once_its_letter_is_stored(
    tmp_path: Path, call: str
) -> None:
    """Under drop_newest, a message dropped because the spool's max_bytes was reached made
    ``await add_message`` return right after it was handed to the dead-letter outbox: a kill -9
    while the sink was slow lost it, though docs/spool.md promises that every message whose
    ``await add_message`` returned is processed or dead-lettered. Now add_message (as submit
    did) returns only once its letter is stored."""
    letters = HeldLetters()
    cfg = config(overflow=OverflowPolicy.DROP_NEWEST, max_pending=100_000)
    spool = Spool(tmp_path / "s", max_bytes=4096, segment_bytes=4096)
    async with BatchProcessor(cfg, never, dead_letter=letters, spool=spool) as processor:
        i = 0
        while spool.disk_bytes + 200 < 4096:
            await processor.add_message({"i": i, "pad": "x" * 100})
            i += 1
        written = spool.sequence
        big = {"i": "dropped", "pad": "x" * 200}
        adding = asyncio.ensure_future(getattr(processor, call)(big))
        for _ in range(20):  # its letter is not stored: it must still be waiting
            await asyncio.sleep(0.005)
        assert spool.sequence == written  # dropped by the spool, not written
        assert not adding.done()
        letters.gate.set()
        if call == "submit":
            with pytest.raises(BufferFull, match="max_bytes"):
                await asyncio.wait_for(adding, 5)
        else:
            await asyncio.wait_for(adding, 5)
        assert [(x.reason, x.message) for x in letters.letters] == [("dropped", big)]


async def test_drops_for_a_full_spool_stop_once_max_pending_letters_wait_for_the_sink(
    tmp_path: Path,
) -> None:
    """The engine's drop policies stop dropping (BufferFull without waiting, a wait for room
    with add_message) once max_pending letters wait for a sink that does not store them; the
    spool's drops for a full max_bytes did not look, and a sink that hangs let their letters
    grow without bound. Now they apply the same bound."""
    letters = HeldLetters()
    cfg = config(overflow=OverflowPolicy.DROP_NEWEST, max_pending=40)
    spool = Spool(tmp_path / "s", max_bytes=4096, segment_bytes=4096)
    async with BatchProcessor(cfg, never, dead_letter=letters, spool=spool) as processor:
        while spool.disk_bytes + 200 < 4096:
            await processor.add_message({"pad": "x" * 100})
        errors: list[str] = []
        for i in range(100):
            try:
                processor.add_message_nowait({"i": i, "pad": "x" * 200})
            except BufferFull as exc:
                errors.append(str(exc))
            await asyncio.sleep(0)  # the outbox begins its (hanging) write
        refused = len(errors)
        assert all("not storing them" in error for error in errors)
        waiting = asyncio.ensure_future(processor.add_message({"i": "late", "pad": "x" * 200}))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # waits for room, adds no letter
        assert refused > 50
        letters.gate.set()
        await asyncio.wait_for(waiting, 5)
    assert len(letters.letters) == 100 - refused + 1


class _Color(enum.Enum):
    RED = 1


class _Shard(enum.IntEnum):
    A = 1


_CHANGING_KEYS = {
    "an Enum": _Color.RED,
    "an IntEnum": _Shard.A,
    "a UUID": uuid.UUID(int=5),
    "a datetime": datetime.datetime(2024, 1, 1, 12, 0),
    "a NaN": float("nan"),
    "an infinity": float("inf"),
    "a tuple holding an Enum": ("a", _Color.RED),
}


@pytest.mark.parametrize("serializer", ["json", "msgpack"])
async def test_a_key_that_would_come_back_changed_is_refused_before_it_is_written(
    tmp_path: Path, serializer: str
) -> None:
    """Keys the serializer does not give back as written came back changed on replay (an Enum
    as an int, a UUID or a datetime as a str), so after a restart a replayed message and a new
    one of the same key ran in different lanes and preserve_order broke. Now, with a spool, a
    key must be a str, int, float, bool, None, bytes (msgpack) or a tuple of these: any other
    raises TypeError naming the key and the rule, before anything is written. Those keys come
    back equal and of the same type."""
    if serializer == "msgpack":
        pytest.importorskip("msgspec", reason="the msgpack serializer needs the msgpack extra")
    path = tmp_path / "s"
    processor = BatchProcessor(config(), never, spool=Spool(path, serializer=serializer))
    async with processor:
        spool = processor.spool
        assert spool is not None
        for name, key in [*_CHANGING_KEYS.items(), *([("bytes", b"k")] * (serializer == "json"))]:
            for call in ("add_message", "submit"):
                with pytest.raises(TypeError, match=r"key: .*str, int, float, bool, None") as info:
                    await getattr(processor, call)(name, key=key)
                assert repr(key) in str(info.value), name
            with pytest.raises(TypeError, match="key: "):
                processor.add_message_nowait(name, key=key)
        assert spool.sequence == 1  # nothing was written
        kept: dict[str, Any] = {
            "str": "k",
            "int": 7,
            "float": 1.5,
            "bool": False,
            "tuple": ("a", (1, 2.5, None, True)),
        }
        if serializer == "msgpack":
            kept["bytes"] = b"k"
        for name, key in kept.items():
            await processor.add_message(name, key=key)
    recorder = Recorder()
    async with BatchProcessor(config(), recorder, spool=Spool(path, serializer=serializer)) as p:
        await p.flush()
    back = {batch[0]: batch.key for batch in recorder.batches}
    for name, key in kept.items():
        assert back[name] == key, name
        assert repr(back[name]) == repr(key), name  # the same types, nested ones too


#: What _Unpickled's reduction ran: a spool that unpickles leaves a mark here.
_UNPICKLED: list[str] = []


def _note_unpickled(text: str) -> str:
    _UNPICKLED.append(text)
    return text


class _Unpickled:
    """Unpickling it calls _note_unpickled (as hostile bytes could call os.system)."""

    def __reduce__(self) -> Any:
        return (_note_unpickled, ("code ran",))


async def test_a_spool_not_built_for_pickle_never_unpickles_what_it_finds(tmp_path: Path) -> None:
    """A spool opened with serializer="json" unpickled records stored with pickle's serializer
    id: code in them ran during start() (the reviewer's repro ran os.system). Now only a Spool
    built with serializer="pickle" unpickles; any other makes the record a "malformed" dead
    letter carrying its bytes, whose error says why, and the letter finishes it."""
    path = tmp_path / "s"
    await leave_unfinished(path, [_Unpickled()], serializer="pickle")
    _UNPICKLED.clear()
    recorder, letters = await replay(path)  # a json spool, the default
    assert _UNPICKLED == []
    assert recorder.seen == []
    [letter] = letters.letters
    assert letter.reason == "malformed"
    assert isinstance(letter.message, bytes)
    assert b"_note_unpickled" in letter.message
    assert "written with pickle" in str(letter.error)
    assert "serializer='pickle'" in str(letter.error)
    assert inspect_spool(path).unfinished == 0
    await leave_unfinished(path, [_Unpickled()], serializer="pickle")
    processor = BatchProcessor(config(), Recorder(), spool=Spool(path, serializer="pickle"))
    async with processor:
        await processor.flush()
    assert _UNPICKLED == ["code ran"]  # its own kind of spool reads it back, as documented


async def test_a_msgpack_spool_without_msgspec_fails_to_start_and_keeps_every_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reopening a msgpack spool where msgspec is not installed dead-lettered every unfinished
    message as "malformed" and emptied the spool: the replay's except caught MissingDependency
    as if the bytes were bad. Now start() fails with the pip hint and the spool is untouched;
    with msgspec back, every message is replayed."""
    pytest.importorskip("msgspec", reason="writing the spool needs the msgpack extra")
    from batchpunk.errors import MissingDependency

    path = tmp_path / "s"
    await leave_unfinished(path, [{"n": n} for n in range(3)], serializer="msgpack")
    before = {p.name: p.read_bytes() for p in segments(path)}
    monkeypatch.setitem(sys.modules, "msgspec", None)  # as in a deploy without the extra
    letters = MemoryDeadLetters()
    recorder = Recorder()
    spool = Spool(path, serializer="msgpack")
    processor = BatchProcessor(config(), recorder, dead_letter=letters, spool=spool)
    with pytest.raises(MissingDependency, match=r"pip install 'batchpunk\[msgpack\]'"):
        await processor.start()
    await processor.stop()
    assert letters.letters == []
    assert recorder.seen == []
    assert {p.name: p.read_bytes() for p in segments(path)} == before
    monkeypatch.undo()
    async with BatchProcessor(config(), recorder, spool=Spool(path, serializer="msgpack")) as p:
        await p.flush()
    assert recorder.seen == [{"n": n} for n in range(3)]


def test_inspect_skips_a_segment_its_owner_deleted_while_it_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """inspect_spool on a live spool raised FileNotFoundError now and then (1,706 of 50,719
    calls; the CLI failed 2 of 20 runs): the owner deletes a drained segment between the listing
    and the read (and the report read and stat'ed each file twice more). Now a segment that
    vanished is skipped, and each one is read once."""
    import batchpunk.spool as spool_module

    path = tmp_path / "s"
    asyncio.run(leave_unfinished(path, [{"n": i} for i in range(4)]))
    listed = spool_module._segment_files

    def with_a_vanished_one(directory: Path) -> list[tuple[int, Path]]:
        return [(0, directory / f"{0:012d}.seg"), *listed(directory)]  # deleted since

    monkeypatch.setattr(spool_module, "_segment_files", with_a_vanished_one)
    reads: list[str] = []
    read_bytes = Path.read_bytes

    def counted(self: Path) -> bytes:
        reads.append(self.name)
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", counted)
    report = inspect_spool(path)
    assert report.unfinished == 4
    assert [row[0] for row in report.segments] == [p.name for p in segments(path)]
    assert sorted(reads) == sorted({p.name for p in segments(path)} | {f"{0:012d}.seg"})


def test_inspect_of_a_live_spool_calls_an_incomplete_tail_a_write_under_way(
    tmp_path: Path,
) -> None:
    """On a spool its owner is writing, inspect reported the record being appended as a torn
    tail "cut on the next start" (the reviewer saw such false reports while the owner ran). Now,
    while a live process holds the spool, an incomplete last record is reported as being
    written, not as damage."""
    path = tmp_path / "s"
    asyncio.run(leave_unfinished(path, [{"n": i} for i in range(4)]))
    seg = segments(path)[-1]
    seg.write_bytes(seg.read_bytes()[:-3])
    (path / "lock").write_text(str(os.getpid()))  # as a running owner leaves it
    report = inspect_spool(path)
    assert report.locked_by == os.getpid()
    assert report.damaged == []
    assert report.writing == [(seg.name, report.writing[0][1])]
    assert report.writing[0][1] > 0
    done = subprocess.run(
        [sys.executable, "-m", "batchpunk", "spool", "inspect", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    assert "torn" not in done.stdout
    assert "being written" in done.stdout


async def test_a_spool_whose_lock_file_cannot_be_opened_fails_with_a_spool_error(
    tmp_path: Path,
) -> None:
    """start() on a spool directory it cannot write (read-only for this user) raised a raw
    PermissionError from the lock file's os.open. Now it is a SpoolError naming the path and
    the problem, as a directory that cannot be created is. (Root ignores file modes, so the
    lock path is made a directory here: opening it fails the same way.)"""
    from batchpunk.spool import SpoolError

    path = tmp_path / "s"
    (path / "lock").mkdir(parents=True)
    processor = BatchProcessor(config(), never, spool=Spool(path))
    with pytest.raises(SpoolError, match=r"spool .*/s: cannot open its lock file .*lock"):
        await processor.start()
    await processor.stop()


def test_inspect_refuses_a_directory_that_is_not_a_spool(tmp_path: Path) -> None:
    """`batchpunk spool inspect /etc` printed "0 unfinished ... not in use" and exited 0: a
    directory with neither a lock file nor segment files is not a spool (a typo, a wrong
    path). Now inspect_spool raises SpoolError saying so, and the command exits 2."""
    from batchpunk.spool import SpoolError

    other = tmp_path / "etc"
    other.mkdir()
    (other / "hosts").write_text("127.0.0.1 localhost\n")
    with pytest.raises(SpoolError, match="not a spool"):
        inspect_spool(other)
    with pytest.raises(SpoolError, match="not a directory"):
        inspect_spool(other / "hosts")
    done = subprocess.run(
        [sys.executable, "-m", "batchpunk", "spool", "inspect", str(other)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout
    assert "not a spool" in done.stderr
    assert done.stdout == ""


async def test_inspect_ages_the_oldest_unfinished_message_by_its_write_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """inspect's "oldest" was the time since the oldest unfinished message's segment was last
    modified, and finish markers of other messages modify it: a message unfinished for 3.22 s
    was reported 0.169 s old. Now each group records when it was written, and the age is taken
    from there (from the file's modification time only for groups written before that)."""
    import batchpunk.spool as spool_module

    path = tmp_path / "s"
    await leave_unfinished(path, [{"n": 0}])
    now = spool_module.time.time()
    seg = segments(path)[-1]
    os.utime(seg, (now + 50, now + 50))  # later writes (finish markers) to the same file
    monkeypatch.setattr(spool_module.time, "time", lambda: now + 100)
    age = inspect_spool(path).oldest_age
    assert age is not None
    assert 99 <= age <= 102  # the file's time said 50
    monkeypatch.undo()
    # A group written before the write time was recorded (type 1) is read as ever.
    body = b'[{"n":"old"},null,0]'
    payload = struct.pack("<QIB", 7, 1, 1) + struct.pack("<I", len(body)) + body
    rest = struct.pack("<BI", 1, len(payload)) + payload
    old = tmp_path / "old"
    old.mkdir()
    (old / "000000000001.seg").write_bytes(struct.pack("<I", zlib.crc32(rest)) + rest)
    assert inspect_spool(old).unfinished == 1
    recorder, letters = await replay(old)
    assert recorder.seen == [{"n": "old"}]
    assert letters.letters == []


@pytest.mark.parametrize("ack_on_write", [False, True])
async def test_a_hard_stop_leaves_spooled_messages_of_a_source_without_nacks_in_the_spool(
    tmp_path: Path, ack_on_write: bool
) -> None:
    """A source that cannot take messages back gets what a stop gives back stored as
    "shutdown" letters; with a spool those messages are in the spool already. A hard stop
    stored the 20 being written as letters, and the next start processed the same 20 again.
    A message in the spool stays there; only one never written becomes a letter."""
    from batchpunk.pipeline import Pipeline
    from tests.engine_support import ListSource

    writing = asyncio.Event()

    async def hangs(batch: Any) -> None:
        writing.set()
        await asyncio.Event().wait()

    letters = MemoryDeadLetters()
    pipeline = Pipeline(
        ListSource(range(20), endless=True),
        _FunctionSink(hangs),
        config(max_size=10, drain_timeout=0.2),
        spool=Spool(tmp_path / "s", ack_on_write=ack_on_write),
        dead_letter=letters,
    )
    running = asyncio.ensure_future(pipeline.run())
    await asyncio.wait_for(writing.wait(), 5)
    await wait_for(lambda: inspect_spool(tmp_path / "s").unfinished == 20)
    pipeline.request_stop(drain=False)
    await asyncio.wait_for(running, 10)
    assert letters.letters == []
    assert pipeline.lost == 0
    recorder, _ = await replay(tmp_path / "s")
    assert sorted(recorder.seen) == list(range(20))


@pytest.mark.parametrize("policy", [OverflowPolicy.RAISE, OverflowPolicy.DROP_NEWEST])
async def test_nowait_messages_the_full_disk_never_took_are_dead_lettered_at_stop(
    tmp_path: Path, policy: OverflowPolicy
) -> None:
    """add_message_nowait returns before the write; on a full disk the write of 1,000 such
    messages was abandoned, and at a graceful stop their "shutdown" letters were dropped as if
    the messages stayed in the spool: neither processed, nor dead-lettered, nor replayed (lost
    1,000 of 8,601). A message is taken to stay in the spool only once it is written; the
    others' letters are stored."""
    mount = tmp_path / "disk"
    _mount_tmpfs(mount)
    try:
        path = mount / "s"
        letters = MemoryDeadLetters()
        cfg = config(overflow=policy, max_pending=100_000, max_size=100, drain_timeout=0.5)
        processor = BatchProcessor(
            cfg, never, dead_letter=letters, spool=Spool(path, segment_bytes=64 << 10)
        )
        await processor.start()
        accepted: list[int] = []
        for i in range(40_000):
            try:
                processor.add_message_nowait({"id": i, "pad": "x" * 100})
                accepted.append(i)
            except BufferFull:
                pass
            if i % 200 == 0:
                await asyncio.sleep(0.002)  # the group commits run
        await asyncio.sleep(0.3)
        await processor.stop()
        recorder, _ = await replay(path)
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", str(mount)], check=False)
    ended = {m["id"] for m in recorder.seen} | {letter.message["id"] for letter in letters.letters}
    assert [i for i in accepted if i not in ended] == []


async def test_a_stop_request_while_start_replays_behind_an_outage_is_obeyed(
    tmp_path: Path,
) -> None:
    """More unfinished messages than max_pending, and the sink down: start() replays until
    the engine is full, then waits for room that only the outage's end or delivery_timeout
    (300 s) frees. A stop request (SIGTERM, twice) was not heard until then: run() did not
    return. It now ends the replay; what was not replayed stays in the spool."""
    from batchpunk.pipeline import Pipeline
    from tests.engine_support import ListSource

    path = tmp_path / "s"
    await leave_unfinished(path, list(range(30)))

    async def down(batch: Any) -> None:
        raise ConnectionRefusedError("the sink is down")

    pipeline = Pipeline(
        ListSource([], endless=True),
        _FunctionSink(down),
        config(max_pending=10, max_size=5, drain_timeout=0.3, retry_delay=0.01),
        spool=Spool(path),
    )
    running = asyncio.ensure_future(pipeline.run())
    await wait_for(lambda: pipeline.processor is not None and pipeline.processor.received >= 10)
    pipeline.request_stop()
    await asyncio.wait_for(running, 10)
    assert inspect_spool(path).unfinished == 30


async def test_every_request_of_dead_lettered_events_gets_202_with_a_spool(tmp_path: Path) -> None:
    """With a spool (replies once durable), an event settled only once (dead-lettered before
    it reached the spool: an unusable key) left its envelope's id() in a set for good; a later
    envelope at the same address then had its only settlement skipped and its request timed
    out: 86 of 200 requests got 504. Now every one gets 202."""
    aiohttp = pytest.importorskip("aiohttp")
    import json

    from batchpunk.connectors.http_source import HttpSource
    from batchpunk.deadletter import JsonlDeadLetters
    from batchpunk.pipeline import Pipeline

    source = HttpSource(port=0, key_field="k", reply_timeout=2.0)
    await source.prepare()
    letters = JsonlDeadLetters(tmp_path / "dead.jsonl")  # keeps no envelope alive
    pipeline = Pipeline(
        source,
        _FunctionSink(never),
        config(max_size=10, max_wait=0.005),
        dead_letter=letters,
        spool=Spool(tmp_path / "s"),
    )
    running = asyncio.ensure_future(pipeline.run())
    statuses: dict[int, int] = {}
    async with aiohttp.ClientSession() as http:
        for n in range(200):
            body = json.dumps({"id": n, "k": {"not": "a key"}}).encode()
            async with http.post(f"http://127.0.0.1:{source.port}/events", data=body) as reply:
                statuses[reply.status] = statuses.get(reply.status, 0) + 1
    pipeline.request_stop()
    await asyncio.wait_for(running, 10)
    assert statuses == {202: 200}
    assert len((tmp_path / "dead.jsonl").read_text().splitlines()) == 200
