"""PostgreSQL sink: each batch lands with one binary COPY; redeliveries are absorbed by a key.

Choose it when a broker's messages end as rows. Two write paths:

- without ``idempotency_key``: one ``COPY ... FROM STDIN (FORMAT binary)`` per batch, the fastest
  way into PostgreSQL. A redelivered batch is written again.
- with ``idempotency_key``: one ``INSERT INTO t SELECT * FROM unnest($1::type[], ...) ON
  CONFLICT (key) DO NOTHING`` (one prepared statement, one round trip, the columns sent as
  arrays) for batches up to ``UNNEST_MAX_ROWS`` rows; larger batches, and any batch the unnest
  statement refuses, go through COPY into a temporary stage table (dropped at commit, holding
  the table's CHECK constraints on the written columns) and ``INSERT INTO t SELECT ... FROM stage
  ON CONFLICT (key) DO NOTHING``, whose errors name the row at fault.
  bench/postgres_statements.py measures the two statements and executemany at several batch
  sizes and sets the crossover.
  A batch redelivered after a crash between the commit and the broker ack adds no rows.

Errors are translated at the seam into three classes that carry ``retryable``::

    BatchpunkError
    └── PostgresSinkError            retryable = False: a table or column missing at open, no
        │                            unique index for the key, TLS refused (fix and replay)
        ├── PostgresRetryable        retryable = True: connection lost or refused, serialization
        │   (ConnectionError)        failure, deadlock, too many connections, shutdown, timeouts;
        │                            and, after open, a table, column or grant gone (class 42)
        │                            or credentials refused (class 28): no row is at fault
        └── PostgresDataError        retryable = False: a row the table refuses (22xxx, 23xxx),
            (ValueError)             a payload without a column; the message names row and column

A bad row is isolated inside ``write()`` whenever the failure says which row it was (the COPY
line, an encoding probe, a NOT NULL column): the other rows are written and ``write()`` raises
``PartialFailure`` for the bad ones only. When the failure names no row (a foreign key, or a
trigger failing in the idempotent INSERT), or more than about log2(n) rows of a batch of n are
bad (a redelivery into a table without a key), the whole batch fails with a non-retryable error
and the engine's bisection takes over; a single-row batch's error always names its row.

The DSN's password never appears in a log line, a repr or an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qsl, unquote, urlsplit

from batchpunk.connectors._common import mask_secrets
from batchpunk.errors import ConfigError, ConnectorError, PartialFailure, require

if TYPE_CHECKING:
    from batchpunk.config import BatchConfig
    from batchpunk.envelope import Envelope

__all__ = ["PostgresDataError", "PostgresRetryable", "PostgresSink", "PostgresSinkError"]

log = logging.getLogger(__name__)

#: What a ``mapping`` returns for one payload: values in table column order, or column -> value.
MappedRow = Sequence[Any] | Mapping[str, Any]

#: The ``sslmode`` names asyncpg accepts for ``tls``.
TLS_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")

#: SQLSTATE classes and codes that a later attempt can survive.
_RETRYABLE_CLASSES = frozenset({"08", "40", "53", "58"})
_RETRYABLE_CODES = frozenset(
    {
        "25006",  # read_only_sql_transaction: a failover left us on a standby
        "55006",  # object_in_use
        "55P03",  # lock_not_available
        "57014",  # query_canceled (statement_timeout)
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (starting up, recovery)
        "57P05",  # idle_session_timeout
    }
)
#: SQLSTATE classes that blame the data: data exceptions and integrity constraint violations.
_DATA_CLASSES = frozenset({"22", "23"})
#: SQLSTATE classes that blame neither the data nor chance, but the table or the credentials as
#: they are now: 28 (invalid authorization) and 42 (syntax error or access rule violation: a
#: table renamed or dropped 42P01, a column dropped 42703, a privilege revoked 42501, a unique
#: index gone 42P10, a column type changed 42804). The sink's statements are built from the
#: table it inspected at open, so these say the table, a column or a grant changed since: every
#: row fails alike. An outage (held until fixed or delivery_timeout), never a row's dead letter.
_SCHEMA_CLASSES = frozenset({"28", "42"})

#: A class-42 error one row caused: a row-level security policy refusing it, or a trigger (a
#: PL/pgSQL function, or a COPY's line, in the error's context) failing for that row only.
_ROW_CONTEXT = re.compile(r"PL/pgSQL function|\bCOPY \S+, line \d+|SQL function")


def _row_specific(exc: BaseException) -> bool:
    """Whether a class-42/28 error came from one row rather than from the table or the login."""
    message = str(getattr(exc, "message", "") or exc)
    context = str(getattr(exc, "context", "") or getattr(exc, "where", "") or "")
    return "row-level security" in message or bool(_ROW_CONTEXT.search(context))


_STAGE = "batchpunk_stage"
#: Largest idempotent batch written with the unnest statement; larger ones use the staged COPY.
#: Measured by bench/postgres_statements.py (figures in docs/brokers.md): unnest is faster up to
#: about 10,000 rows, where the two meet and unnest's per-column arrays only cost memory.
UNNEST_MAX_ROWS = 10_000
_COPY_LINE = re.compile(r"COPY [^,]+, line (\d+)(?:, column ([^:\s]+))?")
_PROBE_ROW = re.compile(r"argument \$(\d+) in element #(\d+)")


# --------------------------------------------------------------------------------------- errors


class PostgresSinkError(ConnectorError):
    """A PostgresSink failure that no retry fixes: a missing table or column found by
    ``open()``, no unique index behind ``idempotency_key``, TLS demanded from a server without.

    Fix the cause, then replay the dead letters. Subclasses tell transient failures and rows the
    table refuses apart from it.

    Attributes:
        sqlstate: the server's SQLSTATE code, when the server reported the error.
        column: the column at fault, when known.
        index: the row's index in the batch given to ``write()``, when one row is at fault.
    """

    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        sqlstate: str | None = None,
        column: str | None = None,
        index: int | None = None,
    ) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.column = column
        self.index = index


class PostgresRetryable(PostgresSinkError, ConnectionError):
    """A transient failure: the same batch can succeed later, so the engine retries it.

    Connection refused or lost, pool or statement timeouts, serialization failures (40001),
    deadlocks (40P01), too many connections (53300), administrator or crash shutdown (57P0x), a
    failover that left the pool on a read-only standby (25006). Also what hits every row alike
    once the sink is open: SQLSTATE class 42 (the table renamed or dropped, a column dropped, a
    privilege revoked) and class 28 (credentials refused): an outage the operator fixes, held
    by the engine up to ``delivery_timeout`` rather than dead-lettered row by row.
    """

    retryable: ClassVar[bool] = True
    unavailable: ClassVar[bool] = True


class PostgresDataError(PostgresSinkError, ValueError):
    """A row the table refuses, whatever the retries: a bad value, a constraint, a missing column.

    The message names the row (its idempotency key, or its first column) and the column and
    value at fault, so the dead letter of that one message says what to fix.
    """

    retryable: ClassVar[bool] = False


# --------------------------------------------------------------------------------- DSN secrets


_KV_SECRET = re.compile(r"\b(password|sslpassword)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_QUERY_SECRETS = frozenset({"password", "sslpassword"})


def mask_dsn(dsn: str) -> str:
    """The DSN with every password replaced by ``***``: what logs and errors may show.

    Handles URL DSNs (userinfo and ``?password=``) and libpq key=value strings alike, so any
    connection string can be logged through it.
    """
    return mask_secrets(dsn)


def _dsn_secrets(dsn: str) -> list[str]:
    """Every password the DSN (or PGPASSWORD) carries, raw and URL-decoded, longest first."""
    found: set[str] = set()
    if "://" in dsn:
        parts = urlsplit(dsn)
        userinfo = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""
        if ":" in userinfo:
            found.add(userinfo.split(":", 1)[1])
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key.lower() in _QUERY_SECRETS:
                found.add(value)
    else:
        for match in _KV_SECRET.finditer(dsn):
            found.add(match.group(2).strip("'"))
    env = os.environ.get("PGPASSWORD")
    if env:
        found.add(env)
    found |= {unquote(s) for s in found}
    return sorted((s for s in found if s), key=len, reverse=True)


# -------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True, slots=True)
class _Table:
    """What the sink learned about its table on open: writable columns and their types."""

    #: Columns that can be written (not generated), in table order.
    columns: tuple[str, ...]
    #: Column -> type name (without modifiers) for the encoding probe.
    types: dict[str, str]
    #: The table's CHECK constraints: (columns they read, their definition).
    checks: tuple[tuple[frozenset[str], str], ...] = ()

    def stage_checks(self, columns: tuple[str, ...]) -> str:
        """The CHECKs a stage of these columns can enforce, as ALTER TABLE clauses (or "").

        Enforcing them while COPYing into the stage makes a violation name its COPY line, so
        the row is isolated in write() instead of failing the INSERT for the whole batch.
        """
        written = set(columns)
        return ", ".join(f"ADD {d}" for cols, d in self.checks if cols and cols <= written)


@dataclass(slots=True)
class _Shaped:
    """A batch turned into rows: the columns, the good rows with their batch index, the rest."""

    columns: tuple[str, ...]
    rows: list[tuple[int, tuple[Any, ...]]]
    failures: dict[int, BaseException]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------- sink


class PostgresSink:
    """Writes batches of payloads as rows of one PostgreSQL table, on asyncpg.

    Give ``columns`` when payloads are dicts holding the values (``{"id": 1, "body": "x"}`` with
    ``columns=("id", "body")``; other keys are ignored), or ``mapping`` when they need reshaping:
    it returns, per payload, a dict of column -> value (a subset of the columns; the rest take
    their defaults) or a tuple of values for every writable column in table order.

    Give ``idempotency_key`` (a column or a tuple of columns with a unique index or constraint)
    whenever the source can redeliver: a batch written twice then adds no rows.

    Args:
        dsn: ``postgresql://user:password@host:port/db``; the password never shows in logs
            or errors. Put ``?application_name=...`` in it to name the connections (default
            "batchpunk").
        table: ``name`` or ``schema.name`` (quoted as given: case-sensitive).
        pool_min, pool_max: connections kept and allowed. Each running write holds one, so
            ``pool_max`` should be at least the processor's ``max_concurrent_batches``.
        create_table: DDL run once when the pool opens (``CREATE TABLE IF NOT EXISTS ...``), for
            examples and tests.
        timeout: seconds for connecting, for waiting on a free connection, and for each
            statement; passing it is a retryable failure.
        tls: an ``ssl.SSLContext`` or a mode ("require", "verify-full", ...); None takes
            ``sslmode`` from the DSN, else asyncpg's "prefer".
        positions: a table name: store each stream partition's written offsets in it, in the
            same transaction as the rows, for effectively-once writes from a source that
            resumes after them (KafkaSource). See connectors/_pg_positions.py.

    The pool opens on the first ``write()`` or on ``await open()``; call ``open()`` at start-up
    to fail early on a wrong DSN, table or column. ``close()`` is idempotent.
    """

    def __init__(
        self,
        dsn: str,
        table: str,
        columns: Sequence[str] | None = None,
        *,
        mapping: Callable[[Any], MappedRow] | None = None,
        idempotency_key: str | Sequence[str] | None = None,
        pool_min: int = 1,
        pool_max: int = 4,
        create_table: str | None = None,
        timeout: float = 30.0,
        tls: ssl.SSLContext | str | None = None,
        positions: str | None = None,
    ) -> None:
        if not isinstance(dsn, str) or not dsn.startswith(("postgresql://", "postgres://")):
            shown = mask_secrets(dsn) if isinstance(dsn, str) else type(dsn).__name__
            raise ConfigError(
                "PostgresSink dsn: expected a URL postgresql://user:password@host:port/db "
                f"(asyncpg does not read key=value connection strings), got {shown!r}"
            )
        self._dsn = dsn
        self._secrets = _dsn_secrets(dsn)
        self._masked = mask_dsn(dsn)
        self._schema, self._table = _split_table(table)
        self._target = ".".join(_quote(p) for p in (self._schema, self._table) if p is not None)
        self._columns = _check_columns(columns, mapping)
        self._mapping = mapping
        self._key = _check_key(idempotency_key, self._columns)
        if isinstance(pool_min, bool) or not isinstance(pool_min, int) or pool_min < 0:
            raise ConfigError(f"PostgresSink pool_min: expected an int >= 0, got {pool_min!r}")
        if isinstance(pool_max, bool) or not isinstance(pool_max, int) or pool_max < 1:
            raise ConfigError(f"PostgresSink pool_max: expected an int >= 1, got {pool_max!r}")
        if pool_min > pool_max:
            raise ConfigError(
                f"PostgresSink pool_min: {pool_min} is more than pool_max ({pool_max})"
            )
        self._pool_min = pool_min
        self._pool_max = pool_max
        if create_table is not None and (not isinstance(create_table, str) or not create_table):
            raise ConfigError("PostgresSink create_table: expected a DDL string or None")
        self._create_table = create_table
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise ConfigError(f"PostgresSink timeout: expected seconds > 0, got {timeout!r}")
        self._timeout = float(timeout)
        if not (tls is None or isinstance(tls, ssl.SSLContext) or tls in TLS_MODES):
            raise ConfigError(
                "PostgresSink tls: expected an ssl.SSLContext or one of "
                f"{', '.join(TLS_MODES)}, got {tls!r}"
            )
        self._tls = tls
        self._pool: Any = None
        self._info: _Table | None = None
        self._closed = False
        self._lock = asyncio.Lock()
        self._getter = itemgetter(*self._columns) if self._columns is not None else None
        # Issue 15, effectively once: see the "positions" section at the end of the class.
        self.positions = _positions_table(positions)

    def __repr__(self) -> str:
        key = f", idempotency_key={self._key!r}" if self._key else ""
        return f"PostgresSink({self._masked!r}, table={self._target!r}{key})"

    # -- life cycle ------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect the pool, run ``create_table`` once, and check the table and columns.

        Safe to call more than once and from concurrent writers. Raises PostgresRetryable when
        the server cannot be reached, PostgresSinkError when the table, a column or the unique
        index behind ``idempotency_key`` is missing.
        """
        if self._pool is not None:
            return
        async with self._lock:
            await self._connect()

    async def prepare(self, config: BatchConfig) -> None:
        """Pipeline hook, before the first message: open the pool and check its size.

        Each running batch holds one connection, so a pool smaller than the engine's concurrency
        makes batches queue for connections; that is logged as a warning, not refused.
        """
        concurrency = config.max_concurrent_batches if config.enable_parallel_processing else 1
        if self._pool_max < concurrency:
            log.warning(
                "PostgresSink %s: pool_max=%d is below max_concurrent_batches=%d; batches will "
                "wait for a connection (raise pool_max to %d)",
                self._target,
                self._pool_max,
                concurrency,
                concurrency,
            )
        await self.open()

    async def _connect(self) -> None:
        """Open the pool unless a concurrent open() did; the caller holds the lock."""
        if self._pool is not None:
            return
        if self._closed:
            raise PostgresRetryable(f"PostgresSink for {self._target} is closed")
        asyncpg = require("asyncpg", "postgres", "PostgresSink")
        settings = {} if "application_name" in self._dsn else {"application_name": "batchpunk"}
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._pool_min,
                max_size=self._pool_max,
                timeout=self._timeout,
                command_timeout=self._timeout,
                ssl=self._tls,
                server_settings=settings,
            )
        except Exception as exc:
            raise self._translate(exc, "connecting") from self._cause(exc)
        try:
            async with pool.acquire(timeout=self._timeout) as conn:
                if self._create_table is not None:
                    await conn.execute(self._create_table)
                self._info = await self._inspect(conn)
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, Exception) and not isinstance(exc, PostgresSinkError):
                raise self._translate(exc, "inspecting the table") from self._cause(exc)
            raise
        self._pool = pool
        log.info(
            "PostgresSink: pool of %d-%d to %s open",
            self._pool_min,
            self._pool_max,
            self._masked,
        )

    async def close(self) -> None:
        """Close the pool, waiting up to ``timeout`` for running writes; idempotent."""
        async with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self._timeout)
        except Exception:
            pool.terminate()
        log.info("PostgresSink: pool to %s closed", self._masked)

    # -- writing ---------------------------------------------------------------------------

    async def write(self, batch: Sequence[Any]) -> None:
        """Write the batch as rows; raises PartialFailure when only some rows are refused.

        Either every row not named in the PartialFailure is committed, or nothing is and the
        error (retryable or not) covers the whole batch.
        """
        if not batch:
            return None
        if self._pool is None:
            await self.open()
        pool = self._pool
        info = self._info
        if pool is None or info is None:  # closed by a concurrent close()
            raise PostgresRetryable(f"PostgresSink for {self._target} is closed")
        shaped = self._shape(batch, info)
        failures = shaped.failures
        pending = shaped.rows
        # Rewriting the rest after each located row costs a COPY of the batch per bad row; past
        # about log2(n) bad rows, the engine's bisection sends fewer rows in total.
        rounds_left = max(4, len(pending).bit_length())
        try:
            async with pool.acquire(timeout=self._timeout) as conn:
                while pending:
                    try:
                        await self._write_rows(conn, shaped.columns, [r for _, r in pending])
                        break
                    except Exception as exc:
                        error, bad = await self._blame(conn, shaped.columns, pending, exc)
                        rounds_left -= 1
                        if not bad or (rounds_left < 0 and len(pending) > 1):
                            raise error from self._cause(exc)
                        for position, row_error in bad.items():
                            failures[pending[position][0]] = row_error
                        pending = [p for n, p in enumerate(pending) if n not in bad]
        except PostgresSinkError:
            raise
        except Exception as exc:  # acquiring, or the connection breaking outside a statement
            raise self._translate(exc, "writing") from self._cause(exc)
        if failures:
            if len(batch) == 1:
                raise failures[0]
            raise PartialFailure(failures)
        return None

    async def _write_rows(
        self, conn: Any, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
    ) -> None:
        if self._key is None:
            async with _savepoint(conn):
                await self._copy(conn, self._table, self._schema, columns, rows)
            return
        listed = ", ".join(_quote(c) for c in columns)
        keys = ", ".join(_quote(c) for c in self._key)
        if len(rows) <= UNNEST_MAX_ROWS and self._info is not None:
            types = self._info.types
            if all(c in types for c in columns):
                arrays = ", ".join(f"${n}::{types[c]}[]" for n, c in enumerate(columns, 1))
                try:
                    async with _savepoint(conn):
                        await conn.execute(
                            f"INSERT INTO {self._target} ({listed}) SELECT * FROM unnest({arrays}) "
                            f"ON CONFLICT ({keys}) DO NOTHING",
                            *(list(column) for column in zip(*rows, strict=True)),
                            timeout=self._timeout,
                        )
                    return
                except Exception as exc:
                    error = self._translate(exc, "writing")
                    if error.retryable and (error.sqlstate or "")[:2] not in _SCHEMA_CLASSES:
                        raise
                    # A refused row: the staged COPY below fails again, naming its line. Or
                    # the unnest statement itself refused (a type it cannot take as an array,
                    # 42804): the staged COPY writes it, or fails again if the table changed.
        checks = self._info.stage_checks(columns) if self._info is not None else ""
        async with conn.transaction():
            # One round trip: the simple query protocol runs both statements.
            await conn.execute(
                f"CREATE TEMP TABLE {_STAGE} ON COMMIT DROP AS "
                f"SELECT {listed} FROM {self._target} WITH NO DATA"
                + (f"; ALTER TABLE {_STAGE} {checks}" if checks else ""),
                timeout=self._timeout,
            )
            await self._copy(conn, _STAGE, None, columns, rows)
            await conn.execute(
                f"INSERT INTO {self._target} ({listed}) SELECT {listed} FROM {_STAGE} "
                f"ON CONFLICT ({keys}) DO NOTHING",
                timeout=self._timeout,
            )

    async def _copy(
        self,
        conn: Any,
        table: str,
        schema: str | None,
        columns: tuple[str, ...],
        rows: list[tuple[Any, ...]],
    ) -> None:
        """COPY the rows, giving up after ``timeout`` and dropping the connection.

        asyncpg's own timeout does not cover its wait for the socket to drain: a connection
        lost while writing is paused never allows writing again, and the COPY would wait
        forever. The connection is terminated, so the pool replaces it.
        """
        try:
            async with asyncio.timeout(self._timeout):
                await conn.copy_records_to_table(
                    table, schema_name=schema, records=rows, columns=columns, timeout=self._timeout
                )
        except TimeoutError:
            with contextlib.suppress(Exception):  # a lost connection is already back in the pool
                conn.terminate()
            raise PostgresRetryable(
                f"PostgresSink {self._target} (writing): COPY got no answer within "
                f"{self._timeout:g} s; its connection was dropped"
            ) from None

    # -- shaping payloads into rows ----------------------------------------------------------

    def _shape(self, batch: Sequence[Any], info: _Table) -> _Shaped:
        if self._columns is not None:
            return self._shape_columns(batch, self._columns)
        assert self._mapping is not None
        return self._shape_mapped(batch, self._mapping, info)

    def _shape_columns(self, batch: Sequence[Any], columns: tuple[str, ...]) -> _Shaped:
        getter = self._getter
        assert getter is not None
        try:  # fast path: every payload has every column
            if len(columns) == 1:
                return _Shaped(columns, [(i, (getter(p),)) for i, p in enumerate(batch)], {})
            return _Shaped(columns, [(i, getter(p)) for i, p in enumerate(batch)], {})
        except (KeyError, TypeError, IndexError):
            pass
        rows: list[tuple[int, tuple[Any, ...]]] = []
        failures: dict[int, BaseException] = {}
        for index, payload in enumerate(batch):
            if not isinstance(payload, Mapping):
                failures[index] = self._payload_error(
                    index, payload, f"expected a dict payload, got {type(payload).__name__}"
                )
                continue
            missing = [c for c in columns if c not in payload]
            if missing:
                failures[index] = self._payload_error(
                    index,
                    payload,
                    f"payload has no {missing[0]!r} (columns: {', '.join(columns)})",
                    column=missing[0],
                )
                continue
            rows.append((index, tuple(payload[c] for c in columns)))
        return _Shaped(columns, rows, failures)

    def _shape_mapped(
        self, batch: Sequence[Any], mapping: Callable[[Any], MappedRow], info: _Table
    ) -> _Shaped:
        columns: tuple[str, ...] | None = None
        named: bool | None = None
        rows: list[tuple[int, tuple[Any, ...]]] = []
        failures: dict[int, BaseException] = {}
        for index, payload in enumerate(batch):
            try:
                mapped = mapping(payload)
            except Exception as exc:
                failures[index] = self._payload_error(
                    index, payload, f"mapping raised {type(exc).__name__}: {exc}"
                )
                continue
            if isinstance(mapped, Mapping):
                keys = tuple(mapped)
                if columns is None:
                    unknown = [k for k in keys if k not in info.types]
                    if unknown or not keys:
                        problem = (
                            f"mapping returned column {unknown[0]!r}, which {self._target} "
                            f"does not have (columns: {', '.join(info.columns)})"
                            if unknown
                            else "mapping returned an empty dict"
                        )
                        failures[index] = self._payload_error(
                            index, payload, problem, column=unknown[0] if unknown else None
                        )
                        continue
                    if self._key and not set(self._key) <= set(keys):
                        absent = next(k for k in self._key if k not in keys)
                        failures[index] = self._payload_error(
                            index,
                            payload,
                            f"mapping result lacks the idempotency key column {absent!r}",
                            column=absent,
                        )
                        continue
                    columns, named = keys, True
                if named is not True or set(keys) != set(columns):
                    odd = sorted(set(keys) ^ set(columns))
                    failures[index] = self._payload_error(
                        index,
                        payload,
                        f"mapping returned columns {', '.join(keys)}; this batch writes "
                        f"{', '.join(columns)} (differs in {', '.join(odd) or 'kind'})",
                        column=odd[0] if odd else None,
                    )
                    continue
                rows.append((index, tuple(mapped[c] for c in columns)))
            elif isinstance(mapped, Sequence) and not isinstance(mapped, str | bytes):
                if len(mapped) != len(info.columns):
                    failures[index] = self._payload_error(
                        index,
                        payload,
                        f"mapping returned {len(mapped)} values; {self._target} has "
                        f"{len(info.columns)} writable columns ({', '.join(info.columns)})",
                    )
                    continue
                if columns is None:
                    columns, named = info.columns, False
                if named is not False:
                    failures[index] = self._payload_error(
                        index, payload, "mapping returned a tuple where this batch has dicts"
                    )
                    continue
                rows.append((index, tuple(mapped)))
            else:
                failures[index] = self._payload_error(
                    index,
                    payload,
                    f"mapping must return a dict or a tuple, got {type(mapped).__name__}",
                )
        return _Shaped(columns or (), rows, failures)

    # -- errors ----------------------------------------------------------------------------

    async def _blame(
        self,
        conn: Any,
        columns: tuple[str, ...],
        pending: list[tuple[int, tuple[Any, ...]]],
        exc: Exception,
    ) -> tuple[PostgresSinkError, dict[int, PostgresDataError]]:
        """What a failed write of ``pending`` means: the error for all of it, and the rows it
        blames (by position in ``pending``, each with its own error naming row and column).

        A retryable failure blames no row; a single pending row is always blamed.
        """
        error = self._translate(exc, "writing")
        if error.retryable:
            return error, {}
        bad = await self._locate(conn, columns, pending, exc)
        if not bad and len(pending) == 1:
            bad = {0: error}
        return error, {n: self._row_error(e, *pending[n], columns) for n, e in bad.items()}

    async def _locate(
        self,
        conn: Any,
        columns: tuple[str, ...],
        pending: list[tuple[int, tuple[Any, ...]]],
        exc: Exception,
    ) -> dict[int, _Located | PostgresSinkError]:
        """Positions in ``pending`` of the rows that caused a non-retryable failure, if known."""
        asyncpg = require("asyncpg", "postgres", "PostgresSink")
        if isinstance(exc, asyncpg.PostgresError):
            context = str(getattr(exc, "context", "") or getattr(exc, "where", "") or "")
            match = _COPY_LINE.search(context)
            if match and 1 <= int(match.group(1)) <= len(pending):
                column = match.group(2) or getattr(exc, "column_name", None)
                marked = _Located(
                    _server_message(exc, self._target, self._table),
                    getattr(exc, "sqlstate", None),
                    column,
                )
                return {int(match.group(1)) - 1: marked}
            column = getattr(exc, "column_name", None)
            if getattr(exc, "sqlstate", None) == "23502" and column in columns:
                at = columns.index(column)
                marked = _Located(_server_message(exc, self._target, self._table), "23502", column)
                return {n: marked for n, (_, row) in enumerate(pending) if row[at] is None}
            return {}
        if isinstance(exc, OSError | asyncpg.InterfaceError):
            return {}
        return await self._probe(conn, columns, pending)

    async def _probe(
        self,
        conn: Any,
        columns: tuple[str, ...],
        pending: list[tuple[int, tuple[Any, ...]]],
    ) -> dict[int, _Located | PostgresSinkError]:
        """Find rows asyncpg cannot encode for their column types (COPY does not say which).

        Binds every row to a no-op ``SELECT $1::type, ... WHERE false`` in one pipelined
        executemany; each encoding error names its element, so k bad rows cost k + 1 calls.
        """
        info = self._info
        if info is None or any(c not in info.types for c in columns):
            return {}
        casts = ", ".join(f"${n}::{info.types[c]}" for n, c in enumerate(columns, 1))
        query = f"SELECT {casts} WHERE false"
        rows = [r for _, r in pending]
        bad: dict[int, _Located | PostgresSinkError] = {}
        start = 0
        while start < len(rows):
            try:
                await conn.executemany(query, rows[start:], timeout=self._timeout)
                break
            except Exception as exc:
                match = _PROBE_ROW.search(str(exc))
                if match is None:
                    break
                column = columns[int(match.group(1)) - 1]
                position = start + int(match.group(2))
                cause = exc.__cause__ or exc
                value = rows[position][int(match.group(1)) - 1]
                bad[position] = _Located(
                    f"bad value {_short(value)} for {info.types[column]}: {cause}", None, column
                )
                start = position + 1
        return bad

    def _translate(self, exc: BaseException, doing: str) -> PostgresSinkError:
        """Map a driver or socket error to the sink's error classes, with secrets scrubbed."""
        if isinstance(exc, PostgresSinkError):
            return exc
        asyncpg = require("asyncpg", "postgres", "PostgresSink")
        where = f"PostgresSink {self._target} ({doing})"
        kind = type(exc).__name__
        if isinstance(exc, asyncpg.PostgresError):
            code = str(getattr(exc, "sqlstate", "") or "")
            text = self._scrub(
                f"{where}: {_server_message(exc, self._target, self._table)} [SQLSTATE {code}]"
            )
            column = getattr(exc, "column_name", None)
            if code in _RETRYABLE_CODES or code[:2] in _RETRYABLE_CLASSES:
                return PostgresRetryable(text, sqlstate=code, column=column)
            if code[:2] in _SCHEMA_CLASSES and doing == "writing" and not _row_specific(exc):
                what = (
                    "the server refused the login"
                    if code[:2] == "28"
                    else "the table, a column or a grant is not what the sink found at open"
                )
                return PostgresRetryable(
                    f"{text}; {what}, so no row is at fault and the batch waits (up to "
                    "delivery_timeout) for it to be fixed",
                    sqlstate=code,
                    column=column,
                )
            if code[:2] in _DATA_CLASSES:
                return PostgresDataError(text, sqlstate=code, column=column)
            return PostgresSinkError(text, sqlstate=code, column=column)
        if isinstance(exc, TimeoutError):
            return PostgresRetryable(f"{where}: no answer within {self._timeout:g} s")
        text = self._scrub(f"{where}: {kind}: {exc}")
        if "rejected SSL upgrade" in str(exc):  # the server has ssl = off: no retry helps
            return PostgresSinkError(f"{text}; set tls=None or 'prefer', or enable ssl on it")
        if isinstance(exc, OSError | TimeoutError | asyncpg.exceptions.OutdatedSchemaCacheError):
            return PostgresRetryable(text)
        if isinstance(exc, asyncpg.exceptions.ClientConfigurationError):
            return PostgresSinkError(text)
        if isinstance(exc, asyncpg.InterfaceError) and not isinstance(exc, ValueError):
            return PostgresRetryable(text)  # "connection is closed", "pool is closing"
        if isinstance(exc, asyncpg.exceptions.InternalClientError):
            return PostgresSinkError(text)
        return PostgresDataError(text)  # asyncpg could not encode a value for its column

    def _row_error(
        self,
        error: _Located | PostgresSinkError,
        index: int,
        values: tuple[Any, ...],
        columns: tuple[str, ...],
    ) -> PostgresDataError:
        label = self._label(dict(zip(columns, values, strict=False)))
        if isinstance(error, _Located):
            column = error.column
            sqlstate = error.sqlstate
            detail = error.detail
        else:
            column = error.column
            sqlstate = error.sqlstate
            detail = str(error).split(": ", 1)[-1]
        at = f"column {column!r}: " if column else ""
        state = f" [SQLSTATE {sqlstate}]" if sqlstate and "SQLSTATE" not in detail else ""
        text = self._scrub(
            f"PostgresSink {self._target}: row {index} ({label}): {at}{detail}{state}"
        )
        return PostgresDataError(text, sqlstate=sqlstate, column=column, index=index)

    def _payload_error(
        self, index: int, payload: Any, problem: str, *, column: str | None = None
    ) -> PostgresDataError:
        label = self._label(payload) if isinstance(payload, Mapping) else _short(payload)
        text = self._scrub(f"PostgresSink {self._target}: row {index} ({label}): {problem}")
        return PostgresDataError(text, column=column, index=index)

    def _label(self, values: Mapping[str, Any]) -> str:
        """How an error names a row: its idempotency key, else its first column, else itself."""
        names = self._key or tuple(values)[:1]
        shown = [f"{n}={_short(values[n])}" for n in names if n in values]
        return ", ".join(shown) if shown else _short(dict(values))

    def _scrub(self, text: str) -> str:
        return mask_secrets(text, self._secrets)

    def _cause(self, exc: BaseException) -> BaseException | None:
        """Chain the driver's error unless its text carries a secret."""
        return None if self._scrub(str(exc)) != str(exc) else exc

    # -- introspection ---------------------------------------------------------------------

    async def _inspect(self, conn: Any) -> _Table:
        asyncpg = require("asyncpg", "postgres", "PostgresSink")
        try:
            found = await conn.fetch(
                "SELECT a.attname, format_type(a.atttypid, NULL) AS type, "
                "a.attgenerated <> '' AS generated "
                "FROM pg_attribute a WHERE a.attrelid = $1::regclass AND a.attnum > 0 "
                "AND NOT a.attisdropped ORDER BY a.attnum",
                self._target,
            )
        except asyncpg.exceptions.UndefinedTableError:
            raise PostgresSinkError(
                f"PostgresSink table: {self._target} does not exist in {self._masked}; "
                "create it first or pass create_table",
                sqlstate="42P01",
            ) from None
        writable = tuple(r["attname"] for r in found if not r["generated"])
        checks = await conn.fetch(
            "SELECT pg_get_constraintdef(c.oid) AS def, array(SELECT a.attname "
            "FROM unnest(c.conkey) AS k(n) JOIN pg_attribute a "
            "ON a.attrelid = c.conrelid AND a.attnum = k.n) AS cols "
            "FROM pg_constraint c WHERE c.conrelid = $1::regclass AND c.contype = 'c'",
            self._target,
        )
        info = _Table(
            writable,
            {r["attname"]: r["type"] for r in found if not r["generated"]},
            tuple((frozenset(r["cols"]), r["def"]) for r in checks),
        )
        for column in self._columns or ():
            if column not in info.types:
                raise PostgresSinkError(
                    f"PostgresSink columns: {column!r} is not a writable column of "
                    f"{self._target} (columns: {', '.join(writable)})",
                    column=column,
                )
        if self._key is not None:
            for column in self._key:
                if column not in info.types:
                    raise PostgresSinkError(
                        f"PostgresSink idempotency_key: {column!r} is not a column of "
                        f"{self._target} (columns: {', '.join(writable)})",
                        column=column,
                    )
            indexes = await conn.fetch(
                "SELECT array(SELECT a.attname FROM unnest(i.indkey::int2[]) AS k(n) "
                "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n) AS cols "
                "FROM pg_index i WHERE i.indrelid = $1::regclass AND i.indisunique "
                "AND i.indpred IS NULL AND i.indexprs IS NULL",
                self._target,
            )
            if not any(set(r["cols"]) == set(self._key) for r in indexes):
                raise PostgresSinkError(
                    f"PostgresSink idempotency_key: {self._target} has no unique index or "
                    f"constraint on exactly ({', '.join(self._key)}); ON CONFLICT needs one: "
                    f"ALTER TABLE {self._target} ADD UNIQUE ({', '.join(self._key)})"
                )
        return info

    # -- positions (issue 15): effectively-once writes; the logic is in _pg_positions.py -----

    async def write_envelopes(self, envelopes: Sequence[Envelope]) -> None:
        """Write the envelopes' payloads; with ``positions``, skip and record stream positions
        in the same transaction (a pipeline calls this instead of write when it exists)."""
        if self.positions is None:
            return await self.write([envelope.payload for envelope in envelopes])
        await self.positions.write(self, envelopes)
        return None

    async def load_positions(
        self, stream: str, floors: Mapping[int, int]
    ) -> dict[int, list[tuple[int, int]]]:
        """The offset ranges already written per partition at or above ``floors`` (the
        source's committed offsets); ranges below are forgotten. Empty without ``positions``."""
        if self.positions is None:
            return {}
        await self.open()
        pool = self._pool
        if pool is None:
            raise PostgresRetryable(f"PostgresSink for {self._target} is closed")
        async with pool.acquire(timeout=self._timeout) as conn:
            result: dict[int, list[tuple[int, int]]] = await self.positions.load(
                conn, stream, floors
            )
            return result


