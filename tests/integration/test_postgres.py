"""PostgresSink against the real PostgreSQL on 127.0.0.1:5432 (trust auth, database ``test``)."""

from __future__ import annotations

import ssl
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from batchpunk.connectors.postgres import (
    PostgresDataError,
    PostgresRetryable,
    PostgresSink,
    PostgresSinkError,
    mask_dsn,
)
from batchpunk.errors import BatchpunkError, ConfigError, PartialFailure
from tests.conftest import require_server
from tests.engine_support import ListSource

DSN = "postgresql://postgres@127.0.0.1:5432/test"

pytestmark = pytest.mark.integration


def rows(start: int, count: int) -> list[dict[str, Any]]:
    return [{"id": i, "body": f"body-{i}"} for i in range(start, start + count)]


@pytest.fixture
async def pg() -> AsyncIterator[Any]:
    """An admin connection for creating, inspecting and dropping test tables."""
    require_server("postgres")
    import asyncpg

    conn = await asyncpg.connect(DSN)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def table(pg: Any) -> AsyncIterator[str]:
    """A fresh table (id int primary key, body text not null, n int, ...) dropped afterwards."""
    name = f"bp_pg_{uuid.uuid4().hex[:10]}"
    await pg.execute(
        f"CREATE TABLE {name} (id int PRIMARY KEY, body text NOT NULL, n int CHECK (n >= 0), "
        "tag varchar(3), created timestamptz NOT NULL DEFAULT now())"
    )
    try:
        yield name
    finally:
        await pg.execute(f"DROP TABLE IF EXISTS {name}")
        await pg.execute(f"DROP FUNCTION IF EXISTS {name}_raise() CASCADE")


async def ids(pg: Any, table: str) -> list[int]:
    return [r["id"] for r in await pg.fetch(f"SELECT id FROM {table} ORDER BY id")]


# -- configuration (no server needed) --------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({}, "exactly one of columns"),
        ({"columns": ("id",), "mapping": lambda p: p}, "exactly one of columns"),
        ({"columns": "id"}, "columns"),
        ({"columns": ("id", "id")}, "duplicate"),
        ({"mapping": 42}, "mapping"),
        ({"columns": ("id",), "idempotency_key": "body"}, "idempotency_key"),
        ({"columns": ("id",), "pool_min": 5, "pool_max": 2}, "pool_min"),
        ({"columns": ("id",), "pool_max": 0}, "pool_max"),
        ({"columns": ("id",), "timeout": 0}, "timeout"),
        ({"columns": ("id",), "tls": "requir"}, "tls"),
    ],
)
def test_bad_settings_fail_at_construction_naming_the_setting(
    kwargs: dict[str, Any], names: str
) -> None:
    """Every wrong setting raises ConfigError at construction, naming the setting at fault."""
    with pytest.raises(ConfigError, match=names):
        PostgresSink(DSN, "events", **kwargs)


@pytest.mark.parametrize("dsn", ["", "host=db user=bob password=s3cret", "mysql://bob:s3cret@db/x"])
def test_a_dsn_that_is_not_a_postgres_url_is_refused_without_echoing_it(dsn: str) -> None:
    """asyncpg reads URL DSNs only: anything else fails at construction, password unshown."""
    with pytest.raises(ConfigError, match="dsn") as caught:
        PostgresSink(dsn, "events", ("id",))
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize("table", ["", "a.b.c", ".x", 7])
def test_bad_table_names_fail_at_construction(table: Any) -> None:
    """A table that is not 'name' or 'schema.name' is refused with ConfigError naming it."""
    with pytest.raises(ConfigError, match="table"):
        PostgresSink(DSN, table, ("id",))


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("postgresql://bob:s3cret@db:5432/app", "postgresql://bob:***@db:5432/app"),
        (
            "postgres://bob:p%40ss@h1,h2/app?sslmode=require",
            "postgres://bob:***@h1,h2/app?sslmode=require",
        ),
        (
            "postgresql://db/app?user=bob&password=s3cret",
            "postgresql://db/app?user=bob&password=***",
        ),
        ("host=db user=bob password=s3cret dbname=app", "host=db user=bob password=*** dbname=app"),
        ("postgresql://bob@db/app", "postgresql://bob@db/app"),
    ],
)
def test_mask_dsn_hides_every_password_form(dsn: str, masked: str) -> None:
    """URL userinfo, query and key=value passwords are all replaced by ***; the rest stays."""
    assert mask_dsn(dsn) == masked


