"""Shared helpers for the cross-broker proofs: publish, run workers, kill them, check the outcome.

The proofs (tests/integration/test_e2e_brokers.py, test_crash.py) all follow one pattern:

1. ``make_orders(n, p)``: n order messages with ids 0..n-1, p of them poison (a row PostgreSQL
   refuses: a CHECK violation, a value of the wrong type, or an unknown foreign key, which only
   the engine's bisection can isolate);
2. ``Place``: a fresh queue (RabbitMQ), stream and group (Redis) or stream and durable consumer
   (NATS), with ``publish()``, ``outstanding()`` and ``unacknowledged()``;
3. ``OrdersTable``: a fresh PostgreSQL table with those constraints, written by PostgresSink with
   ``idempotency_key = "id"``;
4. ``write_pipeline_file`` and ``Worker``: ``batchpunk run`` in a subprocess, killed (-9),
   stopped (SIGTERM) and restarted like a real deployment;
5. ``check()``: reads the table, the dead-letter files and the broker, and reports the ids lost
   (in neither the table nor the dead letters), the duplicated rows, the ids wrongly
   dead-lettered, and what the broker still holds.

It also holds the test-only connectors that misbehave on purpose (``EarlyAckSource``, the
negative control that acks on receipt; ``HarnessPostgresSink``, which records what it committed
and can die right after a commit). They live here, not in the library: nobody should be able to
configure an unsafe worker by accident.

Sizes scale with the environment variable BATCHPUNK_E2E_SCALE (default 1.0; 0.1 for a quick
local run, 2 for a soak).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import random
import shutil
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchpunk.connectors.postgres import PostgresSink
from batchpunk.envelope import Envelope
from batchpunk.errors import PartialFailure
from batchpunk.pipeline_file import SOURCES
from tests.contract.cases_rabbitmq import rabbitmqctl_counts

REPO = Path(__file__).resolve().parents[2]

PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
REDIS_URL = "redis://127.0.0.1:6379/0"
NATS_URL = "nats://127.0.0.1:4222"

BROKERS = ("rabbitmq", "redis", "nats")

#: Exit status of a worker that HarnessPostgresSink stopped right after a commit.
CRASH_EXIT = 99

SCALE = float(os.environ.get("BATCHPUNK_E2E_SCALE", "1") or "1")


def scaled(n: int, minimum: int = 1) -> int:
    """``n`` times BATCHPUNK_E2E_SCALE, at least ``minimum``."""
    return max(minimum, round(n * SCALE))


def unique(prefix: str) -> str:
    """A name no other test run uses (safe as a queue, stream, durable, table or subject)."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


# -- messages --------------------------------------------------------------------------------

POISON_KINDS = ("check", "type", "foreign_key")


def make_orders(
    n: int, poison: int, *, seed: int = 7
) -> tuple[list[dict[str, Any]], frozenset[int]]:
    """n order payloads with ids 0..n-1; ``poison`` of them are rows the table refuses.

    The poison rows cycle through three kinds: a negative amount (CHECK violation, isolated by
    PostgresSink on its COPY line), an amount that is not a number (isolated by its encoding
    probe), and an unknown ``kind`` (foreign key violation, which names no row: the engine
    bisects the batch down to it).
    """
    rng = random.Random(seed)
    bad = sorted(rng.sample(range(n), poison)) if poison else []
    orders = [
        {"id": i, "kind": "a" if i % 2 else "b", "amount": i % 1000, "note": "ok"} for i in range(n)
    ]
    for index, order_id in enumerate(bad):
        kind = POISON_KINDS[index % len(POISON_KINDS)]
        if kind == "check":
            orders[order_id]["amount"] = -1
        elif kind == "type":
            orders[order_id]["amount"] = "not-a-number"
        else:
            orders[order_id]["kind"] = "zz"
        orders[order_id]["note"] = f"poison:{kind}"
    return orders, frozenset(bad)


