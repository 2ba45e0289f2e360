"""PostgresSink behind the real engine: poison rows end dead-lettered, every good row once."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from batchpunk import BatchConfig, BatchProcessor
from batchpunk.connectors.postgres import PostgresDataError, PostgresSink
from batchpunk.deadletter import MemoryDeadLetters
from tests.conftest import require_server

DSN = "postgresql://postgres@127.0.0.1:5432/test"

pytestmark = pytest.mark.integration


@pytest.fixture
async def pg() -> AsyncIterator[Any]:
    """An admin connection for creating, inspecting and dropping the test table."""
    require_server("postgres")
    import asyncpg

    conn = await asyncpg.connect(DSN)
    try:
        yield conn
    finally:
        await conn.close()


def poison(payload: dict[str, Any], kind: int) -> dict[str, Any]:
    """Spoil a payload in one of the ways a table refuses a row."""
    spoiled = dict(payload)
    if kind == 0:
        spoiled["n"] = "not-a-number"  # the driver cannot encode it (found by the probe)
    elif kind == 1:
        spoiled["body"] = None  # NOT NULL
    elif kind == 2:
        spoiled["tag"] = "far too long"  # varchar(3): the COPY names its line
    elif kind == 3:
        del spoiled["tag"]  # a payload without a column
    elif kind == 4:
        spoiled["n"] = -1  # CHECK (enforced in the stage table too)
    else:
        spoiled["ref"] = 404  # foreign key: the error names no row, the engine bisects
    return spoiled


@pytest.mark.parametrize("key", ["id", None], ids=["idempotent", "copy"])
async def test_ten_thousand_rows_with_seventeen_poison_rows(pg: Any, key: str | None) -> None:
    """Every good id lands exactly once and exactly the 17 poison ids are dead-lettered."""
    table = f"bp_pg_e2e_{uuid.uuid4().hex[:10]}"
    # The first three INSERT/COPY statements fail with a serialization failure (40001): the
    # engine must retry them without writing any row twice.
    await pg.execute(
        f"CREATE TABLE {table}_ref (id int PRIMARY KEY); INSERT INTO {table}_ref VALUES (1);"
        f"CREATE TABLE {table} (id int PRIMARY KEY, body text NOT NULL, n int CHECK (n >= 0), "
        f"tag varchar(3), ref int REFERENCES {table}_ref (id));"
        f"CREATE SEQUENCE {table}_calls;"
        f"CREATE FUNCTION {table}_flaky() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF nextval('{table}_calls') <= 3 THEN "
        "RAISE EXCEPTION 'provoked serialization failure' USING ERRCODE = '40001'; END IF; "
        "RETURN NULL; END $$;"
        f"CREATE TRIGGER {table}_flaky BEFORE INSERT ON {table} "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {table}_flaky()"
    )
    rng = random.Random(17)
    payloads = [
        {"id": i, "body": f"body-{i}", "n": i, "tag": "ok", "ref": 1} for i in range(10_000)
    ]
    poison_ids = sorted(rng.sample(range(10_000), 17))
    for kind, i in enumerate(poison_ids):
        payloads[i] = poison(payloads[i], kind % 6)
    columns = ("id", "body", "n", "tag", "ref")
    sink = PostgresSink(DSN, table, columns, idempotency_key=key, pool_max=4)
    letters = MemoryDeadLetters()
    config = BatchConfig(
        max_size=500,
        max_wait=0.05,
        max_concurrent_batches=4,
        max_retries=4,
        retry_delay=0.01,
        retry_max_delay=0.05,
    )
    try:
        async with BatchProcessor(config, sink.write, dead_letter=letters) as processor:
            for payload in payloads:
                await processor.add_message(payload)
        stats = await processor.get_stats()
    finally:
        await sink.close()
        found = await pg.fetch(f"SELECT id FROM {table}")
        await pg.execute(
            f"DROP TABLE {table}; DROP TABLE {table}_ref; DROP FUNCTION {table}_flaky(); "
            f"DROP SEQUENCE {table}_calls"
        )
    written = [r["id"] for r in found]
    assert len(written) == len(set(written)), "a row was written twice"
    assert sorted(written) == sorted(set(range(10_000)) - set(poison_ids))
    assert sorted(letter.message["id"] for letter in letters.letters) == poison_ids
    for letter in letters.letters:
        assert letter.reason == "failed"
        assert isinstance(letter.error, PostgresDataError)
        assert f"id={letter.message['id']}" in str(letter.error)
    # Each provoked serialization failure costs one retry (on the COPY path a row the driver
    # cannot encode may fail its COPY first and hide one of them), and nothing else retries.
    assert 1 <= stats["retries"] <= 3
    # Rows the sink can name are isolated inside write() (PartialFailure); only the foreign key
    # violations, which name no row, need the engine's bisection.
    assert stats["splits"] > 0
    assert stats["processed"] == 10_000 - 17
    assert stats["dead_lettered"] == 17