def test_error_classes_carry_retryable_and_fit_builtin_catches() -> None:
    """The retry predicate can read ``retryable``, and callers can catch the builtin bases."""
    assert PostgresRetryable.retryable is True
    assert PostgresDataError.retryable is False
    assert PostgresSinkError.retryable is False
    assert issubclass(PostgresRetryable, ConnectionError)
    assert issubclass(PostgresDataError, ValueError)
    assert issubclass(PostgresSinkError, BatchpunkError)


# -- the COPY path ----------------------------------------------------------------------------


async def test_copy_path_writes_every_row(pg: Any, table: str) -> None:
    """Batches written with COPY land as rows, every one of them, with the defaults applied."""
    sink = PostgresSink(DSN, table, ("id", "body"))
    try:
        assert await sink.write(rows(0, 1000)) is None
        await sink.write(rows(1000, 500))
    finally:
        await sink.close()
    assert await ids(pg, table) == list(range(1500))
    assert await pg.fetchval(f"SELECT count(*) FROM {table} WHERE created IS NULL") == 0
    assert await pg.fetchval(f"SELECT body FROM {table} WHERE id = 1234") == "body-1234"


async def test_copy_path_has_no_idempotency_a_duplicate_is_a_data_error(
    pg: Any, table: str
) -> None:
    """Without a key, a row already in the table fails as a non-retryable error naming it."""
    sink = PostgresSink(DSN, table, ("id", "body"))
    try:
        await sink.write(rows(0, 3))
        with pytest.raises(PostgresDataError, match=r"row 0 \(id=1\).*already exists") as caught:
            await sink.write([{"id": 1, "body": "again"}])
    finally:
        await sink.close()
    assert caught.value.sqlstate == "23505"
    assert caught.value.retryable is False


async def test_a_batch_of_mostly_bad_rows_is_left_to_the_engines_bisection(
    pg: Any, table: str
) -> None:
    """Past about log2(n) bad rows the sink stops rewriting the rest and fails the batch whole."""
    sink = PostgresSink(DSN, table, ("id", "body"))
    try:
        await sink.write(rows(0, 64))
        with pytest.raises(PostgresDataError, match="already exists") as caught:
            await sink.write(rows(0, 64))  # redelivered into a table without a key
        assert caught.value.index is None  # the batch, not one row
        with pytest.raises(PartialFailure) as partial:
            await sink.write([*rows(60, 3), *rows(100, 61)])  # three bad rows: isolated
        assert sorted(partial.value.failures) == [0, 1, 2]
    finally:
        await sink.close()
    assert await ids(pg, table) == [*range(64), *range(100, 161)]


# -- the idempotent path ----------------------------------------------------------------------


async def test_redelivered_batches_add_no_rows(pg: Any, table: str) -> None:
    """Crash between commit and ack: the same batch written again adds no rows and no error."""
    sink = PostgresSink(DSN, table, ("id", "body"), idempotency_key="id")
    try:
        batch = rows(0, 300)
        await sink.write(batch)  # committed; the worker dies before acking
        await sink.write(batch)  # the broker redelivers the whole batch
        await sink.write(rows(250, 100))  # a batch cut differently overlaps the first
        await sink.write([*rows(400, 2), *rows(400, 2)])  # a duplicate inside one batch
    finally:
        await sink.close()
    assert await ids(pg, table) == [*range(350), 400, 401]
    assert await pg.fetchval(f"SELECT body FROM {table} WHERE id = 299") == "body-299"


async def test_composite_idempotency_key(pg: Any) -> None:
    """A tuple key deduplicates on the pair of columns behind a composite unique constraint."""
    name = f"bp_pg_{uuid.uuid4().hex[:10]}"
    ddl = f"CREATE TABLE {name} (tenant text, id int, body text, UNIQUE (tenant, id))"
    sink = PostgresSink(
        DSN, name, ("tenant", "id", "body"), idempotency_key=("tenant", "id"), create_table=ddl
    )
    try:
        batch = [{"tenant": t, "id": i, "body": "x"} for t in ("a", "b") for i in range(3)]
        await sink.write(batch)
        await sink.write(batch[::-1])
        assert await pg.fetchval(f"SELECT count(*) FROM {name}") == 6
    finally:
        await sink.close()
        await pg.execute(f"DROP TABLE IF EXISTS {name}")