@dataclass(frozen=True, slots=True)
class _Located:
    """Why one located row failed, before it is worded as that row's PostgresDataError."""

    detail: str
    sqlstate: str | None
    column: str | None


def _server_message(exc: BaseException, target: str = "", name: str = "") -> str:
    """The server's message and detail, speaking of the user's table, not the private stage.

    ``target`` is the quoted table, ``name`` its bare name (stage constraints are named after
    the stage, as the table's own are after the table).
    """
    message = str(getattr(exc, "message", "") or exc)
    detail = getattr(exc, "detail", None)
    text = f"{message} ({detail})" if detail else message
    if target:
        text = text.replace(f'"{_STAGE}"', target).replace(_STAGE, name)
    return text


def _savepoint(conn: Any) -> Any:
    """A savepoint when ``conn`` is in a caller's transaction (PositionTable.write), else none.

    A statement failing inside it leaves that transaction usable: for the staged COPY after a
    refused unnest INSERT, and for ``_locate``'s probe after a refused row.
    """
    return conn.transaction() if conn.is_in_transaction() else contextlib.nullcontext()


def _split_table(table: Any) -> tuple[str | None, str]:
    if not isinstance(table, str) or not table:
        raise ConfigError(f"PostgresSink table: expected 'name' or 'schema.name', got {table!r}")
    parts = table.split(".")
    if len(parts) > 2 or not all(parts):
        raise ConfigError(f"PostgresSink table: expected 'name' or 'schema.name', got {table!r}")
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