def encode(order: Mapping[str, Any]) -> bytes:
    """The JSON body every broker carries."""
    return json.dumps(order, separators=(",", ":")).encode()


# -- the PostgreSQL table --------------------------------------------------------------------


class OrdersTable:
    """A fresh ``orders`` table (and its ``kinds`` lookup table) for one test; dropped after."""

    COLUMNS = ("id", "kind", "amount", "note")

    def __init__(self, name: str | None = None) -> None:
        self.name = name or unique("e2e_orders_")
        self.kinds = f"{self.name}_kinds"

    async def create(self) -> None:
        """Create both tables; the orders table refuses every kind of poison row."""
        conn = await _pg()
        try:
            await conn.execute(
                f"CREATE TABLE {self.kinds} (kind text PRIMARY KEY);"
                f"INSERT INTO {self.kinds} VALUES ('a'), ('b');"
                f"CREATE TABLE {self.name} ("
                " id bigint PRIMARY KEY,"
                f" kind text NOT NULL REFERENCES {self.kinds} (kind),"
                " amount integer NOT NULL CHECK (amount >= 0),"
                " note text)"
            )
        finally:
            await conn.close()

    async def drop(self) -> None:
        """Drop both tables."""
        conn = await _pg()
        try:
            await conn.execute(
                f"DROP TABLE IF EXISTS {self.name}; DROP TABLE IF EXISTS {self.kinds}"
            )
        finally:
            await conn.close()

    async def count(self) -> int:
        """Rows in the table."""
        conn = await _pg()
        try:
            return int(await conn.fetchval(f"SELECT count(*) FROM {self.name}"))
        finally:
            await conn.close()

    async def ids(self) -> tuple[int, set[int]]:
        """(rows, the set of ids) in the table."""
        conn = await _pg()
        try:
            rows = await conn.fetch(f"SELECT id FROM {self.name}")
        finally:
            await conn.close()
        return len(rows), {int(r[0]) for r in rows}

    def sink_options(self, **extra: Any) -> dict[str, Any]:
        """The [sink] table of a pipeline file writing here with idempotency_key = "id"."""
        return {
            "type": "postgres",
            "dsn": PG_DSN,
            "table": self.name,
            "columns": list(self.COLUMNS),
            "idempotency_key": "id",
            "pool_max": 4,
            **extra,
        }


async def _pg() -> Any:
    import asyncpg

    return await asyncpg.connect(PG_DSN)


# -- dead letters ----------------------------------------------------------------------------


async def read_dead_letters(paths: Iterable[Path]) -> list[Any]:
    """Every letter stored in these JSONL dead-letter files (a missing file holds none)."""
    from batchpunk.deadletter import JsonlDeadLetters

    letters: list[Any] = []
    for path in paths:
        store = JsonlDeadLetters(path)
        letters.extend([letter async for letter in store.read()])
        await store.close()
    return letters


def letter_id(letter: Any) -> int | None:
    """The order id a dead letter holds, or None for a letter that holds no order."""
    message = letter.message
    if isinstance(message, Mapping) and isinstance(message.get("id"), int):
        return int(message["id"])
    return None


# -- brokers ---------------------------------------------------------------------------------