async def test_idempotent_path_needs_a_unique_index_on_the_key(pg: Any, table: str) -> None:
    """open() refuses a key without a unique index, saying which ALTER TABLE would fix it."""
    sink = PostgresSink(DSN, table, ("id", "body"), idempotency_key="body")
    with pytest.raises(PostgresSinkError, match=r"no unique index.*ADD UNIQUE \(body\)"):
        await sink.open()
    await sink.close()


# -- bad rows ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "id"])
async def test_bad_rows_are_reported_for_themselves_and_the_rest_is_written(
    pg: Any, table: str, key: str | None
) -> None:
    """Each refused row fails alone with an error naming its id and column; the others land."""
    sink = PostgresSink(DSN, table, ("id", "body", "n", "tag"), idempotency_key=key)
    batch = [{"id": i, "body": "ok", "n": 1, "tag": "a"} for i in range(10)]
    batch[2]["n"] = "not-a-number"  # the driver cannot encode it for an integer column
    batch[4]["body"] = None  # NOT NULL
    batch[6]["tag"] = "toolong"  # varchar(3)
    batch[8] = {"id": 8, "body": "no n or tag"}  # a payload without a column
    try:
        with pytest.raises(PartialFailure) as caught:
            await sink.write(batch)
    finally:
        await sink.close()
    failures = caught.value.failures
    assert sorted(failures) == [2, 4, 6, 8]
    assert all(isinstance(e, PostgresDataError) and not e.retryable for e in failures.values())
    assert "id=2" in str(failures[2])
    assert "'n'" in str(failures[2])
    assert "'not-a-number'" in str(failures[2])
    assert "id=4" in str(failures[4])
    assert "'body'" in str(failures[4])
    assert "id=6" in str(failures[6])
    assert "'tag'" in str(failures[6])
    assert "id=8" in str(failures[8])
    assert "no 'n'" in str(failures[8])
    assert [e.index for e in failures.values()] == list(failures)
    assert await ids(pg, table) == [0, 1, 3, 5, 7, 9]


@pytest.mark.parametrize(
    ("row", "column", "sqlstate"),
    [
        ({"id": 1, "body": "x", "n": "abc"}, "n", None),
        ({"id": 1, "body": None, "n": 1}, "body", "23502"),
        ({"id": 1, "body": "a\x00b", "n": 1}, "body", "22021"),
        ({"id": 1, "body": "x"}, "n", None),
    ],
)
async def test_a_single_bad_row_raises_a_non_retryable_error_naming_row_and_column(
    table: str, row: dict[str, Any], column: str, sqlstate: str | None
) -> None:
    """A batch split down to one bad row raises PostgresDataError naming its id and column."""
    sink = PostgresSink(DSN, table, ("id", "body", "n"), idempotency_key="id")
    try:
        with pytest.raises(PostgresDataError) as caught:
            await sink.write([row])
    finally:
        await sink.close()
    assert caught.value.retryable is False
    assert caught.value.column == column
    assert caught.value.sqlstate == sqlstate
    assert "row 0 (id=1)" in str(caught.value)
    assert repr(column) in str(caught.value)


@pytest.mark.parametrize("key", [None, "id"])
async def test_a_failure_that_names_no_row_fails_the_batch_for_splitting(
    pg: Any, table: str, key: str | None
) -> None:
    """A foreign key violation names no row: the batch fails whole, not retryable."""
    await pg.execute(
        f"CREATE TABLE {table}_parent (id int PRIMARY KEY); INSERT INTO {table}_parent VALUES (1);"
        f"ALTER TABLE {table} ADD COLUMN parent int REFERENCES {table}_parent (id)"
    )
    sink = PostgresSink(DSN, table, ("id", "body", "parent"), idempotency_key=key)
    batch = [{"id": i, "body": "x", "parent": 99 if i == 3 else 1} for i in range(5)]
    try:
        with pytest.raises(PostgresDataError, match="is not present in table") as caught:
            await sink.write(batch)
        assert caught.value.retryable is False
        assert caught.value.index is None
        assert await ids(pg, table) == []
        with pytest.raises(PostgresDataError, match=r"row 0 \(id=3\)"):
            await sink.write(batch[3:4])  # once split down to it, the row is named
        await sink.write(batch[:3] + batch[4:])
        assert await ids(pg, table) == [0, 1, 2, 4]
    finally:
        await sink.close()
        await pg.execute(f"DROP TABLE {table}_parent CASCADE")  # the fixture drops the table