def _check_columns(columns: Any, mapping: Any) -> tuple[str, ...] | None:
    if (columns is None) == (mapping is None):
        raise ConfigError(
            "PostgresSink: give exactly one of columns (names taken from dict payloads) "
            "or mapping (a function payload -> tuple or dict)"
        )
    if mapping is not None:
        if not callable(mapping):
            raise ConfigError(f"PostgresSink mapping: expected a callable, got {mapping!r}")
        return None
    if isinstance(columns, str | bytes) or not isinstance(columns, Sequence) or not columns:
        raise ConfigError(
            f"PostgresSink columns: expected a non-empty list of column names, got {columns!r}"
        )
    for column in columns:
        if not isinstance(column, str) or not column:
            raise ConfigError(f"PostgresSink columns: {column!r} is not a column name")
    if len(set(columns)) != len(columns):
        raise ConfigError(f"PostgresSink columns: duplicate names in {list(columns)!r}")
    return tuple(columns)


def _check_key(key: Any, columns: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if key is None:
        return None
    names = (key,) if isinstance(key, str) else key
    if not isinstance(names, Sequence) or not names:
        raise ConfigError(
            f"PostgresSink idempotency_key: expected a column name or a tuple of names, got {key!r}"
        )
    for name in names:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"PostgresSink idempotency_key: {name!r} is not a column name")
        if columns is not None and name not in columns:
            raise ConfigError(
                f"PostgresSink idempotency_key: {name!r} is not among columns "
                f"({', '.join(columns)})"
            )
    return tuple(names)


def _positions_table(name: str | None) -> Any:
    """The PositionTable for ``positions``, or None (issue 15)."""
    if name is None:
        return None
    from batchpunk.connectors._pg_positions import PositionTable

    try:
        return PositionTable(name)
    except (ValueError, ConfigError) as exc:
        raise ConfigError(f"PostgresSink positions: {exc}") from None