@dataclass
class Place:
    """Where one test's messages live on one broker, and how to read its counts.

    Attributes:
        broker: "rabbitmq", "redis" or "nats".
        name: the queue (RabbitMQ), stream key (Redis) or stream name (NATS).
        group: the Redis consumer group or the NATS durable consumer.
        subject: the NATS subject the stream captures.
    """

    broker: str
    name: str = field(default_factory=lambda: unique("E2E"))
    group: str = field(default_factory=lambda: unique("G"))
    subject: str = field(default_factory=lambda: unique("e2e") + ".orders")

    @property
    def port(self) -> int:
        """The broker's port on localhost."""
        return {"rabbitmq": 5672, "redis": 6379, "nats": 4222}[self.broker]

    def source_options(self, **extra: Any) -> dict[str, Any]:
        """The [source] table of a pipeline file reading this place.

        Redis workers take their consumer name from BATCHPUNK_CONSUMER, so that each worker
        slot keeps its name across restarts, as the docs ask.
        """
        if self.broker == "rabbitmq":
            base: dict[str, Any] = {
                "type": "rabbitmq",
                "url": RABBITMQ_URL,
                "queue": self.name,
                "reconnect_interval": 1.0,
            }
        elif self.broker == "redis":
            base = {
                "type": "redis_streams",
                "url": REDIS_URL,
                "stream": self.name,
                "group": self.group,
                "consumer": "${BATCHPUNK_CONSUMER:-worker-0}",
                "claim_idle": 3.0,
                "max_deliveries": 1000,
                "block": 0.5,
            }
        elif self.broker == "nats":
            base = {
                "type": "nats",
                "servers": NATS_URL,
                "stream": self.name,
                "subject": self.subject,
                "durable": self.group,
                "ack_wait": 3.0,
                "max_deliver": 1000,
                "fetch_timeout": 0.5,
                "nak_delay": 0.0,
                "max_ack_pending": 20000,
            }
        else:
            raise ValueError(f"unknown broker {self.broker!r}")
        base.update(extra)
        return base

    def build_source(self, consumer: str = "worker-0", **extra: Any) -> Any:
        """The same source, built in this process."""
        options = self.source_options(**extra)
        kind = options.pop("type")
        if self.broker == "redis":
            options["consumer"] = consumer
        return _connector_class(kind)(**options)

    # -- setting up and tearing down --

    async def create(self) -> None:
        """Declare the queue / create the stream, so that publishing can start before workers."""
        if self.broker == "rabbitmq":
            async with _rabbit_channel() as channel:
                await channel.declare_queue(self.name, durable=True)
        elif self.broker == "redis":
            async with _redis() as client:
                await client.xgroup_create(self.name, self.group, id="0", mkstream=True)
        else:
            async with _jetstream() as js:
                await js.add_stream(name=self.name, subjects=[self.subject])

    async def delete(self) -> None:
        """Remove the queue / stream (consumers and group included); never raises."""
        with contextlib.suppress(Exception):
            if self.broker == "rabbitmq":
                async with _rabbit_channel() as channel:
                    await channel.queue_delete(self.name)
            elif self.broker == "redis":
                async with _redis() as client:
                    await client.delete(self.name)
            else:
                async with _jetstream() as js:
                    await js.delete_stream(self.name)

    # -- publishing --

    async def publish(self, orders: Sequence[Mapping[str, Any]], *, chunk: int = 2000) -> None:
        """Publish every order as one persistent message, confirmed by the broker."""
        if self.broker == "rabbitmq":
            await self._publish_rabbitmq(orders, chunk)
        elif self.broker == "redis":
            await self._publish_redis(orders, chunk)
        else:
            await self._publish_nats(orders, chunk)

    async def publish_paced(
        self, orders: Sequence[Mapping[str, Any]], seconds: float, *, chunk: int = 500
    ) -> None:
        """Publish the orders in chunks spread evenly over about ``seconds``."""
        chunks = [orders[i : i + chunk] for i in range(0, len(orders), chunk)]
        started = time.monotonic()
        for index, part in enumerate(chunks):
            await self.publish(part, chunk=chunk)
            ahead = started + seconds * (index + 1) / len(chunks) - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)

    async def _publish_rabbitmq(self, orders: Sequence[Mapping[str, Any]], chunk: int) -> None:
        import aio_pika

        persistent = aio_pika.DeliveryMode.PERSISTENT
        async with _rabbit_channel() as channel:
            exchange = channel.default_exchange
            for start in range(0, len(orders), chunk):
                await asyncio.gather(
                    *(
                        exchange.publish(
                            aio_pika.Message(encode(o), delivery_mode=persistent), self.name
                        )
                        for o in orders[start : start + chunk]
                    )
                )

    async def _publish_redis(self, orders: Sequence[Mapping[str, Any]], chunk: int) -> None:
        async with _redis() as client:
            for start in range(0, len(orders), chunk):
                pipe = client.pipeline(transaction=False)
                for order in orders[start : start + chunk]:
                    pipe.xadd(self.name, {"data": encode(order)})
                await pipe.execute()

    async def _publish_nats(self, orders: Sequence[Mapping[str, Any]], chunk: int) -> None:
        async with _jetstream() as js:
            for start in range(0, len(orders), chunk):
                futures = [
                    await js.publish_async(self.subject, encode(o), stream=self.name)
                    for o in orders[start : start + chunk]
                ]
                for ack in await asyncio.gather(*futures):
                    assert ack.stream == self.name

    # -- counting --

    async def outstanding(self) -> int:
        """Messages the broker still holds for the consumers: not yet delivered, or delivered
        and not acknowledged (RabbitMQ ready + unacked, Redis pending + undelivered, NATS
        ack-pending + pending)."""
        if self.broker == "rabbitmq":
            ready, unacked = await rabbitmq_counts(self.name)
            return ready + unacked
        if self.broker == "redis":
            async with _redis() as client:
                return await _redis_outstanding(client, self.name, self.group)
        ack_pending, pending = await self._nats_counts()
        return ack_pending + pending

    async def unacknowledged(self) -> int:
        """Messages delivered to a consumer and not acknowledged yet (Redis: its PEL)."""
        if self.broker == "rabbitmq":
            return (await rabbitmq_counts(self.name))[1]
        if self.broker == "redis":
            async with _redis() as client:
                return int((await client.xpending(self.name, self.group))["pending"])
        return (await self._nats_counts())[0]

    async def _nats_counts(self) -> tuple[int, int]:
        import nats.js.errors

        async with _jetstream() as js:
            try:
                info = await js.consumer_info(self.name, self.group)
            except nats.js.errors.NotFoundError:  # no worker ever bound: all still there
                stream = await js.stream_info(self.name)
                return 0, int(stream.state.messages)
            return int(info.num_ack_pending), int(info.num_pending)


