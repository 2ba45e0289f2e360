"""kill -9 at random moments: every message whose add_message returned (or whose request got 202)
ends in the sink or the dead letters, and the negative control without a spool shows loss.

Scale: each of the sink scenarios feeds at least TOTAL (200,000) messages: 10 runs killed after
0.2 to 1.2 s of production each, then, when the kills left fewer acknowledged, one run that adds
the rest and drains (on a quiet 2-core machine the kills alone acknowledge about 400,000).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import require_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PRODUCER = str(Path(__file__).with_name("_spool_producer.py"))
KILLS = 10
TOTAL = 200_000
POISON = 997


@dataclass
class Report:
    acked: int
    missing: list[int]
    duplicates: int
    dead: int
    poison_in_rows: int
    #: (id, reason) of dead letters other than a poison id's "failed": none may exist.
    wrong_letters: list[tuple[int, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"acked {self.acked:,}, missing {len(self.missing):,}, duplicates {self.duplicates:,}, "
            f"dead letters {self.dead:,}, poison stored {self.poison_in_rows}, "
            f"wrong letters {len(self.wrong_letters):,} {self.wrong_letters[:5]}"
        )


def start(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, PRODUCER, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def kill_after_progress(proc: subprocess.Popen[bytes], rng: random.Random) -> list[int]:
    """Let the producer run a random while (after its first ack), kill -9 it, read its acks.

    A thread reads stdout all along, and is the only reader, to the end. The test used to call
    readline() and then communicate(), which reads the raw pipe: what readline() had buffered
    beyond the first line was dropped, and when that buffer ended inside a line, the line's
    tail was counted as an id the producer never acknowledged (a false "missing 1" on a loaded
    machine, where the pipe holds more than a buffer's worth before the test reads it). Reading
    all along also keeps the pipe from filling, which froze the producer's event loop until the
    kill instead of letting the kill land while it works.
    """
    stdout, stderr = proc.stdout, proc.stderr
    assert stdout is not None
    assert stderr is not None
    out = bytearray()
    began = threading.Event()

    def read() -> None:  # raw reads only: nothing else reads this pipe, so nothing is buffered
        while chunk := os.read(stdout.fileno(), 1 << 16):
            out.extend(chunk)
            began.set()
        began.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    began.wait(timeout=60)
    assert out, stderr.read().decode() or "no output"
    time.sleep(rng.uniform(0.2, 1.2))
    proc.send_signal(signal.SIGKILL)
    reader.join(timeout=30)
    assert not reader.is_alive(), "stdout did not close after the kill"
    stderr.read()
    proc.wait(timeout=30)
    # Each ack is one os.write of a whole line (atomic on a pipe): anything else is a reader bug.
    assert out.endswith(b"\n"), bytes(out[-40:])
    return [int(line) for line in bytes(out).split(b"\n")[:-1]]


def run_to_end(*args: str) -> list[int]:
    """Run the producer to its end; the ids it acknowledged."""
    done = subprocess.run(
        [sys.executable, PRODUCER, *args], capture_output=True, timeout=300, env=os.environ
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return [int(line) for line in done.stdout.split()]


def dead_ids(dlq: Path) -> list[tuple[int, str]]:
    """(id, reason) of every dead letter in the JSONL file."""
    if not dlq.exists():
        return []
    letters = [json.loads(line) for line in dlq.read_text().splitlines() if line]
    return [(letter["message"]["id"], letter["reason"]) for letter in letters]


def check(acked: list[int], rows: set[int], attempts: int, dead: list[tuple[int, str]]) -> Report:
    """A good id is kept only in the sink; a poison id only as a dead letter with reason "failed".

    Any other dead letter is a fault (a good message dead-lettered, say as "expired", was never
    processed): it counts as wrong, and its id as missing if it was acknowledged.
    """
    failed = {i for i, reason in dead if reason == "failed" and i % POISON == 0}
    wrong = [(i, reason) for i, reason in dead if reason != "failed" or i % POISON != 0]
    missing = sorted(set(acked) - (rows | failed))
    return Report(
        len(acked),
        missing,
        attempts - len(rows),
        len(dead),
        sum(1 for i in rows if i % POISON == 0),
        wrong,
    )


def crash_rounds(mode: str, target: str, spool: Path, dlq: Path, seed: int) -> list[int]:
    """KILLS killed runs then one run to the end (adding what TOTAL still lacks, then draining
    what the spool holds); the spool is copied after each kill."""
    rng = random.Random(seed)
    acked: list[int] = []
    for round_ in range(KILLS):
        proc = start(mode, target, str(spool), str((round_ + 1) * 10_000_000), str(dlq))
        got = kill_after_progress(proc, rng)
        first = (round_ + 1) * 10_000_000
        strays = [n for n in got if not first <= n < first + 10_000_000]
        assert not strays, f"ids this round's producer never made: {strays[:10]}"
        acked += got
        if spool.exists():  # what the next start recovers, for history() when a check fails
            shutil.copytree(spool, spool.with_name(f"after-kill-{round_ + 1}"))
    first, rest = str((KILLS + 1) * 10_000_000), str(max(0, TOTAL - len(acked)))
    return acked + run_to_end(mode, target, str(spool), first, str(dlq), rest)


def history(spool: Path, ids: list[int], limit: int = 5) -> str:
    """Where each missing id was in the spool after every kill: segment, seq, finish markers.

    Tells a lost message apart from a checker fault: a real loss shows the record and a finish
    marker it should not have (or the record vanishing while unfinished); an id the producer
    never acknowledged is in no copy at all.
    """
    from batchpunk.spool import _decode_message, _scan, _segment_files

    lines = []
    copies = sorted(spool.parent.glob("after-kill-*"), key=lambda p: int(p.name.split("-")[-1]))
    for wanted in ids[:limit]:
        lines.append(f"id {wanted}{' (poison)' if wanted % POISON == 0 else ''}:")
        for copy in copies:
            files = [path for _, path in _segment_files(copy)]
            finished: dict[str, set[int]] = {}
            found: list[tuple[str, int, int]] = []
            for index, path in enumerate(files):
                data = path.read_bytes()
                scan = _scan(data, last=index == len(files) - 1)
                finished[path.name] = set(scan.finished)
                for seq, sid, offset, total in scan.messages:
                    message = _decode_message(sid, data[offset : offset + total])[0]
                    if isinstance(message, dict) and message.get("id") == wanted:
                        found.append((path.name, offset, seq))
            for name, offset, seq in found:
                marks = [segment for segment, seqs in finished.items() if seq in seqs]
                lines.append(f"  {copy.name}: {name}@{offset} seq {seq}, finished in {marks}")
            if not found:
                lines.append(f"  {copy.name}: in none of {[path.name for path in files]}")
    return "\n".join(lines)


def sqlite_state(db: Path) -> tuple[set[int], int]:
    con = sqlite3.connect(db)
    rows = {r[0] for r in con.execute("SELECT id FROM rows")}
    attempts = con.execute("SELECT count(*) FROM attempts").fetchone()[0]
    con.close()
    return rows, attempts


def test_the_ack_reader_counts_every_line_and_nothing_else(tmp_path: Path) -> None:
    """A producer that wrote more than a pipe buffer before the first read gets exactly its ids."""
    script = tmp_path / "lines.py"
    script.write_text(
        "import os, sys, time\n"
        "for n in range(10_000_000, 10_020_000):\n"
        "    os.write(1, b'%d\\n' % n)\n"
        "os.write(2, b'done\\n')\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    time.sleep(0.3)  # the pipe fills before the reader starts, as on a loaded machine
    acked = kill_after_progress(proc, random.Random(1))
    # One writer in order: every line read, none cut (the kill may come before the last ones).
    assert acked == list(range(10_000_000, 10_000_000 + len(acked)))
    assert len(acked) > 8192 // 9  # more than one buffer's worth, where the old reader cut a line


def test_the_checker_keeps_only_poison_letters_that_failed_and_sinks_rows() -> None:
    """The checker counted any dead letter as kept: a mutant spool that dead-lettered every
    replayed message as "expired" passed the crash test with 3,228 good messages never
    processed. Now a good id is kept only in the sink and a poison id only as a "failed" letter;
    any other letter is reported as wrong."""
    good, poison = 10_000_001, 997 * 10_031
    acked = [good, poison, good + 1]
    report = check(acked, {good + 1}, 1, [(good, "expired"), (poison, "failed")])
    assert report.missing == [good]
    assert report.wrong_letters == [(good, "expired")]
    report = check(acked, {good, good + 1}, 2, [(poison, "expired")])
    assert report.missing == [poison]
    assert report.wrong_letters == [(poison, "expired")]
    report = check(acked, {good, good + 1}, 3, [(poison, "failed"), (poison, "failed")])
    assert report.missing == []
    assert report.wrong_letters == []
    assert report.duplicates == 1


def test_the_history_diagnostic_reads_every_copy_of_the_spool(tmp_path: Path) -> None:
    """history(), printed when a crash test finds a missing id, crashed itself (ValueError: too
    many values to unpack: a scan's messages are (seq, serializer id, offset, length), and
    _decode_message takes the serializer id too). It now says where each id was after each kill."""
    from batchpunk import BatchConfig, BatchProcessor, Spool

    spool = tmp_path / "spool"

    async def never(batch: object) -> None:
        await asyncio.Event().wait()

    async def fill() -> None:
        config = BatchConfig(max_size=10, max_wait=0.01, drain_timeout=0.1)
        async with BatchProcessor(config, never, spool=Spool(spool)) as processor:
            for n in range(5):
                await processor.add_message({"id": n})

    asyncio.run(fill())
    shutil.copytree(spool, spool.with_name("after-kill-1"))
    lines = history(spool, [3, 997 * 7]).splitlines()
    assert len(lines) == 4, lines
    assert lines[0] == "id 3:"
    assert lines[1].startswith("  after-kill-1: 000000000001.seg@")
    assert lines[1].endswith(" seq 4, finished in []")  # unfinished at the stop: still there
    assert lines[2:] == [
        f"id {997 * 7} (poison):",
        "  after-kill-1: in none of ['000000000001.seg']",
    ]


def test_kill_9_ten_times_into_sqlite_loses_nothing(tmp_path: Path) -> None:
    """Every message whose add_message returned is in SQLite or the dead letters after 10 kills."""
    db, dlq = tmp_path / "rows.db", tmp_path / "dlq.jsonl"
    acked = crash_rounds("sqlite", str(db), tmp_path / "spool", dlq, seed=16)
    rows, attempts = sqlite_state(db)
    report = check(acked, rows, attempts, dead_ids(dlq))
    print(f"sqlite: {report}")
    assert report.acked >= TOTAL
    assert report.missing == [], f"{report}\n{history(tmp_path / 'spool', report.missing)}"
    assert report.wrong_letters == [], str(report)
    assert report.poison_in_rows == 0
    assert report.dead >= sum(1 for i in acked if i % POISON == 0)
    # Duplicates only from batches in flight at a kill: at most concurrency x max_size per kill.
    assert report.duplicates <= KILLS * 4 * 200


def test_kill_9_ten_times_into_postgres_loses_nothing(tmp_path: Path) -> None:
    """The same crash test into PostgreSQL (unique tables, dropped afterwards)."""
    require_server("postgres")
    import asyncpg

    table = f"spool_crash_{uuid.uuid4().hex[:12]}"
    dsn = "postgresql://postgres@127.0.0.1:5432/test"

    async def sql(query: str) -> list[asyncpg.Record]:
        con = await asyncpg.connect(dsn)
        try:
            return list(await con.fetch(query))
        finally:
            await con.close()

    asyncio.run(sql(f"CREATE TABLE {table} (id bigint PRIMARY KEY)"))
    asyncio.run(sql(f"CREATE TABLE {table}_attempts (id bigint)"))
    try:
        dlq = tmp_path / "dlq.jsonl"
        acked = crash_rounds("postgres", table, tmp_path / "spool", dlq, seed=61)
        rows = {r["id"] for r in asyncio.run(sql(f"SELECT id FROM {table}"))}
        attempts = asyncio.run(sql(f"SELECT count(*) AS n FROM {table}_attempts"))[0]["n"]
        report = check(acked, rows, attempts, dead_ids(dlq))
        print(f"postgres: {report}")
        assert report.acked >= TOTAL
        assert report.missing == [], f"{report}\n{history(tmp_path / 'spool', report.missing)}"
        assert report.wrong_letters == [], str(report)
        assert report.poison_in_rows == 0
        assert report.duplicates <= KILLS * 4 * 200
    finally:
        asyncio.run(sql(f"DROP TABLE IF EXISTS {table}, {table}_attempts"))


def test_negative_control_without_a_spool_the_checker_reports_loss(tmp_path: Path) -> None:
    """Without a spool a kill -9 loses accepted messages, and the same checker says so (the same
    producer script; its handler sleeps 0.2 s a batch without a spool, so that the kill finds
    accepted messages in memory)."""
    db, dlq = tmp_path / "rows.db", tmp_path / "dlq.jsonl"
    rng = random.Random(7)
    proc = start("sqlite", str(db), "-", "10000000", str(dlq))
    acked = kill_after_progress(proc, rng)
    rows, attempts = sqlite_state(db) if db.exists() else (set(), 0)
    report = check(acked, rows, attempts, dead_ids(dlq))
    print(f"no spool: {report}")
    assert len(report.missing) > 0


def test_kill_9_ten_times_every_http_request_answered_202_is_stored(tmp_path: Path) -> None:
    """Clients POST NDJSON of 100 events; after 10 kills every event of a 202 reply is stored."""
    aiohttp = pytest.importorskip("aiohttp", reason="the HTTP source needs the server extra")
    db, dlq, spool = tmp_path / "rows.db", tmp_path / "dlq.jsonl", tmp_path / "spool"
    rng = random.Random(202)
    confirmed: list[int] = []
    answers: dict[int, int] = {}
    counter = iter(range(10**9))

    async def clients(port: int, seconds: float) -> None:
        url = f"http://127.0.0.1:{port}/events"
        deadline = time.monotonic() + seconds
        async with aiohttp.ClientSession() as http:

            async def client() -> None:
                while time.monotonic() < deadline:
                    ids = [next(counter) for _ in range(100)]
                    body = "\n".join(json.dumps({"id": i}) for i in ids).encode()
                    try:
                        async with http.post(url, data=body) as reply:
                            answers[reply.status] = answers.get(reply.status, 0) + 1
                            if reply.status == 202:
                                confirmed.extend(ids)
                    except aiohttp.ClientError:
                        return  # the server was killed under this request: not confirmed

            await asyncio.gather(*(client() for _ in range(8)))

    def serve() -> tuple[subprocess.Popen[bytes], int]:
        portfile = tmp_path / f"port-{uuid.uuid4().hex}"
        proc = start("http", str(db), str(spool), str(portfile), str(dlq))
        for _ in range(3000):
            if portfile.exists():
                return proc, int(portfile.read_text())
            if proc.poll() is not None:
                break
            time.sleep(0.01)
        raise AssertionError(proc.stderr.read().decode() if proc.stderr else "no port")

    for _ in range(KILLS):
        proc, port = serve()
        seconds = rng.uniform(0.3, 1.2)

        async def round_(
            proc: subprocess.Popen[bytes] = proc, port: int = port, seconds: float = seconds
        ) -> None:
            traffic = asyncio.ensure_future(clients(port, seconds + 2))
            await asyncio.sleep(seconds)
            proc.send_signal(signal.SIGKILL)
            await traffic

        asyncio.run(round_())
        proc.communicate(timeout=30)
    proc, port = serve()  # the last start replays what the spool holds
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-3000:]
    rows, attempts = sqlite_state(db)
    report = check(confirmed, rows, attempts, dead_ids(dlq))
    print(
        f"http: confirmed {report.acked:,}, missing {len(report.missing):,}, "
        f"duplicates {report.duplicates:,}; replies {answers}"
    )
    assert report.acked > 1000
    assert report.missing == [], str(report)
    assert report.wrong_letters == [], str(report)
