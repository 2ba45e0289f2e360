"""PostgresSink ``positions``: rows and written offsets commit together, so a redelivered
batch adds no row to a table without any unique key, and the source can resume after them."""

from __future__ import annotations

from typing import Any

import pytest

from batchpunk.connectors.postgres import PostgresDataError, PostgresSink
from batchpunk.envelope import Envelope
from batchpunk.errors import ConfigError
from tests.conftest import require_server
from tests.integration._harness import PG_DSN, _pg, unique

pytestmark = pytest.mark.integration


def envelope(i: int, partition: int = 0, topic: str = "orders") -> Envelope:
    headers: Any = {"topic": topic, "partition": partition, "offset": i}
    return Envelope({"id": i, "body": f"b{i}"}, headers=headers)


def envelope_of(offset: int, payload: Any) -> Envelope:
    """``payload`` at ``offset`` of partition 0 of "orders"."""
    headers: Any = {"topic": "orders", "partition": 0, "offset": offset}
    return Envelope(payload, headers=headers)


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


async def _refused_table() -> tuple[str, Any]:
    """A fresh table whose columns can refuse a value: NOT NULL, integer, varchar(5), int[]."""
    require_server("postgres")
    table = unique("pos_refused_")
    conn = await _pg()
    await conn.execute(
        f"CREATE TABLE {table} (id bigint PRIMARY KEY, amount integer NOT NULL,"
        " note varchar(5), tags integer[])"
    )
    return table, conn


async def _drop(table: str, conn: Any) -> None:
    await conn.execute(f"DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_positions")
    await conn.close()


async def test_positions_with_a_key_write_rows_the_unnest_insert_refuses() -> None:
    """The unnest INSERT refuses an integer[] column and the staged COPY takes over. With
    positions that INSERT ran in the positions transaction, so its failure aborted it and
    every batch of such a table failed, non-retryably, with 25P02 (dead-lettered though no
    row was bad): it now runs in a savepoint and both rows are written, as write() does."""
    table, conn = await _refused_table()
    rows = [{"id": 1, "amount": 1, "tags": [1, 2]}, {"id": 2, "amount": 2, "tags": [3]}]
    sink = PostgresSink(
        PG_DSN,
        table,
        ("id", "amount", "tags"),
        idempotency_key="id",
        positions=f"{table}_positions",
    )
    try:
        await sink.write_envelopes([envelope_of(i, row) for i, row in enumerate(rows)])
        found = await conn.fetch(f"SELECT id, tags FROM {table} ORDER BY id")
        assert [(r["id"], r["tags"]) for r in found] == [(1, [1, 2]), (2, [3])]
        assert await sink.load_positions("orders", {0: 0}) == {0: [(0, 1)]}
    finally:
        await sink.close()
        await _drop(table, conn)


@pytest.mark.parametrize("key", [None, "id"], ids=["copy", "idempotency_key"])
@pytest.mark.parametrize(
    ("payload", "column"),
    [
        ({"id": 1, "amount": "abc", "note": "a"}, "amount"),  # asyncpg cannot encode it
        ({"id": 1, "amount": 2**40, "note": "a"}, "amount"),  # out of integer's range
        ({"id": 1, "amount": None, "note": "a"}, "amount"),  # NULL into NOT NULL
        ({"id": 1, "amount": 1, "note": "far too long"}, "note"),  # varchar(5)
    ],
    ids=["wrong-type", "out-of-range", "null", "too-long"],
)
async def test_positions_a_refused_row_alone_fails_with_the_error_write_gives_it(
    key: str | None, payload: dict[str, Any], column: str
) -> None:
    """A batch with positions fails whole on a refused row and the engine bisects down to it;
    that row's dead letter must say what to fix, as write()'s error does: a PostgresDataError
    naming the column. It named none (the failure was translated as a whole, or with a key the
    fallback ran in the aborted transaction and gave 25P02); now write()'s locating is used."""
    table, conn = await _refused_table()
    columns = ("id", "amount", "note")
    plain = PostgresSink(PG_DSN, table, columns, idempotency_key=key)
    sink = PostgresSink(PG_DSN, table, columns, idempotency_key=key, positions=f"{table}_positions")
    try:
        with pytest.raises(PostgresDataError) as expected:
            await plain.write([payload])
        with pytest.raises(PostgresDataError) as raised:
            await sink.write_envelopes([envelope_of(0, payload)])
        assert (raised.value.column, raised.value.index) == (column, 0)
        assert str(raised.value) == str(expected.value)
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0
        assert await sink.load_positions("orders", {0: 0}) == {}
    finally:
        await plain.close()
        await sink.close()
        await _drop(table, conn)


def test_a_positions_name_that_is_not_an_identifier_is_refused() -> None:
    """positions must be a plain table name (it is put into SQL)."""
    with pytest.raises(ConfigError, match="positions"):
        PostgresSink(PG_DSN, "t", ("id",), positions="t; drop table x")