def _connector_class(kind: str) -> Any:
    module_name, _, attr = SOURCES[kind].partition(":")
    return getattr(importlib.import_module(module_name), attr)


@contextlib.asynccontextmanager
async def _rabbit_channel() -> AsyncIterator[Any]:
    import aio_pika

    connection = await aio_pika.connect(RABBITMQ_URL)
    try:
        yield await connection.channel(publisher_confirms=True)
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def _redis() -> AsyncIterator[Any]:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def _jetstream() -> AsyncIterator[Any]:
    import nats

    nc = await nats.connect(NATS_URL)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def rabbitmq_counts(queue: str) -> tuple[int, int]:
    """(ready, unacknowledged) messages of a queue, from ``rabbitmqctl list_queues``.

    Without rabbitmqctl, the ready count of a passive declaration (unacknowledged unknown: 0).
    """
    if shutil.which("rabbitmqctl") is None:
        async with _rabbit_channel() as channel:
            declared = await channel.declare_queue(queue, passive=True)
            return int(declared.declaration_result.message_count), 0
    counts = await rabbitmqctl_counts(queue)
    if counts is None:
        raise LookupError("rabbitmqctl is not installed")
    return counts


async def _redis_outstanding(client: Any, stream: str, group: str) -> int:
    if not await client.exists(stream):
        return 0
    groups = {g["name"].decode(): g for g in await client.xinfo_groups(stream)}
    if group not in groups:
        return int(await client.xlen(stream))
    pending = int((await client.xpending(stream, group))["pending"])
    last = groups[group]["last-delivered-id"].decode()
    undelivered = len(await client.xrange(stream, min=f"({last}", max="+"))
    return pending + undelivered


