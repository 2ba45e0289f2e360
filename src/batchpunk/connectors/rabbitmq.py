"""RabbitMQ: a consuming Source, a publishing Sink and a dead-letter sink, on aio-pika.

Delivery guarantee: at least once. A message is acknowledged only after the pipeline passed its
envelope to ``ack_many`` (its batch succeeded or its dead letter was durably written); anything
delivered but not settled when the source closes, crashes or loses its connection goes back to
the queue, and the broker delivers it again. Pair it with an idempotent sink.

Scaling out is RabbitMQ's own: run more workers on the same queue. Each consumer gets at most
``prefetch`` unacknowledged messages, so the broker spreads the queue across workers.

Three choices here are not the obvious ones:

* The consumer is registered on the underlying aiormq channel rather than through
  ``aio_pika.Queue.consume``. aio-pika wraps each delivery in an ``IncomingMessage`` and an extra
  task, which halves consumer throughput; the robust channel still restores the connection, the
  QoS and the queue declaration, and this module consumes again on every reopened channel.
* Acknowledgements are coalesced. ``ack_many`` only records the outcomes (one byte per delivery,
  no object per message); one flusher task then sends a single ``basic.ack(multiple=True)`` for
  the longest run of settled deliveries at the head of the channel. Acks behind an unsettled
  delivery wait for it (the next multiple ack covers them) unless half the prefetch window is
  waiting or the unsent deliveries fill it; nacks go out at once. A multiple ack never covers a
  delivery that was not acked.
* Delivery tags belong to one channel. After a reconnect the old channel's tags are stale: their
  settlements are dropped and counted (``stats().stale``), never sent, and the broker redelivers
  those messages. A stale tag never crashes the worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import ssl
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple
from urllib.parse import unquote, urlsplit

from batchpunk.config import BatchConfig, BatchTrigger
from batchpunk.connectors._common import (
    PayloadError,
    fail_payloads,
    mask_secrets,
    mask_url,
    tls_context,
)
from batchpunk.connectors._toolkit import (
    ACK,
    REDELIVERED,
    REJECT,
    REQUEUE,
    Parts,
    hmac_key_option,
    payload_decoder,
    reconnect_delay,
)
from batchpunk.deadletter import DeadLetter, letter_record
from batchpunk.deadletter._files import stored_error_text
from batchpunk.envelope import Envelope
from batchpunk.errors import (
    ConfigError,
    ConnectorError,
    DeadLetterError,
    DeliveryLimitExceeded,
    require,
)

__all__ = [
    "RabbitMQSource",
    "RabbitMQSourceStats",
    "RabbitMQSink",
    "RabbitMQDeadLetters",
    "RabbitMQError",
    "DeliveryLimitExceeded",
    "REDELIVERED_HEADER",
    "DELIVERY_COUNT_HEADER",
    "FRAME_CONTENT_TYPE",
    "mask_url",
]

log = logging.getLogger(__name__)

#: Envelope header set to True on a delivery past ``max_deliveries``: dead-letter it as
#: "redelivered" (without processing it), then ack it.
REDELIVERED_HEADER = REDELIVERED
#: Envelope header: how many times the broker has delivered this message, this time included
#: (quorum queues only; classic queues do not count).
DELIVERY_COUNT_HEADER = "delivery_count"
#: content_type of a message holding a whole batch as a batchpunk codec frame.
FRAME_CONTENT_TYPE = "application/x-batchpunk-frame"
#: AMQP's prefetch_count is a 16-bit field.
MAX_PREFETCH = 65535

DECODERS = ("json", "bytes", "text", "frame")
SINK_MODES = ("frame", "items")
EXCHANGE_TYPES = ("direct", "fanout", "topic", "headers")

# A delivery's state; a frame's items are combined by the toolkit's Parts ledger.
_PENDING, _ACK, _REJECT, _REQUEUE, _SENT = 0, 1, 2, 3, 4
_TO_PARTS = {_ACK: ACK, _REJECT: REJECT, _REQUEUE: REQUEUE}
#: Resuming a cancelled or lost consumer: reconnect_delay from 0.5 s, capped at 10 s, jittered.
_RESUME_BASE = 0.5
_RESUME_CAP = 10.0
_FROM_PARTS = {ACK: _ACK, REJECT: _REJECT, REQUEUE: _REQUEUE}
#: How the broker refuses a message over its max_message_size (it closes the channel with 406).
_TOO_LARGE = re.compile(r"message size (\d+) is larger than configured max size (\d+)")


class RabbitMQError(ConnectorError, ConnectionError):
    """The broker refused, returned or lost a publication, or could not be reached.

    Retryable (``retryable = True``, and a ConnectionError): a nack is transient, a lost
    connection comes back, and an unroutable message succeeds once the missing binding exists.
    """

    retryable = True
    unavailable = True


class RabbitMQSourceStats(NamedTuple):
    """What a RabbitMQSource has done so far (see ``RabbitMQSource.stats()``)."""

    #: Messages received from the broker (a frame counts once).
    delivered: int
    #: Messages acknowledged to the broker.
    acked: int
    #: Messages returned to the queue (nack with requeue).
    requeued: int
    #: Messages rejected without requeue (the queue's own dead-letter exchange gets them).
    rejected: int
    #: Messages whose body could not be decoded (yielded with malformed=True).
    malformed: int
    #: Deliveries past max_deliveries (yielded with the REDELIVERED_HEADER).
    redelivered: int
    #: Deliveries whose channel closed before they were settled; the broker redelivers them.
    stale: int
    #: Times the consumer was registered again on a reopened channel.
    reconnects: int


def _scrub(text: str, url: str) -> str:
    """Mask the URL's password in a third-party error message, in whatever form it appears."""
    password = urlsplit(url).password
    return mask_secrets(text, (password, unquote(password)) if password else ())


def _check_url(url: Any, where: str) -> str:
    if not isinstance(url, str) or not url.startswith(("amqp://", "amqps://")):
        shown = mask_url(url) if isinstance(url, str) else repr(url)
        raise ConfigError(f"{where}.url: expected an amqp:// or amqps:// URL, got {shown}")
    return url


def _check_type(value: object, kind: type, field: str, expected: str) -> None:
    if not isinstance(value, kind):
        raise ConfigError(f"{field}: expected {expected}, got {value!r}")


def _check_seconds(value: object, field: str) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < 1e9:
        raise ConfigError(f"{field}: expected seconds > 0, got {value!r}")


