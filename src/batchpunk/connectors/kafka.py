"""Kafka: a consumer-group Source whose commits never skip a message, and a batch producer Sink.

Choose Kafka when the log already is your system of record: partitions give order and scale,
consumer groups share them among workers. Both connectors use aiokafka (the ``kafka`` extra).

How the source keeps its promise (every message ends processed or durably dead-lettered, and a
committed offset never passes one that did not):

- Each assigned partition has a ``_Ledger``: the offsets handed out, in order, and those finished.
  The committable position is the first unfinished offset (or one past the last delivered when
  all are finished), so concurrent batches may finish in any order and a commit still never
  passes an unfinished message. A committer task commits what advanced, coalesced over
  ``commit_interval`` seconds.
- One fetch task calls ``getmany`` and fills a buffer that ``__anext__`` drains. When the buffer
  holds ``buffer_size`` records (the pipeline is full: a slow or unavailable downstream), the
  task pauses every assigned partition, so aiokafka stops prefetching too; it resumes them when
  the pipeline reads again. Memory stays bounded and the group membership stays alive.
- On a rebalance, the revoked partitions' buffered records are dropped (never handed out), the
  batches already running get ``revoke_timeout`` seconds to finish, the committable positions
  are committed, and only then does aiokafka release the partitions. Acknowledgements that come
  later for a released partition are ignored; its next owner reads those messages again.
- With a position store (``PostgresSink(positions=...)``, wired by the pipeline), a newly
  assigned partition skips the offsets the store says were already written: effectively once.
  Records aiokafka fetches before the store has answered are dropped, and fetched again after
  the seek that follows its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from batchpunk.connectors._common import PayloadError, mask_secrets, tls_context
from batchpunk.connectors._toolkit import (
    BufferedSource,
    choice_option,
    int_option,
    payload_decoder,
    reconnect_delay,
)
from batchpunk.envelope import Envelope
from batchpunk.errors import ConfigError, ConnectorError, PartialFailure, require

__all__ = [
    "KafkaError",
    "KafkaSink",
    "KafkaSource",
    "KafkaUnavailable",
    "MessageTooLarge",
    "PositionStore",
]

logger = logging.getLogger(__name__)

DECODINGS = ("json", "text", "bytes")
ENCODINGS = ("json", "text", "bytes")
BATCH_KEYS = ("key", "partition", "none")

_DEFAULT_COUNT = 500


class KafkaError(ConnectorError):
    """Something Kafka refused that retrying will not fix (a bad setting, an unknown topic)."""


class KafkaUnavailable(KafkaError, ConnectionError):
    """Kafka could not be reached or did not answer in time: an outage, retried and waited out."""

    unavailable = True


class MessageTooLarge(KafkaError, ValueError):
    """A record larger than ``max_message_bytes``: dead-lettered as malformed, never processed."""

    retryable = False


class PositionStore(Protocol):
    """Where a sink records the stream positions it wrote, in the same transaction as the rows.

    ``load_positions`` returns, per partition, the ranges of offsets ``(first, last)`` already
    written at or above ``floors[partition]`` (the committed offset), and may forget the ranges
    below it. ``PostgresSink(positions=...)`` implements it.
    """

    async def load_positions(
        self, stream: str, floors: Mapping[int, int]
    ) -> dict[int, list[tuple[int, int]]]: ...


# -- the offset ledger -----------------------------------------------------------------------


class _Ledger:
    """The offsets of one partition handed out and finished, for commits that never skip one.

    ``committable()`` is the offset to commit (Kafka commits the next offset to read): the first
    offset handed out and not finished, or one past the last one delivered. Offsets arrive in
    increasing order (with gaps after compaction), so the unfinished ones are a queue whose
    head only moves forward.
    """

    __slots__ = (
        "alive",
        "committed",
        "end",
        "finished",
        "loading",
        "outstanding",
        "partition",
        "refetch",
        "skip",
        "tp",
    )

    def __init__(self, tp: Any, start: int | None = None) -> None:
        self.tp = tp
        self.partition: int = getattr(tp, "partition", 0)
        self.outstanding: deque[int] = deque()
        self.finished: set[int] = set()
        self.end = start  # one past the highest offset delivered; None before the first
        self.committed = start  # the last offset committed, None before the first commit
        self.alive = True  # False once revoked: late acks are ignored
        self.skip: list[tuple[int, int]] = []  # ranges a position store says are written
        # True while the position store is asked about a new assignment: records are dropped
        # (fetched again after the seek that follows); ``refetch`` is the lowest one dropped.
        self.loading = False
        self.refetch: int | None = None

    def deliver(self, offset: int) -> bool:
        """Record an offset handed out; False (not recorded) unless it is above every offset
        delivered before, so that no offset is handed out twice and the queue stays ordered."""
        outstanding = self.outstanding
        if (self.end is not None and offset < self.end) or (
            outstanding and offset <= outstanding[-1]
        ):
            return False
        outstanding.append(offset)
        self.end = offset + 1
        return True

    def finish(self, offset: int) -> None:
        """Record an offset finished: processed, or its dead letter stored."""
        outstanding = self.outstanding
        if outstanding and outstanding[0] == offset:
            outstanding.popleft()
            finished = self.finished
            while outstanding and outstanding[0] in finished:
                finished.discard(outstanding.popleft())
        elif outstanding and offset > outstanding[0]:
            self.finished.add(offset)

    def forget_from(self, offset: int) -> None:
        """Drop ``offset`` and later from the ledger (buffered, never handed out)."""
        outstanding = self.outstanding
        while outstanding and outstanding[-1] >= offset:
            self.finished.discard(outstanding.pop())
        self.end = offset if self.end is None or offset < self.end else self.end

    def committable(self) -> int | None:
        """The offset to commit: no message below it is unfinished."""
        if self.outstanding:
            return self.outstanding[0]
        return self.end

    def written(self, offset: int) -> bool:
        """True when the position store said this offset was already written."""
        return any(first <= offset <= last for first, last in self.skip)


# -- settings --------------------------------------------------------------------------------


def _servers(owner: str, value: Any) -> list[str]:
    if isinstance(value, str) and value:
        return [s.strip() for s in value.split(",") if s.strip()]
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ConfigError(
        f"{owner}.bootstrap_servers: expected 'host:port' or a list of them, got {value!r}"
    )


def _seconds(owner: str, field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e9:
        raise ConfigError(f"{owner}.{field}: expected a number of seconds > 0, got {value!r}")
    return float(value)


def _security(
    owner: str,
    tls: Any,
    sasl_mechanism: str | None,
    sasl_username: str | None,
    sasl_password: str | None,
) -> dict[str, Any]:
    """aiokafka's security keywords from our TLS table and SASL settings."""
    context = tls_context(tls, owner)
    kwargs: dict[str, Any] = {}
    if sasl_mechanism is not None:
        if sasl_mechanism not in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            raise ConfigError(
                f"{owner}.sasl_mechanism: expected PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512, "
                f"got {sasl_mechanism!r}"
            )
        if not sasl_username or not sasl_password:
            raise ConfigError(f"{owner}.sasl_username / sasl_password: both are needed for SASL")
        kwargs.update(
            sasl_mechanism=sasl_mechanism,
            sasl_plain_username=sasl_username,
            sasl_plain_password=sasl_password,
            security_protocol="SASL_SSL" if context else "SASL_PLAINTEXT",
        )
    elif context is not None:
        kwargs["security_protocol"] = "SSL"
    if context is not None:
        kwargs["ssl_context"] = context
    return kwargs