# -- the checker -----------------------------------------------------------------------------


@dataclass
class Report:
    """What happened to the published messages, as the table, the letters and the broker say.

    Attributes:
        published: ids published.
        poison: ids of the poison messages among them.
        rows: rows in the table; ``distinct`` distinct ids among them.
        lost: published ids found neither in the table nor in the dead letters.
        duplicated: rows beyond the first for an id (rows - distinct).
        wrongly_dead_lettered: dead-lettered ids that are not poison.
        poison_in_table: poison ids found in the table.
        dead_letters: letters stored (one message may have several after a crash).
        dead_letter_ids: the ids they hold.
        reasons: letters by reason.
        outstanding: messages the broker still holds (None when not asked).
        unacknowledged: messages delivered and not acknowledged (None when not asked).
    """

    published: frozenset[int]
    poison: frozenset[int]
    rows: int
    distinct: int
    lost: set[int]
    duplicated: int
    wrongly_dead_lettered: set[int]
    poison_in_table: set[int]
    dead_letters: int
    dead_letter_ids: set[int]
    reasons: Counter[str]
    outstanding: int | None = None
    unacknowledged: int | None = None

    @property
    def processed(self) -> int:
        """Published ids that ended in the table or in the dead letters."""
        return len(self.published) - len(self.lost)

    @property
    def complete(self) -> bool:
        """Every message accounted for and the broker holding none."""
        return not self.lost and self.outstanding == 0

    def __str__(self) -> str:
        def some(ids: set[int]) -> str:
            shown = sorted(ids)[:10]
            return f"{len(ids)}{' ' + str(shown) if ids else ''}"

        return (
            f"published={len(self.published)} poison={len(self.poison)} rows={self.rows} "
            f"distinct={self.distinct} lost={some(self.lost)} duplicated={self.duplicated} "
            f"wrongly_dead_lettered={some(self.wrongly_dead_lettered)} "
            f"poison_in_table={some(self.poison_in_table)} dead_letters={self.dead_letters} "
            f"reasons={dict(self.reasons)} outstanding={self.outstanding} "
            f"unacknowledged={self.unacknowledged}"
        )


async def check(
    place: Place | None,
    table: OrdersTable,
    dead_letter_paths: Iterable[Path],
    published: Iterable[int],
    poison: Iterable[int],
    *,
    broker_counts: bool = True,
) -> Report:
    """Compare what was published with the table, the dead-letter files and the broker."""
    published_ids = frozenset(published)
    poison_ids = frozenset(poison)
    rows, table_ids = await table.ids()
    letters = await read_dead_letters(dead_letter_paths)
    letter_ids = {i for i in (letter_id(letter) for letter in letters) if i is not None}
    report = Report(
        published=published_ids,
        poison=poison_ids,
        rows=rows,
        distinct=len(table_ids),
        lost=set(published_ids - table_ids - letter_ids),
        duplicated=rows - len(table_ids),
        wrongly_dead_lettered=letter_ids - poison_ids,
        poison_in_table=table_ids & poison_ids,
        dead_letters=len(letters),
        dead_letter_ids=letter_ids,
        reasons=Counter(letter.reason for letter in letters),
    )
    if place is not None and broker_counts:
        report.outstanding = await place.outstanding()
        report.unacknowledged = await place.unacknowledged()
    return report


async def wait_complete(
    place: Place,
    table: OrdersTable,
    dead_letter_paths: Sequence[Path],
    published: Iterable[int],
    poison: Iterable[int],
    *,
    seconds: float,
    workers: Sequence[Worker] = (),
) -> Report:
    """Poll until every message is in the table or the dead letters and the broker holds
    none, or ``seconds`` pass, or a worker exits on its own; returns the last report.

    The cheap row count gates the expensive full check.
    """
    published_ids = frozenset(published)
    deadline = time.monotonic() + seconds
    report: Report | None = None
    while True:
        rows = await table.count()
        letters = await read_dead_letters(dead_letter_paths)
        if rows + len(letters) >= len(published_ids) or time.monotonic() > deadline:
            report = await check(place, table, dead_letter_paths, published_ids, poison)
            if report.complete or time.monotonic() > deadline:
                return report
        if any(w.exited_on_its_own for w in workers):
            return report or await check(place, table, dead_letter_paths, published_ids, poison)
        await asyncio.sleep(0.5)