async def test_check_constraints_are_enforced_in_the_stage_so_the_row_is_named(
    pg: Any, table: str
) -> None:
    """On the idempotent path a CHECK violation still names its row: the stage enforces it."""
    sink = PostgresSink(DSN, table, ("id", "body", "n"), idempotency_key="id")
    batch = [{"id": i, "body": "x", "n": -1 if i == 3 else i} for i in range(5)]
    try:
        with pytest.raises(PartialFailure) as caught:
            await sink.write(batch)
    finally:
        await sink.close()
    assert list(caught.value.failures) == [3]
    assert "row 3 (id=3)" in str(caught.value.failures[3])
    assert "check constraint" in str(caught.value.failures[3])
    assert f'relation "{table}"' in str(caught.value.failures[3])  # the table, not the stage
    assert "batchpunk_stage" not in str(caught.value.failures[3])
    assert await ids(pg, table) == [0, 1, 2, 4]


# -- mappings ---------------------------------------------------------------------------------


async def test_mapping_to_dicts_writes_a_subset_of_columns(pg: Any, table: str) -> None:
    """A mapping returning dicts writes those columns; the table's defaults fill the rest."""
    sink = PostgresSink(
        DSN, table, mapping=lambda p: {"id": p["k"], "body": p["v"].upper()}, idempotency_key="id"
    )
    try:
        await sink.write([{"k": 1, "v": "a"}, {"k": 2, "v": "b"}])
        with pytest.raises(PostgresDataError, match=r"row 0 .*mapping raised KeyError"):
            await sink.write([{"v": "no k"}])
    finally:
        await sink.close()
    found = await pg.fetch(f"SELECT id, body FROM {table} ORDER BY id")
    assert [tuple(r) for r in found] == [(1, "A"), (2, "B")]


async def test_mapping_to_tuples_fills_every_writable_column_in_table_order(
    pg: Any, table: str
) -> None:
    """A tuple from the mapping gives every column in table order; a wrong length is named."""
    from datetime import UTC, datetime

    when = datetime(2024, 1, 2, tzinfo=UTC)
    sink = PostgresSink(DSN, table, mapping=lambda p: (p, f"b{p}", None, "t", when))
    try:
        await sink.write([1, 2, 3])
        assert await ids(pg, table) == [1, 2, 3]
        assert await pg.fetchval(f"SELECT created FROM {table} WHERE id = 2") == when
    finally:
        await sink.close()
    short = PostgresSink(DSN, table, mapping=lambda p: (p, "x"))
    try:
        with pytest.raises(PostgresDataError, match=r"returned 2 values.*5 writable columns"):
            await short.write([9])
    finally:
        await short.close()


# -- open, close, failures that a retry can fix ----------------------------------------------


async def test_open_fails_early_on_a_missing_table_or_column(table: str) -> None:
    """open() says which table or column is missing before any batch is written."""
    missing_table = PostgresSink(DSN, f"{table}_nope", ("id",))
    with pytest.raises(PostgresSinkError, match="does not exist") as caught:
        await missing_table.open()
    assert caught.value.retryable is False
    missing_column = PostgresSink(DSN, table, ("id", "colour"))
    with pytest.raises(PostgresSinkError, match="'colour' is not a writable column"):
        await missing_column.open()