def _text_or_bytes(value: bytes | None) -> str | bytes | None:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value


def _unavailable(errors: Any) -> tuple[type[BaseException], ...]:
    return (errors.KafkaConnectionError, errors.KafkaTimeoutError, OSError, TimeoutError)


# -- the source ------------------------------------------------------------------------------


class KafkaSource(BufferedSource):
    """Reads topics through a consumer group and commits only offsets below which all is done.

    Args:
        bootstrap_servers: "host:port" (comma-separated for several) or a list.
        topics: a topic name or a list of them.
        group_id: the consumer group; workers in one group share the partitions.
        decode: "json" (default), "text" (UTF-8) or "bytes" (raw).
        batch_key: what becomes the envelope's lane key: "key" (the Kafka key, default: per-key
            order with ``preserve_order``; many distinct keys make many small batches),
            "partition" (per-partition order with ``preserve_order``), or "none" (one lane).
        max_message_bytes: a record whose value is larger is dead-lettered as malformed
            (MessageTooLarge) instead of decoded; None accepts any size.
        count: records per fetch; None takes the pipeline's ``max_size``.
        buffer_size: records read ahead before the partitions are paused; None: 2 x count.
        fetch_timeout: seconds one fetch waits for records.
        commit_interval: seconds over which acknowledgements are coalesced into one commit.
        revoke_timeout: seconds a rebalance waits for the revoked partitions' running batches
            before it commits what finished and lets them go (keep it below session_timeout).
        session_timeout: seconds without heartbeat after which the group drops this worker.
        auto_offset_reset: where a group without a committed offset starts: "earliest" (default:
            nothing published before the first worker started is missed) or "latest".
        client_id: shown in the broker's logs and metrics.
        tls: None, True (system CAs) or a table of ca_file, cert_file, key_file, verify.
        sasl_mechanism, sasl_username, sasl_password: SASL PLAIN or SCRAM authentication.
    """

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        topics: str | Sequence[str],
        group_id: str,
        *,
        decode: str = "json",
        batch_key: str = "key",
        max_message_bytes: int | None = None,
        count: int | None = None,
        buffer_size: int | None = None,
        fetch_timeout: float = 0.5,
        commit_interval: float = 0.2,
        revoke_timeout: float = 5.0,
        session_timeout: float = 10.0,
        auto_offset_reset: str = "earliest",
        client_id: str | None = None,
        tls: Any = None,
        sasl_mechanism: str | None = None,
        sasl_username: str | None = None,
        sasl_password: str | None = None,
    ) -> None:
        owner = "KafkaSource"
        self.bootstrap_servers = _servers(owner, bootstrap_servers)
        if isinstance(topics, str):
            topics = [topics]
        if not topics or not all(isinstance(t, str) and t for t in topics):
            raise ConfigError(f"{owner}.topics: expected a topic name or a list, got {topics!r}")
        self.topics = list(topics)
        if not isinstance(group_id, str) or not group_id:
            raise ConfigError(f"{owner}.group_id: expected a non-empty string, got {group_id!r}")
        self.group_id = group_id
        self.decode = choice_option(owner, "decode", decode, DECODINGS)
        self.batch_key = choice_option(owner, "batch_key", batch_key, BATCH_KEYS)
        self.max_message_bytes = (
            None
            if max_message_bytes is None
            else int_option(owner, "max_message_bytes", max_message_bytes)
        )
        super().__init__(owner, count, _DEFAULT_COUNT)  # checks count here, in Args order
        self._buffer_given = (
            None if buffer_size is None else int_option(owner, "buffer_size", buffer_size)
        )
        self.fetch_timeout = _seconds(owner, "fetch_timeout", fetch_timeout)
        self.commit_interval = _seconds(owner, "commit_interval", commit_interval)
        self.revoke_timeout = _seconds(owner, "revoke_timeout", revoke_timeout)
        self.session_timeout = _seconds(owner, "session_timeout", session_timeout)
        if auto_offset_reset not in ("earliest", "latest"):
            raise ConfigError(
                f"{owner}.auto_offset_reset: expected 'earliest' or 'latest', "
                f"got {auto_offset_reset!r}"
            )
        self.auto_offset_reset = auto_offset_reset
        self.client_id = client_id
        self._security = _security(owner, tls, sasl_mechanism, sasl_username, sasl_password)
        self._secrets = [s for s in (sasl_password,) if s]
        self._decoder = self._make_decoder(decode)

        self._consumer: Any = None
        self._errors: Any = None
        self._ledgers: dict[Any, _Ledger] = {}
        #: Ledgers of revoked partitions whose messages were still in this worker's engine: if
        #: the partition comes back here, reading resumes after them instead of reading them
        #: again (aiokafka revokes every partition at a rebalance and may give most back).
        self._dormant: dict[Any, _Ledger] = {}
        self._commit_wake = asyncio.Event()
        self._acked = asyncio.Event()
        self._closing = False
        self._closed = False
        self._fetcher: asyncio.Task[None] | None = None
        self._committer: asyncio.Task[None] | None = None
        self._positions: PositionStore | None = None
        #: Counts for tests and stats: records read, malformed, commits sent, rebalances seen.
        self.read = 0
        self.malformed = 0
        self.commits = 0
        self.rebalances = 0

    def __repr__(self) -> str:
        return (
            f"KafkaSource(bootstrap_servers={','.join(self.bootstrap_servers)!r}, "
            f"topics={self.topics!r}, group_id={self.group_id!r})"
        )

    @property
    def buffer_size(self) -> int:
        """Records read ahead before the partitions are paused."""
        return self._buffer_given or 2 * self.count

    @property
    def connected(self) -> bool:
        """True while the consumer runs and holds a group assignment (or is joining one)."""
        return self._consumer is not None and self._failure is None and not self._closed

    def use_positions(self, store: PositionStore) -> None:
        """Skip offsets ``store`` says were already written (called by the pipeline)."""
        self._positions = store

    # -- starting (the buffer and iteration are BufferedSource's) -----------------------------

    async def _open(self) -> None:
        aiokafka = require("aiokafka", "kafka", "KafkaSource")
        self._errors = require("aiokafka.errors", "kafka", "KafkaSource")
        consumer = aiokafka.AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            group_id=self.group_id,
            client_id=self.client_id or f"batchpunk-{self.group_id}",
            enable_auto_commit=False,
            auto_offset_reset=self.auto_offset_reset,
            max_poll_records=self.count,
            session_timeout_ms=round(self.session_timeout * 1000),
            heartbeat_interval_ms=max(100, round(self.session_timeout * 1000 / 3)),
            # How long the group waits for members to rejoin: our revoke handling plus margin.
            rebalance_timeout_ms=round((self.revoke_timeout + 2) * 1000),
            **self._security,
        )
        consumer.subscribe(topics=self.topics, listener=_listener(self, aiokafka))
        self._consumer = consumer  # before start(): the first assignment may come at once
        try:
            await consumer.start()
        except Exception as exc:
            self._consumer = None
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise self._translate(exc, "connecting") from exc
        self._fetcher = asyncio.create_task(self._read_loop(), name=f"{self!r} fetch")
        self._committer = asyncio.create_task(self._commit_loop(), name=f"{self!r} commit")

    def _translate(self, exc: BaseException, doing: str) -> BaseException:
        text = mask_secrets(f"{self!r}: {doing} failed: {type(exc).__name__}: {exc}", self._secrets)
        if isinstance(exc, _unavailable(self._errors)):
            return KafkaUnavailable(text)
        return KafkaError(text)

    # -- the fetch task ----------------------------------------------------------------------

    async def _read(self) -> list[Envelope]:
        records = await self._consumer.getmany(
            timeout_ms=round(self.fetch_timeout * 1000), max_records=self.count
        )
        return self._accept(records) if records else []

    def _read_failed(self, exc: Exception) -> BaseException | None:
        if isinstance(exc, _unavailable(self._errors)):
            logger.warning("%s; retrying", self._translate(exc, "fetching"))
            return None
        error = self._translate(exc, "fetching")
        logger.error("%s; the source stops", error)
        return error

    def _full(self) -> bool:
        return len(self._buffer) >= self.buffer_size

    def _pause_reading(self) -> None:
        """Backpressure: pause every assigned partition, so aiokafka stops prefetching too."""
        assigned = self._consumer.assignment()
        if assigned:
            self._consumer.pause(*assigned)

    def _resume_reading(self) -> None:
        assigned = self._consumer.assignment()
        if assigned and not self._closing:
            self._consumer.resume(*assigned)

    def _accept(self, records: Mapping[Any, Sequence[Any]]) -> list[Envelope]:
        """Turn fetched records into envelopes; records of a partition not (or no longer) ours
        are dropped unread: their next owner reads them from the committed offset."""
        envelopes: list[Envelope] = []
        assigned: Any = None
        skipped = False
        for tp, batch in records.items():
            ledger = self._ledgers.get(tp)
            if ledger is None:
                # aiokafka fetches a new assignment before it calls on_partitions_assigned:
                # records of a partition that is ours must be kept (its fetch position has
                # moved past them), records of one that is not are dropped.
                assigned = assigned if assigned is not None else self._consumer.assignment()
                if tp not in assigned:
                    continue
                ledger = self._ledgers[tp] = _Ledger(tp)
                # With a position store, _assigned is still to come: it loads the skip ranges.
                ledger.loading = self._positions is not None
            if not ledger.alive:
                continue
            if ledger.loading:
                # The position store has not answered yet: hand nothing out, and let _assigned
                # seek back to these records once it has (at or below ``refetch``).
                if batch:
                    first = min(record.offset for record in batch)
                    if ledger.refetch is None or first < ledger.refetch:
                        ledger.refetch = first
                continue
            for record in batch:
                offset = record.offset
                if ledger.end is not None and offset < ledger.end:
                    # The fetch position moved back (a reset or a seek): start a new ledger so
                    # offsets stay increasing; acks of the old one are ignored, and its messages
                    # come again here (a duplicate at worst, never a skipped message).
                    ledger.alive = False
                    fresh = _Ledger(tp)
                    fresh.skip, fresh.committed = ledger.skip, ledger.committed
                    ledger = self._ledgers[tp] = fresh
                if ledger.skip and ledger.written(offset):
                    ledger.end = offset + 1  # written before: finished without processing
                    skipped = True
                    continue
                if not ledger.deliver(offset):
                    continue  # already handed out by this ledger (never expected here)
                envelopes.append(self._envelope(ledger, record))
        if skipped and not self._commit_wake.is_set():
            # No acknowledgement will come for a skipped record: without this wake-up the
            # commit past a written range waited for the next ack, forever if none came.
            self._commit_wake.set()
        self.read += len(envelopes)
        return envelopes

    def _envelope(self, ledger: _Ledger, record: Any) -> Envelope:
        key = _text_or_bytes(record.key)
        headers: dict[str, Any] = {
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "key": key,
            "timestamp": record.timestamp,
        }
        if record.headers:
            headers["kafka_headers"] = {k: _text_or_bytes(v) for k, v in record.headers}
        lane = (
            key
            if self.batch_key == "key"
            else record.partition
            if self.batch_key == "partition"
            else None
        )
        raw = record.value
        error: BaseException | None = None
        payload: Any = raw
        if raw is None:
            error = PayloadError(
                f"record {record.topic}[{record.partition}]@{record.offset} has no value "
                "(a tombstone)"
            )
        elif self.max_message_bytes is not None and len(raw) > self.max_message_bytes:
            error = MessageTooLarge(
                f"record {record.topic}[{record.partition}]@{record.offset} is {len(raw)} bytes, "
                f"more than max_message_bytes={self.max_message_bytes}"
            )
        else:
            try:
                payload = self._decoder(raw)
            except Exception as exc:
                error = exc
        if error is not None:
            self.malformed += 1
        return Envelope(
            payload, key=lane, headers=headers, receipt=(ledger, record.offset), error=error
        )

    def _make_decoder(self, decode: str) -> Callable[[bytes], Any]:
        decoder = payload_decoder("KafkaSource", decode)  # the toolkit's: one per project
        return lambda raw: decoder(raw)[0]

    # -- settling ------------------------------------------------------------------------------

    async def ack_many(self, envelopes: Sequence[Envelope]) -> None:
        """Mark the envelopes finished; the committer commits what became contiguous."""
        for envelope in envelopes:
            receipt = envelope.receipt
            if receipt is None:
                continue
            ledger, offset = receipt
            # A revoked ledger keeps count too: it may be revived (see _dormant); only live
            # ledgers are committed.
            ledger.finish(offset)
        if not self._commit_wake.is_set():
            self._commit_wake.set()
        self._acked.set()

    async def nack_many(self, envelopes: Sequence[Envelope], requeue: bool) -> None:
        """Kafka cannot give one message back: with ``requeue`` the envelope stays unfinished,
        so the committed offset stays below it and the partition's next reader (this worker
        after a restart, or another after a rebalance) reads it again. Without ``requeue``
        the message is rejected: finished, so the commit moves past it."""
        if not requeue:
            await self.ack_many(envelopes)

    # -- the committer task ----------------------------------------------------------------

    def _due(self) -> dict[Any, int]:
        due: dict[Any, int] = {}
        for tp, ledger in self._ledgers.items():
            if not ledger.alive:
                continue
            position = ledger.committable()
            if position is not None and (ledger.committed is None or position > ledger.committed):
                due[tp] = position
        return due

    async def _commit(self, due: Mapping[Any, int]) -> None:
        if not due:
            return
        await self._consumer.commit(dict(due))
        self.commits += 1
        for tp, position in due.items():
            ledger = self._ledgers.get(tp)
            if ledger is not None and (ledger.committed is None or position > ledger.committed):
                ledger.committed = position

    async def _commit_loop(self) -> None:
        errors = self._errors
        failures = 0
        while True:
            await self._commit_wake.wait()
            await asyncio.sleep(self.commit_interval)
            self._commit_wake.clear()
            try:
                await self._commit(self._due())
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A rebalance in progress, or the broker unreachable: the same offsets (or
                # higher) are committed at the next pass, or by the rebalance itself.
                level = (
                    logging.INFO if isinstance(exc, errors.CommitFailedError) else logging.WARNING
                )
                logger.log(level, "%s; retrying", self._translate(exc, "committing"))
                self._commit_wake.set()
                failures += 1
                await asyncio.sleep(reconnect_delay(failures))

    # -- rebalancing (called by aiokafka through _listener) ------------------------------------

    async def _revoked(self, revoked: Sequence[Any]) -> None:
        self.rebalances += 1
        ledgers = [self._ledgers[tp] for tp in revoked if tp in self._ledgers]
        if not ledgers:
            return
        # Records read ahead and never handed out: drop them, their next owner reads them.
        self._drop_buffered(ledgers)
        # Batches already running get revoke_timeout to finish (not at close: the pipeline has
        # settled or handed back everything by then).
        deadline = time.monotonic() + self.revoke_timeout
        while not self._closing and any(led.outstanding for led in ledgers):
            self._acked.clear()  # set by ack_many: no polling, a wake-up per settled batch
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait(), max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline and any(led.outstanding for led in ledgers):
                logger.warning(
                    "%r: %d message(s) of revoked partitions still running after "
                    "revoke_timeout=%ss; their next owner processes them again",
                    self,
                    sum(len(led.outstanding) for led in ledgers),
                    self.revoke_timeout,
                )
                break
        due = {}
        for ledger in ledgers:
            position = ledger.committable()
            if position is not None and (ledger.committed is None or position > ledger.committed):
                due[ledger.tp] = position
        try:
            await self._commit(due)
        except Exception as exc:
            logger.warning(
                "%s; the next owner may process some messages again",
                self._translate(exc, "committing revoked partitions"),
            )
        for ledger in ledgers:
            ledger.alive = False
            self._ledgers.pop(ledger.tp, None)
            if ledger.outstanding and self._positions is None:
                self._dormant[ledger.tp] = ledger

    def _drop_buffered(self, ledgers: Sequence[_Ledger]) -> None:
        """Drop the buffered (never handed out) envelopes of ``ledgers`` from the buffer and
        from the ledgers."""
        gone = {id(ledger) for ledger in ledgers}
        kept: deque[Envelope] = deque()
        dropped: dict[int, int] = {}
        for envelope in self._buffer:
            ledger, offset = envelope.receipt
            if id(ledger) in gone:
                first = dropped.get(id(ledger))
                dropped[id(ledger)] = offset if first is None or offset < first else first
            else:
                kept.append(envelope)
        self._buffer.clear()  # in place: a waiting __anext__ holds this very deque
        self._buffer.extend(kept)
        for ledger in ledgers:
            first = dropped.get(id(ledger))
            if first is not None:
                ledger.forget_from(first)

    async def _assigned(self, assigned: Sequence[Any]) -> None:
        consumer = self._consumer
        store = self._positions
        if store is None:
            for tp in assigned:
                if tp in self._ledgers:
                    continue
                dormant = self._dormant.pop(tp, None)
                if dormant is None or dormant.end is None:
                    self._ledgers[tp] = _Ledger(tp)
                    continue
                # Back to this worker while messages it read before are still in its engine:
                # resume after them (reading from the committed offset handed them out a
                # second time, to this same process), or after another owner's commit.
                position = await consumer.committed(tp)
                if position is not None and position > dormant.end:
                    dormant.end = dormant.committed = position
                dormant.alive = True
                self._ledgers[tp] = dormant
                consumer.seek(tp, dormant.end)
            # Partitions that went elsewhere: their ledgers count on only until finished.
            for tp in [tp for tp, led in self._dormant.items() if not led.outstanding]:
                del self._dormant[tp]
            return
        # aiokafka fetches the new assignment already: until the store has answered, _accept
        # hands nothing out for these partitions (a "loading" ledger drops their records).
        loading: dict[Any, _Ledger] = {}
        replaced: list[_Ledger] = []
        for tp in assigned:
            old = self._ledgers.get(tp)
            if old is not None and old.loading:
                loading[tp] = old  # made by _accept, with the first offset it dropped
                continue
            ledger = loading[tp] = self._ledgers[tp] = _Ledger(tp)
            ledger.loading = True
            if old is not None and old.alive:  # not expected: ledgers are made loading
                old.alive = False
                replaced.append(old)
                ledger.refetch = old.outstanding[0] if old.outstanding else None
        if replaced:
            self._drop_buffered(replaced)
        by_topic: dict[str, list[Any]] = {}
        for tp in assigned:
            by_topic.setdefault(tp.topic, []).append(tp)
        try:
            for topic, tps in by_topic.items():
                committed: dict[int, int | None] = {}
                for tp in tps:
                    committed[tp.partition] = await consumer.committed(tp)
                floors = {p: c if c is not None else 0 for p, c in committed.items()}
                written = await store.load_positions(topic, floors)
                moved: dict[Any, int] = {}
                for tp in tps:
                    ledger = loading.pop(tp)
                    ranges = sorted(written.get(tp.partition, ()))
                    position = floors[tp.partition]
                    rest: list[tuple[int, int]] = []
                    for first, last in ranges:  # skip the written prefix with one seek
                        if first <= position <= last:
                            position = last + 1
                        elif last >= position:
                            rest.append((first, last))
                    # A fresh ledger, and a seek that fetches again what was dropped meanwhile.
                    start: int | None = position
                    if committed[tp.partition] is None and not ranges:
                        start = None  # keep where auto_offset_reset put the fetch
                    ledger.alive = False
                    fresh = self._ledgers[tp] = _Ledger(tp, start)
                    fresh.skip = rest
                    seek = start if start is not None else ledger.refetch
                    if seek is not None:
                        consumer.seek(tp, seek)
                    if position != floors[tp.partition]:
                        moved[tp] = position
                for tp, position in moved.items():
                    await consumer.commit({tp: position})
                    logger.info(
                        "%r: %s[%d] resumes at offset %d, after the positions the sink "
                        "stored (committed was %d)",
                        self,
                        topic,
                        tp.partition,
                        position,
                        floors[tp.partition],
                    )
        finally:
            # The store or Kafka failed: read these partitions without skip ranges from where
            # their records were dropped (a written message may be processed again, none lost).
            for tp, ledger in loading.items():
                ledger.loading = False
                if ledger.refetch is not None:
                    with contextlib.suppress(Exception):
                        consumer.seek(tp, ledger.refetch)
                    ledger.refetch = None

    # -- stopping and closing ----------------------------------------------------------------

    async def close(self) -> None:
        """Stop fetching, commit what finished, leave the group. Safe to call again.

        Envelopes handed out and not acknowledged by now stay uncommitted: the partition's next
        reader gets them again.
        """
        if self._closed:
            return
        self.stop_consuming()
        self._closing = True
        fetcher, self._fetcher = self._fetcher, None
        if fetcher is not None:
            fetcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await fetcher
        committer, self._committer = self._committer, None
        if committer is not None:
            committer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await committer
        self._unhanded()  # uncommitted: the partition's next reader gets them
        consumer = self._consumer
        if consumer is not None:
            try:
                await self._commit_final(consumer)
            finally:
                # Bounded: aiokafka retries an unreachable coordinator without end, and an
                # outage must not hold a stop (not even a hard one) for ever.
                try:
                    if not await _within(consumer.stop(), self.revoke_timeout):
                        logger.warning("%r: the broker did not answer; stopped without it", self)
                except Exception as exc:
                    logger.debug("%r: stopping the consumer failed: %r", self, exc)
                self._consumer = None
        self._closed = True

    async def _commit_final(self, consumer: Any) -> None:
        due = self._due()
        if not due:
            return
        try:
            if not await _within(consumer.commit(due), self.revoke_timeout):
                raise TimeoutError(f"no answer within revoke_timeout={self.revoke_timeout}s")
            self.commits += 1
        except Exception as exc:
            logger.warning(
                "%s; those messages are read again by the next worker",
                self._translate(exc, "committing at close"),
            )


async def _within(call: Any, seconds: float) -> bool:
    """Await ``call`` for at most ``seconds``; False if it did not finish (it is left to end
    on its own: aiokafka's commit and stop ignore a cancel while the broker is unreachable).

    Raises what the call raised when it did finish.
    """
    task = asyncio.ensure_future(call)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return False
    if not task.cancelled():  # aiokafka's stop can end with its own fetch tasks' cancel
        task.result()
    return True


def _listener(source: KafkaSource, aiokafka: Any) -> Any:
    """aiokafka's rebalance callbacks, forwarded to the source (aiokafka awaits them in the
    join, so the revoked partitions are released only once ``_revoked`` returned)."""

    class Listener(aiokafka.ConsumerRebalanceListener):  # type: ignore[misc]
        async def on_partitions_revoked(self, revoked: Any) -> None:
            await source._revoked(list(revoked))

        async def on_partitions_assigned(self, assigned: Any) -> None:
            await source._assigned(list(assigned))

    return Listener()


# -- the sink --------------------------------------------------------------------------------


class KafkaSink:
    """Produces every item of a batch to a topic with acks=all, one flush per batch.

    Args:
        bootstrap_servers: "host:port" (comma-separated for several) or a list.
        topic: the topic written to.
        encode: "json" (default), "text" (str items) or "bytes" (bytes items).
        key_field: for mapping items, the field whose value (as text) is the record key, so
            that items with one key land in one partition in order; None: no key.
        compression: None, "gzip", "snappy", "lz4" or "zstd" (the codec's package is needed).
        linger: seconds the producer waits to fill a request; 0 sends at once (the batch is
            already a batch).
        max_request_size: bytes; a larger record fails alone, as a bad message.
        enable_idempotence: the broker deduplicates retried produces (needs broker support; the
            Tansu test broker has none).
        tls, sasl_mechanism, sasl_username, sasl_password: as for KafkaSource.

    ``write`` returns ``(partition, offset)`` per item. A record Kafka refuses for itself (too
    large, not encodable) fails alone and is dead-lettered; when Kafka is unreachable the whole
    batch fails with KafkaUnavailable and is retried, never dead-lettered.
    """

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        topic: str,
        *,
        encode: str = "json",
        key_field: str | None = None,
        compression: str | None = None,
        linger: float = 0.0,
        max_request_size: int = 1_048_576,
        enable_idempotence: bool = False,
        client_id: str | None = None,
        tls: Any = None,
        sasl_mechanism: str | None = None,
        sasl_username: str | None = None,
        sasl_password: str | None = None,
    ) -> None:
        owner = "KafkaSink"
        self.bootstrap_servers = _servers(owner, bootstrap_servers)
        if not isinstance(topic, str) or not topic:
            raise ConfigError(f"{owner}.topic: expected a topic name, got {topic!r}")
        self.topic = topic
        self.encode = choice_option(owner, "encode", encode, ENCODINGS)
        if key_field is not None and (not isinstance(key_field, str) or not key_field):
            raise ConfigError(f"{owner}.key_field: expected a field name, got {key_field!r}")
        self.key_field = key_field
        if compression not in (None, "gzip", "snappy", "lz4", "zstd"):
            raise ConfigError(
                f"{owner}.compression: expected gzip, snappy, lz4 or zstd, got {compression!r}"
            )
        self.compression = compression
        if isinstance(linger, bool) or not isinstance(linger, int | float) or linger < 0:
            raise ConfigError(f"{owner}.linger: expected seconds >= 0, got {linger!r}")
        self.linger = float(linger)
        self.max_request_size = int_option(owner, "max_request_size", max_request_size)
        if not isinstance(enable_idempotence, bool):
            raise ConfigError(f"{owner}.enable_idempotence: expected true or false")
        self.enable_idempotence = enable_idempotence
        self.client_id = client_id
        self._security = _security(owner, tls, sasl_mechanism, sasl_username, sasl_password)
        self._secrets = [s for s in (sasl_password,) if s]
        self._producer: Any = None
        self._errors: Any = None
        self._lock = asyncio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"KafkaSink(bootstrap_servers={','.join(self.bootstrap_servers)!r}, "
            f"topic={self.topic!r})"
        )

    async def _open(self) -> Any:
        async with self._lock:
            if self._producer is None:
                aiokafka = require("aiokafka", "kafka", "KafkaSink")
                self._errors = require("aiokafka.errors", "kafka", "KafkaSink")
                producer = aiokafka.AIOKafkaProducer(
                    bootstrap_servers=self.bootstrap_servers,
                    client_id=self.client_id,
                    acks="all",
                    enable_idempotence=self.enable_idempotence,
                    compression_type=self.compression,
                    linger_ms=round(self.linger * 1000),
                    max_request_size=self.max_request_size,
                    max_batch_size=max(16384, min(self.max_request_size, 1_048_576)),
                    **self._security,
                )
                try:
                    await producer.start()
                except Exception as exc:
                    with contextlib.suppress(Exception):
                        await producer.stop()
                    raise self._translate(exc, "connecting") from exc
                self._producer = producer
            return self._producer

    def _translate(self, exc: BaseException, doing: str) -> BaseException:
        text = mask_secrets(f"{self!r}: {doing} failed: {type(exc).__name__}: {exc}", self._secrets)
        errors = self._errors
        if errors is None or isinstance(exc, _unavailable(errors)):
            return KafkaUnavailable(text)
        if isinstance(exc, errors.MessageSizeTooLargeError):
            return PayloadError(text)
        if getattr(exc, "retriable", False):
            return KafkaUnavailable(text)
        return KafkaError(text)

    def _encode(self, item: Any) -> tuple[bytes | None, bytes]:
        key: bytes | None = None
        if self.key_field is not None:
            if not isinstance(item, Mapping) or self.key_field not in item:
                raise PayloadError(f"KafkaSink.key_field: item has no field {self.key_field!r}")
            key = str(item[self.key_field]).encode()
        if self.encode == "json":
            try:
                return key, json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode()
            except (TypeError, ValueError) as exc:
                raise PayloadError(f"KafkaSink: item is not JSON-serializable: {exc}") from None
        if self.encode == "text":
            if not isinstance(item, str):
                raise PayloadError(
                    f"KafkaSink(encode='text'): expected str, got {type(item).__name__}"
                )
            return key, item.encode()
        if not isinstance(item, bytes | bytearray | memoryview):
            raise PayloadError(
                f"KafkaSink(encode='bytes'): expected bytes, got {type(item).__name__}"
            )
        return key, bytes(item)

    async def write(self, batch: Sequence[Any]) -> list[tuple[int, int] | None]:
        """Produce the batch; (partition, offset) per item once Kafka acknowledged it (acks=all)."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        producer = await self._open()
        failures: dict[int, BaseException] = {}
        futures: list[tuple[int, asyncio.Future[Any]]] = []
        for index, item in enumerate(batch):
            try:
                key, value = self._encode(item)
                futures.append((index, await producer.send(self.topic, value, key=key)))
            except PayloadError as exc:
                failures[index] = exc
            except Exception as exc:
                failures[index] = self._translate(exc, "producing")
        results: list[tuple[int, int] | None] = [None] * len(batch)
        if futures:
            outcomes = await asyncio.gather(*(f for _, f in futures), return_exceptions=True)
            for (index, _), outcome in zip(futures, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    failures[index] = self._translate(outcome, "producing")
                else:
                    results[index] = (outcome.partition, outcome.offset)
        if not failures:
            return results
        outages = [e for e in failures.values() if getattr(e, "unavailable", False)]
        if outages and len(outages) == len(failures) == len(batch):
            raise outages[0]  # Kafka is down: the whole batch waits and retries
        if len(batch) == 1:
            raise failures[0]
        raise PartialFailure(failures, results)

    async def close(self) -> None:
        """Flush and stop the producer; later writes raise. Safe to call again."""
        self._closed = True
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()
