"""End to end, for each broker: 100,000 messages with 17 poison ones through ``batchpunk run``
into PostgreSQL with an idempotency key; every good id lands once, the poison ids are
dead-lettered, and the broker is left holding nothing.

Sizes scale with BATCHPUNK_E2E_SCALE (see tests/integration/_harness.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import require_server
from tests.integration._harness import (
    BATCH,
    BROKERS,
    OrdersTable,
    Place,
    Worker,
    check,
    kill_all,
    make_orders,
    scaled,
    wait_complete,
    write_pipeline_file,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MESSAGES = scaled(100_000, minimum=1_000)
POISON = 17


@pytest.mark.timeout(420)
@pytest.mark.parametrize("broker", BROKERS)
async def test_every_good_message_lands_once_and_every_poison_one_is_dead_lettered(
    broker: str, tmp_path: Path
) -> None:
    """100,000 messages (17 poison) -> batchpunk run -> PostgreSQL: rows = the good ids, each
    once; dead letters = exactly the 17 poison ids; nothing unacknowledged or pending."""
    require_server(broker)
    require_server("postgres")
    orders, poison = make_orders(MESSAGES, POISON)
    place, table = Place(broker), OrdersTable()
    dead_letters = tmp_path / "dead-letters.jsonl"
    await place.create()
    await table.create()
    worker = Worker(
        write_pipeline_file(
            tmp_path / "pipeline.toml",
            source=place.source_options(),
            sink=table.sink_options(),
            batch=BATCH,
            dead_letter_path=dead_letters,
        ),
        tmp_path,
        "worker-0",
    )
    try:
        await worker.start()
        began = time.monotonic()
        await place.publish(orders)  # while the worker already consumes
        report = await wait_complete(
            place, table, [dead_letters], range(MESSAGES), poison, seconds=300, workers=[worker]
        )
        elapsed = time.monotonic() - began
        assert report.complete, f"not complete after {elapsed:.0f}s: {report}\n{worker.output()}"
        code, took = await worker.terminate(60)
        assert code == 0, f"exit {code} after SIGTERM ({took:.1f}s)\n{worker.output()}"

        final = await check(place, table, [dead_letters], range(MESSAGES), poison)
        assert final.lost == set(), str(final)
        assert final.rows == final.distinct == MESSAGES - POISON, str(final)
        assert final.duplicated == 0
        assert final.poison_in_table == set()
        assert final.dead_letter_ids == set(poison), str(final)
        assert final.dead_letters == POISON, str(final)
        assert dict(final.reasons) == {"failed": POISON}
        assert final.wrongly_dead_lettered == set()
        assert (final.outstanding, final.unacknowledged) == (0, 0), str(final)
        # The command's own summary agrees with the checker.
        assert f"{MESSAGES - POISON:,}" in worker.output(), worker.output()
    finally:
        await kill_all([worker])
        await place.delete()
        await table.drop()