async def wait_broker_empty(place: Place, *, seconds: float) -> int:
    """Poll until the broker holds nothing for the consumers (or time runs out); the count."""
    deadline = time.monotonic() + seconds
    while True:
        outstanding = await place.outstanding()
        if outstanding == 0 or time.monotonic() > deadline:
            return outstanding
        await asyncio.sleep(0.5)


async def wait_rows(table: OrdersTable, at_least: int, *, seconds: float) -> int:
    """Poll the row count until it reaches ``at_least`` (or time runs out); returns it."""
    deadline = time.monotonic() + seconds
    while True:
        rows = await table.count()
        if rows >= at_least or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.2)


# -- pipeline files and worker processes -----------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to a pipeline file")


def write_pipeline_file(
    path: Path,
    *,
    source: Mapping[str, Any],
    sink: Mapping[str, Any],
    batch: Mapping[str, Any],
    dead_letter_path: Path,
) -> Path:
    """Write a pipeline file with these sections, JSONL dead letters, no live view."""
    sections = {
        "source": source,
        "batch": batch,
        "sink": sink,
        "dead_letter": {"type": "jsonl", "path": str(dead_letter_path)},
        "metrics": {"live": False},
    }
    lines: list[str] = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


#: The [batch] section most proofs use: the issue's max_size 500, quick retries.
BATCH = {
    "max_size": 500,
    "max_wait": 0.2,
    "max_concurrent_batches": 3,
    "max_retries": 3,
    "retry_delay": 0.1,
    "retry_max_delay": 1.0,
    "drain_timeout": 15.0,
}


def _open_log(path: Path) -> Any:
    return path.open("ab")


