"""Crashes, stops and broker restarts with real ``batchpunk run`` worker processes.

- kill -9 a random worker of three every 2 seconds (and restart it): nothing lost, no duplicate
  row, the dead letters are exactly the poison messages;
- the negative control: the same run with workers that acknowledge on receipt must make the
  same checker report losses (so a pass above means something);
- a crash between the database commit and the acknowledgement: the redelivered batch is
  written again and adds no row;
- SIGTERM under load: exit 0 within drain_timeout, every processed message acknowledged, every
  other one back on the broker for the next worker;
- RabbitMQ stopped and started under load: the workers reconnect and finish with nothing lost.

Sizes and durations scale with BATCHPUNK_E2E_SCALE (see tests/integration/_harness.py).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI, require_server
from tests.integration._harness import (
    BATCH,
    BROKERS,
    CRASH_EXIT,
    SCALE,
    OrdersTable,
    Place,
    Report,
    Worker,
    check,
    ensure_rabbitmq_running,
    kill_all,
    make_orders,
    port_open,
    read_records,
    run_command,
    scaled,
    stop_all,
    wait_broker_empty,
    wait_complete,
    wait_file,
    wait_port,
    wait_rows,
    write_pipeline_file,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HARNESS = "tests.integration._harness"
KILL_EVERY = 2.0
POISON = 17


def require(broker: str) -> None:
    require_server(broker)
    require_server("postgres")


class Scene:
    """One broker place, one table, one dead-letter file and a set of worker slots."""

    def __init__(self, broker: str, tmp_path: Path) -> None:
        self.broker = broker
        self.tmp_path = tmp_path
        self.place = Place(broker)
        self.table = OrdersTable()
        self.dead_letters = tmp_path / "dead-letters.jsonl"
        self.workers: list[Worker] = []

    async def __aenter__(self) -> Scene:
        await self.place.create()
        await self.table.create()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await kill_all(self.workers)
        await self.place.delete()
        await self.table.drop()

    def pipeline(
        self,
        name: str,
        *,
        source: dict[str, Any] | None = None,
        sink: dict[str, Any] | None = None,
        batch: dict[str, Any] | None = None,
    ) -> Path:
        return write_pipeline_file(
            self.tmp_path / f"{name}.toml",
            source=source or self.place.source_options(),
            sink=sink or self.table.sink_options(),
            batch={**BATCH, **(batch or {})},
            dead_letter_path=self.dead_letters,
        )

    def worker(self, pipeline: Path, name: str) -> Worker:
        worker = Worker(pipeline, self.tmp_path, name)
        self.workers.append(worker)
        return worker

    async def check(self, published: range, poison: frozenset[int]) -> Report:
        return await check(self.place, self.table, [self.dead_letters], published, poison)

    async def wait_complete(
        self, published: range, poison: frozenset[int], seconds: float
    ) -> Report:
        return await wait_complete(
            self.place,
            self.table,
            [self.dead_letters],
            published,
            poison,
            seconds=seconds,
            workers=[w for w in self.workers if w.running],  # the ones expected to keep running
        )

    def output(self) -> str:
        return "\n".join(w.output(1500) for w in self.workers)


async def chaos(workers: list[Worker], seconds: float, rng: random.Random) -> int:
    """Every KILL_EVERY seconds for ``seconds``, kill -9 a random worker and start it again.

    Returns the number of kills. A worker that exited on its own is an error: it is reported by
    the caller through ``exited_on_its_own`` before it would be restarted here.
    """
    kills = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() + KILL_EVERY <= deadline:
        await asyncio.sleep(KILL_EVERY)
        crashed = [w for w in workers if w.exited_on_its_own]
        assert not crashed, "worker(s) exited on their own:\n" + "\n".join(
            w.output() for w in crashed
        )
        victim = rng.choice(workers)
        await victim.restart()
        kills += 1
    return kills


async def crash_run(
    scene: Scene,
    *,
    messages: int,
    poison: int,
    seconds: float,
    pipeline: Path,
    prepublish: bool,
    drain_seconds: float,
    expect_loss: bool = False,
) -> tuple[Report, int, list[tuple[int | None, float]], frozenset[int]]:
    """Three workers on one pipeline file, a producer, and a kill -9 every 2 s for ``seconds``.

    After the chaos: every slot runs again, the workers drain (until every message is
    accounted for and the broker holds nothing, or ``drain_seconds``; with ``expect_loss``
    only until the broker holds nothing), then get SIGTERM, which drains what they still hold.
    Returns (final report, kills, exit codes, poison ids).
    """
    orders, poison_ids = make_orders(messages, poison, seed=messages)
    workers = [scene.worker(pipeline, f"worker-{i}") for i in range(3)]
    if prepublish:
        await scene.place.publish(orders)
    for worker in workers:
        await worker.start()
    producer = None
    if not prepublish:  # publishing during most of the chaos
        producer = asyncio.create_task(scene.place.publish_paced(orders, seconds * 0.8))
    kills = await chaos(workers, seconds, random.Random(messages))
    if producer is not None:
        await producer
    for worker in workers:
        if not worker.running:
            await worker.start()
    if expect_loss:
        await wait_broker_empty(scene.place, seconds=drain_seconds)
    else:
        await scene.wait_complete(range(messages), poison_ids, drain_seconds)
    for worker in workers:  # a worker restarted a moment ago may not handle SIGTERM yet
        assert await worker.wait_connected(scene.place.port, 30), worker.output()
    codes = await stop_all(workers, 60)
    report = await scene.check(range(messages), poison_ids)
    return report, kills, codes, poison_ids


CRASH_MESSAGES = scaled(25_000, minimum=2_000)
CRASH_SECONDS = max(6.0, min(20.0, 20.0 * SCALE))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("broker", BROKERS)
async def test_kill_9_every_two_seconds_loses_nothing_and_duplicates_nothing(
    broker: str, tmp_path: Path
) -> None:
    """Three workers, one killed -9 and restarted every 2 s while messages arrive: afterwards
    lost = 0, no duplicate row, dead letters = the poison messages, the broker holds nothing."""
    require(broker)
    async with Scene(broker, tmp_path) as scene:
        report, kills, codes, poison = await crash_run(
            scene,
            messages=CRASH_MESSAGES,
            poison=POISON,
            seconds=CRASH_SECONDS,
            pipeline=scene.pipeline("worker"),
            prepublish=False,
            drain_seconds=150,
        )
        detail = f"{report}\nkills={kills} exits={codes}\n{scene.output()}"
        assert kills >= CRASH_SECONDS // KILL_EVERY - 1, detail
        assert report.lost == set(), detail
        assert report.duplicated == 0, detail
        assert report.rows == CRASH_MESSAGES - POISON, detail
        assert report.dead_letter_ids == set(poison), detail
        assert report.wrongly_dead_lettered == set(), detail
        assert set(report.reasons) == {"failed"}, detail
        assert report.outstanding == 0, detail
        assert [code for code, _ in codes] == [0, 0, 0], detail


@pytest.mark.timeout(240)
@pytest.mark.parametrize("broker", BROKERS)
async def test_negative_control_workers_acking_before_the_write_make_the_checker_report_loss(
    broker: str, tmp_path: Path
) -> None:
    """The same kill -9 run with workers that ack on receipt (and a slow database, so that
    each holds acknowledged, unwritten messages) must make the checker report lost > 0."""
    require(broker)
    async with Scene(broker, tmp_path) as scene:
        source = scene.place.source_options()
        source["inner"] = source.pop("type")
        source["type"] = f"{HARNESS}:EarlyAckSource"
        # One batch of 500 a second per worker, at most 2,000 messages read ahead: the backlog
        # lasts through several kills, and every kill finds acknowledged, unwritten messages.
        sink = scene.table.sink_options(type=f"{HARNESS}:HarnessPostgresSink", delay=1.0)
        batch = {"max_concurrent_batches": 1, "max_pending": 2000}
        pipeline = scene.pipeline("early-ack", source=source, sink=sink, batch=batch)
        messages = scaled(12_000, minimum=4_000)
        report, kills, codes, _ = await crash_run(
            scene,
            messages=messages,
            poison=0,  # poison would only slow the bisection down, one second per write
            seconds=8.0,
            pipeline=pipeline,
            prepublish=True,
            drain_seconds=60,
            expect_loss=True,
        )
        detail = f"{report}\nkills={kills} exits={codes}\n{scene.output()}"
        assert kills >= 3, detail
        assert report.outstanding == 0, detail  # the broker believes everything was handled
        assert len(report.lost) > 0, "the checker failed to see the loss: " + detail
        assert report.duplicated == 0, detail


@pytest.mark.timeout(180)
@pytest.mark.parametrize("broker", BROKERS)
async def test_a_crash_between_the_commit_and_the_ack_adds_no_rows_on_redelivery(
    broker: str, tmp_path: Path
) -> None:
    """A worker dies right after its third batch committed, before acking it; a fresh worker
    gets that batch again, writes it again, and the table still holds each id exactly once."""
    require(broker)
    messages = scaled(3_000, minimum=1_000)
    orders, _ = make_orders(messages, 0)
    batch = {"max_size": 200, "max_concurrent_batches": 1, "max_wait": 0.1}
    async with Scene(broker, tmp_path) as scene:
        first_record, second_record = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
        crashing = scene.pipeline(
            "crashing",
            sink=scene.table.sink_options(
                type=f"{HARNESS}:HarnessPostgresSink",
                record_path=str(first_record),
                crash_after_writes=3,
            ),
            batch=batch,
        )
        healthy = scene.pipeline(
            "healthy",
            sink=scene.table.sink_options(
                type=f"{HARNESS}:HarnessPostgresSink", record_path=str(second_record)
            ),
            batch=batch,
        )
        await scene.place.publish(orders)
        first = scene.worker(crashing, "worker-0")
        await first.start()
        code = await first.wait(90)
        assert code == CRASH_EXIT, f"exit {code}\n{first.output()}"
        committed = read_records(first_record)
        assert len(committed) == 3, committed
        rows_after_crash = await scene.table.count()
        assert rows_after_crash == len({i for ids in committed for i in ids})
        unacked = set(committed[-1])  # committed, then the process died before any ack

        second = scene.worker(healthy, "worker-0")  # same slot: the Redis consumer name too
        await second.start()
        report = await scene.wait_complete(range(messages), frozenset(), 90)
        code, _ = await second.terminate(60)
        assert code == 0, f"exit {code}\n{second.output()}"
        report = await scene.check(range(messages), frozenset())
        rewritten = {i for ids in read_records(second_record) for i in ids}
        detail = f"{report}\nunacked={len(unacked)} rewritten={len(rewritten)}"
        assert unacked <= rewritten, "the unacknowledged batch was not redelivered: " + detail
        assert report.lost == set(), detail
        assert report.rows == report.distinct == messages, detail
        assert report.duplicated == 0, detail
        assert report.outstanding == 0, detail


@pytest.mark.timeout(180)
@pytest.mark.parametrize("broker", BROKERS)
async def test_sigterm_under_load_exits_0_within_drain_timeout_with_every_processed_message_acked(
    broker: str, tmp_path: Path
) -> None:
    """SIGTERM while batches are being written and a backlog waits: exit 0 within
    drain_timeout; the broker then holds exactly the messages not processed (none processed
    and left unacknowledged), and a new worker finishes them with nothing lost."""
    require(broker)
    drain_timeout = 10.0
    messages = scaled(15_000, minimum=3_000)
    orders, poison = make_orders(messages, 0)
    async with Scene(broker, tmp_path) as scene:
        # A database taking 0.5 s per batch: whatever the broker's speed, a backlog remains and
        # batches are in flight when the signal comes.
        slow = scene.pipeline(
            "slow",
            sink=scene.table.sink_options(type=f"{HARNESS}:HarnessPostgresSink", delay=0.5),
            batch={"drain_timeout": drain_timeout},
        )
        await scene.place.publish(orders)
        worker = scene.worker(slow, "worker-0")
        await worker.start()
        rows = await wait_rows(scene.table, messages // 5, seconds=90)
        assert rows >= messages // 5, worker.output()
        code, took = await worker.terminate(drain_timeout + 20)
        assert code == 0, f"exit {code}\n{worker.output()}"
        assert took < drain_timeout, f"took {took:.1f}s\n{worker.output()}"

        stopped = await scene.check(range(messages), poison)
        detail = f"{stopped}\n{worker.output()}"
        assert stopped.lost, "the backlog was gone before SIGTERM; nothing was under load"
        assert stopped.rows > rows, "no batch was in flight at SIGTERM: " + detail
        # Processed messages were all acknowledged; the others are all back on the broker.
        assert stopped.outstanding == len(stopped.lost), detail
        if broker == "rabbitmq":
            assert stopped.unacknowledged == 0, detail
        assert stopped.duplicated == 0, detail
        assert stopped.dead_letters == 0, detail  # drained in time: nothing dead-lettered

        pipeline = scene.pipeline("worker")
        again = scene.worker(pipeline, "worker-0")
        await again.start()
        report = await scene.wait_complete(range(messages), poison, 120)
        code, _ = await again.terminate(60)
        assert code == 0, again.output()
        report = await scene.check(range(messages), poison)
        assert report.lost == set(), str(report)
        assert report.rows == report.distinct == messages, str(report)
        assert report.dead_letters == 0, str(report)
        assert report.outstanding == 0, str(report)


@pytest.mark.timeout(60)
async def test_sigterm_while_the_worker_is_still_connecting_exits_0(tmp_path: Path) -> None:
    """A SIGTERM that arrives while the pipeline's prepare hooks still connect is a graceful
    stop (exit 0), not the default action that kills the process (exit -15)."""
    marker = tmp_path / "preparing"
    pipeline = write_pipeline_file(
        tmp_path / "slow-start.toml",
        source={"type": f"{HARNESS}:SlowStartSource", "marker": str(marker), "seconds": 3.0},
        sink={"type": "jsonl", "path": str(tmp_path / "out.jsonl")},
        batch={"max_wait": 0.1, "drain_timeout": 5.0},
        dead_letter_path=tmp_path / "dead-letters.jsonl",
    )
    worker = Worker(pipeline, tmp_path, "worker-0")
    await worker.start()
    try:
        assert await wait_file(marker, 30), worker.output()
        code, took = await worker.terminate(20)
        assert code == 0, f"exit {code} after {took:.1f}s\n{worker.output()}"
        assert "SIGTERM" in worker.output(), worker.output()
    finally:
        await kill_all([worker])


@pytest.mark.timeout(300)
@pytest.mark.exclusive  # stops the shared RabbitMQ: every other test waits
async def test_rabbitmq_restart_under_load_workers_reconnect_and_lose_nothing(
    tmp_path: Path,
) -> None:
    """rabbitmqctl stop_app / start_app while two workers consume a backlog: they reconnect
    and finish with lost = 0, no duplicate row, nothing dead-lettered."""
    require("rabbitmq")
    if shutil.which("rabbitmqctl") is None:
        message = "rabbitmqctl is not installed: cannot restart RabbitMQ"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    messages = scaled(20_000, minimum=3_000)
    orders, poison = make_orders(messages, 0)  # bisection at 1 s a write is too slow
    try:
        async with Scene("rabbitmq", tmp_path) as scene:
            # A database taking 1 s per batch keeps a backlog through the restart, whatever
            # the broker's speed.
            pipeline = scene.pipeline(
                "worker",
                sink=scene.table.sink_options(type=f"{HARNESS}:HarnessPostgresSink", delay=1.0),
            )
            await scene.place.publish(orders)
            workers = [scene.worker(pipeline, f"worker-{i}") for i in range(2)]
            for worker in workers:
                await worker.start()
            rows = await wait_rows(scene.table, messages // 10, seconds=90)
            assert rows >= messages // 10, scene.output()
            assert rows < messages, "the backlog was gone before the restart"

            code, output = await run_command("rabbitmqctl", "stop_app", seconds=60)
            assert code == 0, output
            await asyncio.sleep(2.0)
            assert not port_open(5672), "RabbitMQ still accepts connections after stop_app"
            code, output = await run_command("rabbitmqctl", "start_app", seconds=90)
            assert code == 0, output
            assert await wait_port(5672, 60), "RabbitMQ did not come back on 5672"

            report = await scene.wait_complete(range(messages), poison, 150)
            codes = await stop_all(workers, 60)
            report = await scene.check(range(messages), poison)
            detail = f"{report}\nexits={codes}\n{scene.output()}"
            assert report.lost == set(), detail
            assert report.duplicated == 0, detail
            assert report.rows == report.distinct == messages, detail
            assert report.dead_letters == 0, detail
            assert report.outstanding == 0, detail
            assert [code for code, _ in codes] == [0, 0], detail
            logs = [w.output(last=10**7) for w in workers]
            assert any("Reconnecting" in log or "redelivers them" in log for log in logs), detail
    finally:
        await ensure_rabbitmq_running()