async def _connect(
    url: str,
    context: ssl.SSLContext | None,
    reconnect_interval: float | None,
    name: str,
) -> Any:
    """A robust aio-pika connection; failures become RabbitMQError with the password masked.

    ``name`` shows in ``rabbitmqctl list_connections client_properties``.
    """
    aio_pika = require("aio_pika", "rabbitmq", "RabbitMQ connectors")
    if context is not None and url.startswith("amqp://"):
        # A TLS context means TLS: aiormq only uses it on an amqps:// URL.
        url = "amqps://" + url.removeprefix("amqp://")
    extra: dict[str, Any] = {}
    if reconnect_interval is not None:
        extra["reconnect_interval"] = reconnect_interval
    # What aio_pika.connect_robust does, keeping hold of the connection so that a failed or
    # cancelled first attempt can be closed (its reconnection task would otherwise live on).
    connection = aio_pika.RobustConnection(
        aio_pika.connection.make_url(url, **extra),
        ssl_context=context,
        client_properties={"connection_name": name},
        **extra,
    )
    try:
        await connection.connect()
    except BaseException as exc:
        await _close_quietly(connection)
        if not isinstance(exc, TimeoutError | OSError | aio_pika.exceptions.AMQPError):
            raise
        detail = _scrub(f"{type(exc).__name__}: {exc}", url)
        raise RabbitMQError(f"RabbitMQ at {mask_url(url)}: cannot connect ({detail})") from None
    return connection


async def _close_quietly(thing: Any, seconds: float = 5.0) -> None:
    """Close a connection or channel that is being abandoned; errors only get logged."""
    try:
        async with asyncio.timeout(seconds):
            await thing.close()
    except Exception as exc:
        log.debug("RabbitMQ: closing %r failed: %r", type(thing).__name__, exc)


