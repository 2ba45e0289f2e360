"""NATS JetStream: a durable pull consumer as a Source, JetStream publishing as a Sink.

Choose JetStream when you want scale-out without partitions: every worker that runs with the
same ``stream`` and ``durable`` fetches from one durable pull consumer, the server hands each
message to one worker at a time, and a message a worker never settles comes back after
``ack_wait`` to whichever worker asks next. Nothing is assigned to a worker in advance, so adding
or killing workers needs no rebalancing.

The delivery contract (at least once):

- a message is acknowledged only when the pipeline passes its envelope to ``ack_many``, after
  its batch succeeded or its dead letter was stored (one ack publish per message, written in
  order by the caller: no task per message);
- ``nack_many(requeue=True)`` naks it with ``nak_delay`` (shutdown, or giving it back);
  ``nack_many(requeue=False)`` terminates it (``term``): the server never delivers it again,
  which is what the pipeline does after dead-lettering a poison message;
- while a message waits in batchpunk (buffered, batching, or inside a slow batch), a background
  task tells the server it is still in progress every ``ack_wait / 3``, so a slow batch is not
  redelivered to another worker halfway through;
- a message delivered ``max_deliver`` times comes out with ``headers["batchpunk_redelivered"]``
  set: the pipeline dead-letters it with reason "redelivered" instead of processing it, before
  the server gives up on it and drops it silently;
- if the worker dies (kill -9), nothing is settled and the server redelivers after ``ack_wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import math
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from batchpunk.config import BatchConfig
from batchpunk.connectors._common import mask_secrets, mask_url, tls_context
from batchpunk.connectors._toolkit import (
    ACK,
    DECODINGS,
    ENCODINGS,
    REDELIVERED,
    REJECT,
    REQUEUE,
    Parts,
    choice_option,
    delivery_limit_error,
    hmac_key_option,
    int_option,
    payload_decoder,
    reconnect_delay,
)
from batchpunk.envelope import Envelope
from batchpunk.errors import (
    ConfigError,
    ConnectorError,
    DeliveryLimitExceeded,
    PartialFailure,
    require,
)

__all__ = [
    "DeliveryLimitExceeded",
    "NatsJetStreamSink",
    "NatsJetStreamSource",
    "NatsPayloadError",
    "DECODINGS",
    "ENCODINGS",
    "REDELIVERED",
    "TlsSetting",
]

log = logging.getLogger(__name__)

#: TLS: None/False (plain, unless a server URL says tls://), True (system trust store), an
#: ssl.SSLContext, or a mapping with ``ca_file``, ``cert_file``, ``key_file``, ``verify``.
TlsSetting = ssl.SSLContext | Mapping[str, Any] | bool | None


class NatsPayloadError(ConnectorError, ValueError):
    """A payload the sink can never publish: it does not encode, or exceeds the server's
    max_payload. Not retryable, so the engine dead-letters it at once instead of backing off.
    """

    retryable = False


# The three ways a message can be settled.
_ACK, _NAK, _TERM = "ack", "nak", "term"
_OUTCOME = {_ACK: ACK, _NAK: REQUEUE, _TERM: REJECT}
_HOW = {ACK: _ACK, REQUEUE: _NAK, REJECT: _TERM}
#: After a failed pull: reconnect_delay from 0.1 s, up to max(fetch_timeout, 5 s), jittered.
_PULL_BACKOFF_BASE = 0.1
_MAX_PULL_BACKOFF = 5.0


# ---------------------------------------------------------------------------------------------
# Settings shared by the source and the sink
# ---------------------------------------------------------------------------------------------


def _servers(owner: str, servers: Any) -> list[str]:
    if isinstance(servers, str):
        items = [s.strip() for s in servers.split(",")]
    elif isinstance(servers, Sequence):
        items = [s.strip() if isinstance(s, str) else s for s in servers]
    else:
        items = []
    if not items or not all(isinstance(s, str) and s for s in items):
        raise ConfigError(
            f"{owner}.servers: expected a server URL such as 'nats://127.0.0.1:4222' "
            f"or a list of them, got {_redact_value(servers)!r}"
        )
    return items


def _redact_url(url: str) -> str:
    """The URL without its password or token, fit for a log line or an error."""
    return mask_url(url)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return ",".join(_redact_url(s) for s in value.split(","))
    if isinstance(value, Sequence):
        return [_redact_url(s) if isinstance(s, str) else s for s in value]
    return value


def _secrets_of(servers: Sequence[str], *values: str | None) -> list[str]:
    """Every secret that must never be printed: passwords and tokens, also those in URLs."""
    found = [v for v in values if v]
    for url in servers:
        with contextlib.suppress(ValueError):
            parts = urlsplit(url if "://" in url else f"nats://{url}")
            found.extend(s for s in (parts.password, parts.username) if s)
    return found


def _scrub(text: str, secrets: Sequence[str]) -> str:
    return mask_secrets(text, secrets)


def _seconds(owner: str, name: str, value: Any) -> float:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{owner}.{name}: expected seconds > 0, got {value!r}")
    return float(value)


def _name(owner: str, name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{owner}.{name}: expected a non-empty string, got {value!r}")
    if any(c in value for c in " \t\r\n"):
        raise ConfigError(f"{owner}.{name}: must not contain whitespace, got {value!r}")
    return value


def _hmac_key(owner: str, value: Any) -> bytes | None:
    return hmac_key_option(owner, value)


def _optional_secret(owner: str, name: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    # Never echo the value: it may be a secret of the wrong type.
    raise ConfigError(f"{owner}.{name}: expected a string, got a {type(value).__name__}")


class _Connection:
    """One NATS connection with batchpunk's logging, reconnect and secret hygiene.

    ``check_subjects`` False skips nats-py's client-side check of every published subject, for
    a connection whose subjects are all chosen by the server or built from checked names.

    The client reconnects on its own, forever by default (a worker outlives a broker restart).
    The first connection, though, is bounded by ``connect_timeout`` so a wrong address fails
    at start-up rather than hanging. It checks the connection settings the source and the sink
    share, as given to them, so that both refuse the same values with the same words.
    """

    def __init__(
        self,
        owner: str,
        servers: list[str],
        name: str,
        *,
        tls: TlsSetting,
        user: Any,
        password: Any,
        token: Any,
        connect_timeout: Any,
        reconnect_attempts: Any,
        check_subjects: bool = True,
    ) -> None:
        self.owner = owner
        self.servers = servers
        self.tls = tls_context(tls, owner)
        self.user = _optional_secret(owner, "user", user)
        self.password = _optional_secret(owner, "password", password)
        self.token = _optional_secret(owner, "token", token)
        self.name = name
        self.connect_timeout = _seconds(owner, "connect_timeout", connect_timeout)
        self.reconnect_attempts = int_option(owner, "reconnect_attempts", reconnect_attempts, -1)
        self.secrets = _secrets_of(servers, self.password, self.token)
        self.where = ", ".join(_redact_url(s) for s in servers)
        self.nc: Any = None
        self.closing = False
        self.tls_wanted = self.tls is not None or any(s.startswith("tls://") for s in servers)
        self.check_subjects = check_subjects

    def scrub(self, text: str) -> str:
        return _scrub(text, self.secrets)

    async def open(self) -> Any:
        """Connect and return the JetStream context."""
        nats = require("nats", "nats", self.owner)
        options: dict[str, Any] = {
            "servers": self.servers,
            "name": self.name,
            "allow_reconnect": True,
            "max_reconnect_attempts": self.reconnect_attempts,
            "connect_timeout": max(1, min(5, math.ceil(self.connect_timeout))),
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "skip_subject_validation": not self.check_subjects,
        }
        if self.tls is not None:
            options["tls"] = self.tls
        if self.user is not None:
            options["user"] = self.user
        if self.password is not None:
            options["password"] = self.password
        if self.token is not None:
            options["token"] = self.token
        client = nats.NATS()
        try:
            await asyncio.wait_for(client.connect(**options), self.connect_timeout)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await client.close()
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc, TimeoutError):
                reason = f"no server answered within connect_timeout={self.connect_timeout:g}s"
            else:
                reason = self.scrub(f"{type(exc).__name__}: {exc}".rstrip(": "))
            raise ConnectionError(f"{self.owner}: cannot connect to {self.where}: {reason}") from (
                None
            )
        # nats-py upgrades to TLS only when the server requires it, so a plain server (or a
        # man in the middle posing as one) would silently get a plaintext connection.
        if self.tls_wanted and not getattr(client, "_server_info", {}).get("tls_required"):
            with contextlib.suppress(Exception):
                await client.close()
            raise ConnectionError(
                f"{self.owner}: TLS is configured but {self.where} does not require TLS; "
                "refusing to send credentials and messages in plaintext"
            )
        self.nc = client
        return client.jetstream()

    async def close(self, flush_timeout: float = 5.0) -> None:
        """Flush what is buffered (acks, naks, publishes), then close the socket."""
        client, self.nc = self.nc, None
        if client is None or client.is_closed:
            return
        self.closing = True
        if client.is_connected:
            try:
                await client.flush(timeout=max(1, math.ceil(flush_timeout)))
            except Exception as exc:  # the buffered acks are lost: the server redelivers
                log.warning("%s: flush before close failed: %s", self.owner, self._describe(exc))
        with contextlib.suppress(Exception):
            await client.close()

    def _describe(self, exc: BaseException) -> str:
        return self.scrub(f"{type(exc).__name__}: {exc}")

    async def _on_error(self, exc: Exception) -> None:
        log.warning(
            "%s: NATS connection error (%s): %s", self.owner, self.where, self._describe(exc)
        )

    async def _on_disconnected(self) -> None:
        if self.closing:
            return
        log.warning("%s: disconnected from NATS (%s), reconnecting", self.owner, self.where)

    async def _on_reconnected(self) -> None:
        log.info("%s: reconnected to NATS (%s)", self.owner, self.where)


# ---------------------------------------------------------------------------------------------
# Source
# ---------------------------------------------------------------------------------------------


class NatsJetStreamSource:
    """Envelopes from a durable JetStream pull consumer; run many workers on one ``durable``.

    Args:
        servers: a NATS URL ("nats://host:4222", "tls://host:4222"), a comma-separated string or
            a list of them. Credentials in the URL work but prefer ``user``/``password``/``token``.
        stream: the stream to read; created with ``subjects=[subject]`` when missing and
            ``create`` is true.
        subject: the consumer's filter subject (wildcards allowed).
        durable: the durable consumer name, shared by every worker of the pipeline.
        ack_wait: seconds the server waits for a settlement before redelivering. Heartbeats
            (``in_progress``) every ack_wait/3 keep waiting messages from being redelivered,
            so it only bounds how long a *dead* worker's messages stay locked.
        max_deliver: deliveries before the server gives up on a message; batchpunk flags the
            last one for dead-lettering (reason "redelivered"). At least 2.
        batch: messages per fetch; None takes ``max_size`` from ``prepare(config)``.
        fetch_timeout: seconds one pull waits for a first message; bounds how long ``close()``
            waits.
        decode: "json" (default), "bytes", "text", or "frame" (a batchpunk frame holding many
            payloads, as written by a frame-encoding sink).
        create: create the stream if missing, and create or update the consumer with these
            settings. With False both must exist, and the consumer's own ack_wait and
            max_deliver apply (a consumer without a delivery limit gets none from batchpunk).
        max_ack_pending: the consumer's cap on unacknowledged messages across all workers;
            None leaves room for ten workers, each with a batch filling while
            ``max_concurrent_batches`` run: max(1000, 10 x batch x (concurrency + 1)).
        nak_delay: seconds before a nak'd message is redelivered.
        tls, user, password, token: TLS and credentials (see TlsSetting); never logged.
        connect_timeout: seconds the first connection may take.
        reconnect_attempts: reconnections after a lost connection; -1 retries forever.
        hmac_key: key of signed frames (decode="frame"); a str is taken as UTF-8.
    """

    def __init__(
        self,
        servers: str | Sequence[str],
        stream: str,
        subject: str,
        durable: str,
        *,
        ack_wait: float = 30.0,
        max_deliver: int = 10,
        batch: int | None = None,
        fetch_timeout: float = 1.0,
        decode: str = "json",
        create: bool = True,
        max_ack_pending: int | None = None,
        nak_delay: float = 1.0,
        tls: TlsSetting = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        connect_timeout: float = 10.0,
        reconnect_attempts: int = -1,
        hmac_key: bytes | str | None = None,
    ) -> None:
        owner = "NatsJetStreamSource"
        self.servers = _servers(owner, servers)
        self.stream = _name(owner, "stream", stream)
        self.subject = _name(owner, "subject", subject)
        self._wildcard = "*" in self.subject or ">" in self.subject
        self.durable = _name(owner, "durable", durable)
        if any(c in self.stream for c in ".*>") or any(c in self.durable for c in ".*>"):
            raise ConfigError(
                f"{owner}.stream/durable: names must not contain '.', '*' or '>', "
                f"got stream={stream!r}, durable={durable!r}"
            )
        self.ack_wait = _seconds(owner, "ack_wait", ack_wait)
        self.max_deliver = int_option(owner, "max_deliver", max_deliver, 2)
        self.batch = None if batch is None else int_option(owner, "batch", batch, 1)
        self.fetch_timeout = _seconds(owner, "fetch_timeout", fetch_timeout)
        self.decode = choice_option(owner, "decode", decode, DECODINGS)
        if not isinstance(create, bool):
            raise ConfigError(f"{owner}.create: expected true or false, got {create!r}")
        self.create = create
        self.max_ack_pending = (
            None
            if max_ack_pending is None
            else int_option(owner, "max_ack_pending", max_ack_pending, 1)
        )
        if not isinstance(nak_delay, int | float) or isinstance(nak_delay, bool) or nak_delay < 0:
            raise ConfigError(f"{owner}.nak_delay: expected seconds >= 0, got {nak_delay!r}")
        self.nak_delay = float(nak_delay)
        nak = b"-NAK"
        if self.nak_delay:  # what Msg.nak(delay=...) sends
            nak += b" " + json.dumps({"delay": int(self.nak_delay * 10**9)}).encode()
        self._nak_payload = nak
        self._hmac_key = _hmac_key(owner, hmac_key)
        self._decoder = payload_decoder(owner, self.decode, self._hmac_key)
        self._concurrency = 1
        self._conn = _Connection(
            owner,
            self.servers,
            f"batchpunk:{self.durable}",
            tls=tls,
            user=user,
            password=password,
            token=token,
            connect_timeout=connect_timeout,
            reconnect_attempts=reconnect_attempts,
            # This connection publishes only to reply subjects the server chose (acks, naks)
            # and to API subjects built from names checked above: nats-py's check of every
            # subject (a fifth of each ack publish's CPU, measured) would find nothing.
            check_subjects=False,
        )
        self._js: Any = None
        # The private inbox every pull request of this source replies to (one subscription,
        # delivered through one callback: no task per message, unlike nats-py's fetch()).
        self._sub: Any = None
        self._inbox = ""
        self._next_subject = ""
        # What the consumer really does (the server's values win when create=False).
        self._server_ack_wait = self.ack_wait
        self._server_max_deliver: int | None = self.max_deliver  # None: no delivery limit
        self._ready: deque[Envelope] = deque()
        # Messages handed out and not yet settled, by reply subject (unique per delivery): None,
        # or the parts ledger of a frame message. Acks are published to the reply subject
        # directly, so no nats-py message object outlives its arrival.
        self._unsettled: dict[str, Parts | None] = {}
        self._start_lock = asyncio.Lock()
        # At most one pull request is outstanding: its reply subject (None: none), how many
        # messages it may still bring, how many it brought, and when to give up on it.
        self._pulls = 0
        self._pull_reply: str | None = None
        self._pull_left = 0
        self._pull_got = 0
        self._pull_failures = 0  # failed or refused pulls in a row (their backoff)
        self._pull_sent = 0.0
        self._pull_deadline = 0.0
        self._pull_over = asyncio.Event()
        self._pull_over.set()
        # How the last pull ended, read by the reader before it sends the next one.
        self._last_pull_empty = False
        self._last_pull_quick = False
        self._pull_error: str | None = None
        self._consumer_suspect = False
        # Set whenever a reader waiting for envelopes should look again.
        self._wakeup = asyncio.Event()
        self._fetch_failure: BaseException | None = None
        self._stopping = False
        self._returner: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = asyncio.Event()
        self._last_check = time.monotonic()

    def __repr__(self) -> str:
        return (
            f"NatsJetStreamSource({self._conn.where!r}, stream={self.stream!r}, "
            f"subject={self.subject!r}, durable={self.durable!r})"
        )

    # -- life cycle ----------------------------------------------------------------------------

    async def prepare(self, config: BatchConfig) -> None:
        """Size fetches to the pipeline's batches, then connect and bind the consumer.

        Fetches ``max_size`` messages at a time unless ``batch`` was given explicitly. Connecting
        here makes a wrong address, stream or consumer fail before the pipeline consumes.
        """
        if self.batch is None:
            self.batch = config.max_size
        self._concurrency = config.concurrency
        await self.start()

    @property
    def fetch_size(self) -> int:
        """Messages asked for per fetch."""
        return self.batch if self.batch is not None else BatchConfig().max_size

    @property
    def unsettled(self) -> int:
        """Messages fetched and not yet acked, nak'd or terminated."""
        return len(self._unsettled)

    async def start(self) -> None:
        """Connect and bind the consumer now (iteration does it on first use otherwise).

        Raises ConnectionError when no server answers, ConfigError when the stream or consumer
        is missing (create=False) or does not fit the subject.
        """
        async with self._start_lock:
            if self._sub is not None:
                return
            if self._closing:
                raise RuntimeError(f"{self!r} is closed")
            js = await self._conn.open()
            try:
                self._sub = await self._bind(js)
            except BaseException:
                await self._conn.close()
                raise
            self._js = js
            self._heartbeat = asyncio.create_task(
                self._keep_in_progress(), name=f"batchpunk-nats-in-progress:{self.durable}"
            )

    async def _bind(self, js: Any) -> Any:
        errors = require("nats.js.errors", "nats", "NatsJetStreamSource")
        if self.create:
            await self._ensure_stream(js, errors)
            await self._ensure_consumer(js, errors)
        try:
            info = await js.consumer_info(self.stream, self.durable)
        except errors.NotFoundError:
            raise ConfigError(
                f"NatsJetStreamSource.durable: consumer {self.durable!r} does not exist on "
                f"stream {self.stream!r} (set create=true, or create it with the nats CLI)"
            ) from None
        config = info.config
        if config.ack_wait:
            self._server_ack_wait = float(config.ack_wait)
        if config.max_deliver and config.max_deliver > 0:
            self._server_max_deliver = int(config.max_deliver)
        elif not self.create:
            # The consumer has no delivery limit (None, -1 or 0): the server delivers again and
            # again, so no delivery is the last one and none is flagged redelivered.
            self._server_max_deliver = None
        if not self.create and config.filter_subject and config.filter_subject != self.subject:
            log.warning(
                "NatsJetStreamSource: consumer %r filters %r, not the configured subject %r",
                self.durable,
                config.filter_subject,
                self.subject,
            )
        return await self._subscribe(js)

    async def _subscribe(self, js: Any) -> Any:
        """Subscribe to this source's private inbox, where every pull request is answered.

        Each pull gets its own reply subject under the inbox (``<inbox>.<n>``), so a status
        that answers an old, given-up pull is told apart from one that ends the current pull.
        """
        nc = self._conn.nc
        self._inbox = nc.new_inbox()
        prefix = getattr(js, "_prefix", None) or "$JS.API"
        self._next_subject = f"{prefix}.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}"
        return await nc.subscribe(f"{self._inbox}.*", cb=self._on_message)

    async def _ensure_stream(self, js: Any, errors: Any) -> None:
        try:
            await js.stream_info(self.stream)
            return
        except errors.NotFoundError:
            pass
        try:
            await js.add_stream(name=self.stream, subjects=[self.subject])
            log.info("NatsJetStreamSource: created stream %r on %r", self.stream, self.subject)
        except errors.BadRequestError as exc:
            # Another worker may have created it in between; anything else is a real conflict.
            try:
                await js.stream_info(self.stream)
            except errors.NotFoundError:
                raise ConfigError(
                    f"NatsJetStreamSource.stream: cannot create stream {self.stream!r} for "
                    f"subject {self.subject!r}: {exc.description}"
                ) from None

    async def _ensure_consumer(self, js: Any, errors: Any) -> None:
        api = require("nats.js.api", "nats", "NatsJetStreamSource")
        max_ack_pending = self.max_ack_pending
        if max_ack_pending is None:
            # Too small a cap stalls SIZE-triggered workers waiting for a batch that cannot fill;
            # each worker's own max_pending already bounds what it fetches.
            max_ack_pending = max(1000, 10 * self.fetch_size * (self._concurrency + 1))
        config = api.ConsumerConfig(
            name=self.durable,
            durable_name=self.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=self.ack_wait,
            max_deliver=self.max_deliver,
            filter_subject=self.subject,
            max_ack_pending=max_ack_pending,
        )
        try:
            # Creates the consumer, or updates the ack_wait, max_deliver and max_ack_pending
            # of an existing one (the server allows editing those).
            await js.add_consumer(self.stream, config)
        except errors.APIError as exc:
            raise ConfigError(
                f"NatsJetStreamSource.durable: cannot create or update consumer {self.durable!r} "
                f"on stream {self.stream!r} for subject {self.subject!r}: {exc.description}"
            ) from None

    async def close(self) -> None:
        """Stop fetching, nak every unsettled message, flush and close; safe to call twice.

        A message on its last delivery is not nak'd (JetStream would drop it at once; left
        alone, it drops it after ack_wait): close() logs an error naming its stream sequence.
        Only a hard stop leaves one unsettled; a graceful one dead-letters it first.

        The pull request in flight is let finish (it ends within ``fetch_timeout``) rather
        than abandoned, so no message the server already sent is left unaccounted for.
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        self._wakeup.set()
        try:
            if self._returner is not None:
                await asyncio.wait([self._returner])
            await self._wait_pull_over()
            if self._heartbeat is not None:
                self._heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._heartbeat
            if self._sub is not None:
                with contextlib.suppress(Exception):
                    await self._sub.unsubscribe()
                for msg in self._drain_client_buffer():
                    self._unsettled[msg.reply] = None
            self._ready.clear()
            limit = self._server_max_deliver or math.inf
            returned = sum(_delivered(reply) < limit for reply in self._unsettled)
            # One on its last delivery is not nak'd but logged as an error (see there).
            await self._publish_settlements([(reply, _NAK) for reply in self._unsettled])
            if returned:
                log.info(
                    "NatsJetStreamSource: returned %d unsettled message(s) to %r with nak",
                    returned,
                    self.durable,
                )
            await self._conn.close()
        finally:
            self._closed.set()

    def _drain_client_buffer(self) -> list[Any]:
        """Messages the server sent to the inbox that the callback had not taken yet.

        nats-py keeps them in the subscription's queue and drops them on unsubscribe; taking
        them lets close() nak them now rather than leave them locked until ack_wait expires.
        """
        queue = getattr(self._sub, "_pending_queue", None)
        found: list[Any] = []
        if queue is None:
            return found
        while True:
            try:
                msg = queue.get_nowait()
            except (asyncio.QueueEmpty, AttributeError):
                return found
            if msg.reply and not (msg.headers and msg.headers.get("Status")):
                found.append(msg)

    # -- iteration -----------------------------------------------------------------------------

    def __aiter__(self) -> NatsJetStreamSource:
        return self

    async def __anext__(self) -> Envelope:
        """The next envelope; ends (StopAsyncIteration) once close() was called.

        Cancelling the caller is safe: messages are taken off the connection by the inbox's
        callback, never by the caller, so what a pull brings is kept for the next call (or
        nak'd by close()).
        """
        while True:
            if self._closing:
                raise StopAsyncIteration
            if self._stopping:
                return await self._last_deliveries()
            if self._ready:
                return self._ready.popleft()
            if self._fetch_failure is not None:
                failure, self._fetch_failure = self._fetch_failure, None
                raise failure
            await self.start()
            if self._pull_reply is not None and time.monotonic() >= self._pull_deadline:
                # Neither the messages nor the closing status came (a reconnect lost the
                # request): give up on it; anything it still brings is taken all the same.
                self._end_pull(unanswered=True)
            if self._pull_reply is None:
                await self._before_pull()
                if self._ready or self._closing or self._stopping:
                    continue
                await self._pull()
            self._wakeup.clear()
            if self._ready or self._pull_reply is None or self._closing or self._stopping:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, self._pull_deadline - time.monotonic())):
                    await self._wakeup.wait()

    def stop_consuming(self) -> None:
        """End iteration soon while acknowledgements still work (the pipeline's graceful stop).

        No new pull starts; the one in flight finishes, and whatever was fetched but not yet
        handed out is nak'd at once so that other workers get it while this one drains, except
        the messages on their last delivery (``max_deliver``): JetStream never delivers a nak'd
        last delivery again, so those are still handed out, flagged redelivered, for the
        pipeline to dead-letter before iteration ends.
        """
        if self._stopping or self._closing:
            return
        self._stopping = True
        self._wakeup.set()
        self._returner = asyncio.get_running_loop().create_task(
            self._return_unread(), name=f"batchpunk-nats-return:{self.durable}"
        )

    async def _return_unread(self) -> None:
        await self._wait_pull_over()
        unread = [e for e in self._ready if not self._at_last_delivery(e)]
        last = [e for e in self._ready if self._at_last_delivery(e)]
        self._ready.clear()
        self._ready.extend(last)
        await self.nack_many(unread, True)

    async def _last_deliveries(self) -> Envelope:
        """Once stopping: the fetched messages on their last delivery, then the end.

        Waits for the pull in flight to end (the returner), so that a last delivery it brings
        is handed out too; what a given-up pull brings later and is not a last delivery stays
        for close() to nak.
        """
        if self._returner is not None and not self._returner.done():
            await asyncio.wait([self._returner])  # never cancels it
        ready = self._ready
        if self._closing:
            raise StopAsyncIteration
        for _ in range(len(ready)):
            envelope = ready.popleft()
            if self._at_last_delivery(envelope):
                return envelope
            ready.append(envelope)
        raise StopAsyncIteration

    @staticmethod
    def _at_last_delivery(envelope: Envelope) -> bool:
        """Flagged redelivered: JetStream delivers it no more, whatever this worker does."""
        return bool(envelope.headers and envelope.headers.get(REDELIVERED))

    async def _wait_pull_over(self) -> None:
        """Wait until the pull in flight has brought all it will, or was given up on."""
        if self._pull_reply is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, self._pull_deadline - time.monotonic())):
                await self._pull_over.wait()
        if self._pull_reply is not None:
            self._end_pull()

    # -- the pull protocol ---------------------------------------------------------------------
    #
    # nats-py's PullSubscription.fetch() awaits every message of a batch through a task of its
    # own, which caps one worker at about 12,000-15,000 messages/s. The source speaks the pull
    # protocol itself instead, with the request fetch() starts with:
    # {"batch": n, "expires": ns, "no_wait": true} to $JS.API.CONSUMER.MSG.NEXT.<stream>.
    # <durable>, replying to a subject under the private inbox. The server sends what the
    # consumer has, up to n messages, then ends the request with a status message (408 Request
    # Timeout, 404 No Messages on some versions), or silently when exactly n went out; with
    # nothing to send it waits up to ``expires`` for the first message. 409 ends a request on a
    # conflict (leadership change, deleted consumer, too many waiting requests). Messages are
    # handed out as they arrive; the next request goes out once they are all taken, so a
    # worker holds at most one batch that the pipeline has not taken yet.

    async def _pull(self) -> None:
        """Send one pull request; its messages arrive through ``_on_message``."""
        if self._pull_reply is not None or self._ready or self._closing or self._stopping:
            return  # another reader got here first, or no pull may start any more
        nc = self._conn.nc
        if nc is None or nc.is_closed:
            raise ConnectionError(
                f"NatsJetStreamSource: the connection to {self._conn.where} is closed "
                f"(reconnect_attempts={self._conn.reconnect_attempts} exhausted)"
            )
        if not nc.is_connected:
            # Reconnecting: a request sent now would wait in the client's buffer and go out
            # with every other one sent meanwhile, each bringing a batch. Wait instead.
            await asyncio.sleep(min(self.fetch_timeout, 0.25))
            return
        self._pulls += 1
        reply = f"{self._inbox}.{self._pulls}"
        request = json.dumps(
            {
                "batch": self.fetch_size,
                "expires": int(self.fetch_timeout * 1_000_000_000),
                "no_wait": True,
            }
        ).encode()
        now = time.monotonic()
        # Set before publishing: a reader cancelled inside publish() leaves a pull that is
        # either sent (its messages are taken by the callback) or given up at the deadline.
        self._pull_reply = reply
        self._pull_left = self.fetch_size
        self._pull_got = 0
        self._pull_sent = now
        self._pull_deadline = now + self.fetch_timeout + min(1.0, max(0.25, self.fetch_timeout))
        self._pull_over.clear()
        try:
            await nc.publish(self._next_subject, request, reply=reply)
        except Exception as exc:
            self._end_pull()
            nats = require("nats", "nats", "NatsJetStreamSource")
            if not isinstance(exc, nats.errors.Error | OSError):
                raise
            # Reconnecting with a full buffer and the like: the client recovers; retry soon.
            log.warning(
                "NatsJetStreamSource: fetch from %r failed, retrying: %s",
                self.durable,
                self._conn.scrub(f"{type(exc).__name__}: {exc}"),
            )
            await asyncio.sleep(self._failed_pull_delay())

    async def _before_pull(self) -> None:
        """Between pulls: report a refused pull, back off, check a consumer that looks idle."""
        if self._pull_error is not None:
            error, self._pull_error = self._pull_error, None
            log.warning(
                "NatsJetStreamSource: fetch from %r failed: %s",
                self.durable,
                self._conn.scrub(error),
            )
            await asyncio.sleep(self._failed_pull_delay())
            await self._check_consumer_when_idle(force=True)
        elif self._last_pull_empty or self._consumer_suspect:
            force, self._consumer_suspect = self._consumer_suspect, False
            await self._check_consumer_when_idle(force=force)
            if self._last_pull_empty and self._last_pull_quick:
                # Ended at once without a message (a conflict): do not hammer the server.
                await asyncio.sleep(min(self.fetch_timeout, 0.25))
        self._last_pull_empty = self._last_pull_quick = False

    def _failed_pull_delay(self) -> float:
        """The pause after a failed or refused pull: reconnect backoff, reset by any answer.

        Built on retry.backoff_delay like every broker's (connectors/_toolkit.py): jittered so
        that the workers of a recovering server do not pull in step, growing to at least
        fetch_timeout (and 5 s) while the failures go on.
        """
        self._pull_failures += 1
        cap = max(self.fetch_timeout, _MAX_PULL_BACKOFF)
        return reconnect_delay(self._pull_failures, base=_PULL_BACKOFF_BASE, cap=cap)

    def _end_pull(self, unanswered: bool = False) -> None:
        """The pull in flight is over; ``unanswered``: given up on, no status ever came.

        A live server always ends a request, so silence means a lost connection or a consumer
        that no longer exists (requests to it go nowhere): check it before the next pull.
        """
        if self._pull_reply is None:
            return
        if unanswered:
            self._consumer_suspect = True
        self._pull_reply = None
        self._last_pull_empty = self._pull_got == 0
        self._last_pull_quick = time.monotonic() - self._pull_sent < self.fetch_timeout / 2
        self._pull_over.set()
        self._wakeup.set()

    async def _on_message(self, msg: Any) -> None:
        """Every message sent to the inbox, one after the other, in nats-py's delivery task.

        Does nothing that waits (but for acking an empty frame), so cancelling that task on
        unsubscribe can never interrupt it halfway through a message.
        """
        if not msg.reply:  # a status message ending (or keeping alive) a pull request
            headers = msg.headers or {}
            status = headers.get("Status")
            if status is not None:
                self._on_status(msg.subject, status, headers.get("Description", ""))
            return
        self._pull_failures = 0
        if self._pull_reply is not None:
            self._pull_got += 1
            self._pull_left -= 1
            if self._pull_left <= 0:
                self._end_pull()
        self._last_check = time.monotonic()
        try:
            delivery, envelopes = self._envelopes(msg)
        except Exception as exc:  # handed to the next __anext__, never lost in a callback
            self._fetch_failure = exc
            self._wakeup.set()
            return
        if envelopes:
            self._ready.extend(envelopes)
            self._wakeup.set()
        else:  # an empty frame: nothing to process, nothing to lose
            await self._publish_settlements([(delivery, _ACK)])

    def _on_status(self, subject: str, status: str, description: str) -> None:
        if status == "100":  # idle heartbeat: the request is alive
            return
        if subject != self._pull_reply:  # the end of a pull already given up on
            return
        if status == "409":
            # Leadership change, server shutdown, deleted consumer, too many waiting pulls:
            # pull again (after a pause if nothing came), checking the consumer first.
            log.debug("NatsJetStreamSource: pull from %r ended: 409 %s", self.durable, description)
            self._consumer_suspect = "delet" in description.lower()
        elif status not in ("404", "408"):
            self._pull_error = f"{status} {description}".strip()
        else:
            self._pull_failures = 0  # served: the server answers pulls again
        self._end_pull()

    async def _check_consumer_when_idle(self, force: bool = False) -> None:
        """While idle, make sure the consumer still exists: a deleted one only looks idle."""
        now = time.monotonic()
        if not force and now - self._last_check < 30.0:
            return
        self._last_check = now
        errors = require("nats.js.errors", "nats", "NatsJetStreamSource")
        try:
            await self._js.consumer_info(self.stream, self.durable)
        except errors.NotFoundError:
            if not self.create:
                raise ConfigError(
                    f"NatsJetStreamSource.durable: consumer {self.durable!r} on stream "
                    f"{self.stream!r} was deleted"
                ) from None
            log.warning(
                "NatsJetStreamSource: consumer %r on %r disappeared; creating it again",
                self.durable,
                self.stream,
            )
            await self._ensure_stream(self._js, errors)
            await self._ensure_consumer(self._js, errors)
        except Exception as exc:  # the next fetch reports a lasting problem
            log.debug("NatsJetStreamSource: consumer check failed: %s", exc)

    def _envelopes(self, msg: Any) -> tuple[str, list[Envelope]]:
        reply = msg.reply
        delivered = _delivered(reply)  # the rest of the metadata only when a header needs it
        data: bytes = msg.data
        payloads: list[Any]
        malformed: BaseException | None = None
        try:
            payloads = self._decode(data)
        except Exception as exc:
            payloads, malformed = [data], exc
        # Headers only for what a plain first delivery lacks: headers_of() gives a dead letter
        # the subject, stream and sequences, so a plain message costs no dict.
        headers: dict[str, Any] | None = None
        if delivered > 1 or msg.headers or malformed is not None or self._wildcard:
            headers = self._headers(msg.subject, reply, msg.headers)
        receipt: str | Parts = reply
        if len(payloads) > 1:
            ledger = Parts(reply, len(payloads))  # the frame's parts ledger
            self._unsettled[reply] = receipt = ledger
        else:
            self._unsettled[reply] = None
        error = malformed
        if self._server_max_deliver is not None and delivered >= self._server_max_deliver:
            headers = headers or self._headers(msg.subject, reply, msg.headers)
            headers[REDELIVERED] = True
            stream, stream_seq = headers["stream"], headers["stream_seq"]
            error = error or delivery_limit_error(
                f"stream {stream!r} sequence {stream_seq}",
                delivered,
                self._server_max_deliver,
                "the consumer's max_deliver",
            )
        return reply, [Envelope(p, None, 0, headers, receipt, error) for p in payloads]

    def _headers(self, subject: str, reply: str, nats_headers: Any = None) -> dict[str, Any]:
        stream, delivered, stream_seq, consumer_seq, timestamp = _ack_metadata(reply)
        headers: dict[str, Any] = {
            "subject": subject,
            "stream": stream,
            "stream_seq": stream_seq,
            "consumer_seq": consumer_seq,
            "delivery_count": delivered,
            "timestamp": timestamp,
        }
        if nats_headers:
            headers["nats_headers"] = dict(nats_headers)
        return headers

    def headers_of(self, envelope: Envelope) -> dict[str, Any]:
        """The headers a dead letter of ``envelope`` carries: subject, stream, sequences."""
        receipt = envelope.receipt
        reply = receipt.key if isinstance(receipt, Parts) else receipt
        try:
            # Without a wildcard the filter subject is every message's subject; with one,
            # each envelope carries its own headers.
            return self._headers(self.subject, str(reply))
        except (IndexError, ValueError):
            return {}

    def _decode(self, data: bytes) -> list[Any]:
        return self._decoder(data)

    # -- settlement ----------------------------------------------------------------------------

    async def ack_many(self, envelopes: Sequence[Envelope]) -> None:
        """Acknowledge these envelopes' messages (a frame message once all its parts are)."""
        await self._settle(envelopes, _ACK)

    async def nack_many(self, envelopes: Sequence[Envelope], requeue: bool) -> None:
        """Nak (``requeue``: redelivered after ``nak_delay``) or terminate these messages."""
        await self._settle(envelopes, _NAK if requeue else _TERM)

    async def _settle(self, envelopes: Sequence[Envelope], how: str) -> None:
        """One publish per message, written in order, with no task or coroutine per message."""
        replies: list[tuple[str | Parts, str]] = []
        for envelope in envelopes:
            receipt = envelope.receipt
            if isinstance(receipt, Parts):
                verdict = receipt.settle(_OUTCOME[how])
                if verdict is not None:  # else other parts of the frame are not settled yet
                    replies.append((receipt, _HOW[verdict]))
            elif receipt is not None:
                replies.append((receipt, how))
        await self._publish_settlements(replies)

    async def _publish_settlements(self, replies: list[tuple[str | Parts, str]]) -> None:
        """Publish each (delivery, ack/nak/term) as nats-py's Msg.ack/nak/term would, once.

        Failures are logged once per call, not per message: a lost connection would otherwise
        write a line for every message of the batch. Never lost either way: an unsettled
        message comes back after ack_wait (a duplicate at worst).
        """
        unsettled = self._unsettled
        nc = self._conn.nc
        limit = self._server_max_deliver
        failed = 0
        first = ""  # the first failed settlement, named in the log line
        error: BaseException | None = None
        lost: list[Any] = []  # last deliveries given back: JetStream drops them
        for delivery, how in replies:
            reply = delivery.key if isinstance(delivery, Parts) else delivery
            if reply not in unsettled:
                continue  # settled already (close() gave it back, or a second settlement)
            del unsettled[reply]
            if how == _NAK and limit is not None and _delivered(reply) >= limit:
                lost.append(_stream_seq(reply))  # a nak would only drop it at once
                continue
            payload = b"" if how == _ACK else b"+TERM" if how == _TERM else self._nak_payload
            try:
                if nc is None:
                    raise ConnectionError("not connected")
                await nc.publish(reply, payload)
            except Exception as exc:
                if not failed:
                    first, error = f"{how} of stream sequence {_stream_seq(reply)}", exc
                failed += 1
        if error is not None:
            log.warning(
                "NatsJetStreamSource: %d settlement(s) failed (first: %s), the server will "
                "redeliver those messages after ack_wait: %s",
                failed,
                first,
                self._conn.scrub(f"{type(error).__name__}: {error}"),
            )
        if lost:
            log.error(
                "NatsJetStreamSource: %d message(s) of stream %r on their last delivery "
                "(max_deliver=%s) were given back unsettled, not dead-lettered; JetStream will "
                "not deliver them again (stream sequences %s). A graceful stop dead-letters "
                "them; recover these from the stream by sequence",
                len(lost),
                self.stream,
                limit,
                ", ".join(map(str, lost)),
            )

    async def _keep_in_progress(self) -> None:
        """Every ack_wait/3, tell the server each unsettled message is still being worked on."""
        interval = max(0.05, self._server_ack_wait / 3)
        while True:
            await asyncio.sleep(interval)
            nc = self._conn.nc
            for reply in list(self._unsettled):
                if reply not in self._unsettled or nc is None:
                    continue
                try:
                    await nc.publish(reply, b"+WPI")  # what Msg.in_progress() sends
                except Exception as exc:  # disconnected: the server redelivers, nothing is lost
                    log.debug("NatsJetStreamSource: in_progress failed: %s", exc)
                    break


def _stream_seq(reply: str) -> Any:
    try:
        return _ack_metadata(reply)[2]
    except Exception:
        return "?"


def _delivered(reply: str) -> int:
    """The delivery count in a JetStream reply subject (see _ack_metadata), cheaply."""
    tokens = reply.split(".")
    count = len(tokens)
    if tokens[0] != "$JS" or tokens[1] != "ACK" or not (count == 9 or count >= 11):
        raise ValueError(f"not a JetStream message: reply subject {reply!r}")
    return int(tokens[4 if count == 9 else 6])


def _ack_metadata(reply: str) -> tuple[str, int, int, int, float]:
    """(stream, delivery count, stream sequence, consumer sequence, timestamp) of a message.

    JetStream puts them in the reply subject, ``$JS.ACK.<stream>.<consumer>.<delivered>.
    <stream seq>.<consumer seq>.<nanoseconds>.<pending>`` (with a domain and an account hash
    after ``ACK`` on newer servers). Parsed here rather than through nats-py's ``msg.metadata``,
    which builds a datetime per message; the timestamp is the same float (seconds, rounded to
    microseconds as that datetime did).
    """
    tokens = reply.split(".")
    count = len(tokens)
    if tokens[0] != "$JS" or tokens[1] != "ACK" or not (count == 9 or count >= 11):
        raise ValueError(f"not a JetStream message: reply subject {reply!r}")
    at = 2 if count == 9 else 4
    seconds = int(tokens[at + 5]) / 1_000_000_000.0
    whole = int(seconds)
    micros = whole * 1_000_000 + round((seconds - whole) * 1e6)
    return (
        tokens[at],
        int(tokens[at + 2]),
        int(tokens[at + 3]),
        int(tokens[at + 4]),
        micros / 1_000_000,
    )


# ---------------------------------------------------------------------------------------------
# Sink
# ---------------------------------------------------------------------------------------------


def _header_bytes(headers: Mapping[str, str] | None, stream: str | None) -> int:
    """The bytes of the header block nats-py sends with a JetStream publish of ``headers``
    (plus ``Nats-Expected-Stream`` when a stream is expected): ``NATS/1.0\r\n``, one
    ``key: value\r\n`` per header, a closing ``\r\n``."""
    if not headers and not stream:
        return 0
    size = len(b"NATS/1.0\r\n") + 2
    if stream:
        size += len("Nats-Expected-Stream: \r\n") + len(stream.encode())
    for key, value in (headers or {}).items():
        size += len(key.encode()) + 2 + len(str(value).encode()) + 2
    return size


class NatsJetStreamSink:
    """Publishes each payload of a batch to a JetStream subject and waits for every ack.

    Returns the stream sequence of each payload. Publishes run concurrently (up to
    ``max_in_flight`` at once), so a batch costs about one round trip, not one per payload.
    When only some publishes fail, the sink raises PartialFailure for those, so a retry does
    not publish the others twice; give ``msg_id`` to let JetStream's duplicate window absorb
    republishing after a crash as well.

    Args:
        servers: as for NatsJetStreamSource.
        subject: where to publish; a stream must capture it (see ``stream``).
        encode: "json" (default), "bytes", "text", or "frame" (the whole batch as one message
            in batchpunk's frame format; every payload gets that message's sequence).
        stream: expected stream name: the server refuses a publish that lands elsewhere.
        msg_id: payload field name, or a function of the payload, giving the Nats-Msg-Id
            header used for de-duplication.
        timeout: seconds to wait for one publish acknowledgement.
        max_in_flight: publishes awaiting their acknowledgement at once.
        serializer, compression: frame settings (encode="frame").
        hmac_key: sign frames with this key (encode="frame"); a str is taken as UTF-8.
        tls, user, password, token, connect_timeout, reconnect_attempts: as for the source.
    """

    def __init__(
        self,
        servers: str | Sequence[str],
        subject: str,
        *,
        encode: str = "json",
        stream: str | None = None,
        msg_id: str | Callable[[Any], Any] | None = None,
        timeout: float = 5.0,
        max_in_flight: int = 1000,
        serializer: str = "json",
        compression: str = "zlib",
        hmac_key: bytes | str | None = None,
        tls: TlsSetting = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        connect_timeout: float = 10.0,
        reconnect_attempts: int = -1,
    ) -> None:
        owner = "NatsJetStreamSink"
        self.servers = _servers(owner, servers)
        self.subject = _name(owner, "subject", subject)
        if any(c in self.subject for c in "*>"):
            raise ConfigError(f"{owner}.subject: cannot publish to a wildcard, got {subject!r}")
        self.encode = choice_option(owner, "encode", encode, ENCODINGS)
        self.stream = None if stream is None else _name(owner, "stream", stream)
        if msg_id is not None and not (isinstance(msg_id, str) or callable(msg_id)):
            raise ConfigError(
                f"{owner}.msg_id: expected a payload field name or a function, got {msg_id!r}"
            )
        self.msg_id = msg_id
        self.timeout = _seconds(owner, "timeout", timeout)
        self.max_in_flight = int_option(owner, "max_in_flight", max_in_flight, 1)
        self.serializer = serializer
        self.compression = compression
        self._hmac_key = _hmac_key(owner, hmac_key)
        self._conn = _Connection(
            owner,
            self.servers,
            f"batchpunk:{self.subject}",
            tls=tls,
            user=user,
            password=password,
            token=token,
            connect_timeout=connect_timeout,
            reconnect_attempts=reconnect_attempts,
        )
        self._js: Any = None
        self._lock = asyncio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"NatsJetStreamSink({self._conn.where!r}, subject={self.subject!r})"

    async def prepare(self, config: BatchConfig) -> None:
        """Connect before the pipeline consumes, so a wrong address fails first."""
        await self.start()

    async def start(self) -> None:
        """Connect now (the first write does it otherwise)."""
        async with self._lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            nc = self._conn.nc
            if self._js is None or nc is None or nc.is_closed:
                # A client nats-py closed for good (reconnect_attempts exhausted, or a frame
                # the server refused) is replaced: it never publishes again.
                self._js = None
                self._js = await self._conn.open()

    async def write(self, batch: Sequence[Any]) -> list[int]:
        """Publish every payload; the stream sequence of each, in order."""
        if not batch:
            return []
        await self.start()
        if self.encode == "frame":
            seq = await self._publish(self._frame(batch), self._headers(None))
            return [seq] * len(batch)
        results: list[Any] = [None] * len(batch)
        failures: dict[int, BaseException] = {}
        jobs: list[tuple[int, bytes, dict[str, str] | None]] = []
        for index, item in enumerate(batch):
            try:
                jobs.append((index, self._encode(item), self._headers(item)))
            except Exception as exc:
                failures[index] = NatsPayloadError(
                    f"NatsJetStreamSink: payload {index} of the batch cannot be published: "
                    f"{type(exc).__name__}: {exc}"
                )
        for start in range(0, len(jobs), self.max_in_flight):
            chunk = jobs[start : start + self.max_in_flight]
            outcomes = await asyncio.gather(
                *(self._publish(data, headers) for _, data, headers in chunk),
                return_exceptions=True,
            )
            for (index, _, _), outcome in zip(chunk, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    if not isinstance(outcome, Exception):
                        raise outcome
                    failures[index] = outcome
                else:
                    results[index] = outcome
        if failures:
            if len(failures) == len(batch):
                raise next(iter(failures.values()))
            raise PartialFailure(failures, results)
        return results

    async def _publish(self, data: bytes, headers: dict[str, str] | None) -> int:
        nc = self._conn.nc
        limit = nc.max_payload if nc is not None else 0
        if limit and (headers or self.stream):
            size = len(data) + _header_bytes(headers, self.stream)
            if size > limit:
                # nats-py checks the payload alone; the server counts the headers too, refuses
                # the frame and nats-py closes the connection for good: check it here.
                raise NatsPayloadError(
                    f"NatsJetStreamSink: a {len(data)}-byte message with its headers "
                    f"({size} bytes) exceeds the server's max_payload ({limit}) for "
                    f"{self.subject!r}"
                )
        try:
            ack = await self._js.publish(
                self.subject, data, timeout=self.timeout, stream=self.stream, headers=headers
            )
        except Exception as exc:
            nats = require("nats", "nats", "NatsJetStreamSink")
            js_errors = require("nats.js.errors", "nats", "NatsJetStreamSink")
            if isinstance(exc, nats.errors.TimeoutError):
                raise TimeoutError(
                    f"NatsJetStreamSink: no acknowledgement for {self.subject!r} within "
                    f"timeout={self.timeout:g}s"
                ) from None
            if isinstance(exc, nats.errors.MaxPayloadError):
                raise NatsPayloadError(
                    f"NatsJetStreamSink: a {len(data)}-byte message exceeds the server's "
                    f"max_payload for {self.subject!r}"
                ) from None
            if isinstance(exc, js_errors.NoStreamResponseError):
                raise ConnectionError(
                    f"NatsJetStreamSink: no stream captures subject {self.subject!r}"
                ) from None
            raise
        return int(ack.seq)

    def _encode(self, item: Any) -> bytes:
        if self.encode == "json":
            return json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode()
        if self.encode == "text":
            if not isinstance(item, str):
                raise TypeError(f"NatsJetStreamSink(encode='text'): expected str, got {item!r}")
            return item.encode()
        if not isinstance(item, bytes | bytearray | memoryview):
            raise TypeError(f"NatsJetStreamSink(encode='bytes'): expected bytes, got {item!r}")
        return bytes(item)

    def _frame(self, batch: Sequence[Any]) -> bytes:
        codec = importlib.import_module("batchpunk.codec")
        data: bytes = codec.encode_batch(
            list(batch),
            serializer=self.serializer,
            compression=self.compression,
            hmac_key=self._hmac_key,
        )
        return data

    def _headers(self, item: Any) -> dict[str, str] | None:
        if self.msg_id is None or item is None:
            return None
        if callable(self.msg_id):
            value = self.msg_id(item)
        elif isinstance(item, Mapping) and self.msg_id in item:
            value = item[self.msg_id]
        else:
            raise KeyError(f"NatsJetStreamSink.msg_id: payload has no field {self.msg_id!r}")
        return {"Nats-Msg-Id": str(value)}

    async def close(self) -> None:
        """Flush and close the connection; safe to call twice."""
        async with self._lock:
            self._closed = True
            self._js = None
            await self._conn.close()