class Worker:
    """One ``batchpunk run PIPELINE`` process slot that can be killed and restarted.

    Each start writes its output to ``<log_dir>/<name>.<n>.log``. Under Redis the slot's
    name is the consumer name (BATCHPUNK_CONSUMER), kept across restarts.
    """

    def __init__(
        self,
        pipeline_file: Path,
        log_dir: Path,
        name: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.pipeline_file = pipeline_file
        self.log_dir = log_dir
        self.name = name
        self.env = dict(env or {})
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.kills = 0
        self.logs: list[Path] = []
        self._signalled = False

    async def start(self) -> None:
        """Start the process (the slot must not be running)."""
        assert not self.running, f"worker {self.name} is already running"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO), str(REPO / "src"), os.environ.get("PYTHONPATH")) if p
            ),
            "BATCHPUNK_CONSUMER": self.name,
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }
        log = self.log_dir / f"{self.name}.{self.starts}.log"
        self.logs.append(log)
        handle = _open_log(log)
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "batchpunk",
                "run",
                "--no-live",
                "--log-level",
                "WARNING",
                str(self.pipeline_file),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=handle,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                cwd=str(self.log_dir),
            )
        finally:
            handle.close()
        self.starts += 1
        self._signalled = False

    @property
    def running(self) -> bool:
        """True while the current process has not exited."""
        return self.process is not None and self.process.returncode is None

    @property
    def exited_on_its_own(self) -> bool:
        """True when the process ended without being signalled by the test."""
        return (
            self.process is not None and self.process.returncode is not None and not self._signalled
        )

    async def kill(self) -> None:
        """kill -9 the process and reap it."""
        if self.running:
            assert self.process is not None
            self._signalled = True
            self.process.kill()
            await self.process.wait()
            self.kills += 1

    async def restart(self) -> None:
        """kill -9, then start again under the same name."""
        await self.kill()
        await self.start()

    async def terminate(self, seconds: float) -> tuple[int | None, float]:
        """SIGTERM, then wait up to ``seconds`` for it to exit: (exit code, seconds taken).

        The exit code is None when it did not exit in time (it is then killed).
        """
        if self.process is None:
            return None, 0.0
        if self.process.returncode is not None:
            return self.process.returncode, 0.0
        self._signalled = True
        began = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.process.wait(), seconds)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            return None, time.monotonic() - began
        return code, time.monotonic() - began

    def connected(self, port: int) -> bool:
        """True when the process holds an established TCP connection to localhost:``port``.

        A worker's source connects on its first read, after ``batchpunk run`` installed its
        SIGTERM handler: before that, a SIGTERM ends the process with the default action.
        """
        if not self.running:
            return False
        assert self.process is not None
        inodes: set[str] = set()
        fd_dir = Path(f"/proc/{self.process.pid}/fd")
        with contextlib.suppress(OSError):
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
        wanted = f"{port:04X}"
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError):
                for line in Path(table).read_text().splitlines()[1:]:
                    fields = line.split()
                    remote, state, inode = fields[2], fields[3], fields[9]
                    if state == "01" and remote.endswith(":" + wanted) and inode in inodes:
                        return True
        return False

    async def wait_connected(self, port: int, seconds: float) -> bool:
        """Poll until ``connected(port)``; False when ``seconds`` pass first."""
        deadline = time.monotonic() + seconds
        while not self.connected(port):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    async def wait(self, seconds: float) -> int | None:
        """Wait up to ``seconds`` for the process to exit by itself; its exit code or None."""
        if self.process is None:
            return None
        try:
            return await asyncio.wait_for(self.process.wait(), seconds)
        except TimeoutError:
            return None

    def output(self, last: int = 3000) -> str:
        """The end of every log of this slot, for assertion messages."""
        parts = []
        for log in self.logs:
            with contextlib.suppress(OSError):
                text = log.read_text(errors="replace")
                parts.append(f"--- {log.name}\n{text[-last:]}")
        return "\n".join(parts)


async def stop_all(workers: Iterable[Worker], seconds: float) -> list[tuple[int | None, float]]:
    """SIGTERM every running worker at once and wait for each; [(exit code, seconds)]."""
    return list(await asyncio.gather(*(w.terminate(seconds) for w in workers)))


async def kill_all(workers: Iterable[Worker]) -> None:
    """kill -9 whatever still runs (cleanup)."""
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):
            await worker.kill()


# -- test-only connectors ---------------------------------------------------------------------


class EarlyAckSource:
    """NEGATIVE CONTROL ONLY: a broker source that acknowledges each message on receipt.

    This is the classic bug the crash test must be able to catch: acknowledging before the
    write means that a worker killed between the two loses what it held. It wraps the real
    source named by ``inner`` (a [source] type: "rabbitmq", "redis_streams", "nats") built
    with the other keys, acks every envelope as soon as it is read, and hands the pipeline an
    envelope whose ack and nack do nothing.
    """

    def __init__(self, inner: str, **options: Any) -> None:
        self._inner = _connector_class(inner)(**options)

    async def prepare(self, config: Any) -> None:
        prepare = getattr(self._inner, "prepare", None)
        if prepare is not None:
            await prepare(config)

    def stop_consuming(self) -> None:
        self._inner.stop_consuming()

    def __aiter__(self) -> EarlyAckSource:
        return self

    async def __anext__(self) -> Envelope:
        envelope: Envelope = await self._inner.__anext__()
        await self._inner.ack_many([envelope])
        return Envelope(
            envelope.payload,
            key=envelope.key,
            priority=envelope.priority,
            headers=envelope.headers,
            error=envelope.error,
        )

    async def close(self) -> None:
        await self._inner.close()