async def test_prepare_opens_the_pool_and_warns_about_a_pool_smaller_than_concurrency(
    table: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The pipeline's prepare() hook connects early and flags pool_max < concurrency."""
    from batchpunk import BatchConfig

    sink = PostgresSink(DSN, table, ("id", "body"), pool_max=2)
    try:
        with caplog.at_level("WARNING", logger="batchpunk.connectors.postgres"):
            await sink.prepare(BatchConfig(max_concurrent_batches=8))
        assert "pool_max=2 is below max_concurrent_batches=8" in caplog.text
        caplog.clear()
        await sink.prepare(BatchConfig(max_concurrent_batches=2))
        assert "pool_max" not in caplog.text
    finally:
        await sink.close()
    missing = PostgresSink(DSN, f"{table}_nope", ("id",))
    with pytest.raises(PostgresSinkError, match="does not exist"):
        await missing.prepare(BatchConfig())


async def test_connection_refused_is_retryable_and_never_shows_the_password() -> None:
    """A wrong port is a retryable error whose message and repr keep the password hidden."""
    require_server("postgres")
    sink = PostgresSink("postgresql://postgres:Sw0rdf1sh@127.0.0.1:1/test", "t", ("id",))
    with pytest.raises(PostgresRetryable) as caught:
        await sink.write([{"id": 1}])
    assert caught.value.retryable is True
    assert isinstance(caught.value, ConnectionError)
    assert "Sw0rdf1sh" not in str(caught.value)
    assert "Sw0rdf1sh" not in repr(sink)
    assert "***" in repr(sink)
    await sink.close()


@pytest.mark.parametrize("code", ["40001", "40P01", "53300", "57P01", "55P03"])
async def test_transient_server_errors_are_retryable(pg: Any, table: str, code: str) -> None:
    """Serialization failure, deadlock, too many connections, shutdown, lock: all retryable."""
    await pg.execute(
        f"CREATE FUNCTION {table}_raise() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.body LIKE 'raise:%' THEN "
        "RAISE EXCEPTION 'provoked %', NEW.body USING ERRCODE = substr(NEW.body, 7); END IF; "
        "RETURN NEW; END $$; "
        f"CREATE TRIGGER {table}_raise BEFORE INSERT ON {table} "
        f"FOR EACH ROW EXECUTE FUNCTION {table}_raise()"
    )
    sink = PostgresSink(DSN, table, ("id", "body"), idempotency_key="id")
    try:
        batch = [{"id": 1, "body": "fine"}, {"id": 2, "body": f"raise:{code}"}]
        with pytest.raises(PostgresRetryable) as caught:
            await sink.write(batch)
        assert caught.value.sqlstate == code
        assert await ids(pg, table) == []  # nothing of the failed batch was committed
        await sink.write(batch[:1])  # the pool is still usable
    finally:
        await sink.close()
    assert await ids(pg, table) == [1]


async def test_a_real_serialization_failure_is_retryable(pg: Any, table: str) -> None:
    """A genuine 40001 (ON CONFLICT meeting a row committed after our snapshot) is retryable."""
    import asyncio

    serializable = f"{DSN}?default_transaction_isolation=serializable"
    sink = PostgresSink(serializable, table, ("id", "body"), idempotency_key="id")
    await sink.open()
    try:
        async with pg.transaction():
            await pg.execute(f"INSERT INTO {table} (id, body) VALUES (1, 'theirs')")
            write = asyncio.create_task(sink.write([{"id": 1, "body": "ours"}]))
            # The sink's transaction takes its snapshot, then waits on the uncommitted row.
            for _ in range(100):
                await pg.execute("SELECT pg_stat_clear_snapshot()")  # stats are per transaction
                waiting = await pg.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE 'INSERT INTO%' || $1 || '%'",
                    table,
                )
                if waiting:
                    break
                await asyncio.sleep(0.02)
            assert waiting == 1
        with pytest.raises(PostgresRetryable) as caught:
            await write
        assert caught.value.sqlstate == "40001"
        await sink.write([{"id": 1, "body": "ours"}])  # the retry: absorbed by the key
    finally:
        await sink.close()
    assert await pg.fetchval(f"SELECT body FROM {table} WHERE id = 1") == "theirs"


