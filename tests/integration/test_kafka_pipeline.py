"""Kafka end to end with real ``batchpunk run`` workers against the Tansu test broker.

- poison messages: every good id lands once, the dead letters are exactly the poison, and the
  group's committed offsets reach the end of every partition;
- three workers on one group, one killed -9 every 2 s: nothing lost, duplicates absorbed by the
  idempotent sink; with ``positions`` on a table without any unique key, duplicates 0;
- the negative control: a worker committing on receipt, killed -9, makes the checker report loss.

Sizes scale with BATCHPUNK_E2E_SCALE (see tests/integration/_harness.py).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_server
from tests.integration._harness import make_orders, scaled, wait_broker_empty, wait_rows
from tests.integration._kafka_sqs import AppendOnlyOrdersTable, new_kafka_place
from tests.integration.test_crash import HARNESS, Scene, crash_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MESSAGES = scaled(100_000, minimum=1_000)
CRASH_MESSAGES = scaled(10_000, minimum=2_000)
CRASH_SECONDS = 16.0
POISON = 17


def require() -> None:
    require_server("kafka")
    require_server("postgres")


class KafkaScene(Scene):
    """test_crash's Scene on a fresh Kafka topic (3 partitions) and group."""

    def __init__(self, tmp_path: Path, *, append_only: bool = False) -> None:
        super().__init__("kafka", tmp_path)
        self.place = new_kafka_place()
        if append_only:
            self.table = AppendOnlyOrdersTable()


@pytest.mark.timeout(300)
async def test_kafka_every_good_message_lands_once_and_every_poison_one_is_dead_lettered(
    tmp_path: Path,
) -> None:
    """100,000 messages (17 poison) on 3 partitions -> batchpunk run -> PostgreSQL: rows = the
    good ids, each once; dead letters = exactly the poison; every partition committed to its end."""
    require()
    async with KafkaScene(tmp_path) as scene:
        orders, poison = make_orders(MESSAGES, POISON)
        worker = scene.worker(scene.pipeline("worker"), "worker-0")
        await worker.start()
        began = time.monotonic()
        await scene.place.publish(orders)
        report = await scene.wait_complete(range(MESSAGES), poison, 240)
        elapsed = time.monotonic() - began
        assert report.complete, f"not complete after {elapsed:.0f}s: {report}\n{worker.output()}"
        code, took = await worker.terminate(60)
        assert code == 0, f"exit {code} after SIGTERM ({took:.1f}s)\n{worker.output()}"
        final = await scene.check(range(MESSAGES), poison)
        assert final.lost == set(), str(final)
        assert final.rows == final.distinct == MESSAGES - POISON, str(final)
        assert final.dead_letter_ids == set(poison), str(final)
        assert final.dead_letters == POISON, str(final)
        assert dict(final.reasons) == {"failed": POISON}
        assert (final.outstanding, final.unacknowledged) == (0, 0), str(final)


@pytest.mark.timeout(300)
async def test_kafka_kill_9_every_two_seconds_loses_nothing_and_duplicates_are_absorbed(
    tmp_path: Path,
) -> None:
    """Three workers on one group, one killed -9 and restarted every 2 s while messages
    arrive: lost = 0, no duplicate row (idempotent sink), dead letters = the poison, every
    partition committed to its end."""
    require()
    async with KafkaScene(tmp_path) as scene:
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
        assert kills >= CRASH_SECONDS // 2 - 1, detail
        assert report.lost == set(), detail
        assert report.duplicated == 0, detail
        assert report.rows == CRASH_MESSAGES - POISON, detail
        assert report.dead_letter_ids == set(poison), detail
        assert report.wrongly_dead_lettered == set(), detail
        assert report.outstanding == 0, detail
        assert [code for code, _ in codes] == [0, 0, 0], detail


@pytest.mark.timeout(300)
async def test_kafka_kill_9_with_positions_on_an_append_only_table_writes_each_message_once(
    tmp_path: Path,
) -> None:
    """The same kill -9 run into a table WITHOUT any unique key, with PostgresSink's
    ``positions``: lost = 0 and duplicates = 0, because the written offsets commit with the
    rows and a redelivered message is skipped (effectively once)."""
    require()
    async with KafkaScene(tmp_path, append_only=True) as scene:
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
        assert kills >= CRASH_SECONDS // 2 - 1, detail
        assert report.lost == set(), detail
        assert report.duplicated == 0, detail
        assert report.rows == report.distinct == CRASH_MESSAGES - POISON, detail
        assert report.dead_letter_ids == set(poison), detail
        assert report.outstanding == 0, detail
        assert [code for code, _ in codes] == [0, 0, 0], detail


@pytest.mark.timeout(240)
async def test_kafka_negative_control_commit_on_receipt_makes_the_checker_report_loss(
    tmp_path: Path,
) -> None:
    """A worker that acknowledges (commits) on receipt, with a slow database, killed -9 while
    it holds committed, unwritten messages: the next worker starts after them, and the checker
    reports lost > 0 (so the crash tests above can see a loss)."""
    require()
    async with KafkaScene(tmp_path) as scene:
        source: dict[str, Any] = scene.place.source_options()
        source["inner"] = source.pop("type")
        source["type"] = f"{HARNESS}:EarlyAckSource"
        sink = scene.table.sink_options(type=f"{HARNESS}:HarnessPostgresSink", delay=1.0)
        batch = {"max_concurrent_batches": 1, "max_pending": 2000}
        early = scene.pipeline("early-ack", source=source, sink=sink, batch=batch)
        messages = scaled(6_000, minimum=4_000)
        orders, _ = make_orders(messages, 0)
        await scene.place.publish(orders)
        first = scene.worker(early, "worker-0")
        await first.start()
        # One batch of 500 a second: once 500 rows are in, ~2,000 more are committed, unwritten.
        assert await wait_rows(scene.table, 500, seconds=90) >= 500, first.output()
        await asyncio.sleep(1.0)  # the commit interval passed: what it acked is committed
        await first.kill()
        second = scene.worker(scene.pipeline("worker"), "worker-1")
        await second.start()
        await wait_broker_empty(scene.place, seconds=120)
        code, _ = await second.terminate(60)
        report = await scene.check(range(messages), frozenset())
        detail = f"{report}\nexit={code}\n{scene.output()}"
        assert report.outstanding == 0, detail  # Kafka believes everything was handled
        assert len(report.lost) > 0, "the checker failed to see the loss: " + detail
