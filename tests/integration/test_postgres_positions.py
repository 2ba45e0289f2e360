"""PostgresSink ``positions``: rows and written offsets commit together, so a redelivered
batch adds no row to a table without any unique key, and the source can resume after them."""

from __future__ import annotations

from typing import Any

import pytest

from batchpunk.connectors.postgres import PostgresSink
from batchpunk.envelope import Envelope
from batchpunk.errors import ConfigError
from tests.conftest import require_server
from tests.integration._harness import PG_DSN, _pg, unique

pytestmark = pytest.mark.integration


def envelope(i: int, partition: int = 0, topic: str = "orders") -> Envelope:
    headers: Any = {"topic": topic, "partition": partition, "offset": i}
    return Envelope({"id": i, "body": f"b{i}"}, headers=headers)


async def test_a_redelivered_batch_adds_no_rows_and_load_positions_returns_written_ranges() -> None:
    """Offsets 0-9 then 5-14 (5-9 redelivered) into an append-only table: 15 rows, each once;
    load_positions gives the range 0-14, and a floor of 10 forgets what lies below it."""
    require_server("postgres")
    table = unique("pos_rows_")
    positions = f"{table}_positions"
    conn = await _pg()
    await conn.execute(f"CREATE TABLE {table} (id bigint NOT NULL, body text)")
    sink = PostgresSink(PG_DSN, table, ("id", "body"), positions=positions)
    try:
        await sink.write_envelopes([envelope(i) for i in range(10)])
        await sink.write_envelopes([envelope(i) for i in range(5, 15)])
        await sink.write_envelopes([envelope(3, partition=1)])
        ids = [r[0] for r in await conn.fetch(f"SELECT id FROM {table} ORDER BY id")]
        assert ids == sorted([*range(15), 3])  # 3 of partition 1 is another message
        ranges = await sink.load_positions("orders", {0: 0, 1: 0})
        assert ranges == {0: [(0, 9), (10, 14)], 1: [(3, 3)]}
        assert await sink.load_positions("orders", {0: 10}) == {0: [(10, 14)]}
        assert await sink.load_positions("other", {0: 0}) == {}
    finally:
        await sink.close()
        await conn.execute(f"DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {positions}")
        await conn.close()


def test_a_positions_name_that_is_not_an_identifier_is_refused() -> None:
    """positions must be a plain table name (it is put into SQL)."""
    with pytest.raises(ConfigError, match="positions"):
        PostgresSink(PG_DSN, "t", ("id",), positions="t; drop table x")