async def test_a_backend_killed_mid_write_is_retryable_and_the_next_write_recovers(
    pg: Any, table: str
) -> None:
    """pg_terminate_backend during a COPY: that write is retryable, the next one succeeds."""
    import asyncio

    await pg.execute(
        f"CREATE FUNCTION {table}_raise() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.body = 'slow' THEN PERFORM pg_sleep(5); END IF; RETURN NEW; END $$; "
        f"CREATE TRIGGER {table}_raise BEFORE INSERT ON {table} "
        f"FOR EACH ROW EXECUTE FUNCTION {table}_raise()"
    )
    app = f"bp_test_{uuid.uuid4().hex[:8]}"
    sink = PostgresSink(f"{DSN}?application_name={app}", table, ("id", "body"), pool_max=1)
    try:
        await sink.write(rows(0, 10))
        write = asyncio.create_task(sink.write([{"id": 10, "body": "slow"}]))
        killed = 0
        for _ in range(200):  # wait until the COPY runs, then kill its backend
            killed = await pg.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = $1 AND state = 'active'",
                app,
            )
            if killed:
                break
            await asyncio.sleep(0.02)
        assert killed == 1
        with pytest.raises(PostgresRetryable):
            await write
        await sink.write(rows(10, 10))  # the pool replaced the dead connection
    finally:
        await sink.close()
    assert await ids(pg, table) == list(range(20))


@pytest.mark.parametrize("key", [None, "id"])
async def test_a_backend_killed_while_the_copy_is_paused_fails_within_timeout(
    pg: Any, table: str, key: str | None
) -> None:
    """A COPY whose backend dies while the client waits for the socket to drain used to hang.

    asyncpg waits for "writing allowed" with no deadline, and a lost connection never allows
    it: write() never returned (pg_terminate_backend during a 400,000-row COPY: still waiting
    after 20 s with timeout=5). Now each COPY is bounded by ``timeout``: the write fails
    retryably (an outage) and its connection is dropped, so the next write gets a fresh one.
    A CHECK that sleeps on the first row (the stage enforces it too: rows past
    UNNEST_MAX_ROWS take the staged COPY) stops the server reading, so the client's socket
    fills and its writing pauses before the kill.
    """
    import asyncio

    await pg.execute(
        f"CREATE FUNCTION {table}_slow(id int) RETURNS bool LANGUAGE plpgsql AS $$ BEGIN "
        "IF id = 0 THEN PERFORM pg_sleep(30); END IF; RETURN true; END $$; "
        f"ALTER TABLE {table} ADD CONSTRAINT {table}_slow CHECK ({table}_slow(id))"
    )
    app = f"bp_test_{uuid.uuid4().hex[:8]}"
    sink = PostgresSink(
        f"{DSN}?application_name={app}",
        table,
        ("id", "body"),
        idempotency_key=key,
        pool_max=1,
        timeout=1.5,
    )
    body = "x" * 2000
    big = [{"id": i, "body": body} for i in range(20_000)]  # 40 MB: more than socket buffers
    try:
        await sink.open()
        write = asyncio.create_task(sink.write(big))
        killed = 0
        for _ in range(250):  # the server sleeps in the trigger: the client is paused by now
            killed = await pg.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = $1 AND wait_event = 'PgSleep'",
                app,
            )
            if killed:
                break
            await asyncio.sleep(0.02)
        assert killed == 1
        done, _ = await asyncio.wait({write}, timeout=10)
        if not done:
            write.cancel()
            pytest.fail("write() did not return within 10 s of its backend's death (timeout=1.5)")
        with pytest.raises(PostgresRetryable) as caught:
            await write
        assert caught.value.unavailable is True
        await pg.execute(f"ALTER TABLE {table} DROP CONSTRAINT {table}_slow")
        await sink.write(rows(0, 3))  # the dead connection was not returned to the pool
    finally:
        await sink.close()
        await pg.execute(f"DROP FUNCTION IF EXISTS {table}_slow(int) CASCADE")
    assert await ids(pg, table) == [0, 1, 2]


