"""PostgreSQL stopped for 30 s under load: an outage is waited out, never dead-lettered.

For each broker (RabbitMQ, Redis Streams, NATS) one ``batchpunk run`` worker writes to PostgreSQL
with the examples' settings while orders keep arriving; the database is stopped (``pg_ctl stop -m
fast``) for OUTAGE_SECONDS and started again. Then: 0 lost, 0 duplicated rows, 0 good messages
dead-lettered, every poison message dead-lettered, /readyz 503 during the outage and 200 after.
A fourth worker runs the policy before issue 13 (``unavailable_on = []``: nothing is an outage) in
the same outage: the negative control, which the same checker must catch dead-lettering good
messages. The three brokers and the control share one outage, so the test costs one outage.

The database is a private cluster (initdb in a temporary directory, its own port): the shared
server on 5432 is never stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from batchpunk.connectors.postgres import PostgresSink, PostgresSinkError
from tests.conftest import IN_CI, require_server
from tests.integration import _harness
from tests.integration._harness import (
    BROKERS,
    OrdersTable,
    Place,
    Report,
    Worker,
    check,
    kill_all,
    make_orders,
    scaled,
    stop_all,
    wait_complete,
    wait_rows,
    write_pipeline_file,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE_SECONDS = float(os.environ.get("BATCHPUNK_OUTAGE_SECONDS", "30"))
MESSAGES = scaled(8_000, minimum=2_000)
POISON = 6

#: The [batch] section of examples/*-to-postgres.toml (the circuit breaker is the pipelines'
#: default, threshold 5, cooldown 5 s).
EXAMPLE_BATCH: dict[str, Any] = {
    "max_size": 500,
    "max_wait": 0.5,
    "max_concurrent_batches": 4,
    "max_retries": 3,
    "retry_delay": 0.5,
    "drain_timeout": 30.0,
}


class Unmarked(Exception):
    """A PostgreSQL outage error with its outage mark removed, as before issue 13."""


class OldPolicyPostgresSink(PostgresSink):
    """The negative control's sink: an outage looks like any other error (the old policy)."""

    async def write(self, batch: Any) -> Any:
        try:
            return await super().write(batch)
        except PostgresSinkError as exc:
            if getattr(exc, "unavailable", False):
                raise Unmarked(str(exc)) from None
            raise


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _postgres_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    if found:
        return Path(found[0]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


class PrivatePostgres:
    """A throwaway PostgreSQL cluster on its own port, owned by the ``postgres`` user."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="batchpunk-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        command = [str(self.bindir / argv[0]), *argv[1:]]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_postgres(monkeypatch: pytest.MonkeyPatch) -> Iterator[PrivatePostgres]:
    """A private cluster the test may stop; the harness's tables and sinks point at it."""
    bindir = _postgres_bindir()
    if bindir is None or not (bindir / "initdb").exists():
        message = "PostgreSQL server binaries (initdb, pg_ctl) are not installed"
        if IN_CI:
            pytest.fail(f"{message}, and CI=true requires them")
        pytest.skip(message)
    server = PrivatePostgres(bindir)
    try:
        server.init()
        server.start()
        monkeypatch.setattr(_harness, "PG_DSN", server.dsn)
        yield server
    finally:
        server.destroy()


@dataclass
class Run:
    """One worker, its place and table, and what it showed during the outage."""

    name: str
    place: Place
    table: OrdersTable
    tmp: Path
    port: int = field(default_factory=_free_port)
    batch: dict[str, Any] = field(default_factory=dict)
    sink: dict[str, Any] = field(default_factory=dict)
    worker: Worker | None = None
    readyz_during: set[int] = field(default_factory=set)
    readyz_after: int | None = None
    held_max: int = 0
    probes: int = 0
    outages: int = 0
    drained_after: float | None = None
    report: Report | None = None
    #: Envelopes the worker read: more than published means the broker redelivered some.
    read: int | None = None
    #: (seconds since the outage began, calls, held, probes, circuit, readyz) per poll.
    timeline: list[tuple[float, int, int, int, str, int]] = field(default_factory=list)

    @property
    def dead_letters(self) -> Path:
        return self.tmp / f"{self.name}.dead-letters.jsonl"

    def pipeline_file(self) -> Path:
        path = write_pipeline_file(
            self.tmp / f"{self.name}.toml",
            source=self.place.source_options(),
            sink=self.table.sink_options(**self.sink),
            batch={**EXAMPLE_BATCH, **self.batch},
            dead_letter_path=self.dead_letters,
        )
        text = path.read_text().replace(
            "[metrics]\nlive = false\n", f"[metrics]\nlive = false\nprometheus_port = {self.port}\n"
        )
        path.write_text(text)
        return path

    async def get(self, route: str) -> tuple[int, Any]:
        """GET a route of the worker's metrics server: (status, parsed JSON or None)."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 5)
        try:
            writer.write(f"GET {route} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            raw = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        with contextlib.suppress(ValueError):
            return status, json.loads(body)
        return status, None

    async def watch(self, until: asyncio.Event, began: float, *, extra: float = 0.0) -> None:
        """Poll /readyz and /stats every 0.5 s until ``extra`` seconds after ``until`` is set."""
        over: float | None = None
        while over is None or time.monotonic() < over + extra:
            if over is None and until.is_set():
                over = time.monotonic()
            with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
                status, _ = await self.get("/readyz")
                _, stats = await self.get("/stats")
                stats = stats or {}
                downstream = stats.get("downstream") or {}
                held = int(downstream.get("held") or 0)
                if over is None:
                    self.readyz_during.add(status)
                    self.held_max = max(self.held_max, held)
                    self.probes = max(self.probes, int(downstream.get("probes") or 0))
                self.outages = int(downstream.get("outages") or 0)
                self.timeline.append(
                    (
                        time.monotonic() - began,
                        int(stats.get("calls") or 0),
                        held,
                        int(downstream.get("probes") or 0),
                        str(stats.get("circuit")),
                        status,
                    )
                )
            await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def _runs(tmp_path: Path) -> AsyncIterator[list[Run]]:
    runs = [Run(broker, Place(broker), OrdersTable(), tmp_path) for broker in BROKERS]
    # The negative control: the policy before issue 13, where nothing is an outage.
    runs.append(
        Run(
            "control",
            Place("rabbitmq"),
            OrdersTable(),
            tmp_path,
            batch={"circuit_breaker_threshold": 0},
            sink={"type": f"{__name__}:OldPolicyPostgresSink"},
        )
    )
    try:
        for run in runs:
            await run.place.create()
            await run.table.create()
        yield runs
    finally:
        await kill_all([r.worker for r in runs if r.worker is not None])
        for run in runs:
            await run.place.delete()
            with contextlib.suppress(Exception):
                await run.table.drop()


@pytest.mark.timeout(420)
async def test_postgres_stopped_30s_under_load_loses_nothing_and_dead_letters_only_poison(
    private_postgres: PrivatePostgres, tmp_path: Path
) -> None:
    """Every broker -> PostgreSQL rides out a 30 s outage: nothing lost or duplicated, only the
    poison dead-lettered, /readyz 503 then 200; the old policy's control dead-letters good ones."""
    for name in BROKERS:
        require_server(name)
    orders, poison = make_orders(MESSAGES, POISON, seed=13)
    first, rest = orders[: MESSAGES // 4], orders[MESSAGES // 4 :]
    async with _runs(tmp_path) as runs:
        for run in runs:
            run.worker = Worker(run.pipeline_file(), tmp_path, run.name)
            await run.worker.start()
        await asyncio.gather(*(run.place.publish(first) for run in runs))
        for run in runs:
            rows = await wait_rows(run.table, len(first) // 2, seconds=90)
            assert rows >= len(first) // 2, run.worker.output() if run.worker else ""

        # Under load: the rest arrives during the outage and just after it.
        producers = [
            asyncio.create_task(run.place.publish_paced(rest, OUTAGE_SECONDS * 1.2)) for run in runs
        ]
        outage_over = asyncio.Event()
        stopped_at = time.monotonic()
        watchers = [
            asyncio.create_task(run.watch(outage_over, stopped_at, extra=10.0)) for run in runs
        ]
        private_postgres.stop()
        await asyncio.sleep(OUTAGE_SECONDS)
        private_postgres.start()
        restarted = time.monotonic()
        outage_over.set()
        await asyncio.gather(*producers, *watchers)

        async def finish(run: Run) -> None:
            assert run.worker is not None
            run.report = await wait_complete(
                run.place,
                run.table,
                [run.dead_letters],
                range(MESSAGES),
                poison,
                seconds=150,
                workers=[run.worker],
            )
            run.drained_after = time.monotonic() - restarted
            status, _ = await run.get("/readyz")
            run.readyz_after = status
            _, stats = await run.get("/stats")
            run.read = int(((stats or {}).get("pipeline") or {}).get("read") or 0)

        await asyncio.gather(*(finish(run) for run in runs))
        codes = await stop_all([r.worker for r in runs if r.worker is not None], 60)
        for run in runs:
            run.report = await check(
                run.place, run.table, [run.dead_letters], range(MESSAGES), poison
            )

    figures = [
        f"{r.name}: outage {restarted - stopped_at:.1f} s, held up to {r.held_max} messages, "
        f"{r.probes} probe call(s), drained {r.drained_after:.1f} s after the restart, "
        f"/readyz during {sorted(r.readyz_during)} after {r.readyz_after}, read {r.read}; "
        f"{r.report}"
        for r in runs
    ]
    print("\n" + "\n".join(figures))
    print("timeline (rabbitmq): seconds since the stop, calls, held, probes, circuit, /readyz")
    for at, calls, held, probes, circuit, ready in runs[0].timeline:
        print(f"  {at:6.1f} {calls:6d} {held:6d} {probes:4d} {circuit:<9} {ready}")
    for run, (code, _) in zip(runs, codes, strict=True):
        report = run.report
        assert report is not None
        detail = f"{run.name}: {report}\n" + (run.worker.output() if run.worker else "")
        assert code == 0, detail
        assert report.lost == set(), detail
        assert report.duplicated == 0, detail
        assert report.poison_in_table == set(), detail
        if run.name == "control":
            # The checker sees the old policy's failure: good messages dead-lettered.
            assert report.wrongly_dead_lettered, detail
            continue
        assert report.wrongly_dead_lettered == set(), detail
        assert report.dead_letter_ids == set(poison), detail
        assert report.outstanding == 0, detail
        assert 503 in run.readyz_during, detail
        assert run.readyz_after == 200, detail
        assert run.outages >= 1, detail
        # Held messages were not redelivered meanwhile (NATS: in_progress kept them alive).
        assert run.read == MESSAGES, detail