class HarnessPostgresSink(PostgresSink):
    """A PostgresSink that records the ids each write committed, and can misbehave on purpose.

    Args (besides PostgresSink's):
        record_path: append one JSON line per committed write: {"pid": ..., "ids": [...]}.
        crash_after_writes: after this many committed writes, end the process at once with
            exit status CRASH_EXIT, before the pipeline can acknowledge anything of that write
            (the "crash between the database commit and the ack"). 0 never crashes.
        delay: seconds to sleep before each write (a slow database).
    """

    def __init__(
        self,
        *args: Any,
        record_path: str | None = None,
        crash_after_writes: int = 0,
        delay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._record_path = record_path
        self._crash_after = crash_after_writes
        self._delay = delay
        self._committed_writes = 0

    async def write(self, batch: Sequence[Any]) -> None:
        if self._delay:
            await asyncio.sleep(self._delay)
        try:
            await super().write(batch)
        except PartialFailure as exc:
            self._committed([p for i, p in enumerate(batch) if i not in exc.failures])
            raise
        self._committed(batch)

    def _committed(self, payloads: Sequence[Any]) -> None:
        if self._record_path is not None:
            line = json.dumps({"pid": os.getpid(), "ids": [p["id"] for p in payloads]}) + "\n"
            fd = os.open(self._record_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        self._committed_writes += 1
        if self._crash_after and self._committed_writes >= self._crash_after:
            os._exit(CRASH_EXIT)


class SlowStartSource:
    """A source whose ``prepare`` takes ``seconds`` (a slow connect), then never yields.

    It writes ``marker`` when ``prepare`` begins, so a test knows the pipeline is running and
    can signal it while it is still starting.
    """

    def __init__(self, marker: str, seconds: float = 5.0) -> None:
        self._marker = marker
        self._seconds = seconds
        self._stop = asyncio.Event()

    async def prepare(self, config: Any) -> None:
        _touch(self._marker)
        await asyncio.sleep(self._seconds)

    def stop_consuming(self) -> None:
        self._stop.set()

    def __aiter__(self) -> SlowStartSource:
        return self

    async def __anext__(self) -> Envelope:
        await self._stop.wait()
        raise StopAsyncIteration

    async def close(self) -> None:
        self._stop.set()


def _exists(path: Path) -> bool:
    return path.exists()


def _touch(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))


async def wait_file(path: Path, seconds: float) -> bool:
    """Poll until ``path`` exists; False when ``seconds`` pass first."""
    deadline = time.monotonic() + seconds
    while True:
        if _exists(path):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)


def read_records(path: Path) -> list[list[int]]:
    """The id lists a HarnessPostgresSink recorded, one per committed write, in order."""
    if not path.exists():
        return []
    return [json.loads(line)["ids"] for line in path.read_text().splitlines() if line.strip()]


# -- RabbitMQ restarts -----------------------------------------------------------------------


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on the port."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


async def run_command(*argv: str, seconds: float = 60.0) -> tuple[int | None, str]:
    """Run a command, wait up to ``seconds``; (exit code or None on timeout, its output)."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), seconds)
    except TimeoutError:
        process.kill()
        await process.wait()
        return None, ""
    return process.returncode, output.decode(errors="replace")


async def wait_port(port: int, seconds: float) -> bool:
    """Poll until the port accepts connections; False when ``seconds`` pass first."""
    deadline = time.monotonic() + seconds
    while not port_open(port):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.5)
    return True


async def ensure_rabbitmq_running() -> None:
    """Bring RabbitMQ back whatever state a test left it in: start_app, else start the server."""
    if port_open(5672):
        return
    await run_command("rabbitmqctl", "start_app", seconds=60)
    if await wait_port(5672, 30):
        return
    await run_command("rabbitmq-server", "-detached", seconds=30)
    await wait_port(5672, 90)