@pytest.mark.parametrize("key", [None, "id"])
@pytest.mark.parametrize(
    ("change", "says", "sqlstate"),
    [
        ("ALTER TABLE {t} RENAME TO {t}_moved", "does not exist", "42P01"),
        ("ALTER TABLE {t} DROP COLUMN body", 'column "body"', "42703"),
        ("REVOKE INSERT ON {t} FROM {t}_writer", "permission denied", "42501"),
    ],
    ids=["table-renamed", "column-dropped", "privilege-revoked"],
)
async def test_a_table_changed_under_the_sink_is_an_outage_not_bad_rows(
    pg: Any, table: str, key: str | None, change: str, says: str, sqlstate: str
) -> None:
    """A table renamed, a column dropped or a privilege revoked after open() fails every row
    alike, but was a non-retryable error blamed on the rows: a pipeline bisected each batch and
    dead-lettered all of it, every letter reading "row 0 (id=...)" (40 of 40 dead-lettered).
    These SQLSTATEs (class 42, and class 28 for authorization) are outages now: retryable and
    unavailable, so the engine holds the batch, and the error names the real problem, not a
    row."""
    role = f"{table}_writer"
    await pg.execute(f"CREATE ROLE {role} LOGIN; GRANT SELECT, INSERT ON {table} TO {role}")
    dsn = DSN.replace("postgres@", f"{role}@")
    sink = PostgresSink(dsn, table, ("id", "body"), idempotency_key=key)
    try:
        await sink.open()
        await pg.execute(change.format(t=table))
        for batch in (rows(0, 5), rows(5, 1)):
            with pytest.raises(PostgresRetryable) as caught:
                await sink.write(batch)
            assert caught.value.unavailable is True
            assert caught.value.sqlstate == sqlstate
            assert says in str(caught.value)
            assert "row 0" not in str(caught.value)
    finally:
        await sink.close()
        await pg.execute(f"DROP TABLE IF EXISTS {table}_moved")
        await pg.execute(f"DROP TABLE IF EXISTS {table}; DROP ROLE {role}")


@pytest.mark.parametrize(
    ("cause", "key"),
    # (COPY refuses a table with row-level security outright: only the keyed path has it.)
    [("trigger", None), ("trigger", "id"), ("row-level-security", "id")],
)
async def test_a_class_42_error_one_row_causes_is_that_rows_fault_not_an_outage(
    pg: Any, table: str, key: str | None, cause: str
) -> None:
    """Class 42 became an outage for every write, so a row a trigger refused (42P01 from its
    own SQL) or a row-level security policy refused (42501) was held for delivery_timeout
    with the good rows behind it, then expired. An error whose context names a trigger or a
    COPY line, or a row-level security refusal, is that row's fault again: the others are
    written and the row is isolated (blamed alone where the server names its line, else by
    the engine's bisection of a non-retryable error)."""
    role = f"{table}_writer"
    await pg.execute(f"CREATE ROLE {role} LOGIN; GRANT SELECT, INSERT ON {table} TO {role}")
    if cause == "trigger":
        await pg.execute(
            f"""CREATE FUNCTION {table}_raise() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                  IF NEW.id = 1 THEN EXECUTE 'INSERT INTO {table}_nowhere VALUES (1)'; END IF;
                  RETURN NEW; END $$;
                CREATE TRIGGER route BEFORE INSERT ON {table}
                  FOR EACH ROW EXECUTE FUNCTION {table}_raise()"""
        )
    else:
        await pg.execute(
            f"""ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;
                CREATE POLICY see ON {table} FOR SELECT TO {role} USING (true);
                CREATE POLICY put ON {table} FOR INSERT TO {role} WITH CHECK (id <> 1)"""
        )
    dsn = DSN.replace("postgres@", f"{role}@")
    sink = PostgresSink(dsn, table, ("id", "body"), idempotency_key=key)
    try:
        await sink.open()
        with pytest.raises(BatchpunkError) as caught:
            await sink.write(rows(0, 3))
        error: Any = caught.value
        if isinstance(error, PartialFailure):
            assert list(error.failures) == [1]
            error = error.failures[1]
        assert error.retryable is False
        assert getattr(error, "unavailable", False) is False
        assert error.sqlstate == ("42P01" if cause == "trigger" else "42501")
    finally:
        await sink.close()
        await pg.execute(f"DROP TABLE IF EXISTS {table}; DROP ROLE {role}")
    # (the table fixture drops the trigger function)


async def test_credentials_refused_at_open_fail_the_start_plainly(table: str) -> None:
    """Class 28 at open() is a start-up failure (PostgresSinkError), not an outage whose text
    promised a batch would wait, with "credentials: no" masked into "***"."""
    sink = PostgresSink(DSN.replace("postgres@", f"{table}_nobody@"), table, ("id", "body"))
    with pytest.raises(PostgresSinkError) as caught:
        await sink.open()
    assert not isinstance(caught.value, PostgresRetryable)
    assert caught.value.sqlstate == "28000"
    assert "***" not in str(caught.value)
    await sink.close()