def _channel_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "this channel or connection is gone", not a bug of ours."""
    aiormq = require("aiormq", "rabbitmq", "RabbitMQSource")
    return (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError, asyncio.TimeoutError)


#: A receipt is ``generation * _GEN + delivery tag``: one int per message (never tracked by the
#: garbage collector), telling a stale channel's tags from the current one's.
_GEN = 1 << 48


class _Tracker:
    """The deliveries of one AMQP channel, in delivery-tag order, until each is sent settled.

    One byte of state per delivery (``states[tag - base]``), no object per message. A frame
    message yields several envelopes; ``parts`` holds, for such a message only, its parts
    ledger (the toolkit's rule: requeue if any part asked, else ack if any part was processed,
    reject only when all were rejected).

    Once the channel closes the tracker is dead: its tags mean nothing on any other channel.
    """

    __slots__ = (
        "acks_behind",
        "base",
        "channel",
        "dead",
        "dirty",
        "gen",
        "others_behind",
        "parts",
        "source",
        "states",
    )

    def __init__(self, source: RabbitMQSource, channel: Any, gen: int) -> None:
        self.source = source
        self.channel = channel
        self.gen = gen
        self.base = 0
        self.states = bytearray()
        self.parts: dict[int, Parts] = {}
        self.dead = False
        self.dirty = False
        # Settled but unsent deliveries behind an unsettled one (acks wait for the gap to close).
        self.acks_behind = 0
        self.others_behind = 0

    def add(self, tag: int) -> int:
        """Record a new delivery; returns its receipt."""
        states = self.states
        if not states:
            self.base = tag
        else:
            gap = tag - self.base - len(states)
            if gap > 0:  # never seen on one consumer's channel; keep the indices right anyway
                states.extend(bytes((_SENT,)) * gap)
        states.append(_PENDING)
        if self.acks_behind and not self.dirty:
            window = self.source.prefetch
            if window and len(states) >= window:
                # Held acks may now fill the window: the broker would send nothing more, and
                # with no batch to finish no settlement would come to flush them.
                self.dirty = True
                self.source._mark_dirty(self)
        return self.gen * _GEN + tag

    def split(self, tag: int, parts: int) -> None:
        """The delivery ``tag`` holds ``parts`` messages: settle it once all of them are."""
        self.parts[tag] = Parts(tag, parts)

    def settle(self, tag: int, outcome: int) -> None:
        if self.dead:
            log.debug("RabbitMQ delivery %d settled after its channel closed", tag)
            return
        parts = self.parts
        if parts:
            ledger = parts.get(tag)
            if ledger is not None:
                verdict = ledger.settle(_TO_PARTS[outcome])
                if verdict is None:
                    return
                del parts[tag]
                outcome = _FROM_PARTS[verdict]
        index = tag - self.base
        states = self.states
        if index < 0 or index >= len(states) or states[index] != _PENDING:
            return  # settled already: a second ack or nack changes nothing
        states[index] = outcome
        if index:
            if outcome == _ACK:
                self.acks_behind += 1
            else:
                self.others_behind += 1
        if not self.dirty:
            self.dirty = True
            self.source._mark_dirty(self)

    def pending_tags(self) -> list[int]:
        base = self.base
        return [base + i for i, state in enumerate(self.states) if state == _PENDING]

    def kill(self, lost: int = 0, cause: BaseException | None = None) -> None:
        """The channel is gone: count what it leaves unsettled and stop sending for it."""
        if self.dead:
            return
        self.dead = True
        lost += sum(1 for state in self.states if state != _SENT)
        self.states = bytearray()
        self.parts.clear()
        self.source._stale += lost
        if lost:
            log.warning(
                "RabbitMQ channel for queue %r closed with %d unsettled deliveries%s; "
                "the broker redelivers them",
                self.source.queue,
                lost,
                f" ({type(cause).__name__}: {cause})" if cause else "",
            )

    async def flush(self) -> None:
        """Send the settlements recorded since the last flush, coalescing acks.

        The settled run at the head of the channel goes out as one ``basic.ack(multiple=True)``
        (after the single nacks inside it). Behind an unsettled delivery, nacks go out at once;
        acks wait for the gap to close (a later multiple ack covers them) unless more than half
        the prefetch window waits or the unsent deliveries fill the window (the broker would
        send nothing more): then they go out singly.
        """
        self.dirty = False
        if self.dead:
            return
        if self.channel.is_closed:
            self.kill()
            return
        # (tag, outcome, multiple, how many deliveries the frame settles)
        frames: list[tuple[int, int, bool, int]] = []
        states = self.states
        base = self.base
        run = 0
        last_ack = 0
        acks = 0
        behind_acks = behind_others = 0
        size = len(states)
        while run < size:
            state = states[run]
            if state == _PENDING:
                break
            if state == _ACK:
                last_ack = base + run
                acks += 1
                if run:
                    behind_acks += 1
            elif state != _SENT:
                frames.append((base + run, state, False, 1))
                if run:
                    behind_others += 1
            run += 1
        if run:
            # Part of the head run was counted as "behind" when it was settled.
            self.acks_behind = max(0, self.acks_behind - behind_acks)
            self.others_behind = max(0, self.others_behind - behind_others)
            del states[:run]
            self.base = base = base + run
        if acks:
            # Every delivery up to last_ack is settled: nacks above go first, on the same
            # channel, so the broker has already taken them out when it reads this ack.
            frames.append((last_ack, _ACK, acks > 1, acks))
        window = self.source.prefetch or 0
        held = self.acks_behind
        # Singly when more than half the window waits, or when the unsent deliveries fill it:
        # the broker then sends nothing more, and a lane that waits for more messages (a SIZE
        # trigger, a priority of its own) would wait for ever.
        singles = held > max(1, window // 2) or (
            held > 0 and window > 0 and len(states) - states.count(_SENT) >= window
        )
        if states and (self.others_behind or singles):
            for index, state in enumerate(states):
                if (state == _ACK and singles) or state in (_REJECT, _REQUEUE):
                    frames.append((base + index, state, False, 1))
                    states[index] = _SENT
            if singles:
                self.acks_behind = 0
            self.others_behind = 0
        channel = self.channel
        source = self.source
        for index, (tag, outcome, multiple, count) in enumerate(frames):
            try:
                if outcome == _ACK:
                    await channel.basic_ack(tag, multiple=multiple)
                else:
                    await channel.basic_nack(tag, requeue=outcome == _REQUEUE)
            except source._errors as exc:
                self.kill(sum(frame[3] for frame in frames[index:]), exc)
                return
            if outcome == _ACK:
                source._acked += count
            elif outcome == _REQUEUE:
                source._requeued += count
            else:
                source._rejected += count


class RabbitMQSource:
    """Consume one queue: an async iterator of Envelopes, settled through ack_many / nack_many.

    Choose the defaults for a durable classic queue; ``quorum=True`` for a replicated queue with
    a delivery count, which ``max_deliveries`` needs. Call ``prepare(config)`` before iterating
    (the pipeline does) so the prefetch fits the batches.

    Envelope headers: None for a plain first delivery (``headers_of`` gives a dead letter the
    queue name); else ``queue``, with ``message_id`` and ``redelivered`` (the AMQP flag) when
    set, ``delivery_count`` (quorum queues), ``amqp_headers`` (the message's own headers) when
    it has any, REDELIVERED_HEADER (True) past max_deliveries, with ``error`` a
    DeliveryLimitExceeded. The envelope's priority is the AMQP priority; its receipt is the
    delivery tag with the channel's generation.

    Attributes:
        url: amqp:// or amqps:// URL (user, password, host, port, vhost).
        queue: the queue to consume.
        prefetch: unacknowledged messages the broker sends this consumer at most (basic.qos);
            None for max_size * (max_concurrent_batches + 1) from ``prepare``.
        declare: declare the queue (durable, quorum when asked) instead of requiring it.
        quorum: declare it with x-queue-type=quorum.
        durable: declare it durable (quorum queues always are).
        max_deliveries: a message delivered more times than this is yielded with
            ``headers[REDELIVERED_HEADER] = True``: the pipeline dead-letters it as
            "redelivered" instead of processing it. Needs a quorum queue (x-delivery-count).
        dead_letter_exchange: where ``dead_letter_sink()`` publishes dead letters.
        dead_letter_routing_key: their routing key; default ``<queue>.dead``.
        decode: "json" (default), "bytes", "text", "frame" (one batchpunk codec frame per
            message, one envelope per item), or a function of the body's bytes.
        hmac_key: key the frames were signed with (decode="frame").
        queue_arguments: extra x-arguments for the declaration (x-delivery-limit,
            x-dead-letter-exchange, ...).
        tls: an ssl.SSLContext, or a dict with ca_file / cert_file / key_file / verify.
        reconnect_interval: seconds between reconnection attempts (aio-pika's default: 5).
        close_timeout: seconds each step of close() may take before it is abandoned.
    """

    def __init__(
        self,
        url: str,
        queue: str,
        *,
        prefetch: int | None = None,
        declare: bool = True,
        quorum: bool = False,
        durable: bool = True,
        max_deliveries: int | None = None,
        dead_letter_exchange: str | None = None,
        dead_letter_routing_key: str | None = None,
        decode: str | Callable[[bytes], Any] = "json",
        hmac_key: bytes | str | None = None,
        queue_arguments: Mapping[str, Any] | None = None,
        tls: ssl.SSLContext | Mapping[str, Any] | None = None,
        reconnect_interval: float | None = None,
        close_timeout: float = 5.0,
    ) -> None:
        where = "RabbitMQSource"
        self._url = _check_url(url, where)
        if not isinstance(queue, str) or not queue:
            raise ConfigError(f"{where}.queue: expected a non-empty queue name, got {queue!r}")
        if prefetch is not None and (
            not isinstance(prefetch, int)
            or isinstance(prefetch, bool)
            or not 1 <= prefetch <= MAX_PREFETCH
        ):
            raise ConfigError(
                f"{where}.prefetch: expected an integer from 1 to {MAX_PREFETCH}, got {prefetch!r}"
            )
        for name, flag in (("declare", declare), ("quorum", quorum), ("durable", durable)):
            if not isinstance(flag, bool):
                raise ConfigError(f"{where}.{name}: expected true or false, got {flag!r}")
        if quorum and not durable:
            raise ConfigError(f"{where}.durable: quorum queues are always durable; got false")
        arguments = dict(queue_arguments or {})
        if max_deliveries is not None:
            if (
                not isinstance(max_deliveries, int)
                or isinstance(max_deliveries, bool)
                or max_deliveries < 1
            ):
                raise ConfigError(
                    f"{where}.max_deliveries: expected an integer >= 1, got {max_deliveries!r}"
                )
            if declare and not quorum:
                raise ConfigError(
                    f"{where}.max_deliveries: needs quorum = true (classic queues do not count "
                    "deliveries)"
                )
            limit = arguments.get("x-delivery-limit")
            if isinstance(limit, int) and max_deliveries >= limit:
                # The flagged delivery (x-delivery-count = max_deliveries) must not be the
                # broker's last (x-delivery-count = limit): a stop or crash that returns it
                # would have the broker drop it before batchpunk dead-letters it.
                raise ConfigError(
                    f"{where}.max_deliveries: {max_deliveries} must be below the queue's "
                    f"x-delivery-limit {limit}; at max_deliveries >= x-delivery-limit the "
                    "broker drops a flagged message that a stop or crash returns, before "
                    "batchpunk dead-letters it"
                )
        if not callable(decode) and decode not in DECODERS:
            raise ConfigError(
                f"{where}.decode: expected one of {', '.join(DECODERS)} or a function, "
                f"got {decode!r}"
            )
        _check_seconds(close_timeout, f"{where}.close_timeout")
        if reconnect_interval is not None:
            _check_seconds(reconnect_interval, f"{where}.reconnect_interval")
        if quorum:
            arguments["x-queue-type"] = "quorum"
        require("aio_pika", "rabbitmq", where)

        self.queue = queue
        self.prefetch = prefetch
        self.declare = declare
        self.quorum = quorum
        self.durable = durable
        self.max_deliveries = max_deliveries
        self.dead_letter_exchange = dead_letter_exchange
        self.dead_letter_routing_key = dead_letter_routing_key or f"{queue}.dead"
        self.queue_arguments = arguments
        self.reconnect_interval = reconnect_interval
        self.close_timeout = float(close_timeout)
        self._tls = tls
        self._context = tls_context(tls, where)
        self._hmac_key = hmac_key
        self._decode = self._decoder(decode)
        self._frames = decode == "frame"
        self._given_prefetch = prefetch is not None
        self._errors = _channel_errors()

        self._connection: Any = None
        self._channel: Any = None
        self._consumer_tag: str | None = None
        self._tracker: _Tracker | None = None
        self._buffer: deque[Envelope] = deque()
        self._generation = 0
        self._waiter: asyncio.Future[None] | None = None
        self._dirty: list[_Tracker] = []
        self._flusher: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        self._started = False
        self._stopping = False
        self._closed: asyncio.Future[None] | None = None
        self._resumer: asyncio.Task[None] | None = None
        self._canceller: asyncio.Task[None] | None = None
        self._delivered = self._acked = self._requeued = self._rejected = 0
        self._malformed = self._redelivered = self._stale = self._reconnects = 0

    def __repr__(self) -> str:
        return f"RabbitMQSource({mask_url(self._url)!r}, queue={self.queue!r})"

    # -- configuration -------------------------------------------------------------------

    async def prepare(self, config: BatchConfig) -> None:
        """Fit the prefetch to the batches: room for every running batch and one filling.

        Raises ConfigError when a given prefetch is below max_size under a trigger that waits
        for full batches (SIZE, ALL): the broker would stop sending before a batch could fill.
        """
        needed = config.max_size * (config.concurrency + 1)
        size_gated = config.trigger in (BatchTrigger.SIZE, BatchTrigger.ALL)
        if not self._given_prefetch:
            if size_gated and config.max_size > MAX_PREFETCH and not self._frames:
                raise ConfigError(
                    f"batch.max_size: {config.max_size} exceeds RabbitMQ's largest prefetch "
                    f"({MAX_PREFETCH}); under trigger {config.trigger.value!r} no batch could fill"
                )
            self.prefetch = min(needed, MAX_PREFETCH)
        else:
            assert self.prefetch is not None
            if self.prefetch < config.max_size and size_gated and not self._frames:
                raise ConfigError(
                    f"source.prefetch: {self.prefetch} is below batch.max_size "
                    f"{config.max_size}; under trigger {config.trigger.value!r} a batch waits "
                    "for max_size messages that the broker will never send. Raise prefetch to "
                    f"at least {needed} or leave it unset"
                )
            if self.prefetch < needed:
                log.warning(
                    "RabbitMQSource(queue=%r): prefetch %d is below max_size x "
                    "(max_concurrent_batches + 1) = %d; batches will be smaller or fewer will "
                    "run at once",
                    self.queue,
                    self.prefetch,
                    needed,
                )
        if self._channel is not None:
            # A consumer keeps the QoS it started with: consume again under the new one. Its
            # deliveries so far stay valid, being on the same channel.
            await self._channel.set_qos(prefetch_count=self.prefetch)
            if self._consumer_tag is not None and not self._stopping:
                await self._cancel_consumer()
                await self._consume()

    def dead_letter_sink(self) -> RabbitMQDeadLetters:
        """A dead-letter sink publishing to ``dead_letter_exchange`` (ConfigError if unset)."""
        if self.dead_letter_exchange is None:
            raise ConfigError("RabbitMQSource.dead_letter_exchange: not set")
        return RabbitMQDeadLetters(
            self._url,
            self.dead_letter_exchange,
            self.dead_letter_routing_key,
            tls=self._tls,
            reconnect_interval=self.reconnect_interval,
        )

    @property
    def stopping(self) -> bool:
        """True once stop_consuming() or close() began: no new message will be yielded."""
        return self._stopping

    def stats(self) -> RabbitMQSourceStats:
        """Counters since the source was created."""
        return RabbitMQSourceStats(
            delivered=self._delivered,
            acked=self._acked,
            requeued=self._requeued,
            rejected=self._rejected,
            malformed=self._malformed,
            redelivered=self._redelivered,
            stale=self._stale,
            reconnects=self._reconnects,
        )

    # -- iteration -----------------------------------------------------------------------

    def __aiter__(self) -> RabbitMQSource:
        return self

    async def __anext__(self) -> Envelope:
        if not self._started:
            await self.start()
        buffer = self._buffer
        while True:
            while buffer:
                envelope = buffer.popleft()
                tracker = self._tracker
                if (
                    tracker is not None
                    and not tracker.dead
                    and envelope.receipt // _GEN == tracker.gen
                ):
                    return envelope
            if self._stopping:
                canceller = self._canceller
                if canceller is None or canceller.done():
                    raise StopAsyncIteration
                # A flagged delivery may still come before the broker's cancel-ok: wait.
                await asyncio.wait([canceller])  # never cancels it
                await asyncio.sleep(0)  # the delivery tasks started before it ran
                continue
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def __aenter__(self) -> RabbitMQSource:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect, declare and start consuming; iteration calls it on first use."""
        async with self._start_lock:
            if self._started or self._stopping:
                return
            if self.prefetch is None:
                await self.prepare(BatchConfig())
            self._connection = await _connect(
                self._url,
                self._context,
                self.reconnect_interval,
                f"RabbitMQSource queue={self.queue}",
            )
            try:
                channel = await self._connection.channel(publisher_confirms=False)
                await channel.set_qos(prefetch_count=self.prefetch)
                await channel.declare_queue(
                    self.queue,
                    durable=self.durable,
                    passive=not self.declare,
                    arguments=self.queue_arguments or None,
                )
                channel.reopen_callbacks.add(self._on_reopen)
                self._channel = channel
                await self._consume()
                if self.stopping:  # stop_consuming() ran while this was connecting
                    await self._cancel_consumer()
            except BaseException as exc:
                await self._abandon_connection()
                if not isinstance(exc, self._errors):
                    raise
                detail = _scrub(f"{type(exc).__name__}: {exc}", self._url)
                raise RabbitMQError(
                    f"RabbitMQ at {mask_url(self._url)}: cannot consume queue {self.queue!r} "
                    f"({detail})"
                ) from None
            self._started = True

    async def _consume(self) -> None:
        """Register this source's consumer on the channel as it is now."""
        amqp = await self._channel.get_underlay_channel()
        tag = f"batchpunk.{self.queue}.{uuid.uuid4().hex[:12]}"
        self._new_tracker(amqp)
        amqp.on_consumer_cancel_callbacks.add(self._on_cancelled)
        await amqp.basic_consume(self.queue, self._on_message, consumer_tag=tag)
        self._consumer_tag = tag

    def _new_tracker(self, amqp: Any) -> _Tracker:
        old = self._tracker
        if old is not None and old.channel is not amqp:
            old.kill()
        if old is None or old.channel is not amqp:
            self._generation += 1
            self._tracker = _Tracker(self, amqp, self._generation)
        assert self._tracker is not None
        return self._tracker

    async def _on_reopen(self, channel: Any) -> None:
        """The robust channel reopened (reconnect): the old tags are stale; consume again."""
        if self._stopping:
            return
        if self._tracker is not None:
            self._tracker.kill()
        self._reconnects += 1
        log.info("RabbitMQ consumer of queue %r reopened its channel; consuming again", self.queue)
        self._resume()

    async def _on_cancelled(self, frame: Any) -> None:
        """The broker cancelled the consumer (queue deleted?): try to consume again."""
        if self._stopping or frame.consumer_tag != self._consumer_tag:
            return
        log.warning("RabbitMQ cancelled the consumer of queue %r; consuming again", self.queue)
        self._resume(redeclare=True)

    def _resume(self, redeclare: bool = False) -> None:
        if self._resumer is None or self._resumer.done():
            self._resumer = asyncio.get_running_loop().create_task(self._resume_loop(redeclare))

    async def _resume_loop(self, redeclare: bool) -> None:
        failures = 0
        while not self._stopping:
            try:
                await self._channel.ready()
                if redeclare and self.declare:
                    await self._channel.declare_queue(
                        self.queue,
                        durable=self.durable,
                        arguments=self.queue_arguments or None,
                    )
                await self._consume()
                return
            except self._errors as exc:
                failures += 1
                delay = reconnect_delay(failures, base=_RESUME_BASE, cap=_RESUME_CAP)
                log.warning(
                    "RabbitMQ consumer of queue %r could not resume (%s: %s); retrying in %.1fs",
                    self.queue,
                    type(exc).__name__,
                    _scrub(str(exc), self._url),
                    delay,
                )
                await asyncio.sleep(delay)

    async def _on_message(self, message: Any) -> None:
        """aiormq calls this (in a task of its own) for each delivery, in tag order."""
        tracker = self._tracker
        if tracker is None or tracker.channel is not message.channel:
            tracker = self._new_tracker(message.channel)
        delivery = message.delivery
        tag = delivery.delivery_tag
        receipt = tracker.add(tag)
        self._delivered += 1
        properties = message.header.properties
        # Headers only when the message has some: the queue name of a dead letter comes from
        # headers_of(), so a plain message costs no dict.
        headers: dict[str, Any] | None = None
        if properties.message_id is not None:
            headers = {"queue": self.queue, "message_id": properties.message_id}
        if delivery.redelivered:
            headers = headers or {"queue": self.queue}
            headers["redelivered"] = True
        error: BaseException | None = None
        amqp_headers = properties.headers
        count = None
        if amqp_headers:
            headers = headers or {"queue": self.queue}
            headers["amqp_headers"] = amqp_headers
            count = amqp_headers.get("x-delivery-count")
        if count is None and self.quorum:
            count = 0  # a quorum queue omits the header on a first delivery
        if isinstance(count, int):
            headers = headers or {"queue": self.queue}
            headers[DELIVERY_COUNT_HEADER] = count + 1
            if self.max_deliveries is not None and count >= self.max_deliveries:
                headers[REDELIVERED_HEADER] = True
                self._redelivered += 1
                error = DeliveryLimitExceeded(
                    f"message {properties.message_id or tag} of queue "
                    f"{self.queue!r} was delivered {count + 1} times, more than "
                    f"max_deliveries={self.max_deliveries}"
                )
        if self._stopping and error is None:
            # Sent before the broker saw our basic.cancel: give it straight back (unless it
            # is flagged: see stop_consuming).
            tracker.settle(tag, _REQUEUE)
            return
        priority = properties.priority or 0
        body: bytes = message.body
        try:
            payload = self._decode(body)
        except Exception as exc:
            self._malformed += 1
            self._buffer.append(
                Envelope(body, None, priority, headers or {"queue": self.queue}, receipt, exc)
            )
            self._wake()
            return
        if not self._frames:
            self._buffer.append(Envelope(payload, None, priority, headers, receipt, error))
            self._wake()
            return
        if not payload:
            tracker.settle(tag, _ACK)  # an empty frame: nothing to process
            return
        if len(payload) > 1:
            tracker.split(tag, len(payload))
        self._buffer.extend(
            Envelope(item, None, priority, headers, receipt, error) for item in payload
        )
        self._wake()

    def headers_of(self, envelope: Envelope) -> dict[str, Any]:
        """The headers a dead letter of ``envelope`` carries beyond its own: the queue name."""
        return {"queue": self.queue}

    def _settle(self, envelopes: Sequence[Envelope], outcome: int) -> None:
        tracker = self._tracker
        if tracker is None:
            return
        gen = tracker.gen
        stale = 0
        for envelope in envelopes:
            receipt = envelope.receipt
            if not isinstance(receipt, int):
                continue
            if receipt // _GEN != gen:
                stale += 1  # its channel closed: the broker redelivers it
                continue
            tracker.settle(receipt - gen * _GEN, outcome)
        if stale:
            log.debug("RabbitMQ: %d settlement(s) for a closed channel dropped", stale)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _decoder(self, decode: str | Callable[[bytes], Any]) -> Callable[[bytes], Any]:
        if callable(decode):
            return decode
        if decode == "json":
            from batchpunk.codec.serializers import deserialize

            return lambda body: deserialize(body, "json")
        if decode == "text":
            return lambda body: body.decode("utf-8")
        if decode == "bytes":
            return _identity
        require("batchpunk.codec", "all", "RabbitMQSource(decode='frame')")
        key = hmac_key_option("RabbitMQSource", self._hmac_key)
        return payload_decoder("RabbitMQSource", "frame", key)

    # -- settlement ----------------------------------------------------------------------

    def _mark_dirty(self, tracker: _Tracker) -> None:
        self._dirty.append(tracker)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        """The one task that writes acks and nacks, so their frames keep their order."""
        try:
            while self._dirty:
                tracker = self._dirty.pop(0)
                await tracker.flush()
        finally:
            self._flusher = None

    async def flush(self) -> None:
        """Wait until every ack and nack recorded so far is written to the broker's socket.

        ``ack_many`` only records the outcome (acks are coalesced); call this when the caller needs
        the frames out, e.g. before measuring the queue. close() flushes by itself.
        """
        await self._drain_settlements()

    async def _drain_settlements(self) -> None:
        while self._flusher is not None or self._dirty:
            if self._flusher is None:
                self._flusher = asyncio.get_running_loop().create_task(self._flush())
            await asyncio.shield(self._flusher)

    # -- shutdown ------------------------------------------------------------------------

    def stop_consuming(self) -> None:
        """End iteration soon; give the messages received but not yet yielded back to the queue.

        The pipeline calls it when a graceful stop begins, so that other workers get those
        messages while this one drains. Envelopes already yielded stay the caller's to ack or
        nack until ``close()``. The consumer is cancelled (basic.cancel) in the background.
        Deliveries flagged redelivered (past max_deliveries) are not returned but still yielded
        until the broker confirms the cancel, for the pipeline to dead-letter: returning one
        counts a delivery more, and at the queue's delivery limit the broker drops it.
        """
        if self._stopping:
            return
        self._stopping = True
        self._wake()
        if self._resumer is not None:
            self._resumer.cancel()
        buffer = self._buffer  # emptied in place: a waiting __anext__ holds this very deque
        unhanded = [e for e in buffer if e.error is None or not _flagged(e)]
        flagged = [e for e in buffer if e.error is not None and _flagged(e)]
        buffer.clear()
        buffer.extend(flagged)
        self._settle(unhanded, _REQUEUE)
        if self._consumer_tag is not None:
            self._canceller = asyncio.get_running_loop().create_task(self._cancel_consumer())

    async def ack_many(self, envelopes: Sequence[Envelope]) -> None:
        """Acknowledge these envelopes: recorded now, sent by the flusher as multiple acks."""
        self._settle(envelopes, _ACK)

    async def nack_many(self, envelopes: Sequence[Envelope], requeue: bool) -> None:
        """Return these envelopes to the queue (``requeue``) or reject them (to its DLX)."""
        self._settle(envelopes, _REQUEUE if requeue else _REJECT)

    async def _cancel_consumer(self) -> None:
        tag, self._consumer_tag = self._consumer_tag, None
        if tag is None or self._channel is None:
            return
        try:
            async with asyncio.timeout(self.close_timeout):
                amqp = await self._channel.get_underlay_channel()
                await amqp.basic_cancel(tag)
        except self._errors as exc:
            log.warning(
                "RabbitMQ consumer of queue %r not cancelled cleanly (%s)",
                self.queue,
                type(exc).__name__,
            )

    async def close(self) -> None:
        """Stop consuming, requeue what is unsettled, close channel and connection.

        Call it after the pipeline has acked or nacked what it finished: anything still
        unsettled then goes back to the queue. Safe to call twice; never raises for a broker
        that is gone (its unacknowledged messages return to the queue anyway).
        """
        if self._closed is not None:
            await asyncio.shield(self._closed)
            return
        self._closed = asyncio.get_running_loop().create_future()
        try:
            async with self._start_lock:
                self.stop_consuming()
                if self._canceller is not None:
                    await self._canceller
                await self._drain_settlements()
                tracker = self._tracker
                if tracker is not None and not tracker.dead:
                    for tag in tracker.pending_tags():
                        tracker.parts.pop(tag, None)
                        tracker.settle(tag, _REQUEUE)
                    await self._drain_settlements()
                await self._abandon_connection()
        finally:
            self._closed.set_result(None)

    async def _abandon_connection(self) -> None:
        channel, self._channel = self._channel, None
        connection, self._connection = self._connection, None
        for thing in (channel, connection):
            if thing is not None:
                await _close_quietly(thing, self.close_timeout)
        if self._tracker is not None:
            self._tracker.kill()


def _flagged(envelope: Envelope) -> bool:
    """A delivery past max_deliveries, yielded for the pipeline to dead-letter."""
    return bool(envelope.headers and envelope.headers.get(REDELIVERED_HEADER))


def _identity(body: bytes) -> bytes:
    return body


class _Publisher:
    """A robust connection and a confirming channel, opened on first use, for the sinks.

    Its settings are the publishing ones every RabbitMQ sink takes (RabbitMQSink documents
    them); a sink that takes no others, RabbitMQDeadLetters, is this constructor under its
    own name (``_where``, which errors and ``repr`` show).
    """

    _where: ClassVar[str]

    def __init__(
        self,
        url: str,
        exchange: str,
        routing_key: str,
        *,
        declare: bool = True,
        exchange_type: str = "direct",
        queue: str | None = None,
        tls: ssl.SSLContext | Mapping[str, Any] | None = None,
        timeout: float = 30.0,
        reconnect_interval: float | None = None,
        close_timeout: float = 5.0,
    ) -> None:
        where = self._where
        self._url = _check_url(url, where)
        _check_type(exchange, str, f"{where}.exchange", "a name ('' for the default exchange)")
        _check_type(routing_key, str, f"{where}.routing_key", "a string")
        _check_type(declare, bool, f"{where}.declare", "true or false")
        if exchange_type not in EXCHANGE_TYPES:
            raise ConfigError(
                f"{where}.exchange_type: expected one of {', '.join(EXCHANGE_TYPES)}, "
                f"got {exchange_type!r}"
            )
        if queue is not None and (not isinstance(queue, str) or not queue):
            raise ConfigError(f"{where}.queue: expected a queue name, got {queue!r}")
        _check_seconds(timeout, f"{where}.timeout")
        _check_seconds(close_timeout, f"{where}.close_timeout")
        if reconnect_interval is not None:
            _check_seconds(reconnect_interval, f"{where}.reconnect_interval")
        require("aio_pika", "rabbitmq", where)
        self.timeout = float(timeout)
        self.exchange = exchange
        self.routing_key = routing_key
        self.declare = declare
        self.exchange_type = exchange_type
        self.queue = queue
        self.reconnect_interval = reconnect_interval
        self.close_timeout = close_timeout
        self._context = tls_context(tls, where)
        self._connection: Any = None
        self._channel: Any = None
        self._exchange: Any = None
        self._lock = asyncio.Lock()
        self._closed = False
        # The broker's max_message_size, once a refusal told it (AMQP does not advertise it).
        self._max_size: int | None = None

    def __repr__(self) -> str:
        return (
            f"{self._where}({mask_url(self._url)!r}, exchange={self.exchange!r}, "
            f"routing_key={self.routing_key!r})"
        )

    async def _open(self) -> Any:
        """Connect and declare once; concurrent first writes wait for the same opening."""
        async with self._lock:
            if self._closed:
                raise RabbitMQError(f"{self._where}: closed")
            if self._exchange is not None:
                return self._exchange
            connection = await _connect(
                self._url, self._context, self.reconnect_interval, f"{self._where}"
            )
            try:
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                if self.exchange == "":
                    exchange = channel.default_exchange
                else:
                    exchange = await channel.declare_exchange(
                        self.exchange,
                        self.exchange_type,
                        durable=True,
                        passive=not self.declare,
                    )
                if self.queue is not None:
                    queue = await channel.declare_queue(self.queue, durable=True)
                    if self.exchange != "":
                        await queue.bind(exchange, self.routing_key)
            except BaseException as exc:
                await _close_quietly(connection, self.close_timeout)
                if not isinstance(exc, _channel_errors()):
                    raise
                detail = _scrub(f"{type(exc).__name__}: {exc}", self._url)
                raise RabbitMQError(
                    f"{self._where} at {mask_url(self._url)}: cannot open exchange "
                    f"{self.exchange!r} ({detail})"
                ) from None
            self._connection, self._channel, self._exchange = connection, channel, exchange
            return exchange

    async def _publish(self, messages: Sequence[Any]) -> None:
        """Publish all, then wait for every confirm; any failure raises RabbitMQError, but a
        message over the broker's max_message_size raises PayloadError (not retried)."""
        for message in messages:
            self._check_size(len(message.body), "a message")
        results = await self._confirm(messages)
        for message in messages:
            self._check_size(len(message.body), "a message")  # the limit the refusal told
        failures = [r for r in results if r is not None]
        if failures:
            what = f"{len(failures)} of {len(messages)} message(s)"
            raise self._unconfirmed(failures[0], what) from failures[0]

    async def _confirm(self, messages: Sequence[Any]) -> list[BaseException | None]:
        """Publish all and wait for every confirm: each message's failure, or None if confirmed.

        Raises RabbitMQError when no answer came for the batch (no connection, or not every
        confirm within ``timeout``): then nothing says which messages arrived.
        """
        key = self.routing_key
        await self._drop_closed_channel()
        try:
            async with asyncio.timeout(self.timeout):
                exchange = self._exchange or await self._open()
                results = await asyncio.gather(
                    *(exchange.publish(message, key, mandatory=True) for message in messages),
                    return_exceptions=True,
                )
        except TimeoutError:
            raise RabbitMQError(
                f"{self._where} at {mask_url(self._url)}: {len(messages)} message(s) not "
                f"confirmed within timeout={self.timeout}s (broker down or blocked?)"
            ) from None
        failures = [r if isinstance(r, BaseException) else None for r in results]
        for failure in failures:
            found = _TOO_LARGE.search(str(failure)) if failure is not None else None
            if found:  # the broker closed the channel: the next write opens another
                self._max_size = int(found.group(2))
                break
        return failures

    def _check_size(self, size: int, what: str) -> None:
        """Raise PayloadError if ``size`` bytes exceed the broker's max_message_size (known
        once the broker refused a message: it says its limit then)."""
        if self._max_size is not None and size > self._max_size:
            raise PayloadError(
                f"{self._where}: {what} of {size} bytes is larger than the broker's "
                f"max_message_size ({self._max_size} bytes); it can never be published"
            )

    async def _drop_closed_channel(self) -> None:
        """Open afresh if the broker closed the channel on a live connection (its exchange was
        deleted, say): the robust channel's restore then fails for good, and every write after
        failed as "connection lost" even once the exchange was back."""
        channel, connection = self._channel, self._connection
        if channel is None or not channel.is_closed or connection is None or connection.is_closed:
            return
        async with self._lock:
            if self._channel is not channel:
                return  # another write opened afresh already
            self._connection = self._channel = self._exchange = None
        await _close_quietly(connection, self.close_timeout)

    def _unconfirmed(self, failure: BaseException, what: str) -> RabbitMQError:
        """The RabbitMQError saying ``what`` was not confirmed, the first of it because of
        ``failure`` (a nack, a return, a lost channel); the caller chains ``failure``."""
        aio_pika = require("aio_pika", "rabbitmq", self._where)
        if isinstance(failure, aio_pika.exceptions.PublishError):
            why = (
                f"unroutable: no queue is bound to exchange {self.exchange!r} "
                f"with routing key {self.routing_key!r}"
            )
        elif isinstance(failure, aio_pika.exceptions.DeliveryError):
            why = "nacked by the broker"
        elif isinstance(failure, aio_pika.exceptions.ChannelInvalidStateError):
            why = "the connection is lost; reconnecting"
        else:
            why = _scrub(f"{type(failure).__name__}: {failure}", self._url)
        return RabbitMQError(
            f"{self._where} at {mask_url(self._url)}: {what} not confirmed ({why})"
        )

    async def close(self) -> None:
        """Close channel and connection; safe to call twice."""
        async with self._lock:
            self._closed = True
            connection, self._connection = self._connection, None
            self._channel = self._exchange = None
        if connection is not None:
            await _close_quietly(connection, self.close_timeout)


class RabbitMQSink(_Publisher):
    """Publish each batch, persistent and confirmed, before ``write`` returns.

    ``mode="frame"`` (default) sends the whole batch as one message holding a batchpunk codec
    frame (content_type FRAME_CONTENT_TYPE): the cheapest way to move batches between
    batchpunk workers. ``mode="items"`` sends one JSON message per item, for other consumers.

    Attributes:
        url: amqp:// or amqps:// URL.
        exchange: exchange to publish to; "" for the default exchange (routing key = queue).
        routing_key: routing key of every message.
        mode: "frame" or "items".
        declare: declare the exchange (durable, ``exchange_type``) rather than require it.
        queue: also declare this durable queue and bind it with routing_key, so that nothing
            published is unroutable.
        serializer, compression, level, hmac_key: the frame's codec settings (mode="frame").
        tls: an ssl.SSLContext or a dict with ca_file / cert_file / key_file / verify.
        timeout: seconds a write may wait for the connection and every confirm.

    A message the broker nacks or cannot route raises RabbitMQError (retryable, an outage) once
    every confirm has arrived. In items mode, when the broker confirmed some items, write raises
    PartialFailure naming only the others (each with its RabbitMQError), so a retry does not
    publish the confirmed ones again; an item that is not JSON fails alone, with a PayloadError
    that is not retried. So does a message over the broker's max_message_size (the broker
    refuses it and names its limit, which the sink then checks before publishing): in frame
    mode the whole frame, which the engine bisects.
    """

    _where = "RabbitMQSink"

    def __init__(
        self,
        url: str,
        exchange: str,
        routing_key: str,
        *,
        mode: str = "frame",
        declare: bool = True,
        exchange_type: str = "direct",
        queue: str | None = None,
        serializer: str = "json",
        compression: str = "zlib",
        level: int | None = None,
        hmac_key: bytes | str | None = None,
        tls: ssl.SSLContext | Mapping[str, Any] | None = None,
        timeout: float = 30.0,
        reconnect_interval: float | None = None,
        close_timeout: float = 5.0,
    ) -> None:
        if mode not in SINK_MODES:
            raise ConfigError(
                f"RabbitMQSink.mode: expected one of {', '.join(SINK_MODES)}, got {mode!r}"
            )
        super().__init__(
            url,
            exchange,
            routing_key,
            declare=declare,
            exchange_type=exchange_type,
            queue=queue,
            tls=tls,
            timeout=timeout,
            reconnect_interval=reconnect_interval,
            close_timeout=close_timeout,
        )
        if mode == "frame":
            codec = require("batchpunk.codec", "all", "RabbitMQSink(mode='frame')")
            try:
                codec.validate_options(serializer, compression, level, level_name="level")
            except ValueError as exc:
                raise ConfigError(f"RabbitMQSink.{exc}") from None
        self.mode = mode
        self._codec_options: dict[str, Any] = {
            "serializer": serializer,
            "compression": compression,
            "level": level,
            "hmac_key": hmac_key,
        }

    async def write(self, batch: Sequence[Any]) -> None:
        """Publish the batch; returns once the broker confirmed every message."""
        if not batch:
            return
        aio_pika = require("aio_pika", "rabbitmq", "RabbitMQSink")
        persistent = aio_pika.DeliveryMode.PERSISTENT
        if self.mode == "frame":
            codec = require("batchpunk.codec", "all", "RabbitMQSink(mode='frame')")
            body = codec.encode_batch(list(batch), **self._codec_options)
            message = aio_pika.Message(
                body,
                content_type=FRAME_CONTENT_TYPE,
                delivery_mode=persistent,
                headers={"x-batchpunk-count": len(batch)},
            )
            await self._publish([message])
            return
        messages: list[Any] = []
        indices: list[int] = []  # the batch index of each message
        failures: dict[int, BaseException] = {}
        for index, item in enumerate(batch):
            try:
                body = json.dumps(item, separators=(",", ":")).encode()
            except (TypeError, ValueError) as exc:
                failures[index] = PayloadError(
                    f"RabbitMQSink: payload {index} of the batch is not JSON: {exc}"
                )
                continue
            try:
                self._check_size(len(body), f"payload {index} of the batch")
            except PayloadError as exc:
                failures[index] = exc
                continue
            messages.append(
                aio_pika.Message(body, content_type="application/json", delivery_mode=persistent)
            )
            indices.append(index)
        if messages:
            results = await self._confirm(messages)
            unconfirmed = []
            for index, message, result in zip(indices, messages, results, strict=True):
                if result is None:
                    continue
                try:  # refused for its size (the broker said its limit): never publishable
                    self._check_size(len(message.body), f"payload {index} of the batch")
                except PayloadError as exc:
                    exc.__cause__ = result
                    failures[index] = exc
                    continue
                unconfirmed.append((index, result))
            if len(unconfirmed) == len(messages):  # none arrived: an outage of the whole batch
                first = unconfirmed[0][1]
                what = f"{len(messages)} of {len(messages)} message(s)"
                raise self._unconfirmed(first, what) from first
            # Some were confirmed, so they are written: name only those nacked or returned
            # (each an outage error, retried; a full queue is the downstream unavailable), so
            # that a retry does not publish the confirmed ones again.
            for index, result in unconfirmed:
                error = self._unconfirmed(result, f"payload {index} of the batch")
                error.__cause__ = result
                failures[index] = error
        if failures:
            fail_payloads(failures, len(batch))


class RabbitMQDeadLetters(_Publisher):
    """A DeadLetterSink that publishes each letter as a persistent, confirmed JSON message.

    The body is the dead-letter record every store writes (docs/FORMAT.md: v, id, reason,
    error, error_type, attempts, first_seen, traceback, message, key, headers; values JSON
    cannot hold exactly as ``*_frame`` fields), so ``batchpunk dlq show`` / ``dlq replay`` read
    a file of these bodies, one per line, and ``letter_from_record`` reads one. The AMQP headers
    repeat x-batchpunk-reason, x-batchpunk-error, x-batchpunk-error-type, x-batchpunk-attempts,
    so a consumer can route or filter without parsing the body. ``put`` returns only once the
    broker confirmed every letter; otherwise it raises DeadLetterError and batchpunk retries.

    Give ``queue`` to declare a durable queue bound to the exchange: an exchange without a
    bound queue drops messages, which here would be an error on every put. The other settings
    are RabbitMQSink's publishing ones: url, exchange, routing_key, declare, exchange_type,
    tls, timeout, reconnect_interval, close_timeout.
    """

    _where = "RabbitMQDeadLetters"

    async def put(self, letters: Sequence[DeadLetter]) -> None:
        """Publish the letters; returns once all are confirmed by the broker."""
        if not letters:
            return
        aio_pika = require("aio_pika", "rabbitmq", "RabbitMQDeadLetters")
        messages = []
        for letter in letters:
            # The record's own error text: redacted like the body, and never failing to encode
            # (a broken __str__, a lone surrogate) where the record would not.
            error = "" if letter.error is None else stored_error_text(letter.error)
            body = letter_to_json(letter)
            if self._max_size is not None and len(body) > self._max_size:
                body = self._without_message(letter, len(body), self._max_size)
            messages.append(
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    headers={
                        "x-batchpunk-reason": letter.reason,
                        "x-batchpunk-error": error[:1000],
                        "x-batchpunk-error-type": letter.error_type,
                        "x-batchpunk-attempts": letter.attempts,
                    },
                )
            )
        try:
            await self._publish(messages)
        except (RabbitMQError, PayloadError) as exc:  # PayloadError: a letter over the
            # broker's max_message_size, said as such rather than as a lost connection; the
            # limit is known from now on, and the retry stores that letter without its message
            raise DeadLetterError(str(exc)) from exc

    def _without_message(self, letter: DeadLetter, size: int, limit: int) -> bytes:
        """The letter's record with its message left out: the broker can never hold it whole.

        Retrying it as it is would hold every later letter behind it for good (the outbox
        retries a failed put whole); the letter's reason, error and headers still tell what
        failed, and the log says which message was left out.
        """
        log.error(
            "RabbitMQDeadLetters: a letter of %d bytes is over the broker's max_message_size "
            "(%d bytes); it is stored without its message (reason %s, headers %s)",
            size,
            limit,
            letter.reason,
            letter.headers,
        )
        shown = (
            f"<message left out: its dead letter of {size} bytes is over the broker's "
            f"max_message_size ({limit} bytes)>"
        )
        return letter_to_json(dataclasses.replace(letter, message=shown))


def letter_to_json(letter: DeadLetter) -> bytes:
    """A dead letter as the body RabbitMQDeadLetters publishes: the stored dead-letter record.

    The same record as a line of JsonlDeadLetters' file (docs/FORMAT.md), so that the bodies of
    a dead-letter queue, appended to a ``.jsonl`` file one per line, are what ``batchpunk dlq
    show`` and ``dlq replay`` read; ``batchpunk.deadletter.letter_from_record`` reads one body.
    """
    return letter_record(letter)