async def test_a_pipeline_holds_its_batches_while_the_table_is_missing(pg: Any, table: str) -> None:
    """Pipeline view: the table is renamed away during more failed writes than the retries
    allow, then back. Every row is written and nothing is dead-lettered (all 40 were)."""
    import asyncio

    from batchpunk import BatchConfig
    from batchpunk.pipeline import Pipeline

    failed = 0

    class RenamesBackLate(PostgresSink):
        async def write(self, batch: Any) -> None:
            nonlocal failed
            try:
                await super().write(batch)
            except Exception:
                failed += 1
                if failed == 12:
                    await pg.execute(f"ALTER TABLE {table}_moved RENAME TO {table}")
                raise

    sink = RenamesBackLate(DSN, table, ("id", "body"), idempotency_key="id")
    await sink.open()
    await pg.execute(f"ALTER TABLE {table} RENAME TO {table}_moved")
    config = BatchConfig(
        max_size=10, max_wait=0.01, retry_delay=0.01, retry_max_delay=0.02, max_retries=1,
        delivery_timeout=20, drain_timeout=10,
    )  # fmt: skip
    pipeline = Pipeline(ListSource({"id": i, "body": "x"} for i in range(40)), sink, config)
    try:
        await asyncio.wait_for(pipeline.run(), 30)
    finally:
        await pg.execute(f"DROP TABLE IF EXISTS {table}_moved")
    assert failed >= 12
    assert pipeline.dead_letter.letters == []  # type: ignore[attr-defined]
    assert await ids(pg, table) == list(range(40))


async def test_a_statement_past_timeout_is_retryable(pg: Any, table: str) -> None:
    """A write that takes longer than ``timeout`` is cancelled and fails as retryable."""
    await pg.execute(
        f"CREATE FUNCTION {table}_raise() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "PERFORM pg_sleep(2); RETURN NEW; END $$; "
        f"CREATE TRIGGER {table}_raise BEFORE INSERT ON {table} "
        f"FOR EACH ROW EXECUTE FUNCTION {table}_raise()"
    )
    sink = PostgresSink(DSN, table, ("id", "body"), timeout=0.3)
    try:
        with pytest.raises(PostgresRetryable, match=r"no answer within 0\.3 s"):
            await sink.write(rows(0, 1))
    finally:
        await sink.close()


async def test_close_is_idempotent_and_a_closed_sink_refuses_retryably(table: str) -> None:
    """close() twice is fine; a write after close is retryable, so messages go back unacked."""
    sink = PostgresSink(DSN, table, ("id", "body"))
    await sink.write(rows(0, 1))
    await sink.close()
    await sink.close()
    with pytest.raises(PostgresRetryable, match="closed"):
        await sink.write(rows(1, 1))


async def test_tls_settings_reach_the_driver(pg: Any, table: str) -> None:
    """tls is passed through: 'disable' connects, 'require' against ssl=off fails, not retried."""
    plain = PostgresSink(DSN, table, ("id", "body"), tls="disable")
    try:
        await plain.write(rows(0, 1))
    finally:
        await plain.close()
    if await pg.fetchval("SHOW ssl") == "on":
        pytest.skip("this server offers TLS; the refusal below needs ssl = off")
    strict = PostgresSink(DSN, table, ("id", "body"), tls=ssl.create_default_context())
    with pytest.raises(PostgresSinkError, match="rejected SSL upgrade") as caught:
        await strict.open()
    assert caught.value.retryable is False


async def test_one_row_at_a_time_baseline_inserts_every_row(pg: Any, table: str) -> None:
    """The bench baseline helper inserts each row in its own autocommit INSERT."""
    from bench._postgres_baseline import OneRowInserter

    inserter = OneRowInserter(DSN, table, ("id", "body"))
    await inserter.open()
    try:
        for payload in rows(0, 20):
            await inserter.insert(payload)
    finally:
        await inserter.close()
    assert await ids(pg, table) == list(range(20))
