"""Redis Streams: a consumer-group Source and an XADD Sink, at least once, across many workers.

Choose Redis Streams when Redis is already there and its memory can hold the backlog (a stream
lives in RAM, and trimming it is the operator's job: see the docs). Delivery is at least once: an
entry leaves the group's pending entries list (PEL) only through XACK, which this source sends
only after the pipeline acknowledged every envelope made from that entry. Scale out by running
more workers in the same group, each with its own stable consumer name; a restarted worker reads
its own pending entries first, and any worker's janitor claims (XAUTOCLAIM) the entries of a dead
one once they were idle ``claim_idle`` seconds. See docs/brokers/redis.md for the settings.

How the source keeps its promises:

- One reader task issues every XREADGROUP, with ``BLOCK block`` so that close() only waits for
  the in-flight command to return; nothing cancels a command halfway. Callers of ``__anext__``
  wait on a buffer, so cancelling them never loses an entry Redis already delivered.
- One janitor task, every ``claim_idle / 3`` seconds, refreshes the idle time of the entries this
  worker still holds (XCLAIM ... JUSTID, which does not count as a delivery) so that a slow batch
  is not stolen by another worker, then claims idle entries of dead consumers (XAUTOCLAIM).
- One settle task sends XACKs (and requeues) coalesced over a few milliseconds: ``ack()`` only
  queues the id and returns, so a pipeline may await thousands of acks in a row cheaply.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from batchpunk.connectors._common import PayloadError, mask_secrets, mask_url
from batchpunk.connectors._toolkit import (
    ACK,
    DECODINGS,
    ENCODINGS,
    REDELIVERED,
    REQUEUE,
    BufferedSource,
    Parts,
    choice_option,
    delivery_limit_error,
    hmac_key_option,
    int_option,
    payload_decoder,
)
from batchpunk.envelope import Envelope
from batchpunk.errors import (
    BatchpunkError,
    ConfigError,
    ConnectorError,
    DeliveryLimitExceeded,
    PartialFailure,
    require,
)

__all__ = [
    "REDELIVERED",
    "DeliveryLimitExceeded",
    "RedisStreamSink",
    "RedisUnavailable",
    "RedisStreamSource",
    "StreamEntryLost",
]

logger = logging.getLogger(__name__)

_ONE = 1  # the value in _held of an entry holding one message (no parts ledger)
_CHUNK = 1000  # ids per XACK / XCLAIM command
_CLOSE_FLUSH_SECONDS = 10.0  # how long close() keeps retrying unsent acks when Redis is down
_MAX_BACKOFF = 5.0
_DEFAULT_COUNT = 100  # BatchConfig().max_size, until prepare() says otherwise


class RedisUnavailable(ConnectorError, ConnectionError):
    """Redis refused a write for a reason of its own, not the item's: out of memory under
    ``noeviction``, a read-only replica, still loading, a failed snapshot (MISCONF), too few
    replicas, no permission. An outage: retried and waited out, never dead-lettered."""

    retryable = True
    unavailable = True


#: Reply codes (the first word of Redis's error) that say Redis cannot take writes just now.
_OUTAGE_REPLIES = frozenset(
    {
        "OOM",
        "READONLY",
        "LOADING",
        "MISCONF",
        "MASTERDOWN",
        "NOREPLICAS",
        "TRYAGAIN",
        "NOPERM",
        "BUSY",  # a script or function running past busy-reply-threshold
        "CLUSTERDOWN",
    }
)


def _is_outage_reply(error: BaseException) -> bool:
    """Whether an error reply to one command means Redis, not the item, is at fault."""
    exceptions = require("redis.exceptions", "redis", "RedisStreamSink")
    if isinstance(
        error,
        exceptions.ConnectionError  # BusyLoadingError (LOADING) and AuthenticationError too
        | exceptions.TimeoutError
        | exceptions.OutOfMemoryError
        | exceptions.ReadOnlyError
        | exceptions.NoPermissionError,
    ):
        return True
    code = getattr(error, "status_code", None) or str(error).split(" ", 1)[0]
    return code in _OUTAGE_REPLIES


class StreamEntryLost(ConnectorError, LookupError):
    """A pending entry was trimmed or deleted from the stream before it was acknowledged.

    Its data is gone; the source still yields a malformed envelope for it so the loss shows in
    the dead-letter sink instead of vanishing. Trim with MAXLEN well above the pending backlog.
    """


def _secret(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.password:
        return parts.password
    for key, value in parse_qsl(parts.query):
        if key == "password" and value:
            return value
    return None


def _scrub(text: str, secret: str | None) -> str:
    return mask_secrets(text, (secret,))


_TLS_KEYS = {
    "ca_file": "ssl_ca_certs",
    "ca_path": "ssl_ca_path",
    "ca_data": "ssl_ca_data",
    "cert_file": "ssl_certfile",
    "key_file": "ssl_keyfile",
    "key_password": "ssl_password",
    "check_hostname": "ssl_check_hostname",
    "verify": "ssl_cert_reqs",
}


def _client_kwargs(owner: str, url: str, tls: bool | Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate the URL and TLS settings and turn them into redis.asyncio.from_url keywords."""
    if not isinstance(url, str) or not url:
        raise ConfigError(f"{owner}.url: expected a redis://, rediss:// or unix:// URL")
    shown = mask_url(url)
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        raise ConfigError(f"{owner}.url: cannot parse {shown!r}") from None
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"{owner}.url: expected a redis://, rediss:// or unix:// URL, got {shown!r}"
        )
    kwargs: dict[str, Any] = {}
    if tls is None:
        return kwargs
    if tls is False:
        if scheme == "rediss":
            raise ConfigError(f"{owner}.tls: false contradicts the rediss:// URL {shown!r}")
        return kwargs
    if scheme == "unix":
        raise ConfigError(f"{owner}.tls: TLS does not apply to a unix:// socket URL")
    settings: Mapping[str, Any]
    if tls is True:
        settings = {}
    elif isinstance(tls, Mapping):
        settings = tls
    else:
        raise ConfigError(
            f"{owner}.tls: expected true, false or a table of TLS settings, "
            f"got {type(tls).__name__}"
        )
    for key, value in settings.items():
        target = _TLS_KEYS.get(key)
        if target is None:
            allowed = ", ".join(sorted(_TLS_KEYS))
            raise ConfigError(f"{owner}.tls.{key}: unknown setting (expected one of {allowed})")
        if key in ("verify", "check_hostname"):
            if not isinstance(value, bool):
                raise ConfigError(f"{owner}.tls.{key}: expected true or false, got {value!r}")
            kwargs[target] = ("required" if value else "none") if key == "verify" else value
        else:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{owner}.tls.{key}: expected a non-empty string")
            kwargs[target] = value
    if scheme == "redis":
        connection = require("redis.asyncio.connection", "redis", owner)
        kwargs["connection_class"] = connection.SSLConnection
    return kwargs


def _name(owner: str, field: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{owner}.{field}: expected a non-empty string, got {value!r}")
    return value


def _seconds(owner: str, field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{owner}.{field}: expected a number of seconds > 0, got {value!r}")
    if value == float("inf"):
        raise ConfigError(f"{owner}.{field}: expected a finite number of seconds")
    return float(value)


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``event``; whether it is set. Cancels only an Event.wait()."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStreamSource(BufferedSource):
    """Reads a Redis stream through a consumer group, acknowledging entries after their batch.

    Args:
        url: redis://, rediss:// (TLS) or unix:// URL; its password never appears in logs.
        stream: the stream key.
        group: consumer group; workers in one group share the entries.
        consumer: this worker's name within the group. Keep it stable across restarts (e.g.
            "<host>-<n>") so a restarted worker finds its own pending entries at once; two live
            workers must never share a name.
        claim_idle: seconds an unacknowledged entry must sit idle before a janitor hands it to
            another worker. Entries this worker holds are refreshed every claim_idle / 3, so a
            slow batch is not stolen; a dead worker's entries move after about claim_idle.
        max_deliveries: deliveries after which an entry is not processed again but marked for
            dead-lettering with reason "redelivered" (a message that keeps killing workers).
        count: entries per XREADGROUP; None takes ``max_size`` of the pipeline's BatchConfig
            (see prepare()), or 100.
        block: seconds one XREADGROUP waits for new entries; close() returns within about that.
        field: the entry field holding the payload.
        decode: "json" (default), "bytes" (raw), "text" (UTF-8) or "frame" (a batchpunk frame
            from batchpunk.codec; every message in it becomes one envelope).
        create_group: create the group (and the stream) when missing.
        start_id: where a newly created group starts: "0" for the whole stream, "$" for new
            entries only.
        tls: None to follow the URL scheme, True for TLS with the system CAs, or a mapping with
            any of ca_file, ca_path, ca_data, cert_file, key_file, key_password, verify,
            check_hostname.
        hmac_key: with decode="frame", the key every frame must be signed with (a frame
            without a valid signature comes out malformed); a signed frame needs it.
    """

    def __init__(
        self,
        url: str,
        stream: str,
        group: str,
        consumer: str,
        *,
        claim_idle: float = 60.0,
        max_deliveries: int = 10,
        count: int | None = None,
        block: float = 1.0,
        field: str = "data",
        decode: str = "json",
        create_group: bool = True,
        start_id: str = "0",
        tls: bool | Mapping[str, Any] | None = None,
        hmac_key: bytes | str | None = None,
    ) -> None:
        owner = "RedisStreamSource"
        self._client_kwargs = _client_kwargs(owner, url, tls)
        self._url = url
        self._secret = _secret(url)
        self.stream = _name(owner, "stream", stream)
        self.group = _name(owner, "group", group)
        self.consumer = _name(owner, "consumer", consumer)
        self.claim_idle = _seconds(owner, "claim_idle", claim_idle)
        self.max_deliveries = int_option(owner, "max_deliveries", max_deliveries)
        super().__init__(owner, count, _DEFAULT_COUNT)  # checks count here, in Args order
        self.block = _seconds(owner, "block", block)
        self.field = _name(owner, "field", field)
        self._field_bytes = self.field.encode()
        self.decode = choice_option(owner, "decode", decode, DECODINGS)
        if not isinstance(create_group, bool):
            raise ConfigError(f"{owner}.create_group: expected true or false")
        self.create_group = create_group
        self.start_id = _name(owner, "start_id", start_id)
        self._decoder = payload_decoder(owner, decode, hmac_key_option(owner, hmac_key))

        self._client: Any = None
        self._errors: Any = None
        self._closing = False
        self._close_lock = asyncio.Lock()
        # Entries handed out and not yet settled: the janitor keeps them claimed. The value is
        # the parts ledger of a frame entry, or _ONE for an entry holding one message.
        self._held: dict[str, Parts | int] = {}
        self._stop = asyncio.Event()  # set by close()
        self._reader: asyncio.Task[None] | None = None
        self._janitor: asyncio.Task[None] | None = None
        self._settler: asyncio.Task[None] | None = None
        self._settle_wakeup = asyncio.Event()
        self._settle_final = False
        self._acks: list[str] = []
        self._requeues: list[str] = []
        self._pending_phase = True
        self._pending_cursor = "0"
        self._lost_group = False  # the group vanished: recreate it before the next read

    def __repr__(self) -> str:
        return (
            f"RedisStreamSource(url={mask_url(self._url)!r}, stream={self.stream!r}, "
            f"group={self.group!r}, consumer={self.consumer!r})"
        )

    # -- starting (the buffer and iteration are BufferedSource's) -----------------------------

    async def _open(self) -> None:
        redis = require("redis.asyncio", "redis", "RedisStreamSource")
        self._errors = require("redis.exceptions", "redis", "RedisStreamSource")
        self._client = redis.Redis.from_url(
            self._url,
            socket_timeout=self.block + 10.0,
            socket_connect_timeout=5.0,
            **self._client_kwargs,
        )
        try:
            await self._ensure_group()
        except Exception as exc:
            exc.add_note(f"while starting {self!r}")
            await self._client.aclose()
            raise
        self._reader = asyncio.create_task(self._read_loop(), name=f"{self!r} reader")
        self._janitor = asyncio.create_task(self._janitor_loop(), name=f"{self!r} janitor")

    async def _ensure_group(self) -> None:
        errors = self._errors
        try:
            if self.create_group:
                await self._client.xgroup_create(
                    self.stream, self.group, id=self.start_id, mkstream=True
                )
            else:
                groups = await self._client.xinfo_groups(self.stream)
                if not any(_text(g["name"]) == self.group for g in groups):
                    raise ConfigError(self._no_group_message())
        except errors.ResponseError as exc:
            message = str(exc)
            if "BUSYGROUP" in message:
                return
            if "no such key" in message:
                raise ConfigError(self._no_group_message()) from None
            if "WRONGTYPE" in message:
                raise ConfigError(
                    f"RedisStreamSource.stream: key {self.stream!r} exists but is not a stream"
                ) from None
            raise ConfigError(
                f"RedisStreamSource: cannot create group {self.group!r} on stream "
                f"{self.stream!r}: {_scrub(message, self._secret)}"
            ) from None
        self._pending_phase = True
        self._pending_cursor = "0"

    def _no_group_message(self) -> str:
        return (
            f"RedisStreamSource.group: consumer group {self.group!r} does not exist on stream "
            f"{self.stream!r} and create_group is false"
        )

    # -- the reader task ---------------------------------------------------------------------

    async def _read(self) -> list[Envelope]:
        """Own pending entries first (a restarted worker finishes its own), then new ones."""
        if self._lost_group:  # after the backoff, not at once: Redis may still be restarting
            self._lost_group = False
            with contextlib.suppress(self._errors.RedisError, ConfigError):
                await self._ensure_group()
        if self._pending_phase:
            return await self._read_pending()
        return await self._read_new()

    def _read_failed(self, exc: Exception) -> BaseException | None:
        errors = self._errors
        # NOGROUP: the group (or the whole key) is gone; UNBLOCKED: it went while this read
        # was blocked on it. Both happen when Redis restarts without persistence.
        if isinstance(exc, errors.ResponseError) and str(exc).startswith(("NOGROUP", "UNBLOCKED")):
            if not self.create_group:
                return ConfigError(self._no_group_message())
            logger.warning(
                "%r: group or stream disappeared (Redis restarted or the key was deleted); "
                "recreating it",
                self,
            )
            self._lost_group = True
            return None
        refused = errors.AuthenticationError | errors.AuthorizationError  # ConnectionErrors too
        if isinstance(exc, errors.ConnectionError | errors.TimeoutError | OSError) and not (
            isinstance(exc, refused)
        ):
            self._log_transient("read", exc)
            return None
        return exc  # refused credentials or command, or unexpected: retrying cannot help

    def _reading_ended(self) -> None:
        self._requeue_unhanded()

    async def _read_pending(self) -> list[Envelope]:
        reply = await self._client.xreadgroup(
            self.group, self.consumer, {self.stream: self._pending_cursor}, count=self.count
        )
        entries = reply[0][1] if reply else []
        if not entries:
            self._pending_phase = False
            return []
        self._pending_cursor = _text(entries[-1][0])
        # The janitor may have claimed some of them already (this worker was down longer than
        # claim_idle): those are being processed, and must not be handed out twice.
        fresh = [(_text(i), f) for i, f in entries if _text(i) not in self._held]
        counts = await self._delivery_counts([i for i, f in fresh if f])
        out: list[Envelope] = []
        for entry_id, fields in fresh:
            if not fields:  # in our PEL, but trimmed from the stream: report it, then XACK it
                out.append(self._lost(entry_id))
            else:
                out.extend(self._envelopes(entry_id, fields, counts.get(entry_id, 1)))
        return out

    async def _read_new(self) -> list[Envelope]:
        reply = await self._client.xreadgroup(
            self.group,
            self.consumer,
            {self.stream: ">"},
            count=self.count,
            block=max(1, round(self.block * 1000)),
        )
        out: list[Envelope] = []
        for raw_id, fields in reply[0][1] if reply else ():
            out.extend(self._envelopes(_text(raw_id), fields, 1))
        return out

    async def _delivery_counts(self, ids: Sequence[str]) -> dict[str, int]:
        """Times each of our pending entries was delivered (XPENDING, one round trip)."""
        if not ids:
            return {}
        pipe = self._client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
        counts: dict[str, int] = {}
        for rows in await pipe.execute():
            for row in rows:
                counts[_text(row["message_id"])] = int(row["times_delivered"])
        return counts

    def _fail(self, error: BaseException) -> None:
        """Stop with ``error``, its password scrubbed, and log it."""
        if isinstance(error, Exception) and self._secret and self._secret in str(error):
            error = BatchpunkError(_scrub(str(error), self._secret))
        logger.error("%r: stopped reading: %s", self, _scrub(str(error), self._secret))
        super()._fail(error)

    def _log_transient(self, what: str, exc: BaseException) -> None:
        logger.warning(
            "%r: %s failed, retrying: %s: %s",
            self,
            what,
            type(exc).__name__,
            _scrub(str(exc), self._secret),
        )

    # -- turning entries into envelopes ----------------------------------------------------

    def _envelopes(
        self, entry_id: str, fields: Mapping[bytes, bytes], count: int
    ) -> list[Envelope]:
        # Headers only when there is something a first delivery does not have: the stream and
        # entry id of a dead letter come from headers_of(), so a message costs no dict.
        headers: dict[str, Any] | None = None
        if count > 1:
            headers = self._headers(entry_id, count)
        raw = fields.get(self._field_bytes)
        error: BaseException | None = None
        payloads: list[Any] = []
        if raw is None:
            present = ", ".join(sorted(_text(k) for k in fields))
            error = KeyError(f"stream entry {entry_id} has no field {self.field!r} ({present})")
        else:
            try:
                payloads = self._decoder(raw)
            except Exception as exc:
                error = exc
        if error is not None:
            self._held[entry_id] = _ONE
            payload: Any = raw if raw is not None else {_text(k): v for k, v in fields.items()}
            return [
                Envelope(
                    payload,
                    headers=self._headers(entry_id, count),
                    receipt=entry_id,
                    error=error,
                )
            ]
        if not payloads:  # an empty frame: nothing to process, settle it at once
            self._held.pop(entry_id, None)
            self._acks.append(entry_id)
            self._wake_settler()
            return []
        if count > self.max_deliveries:
            headers = self._headers(entry_id, count)
            headers[REDELIVERED] = True
            error = delivery_limit_error(
                f"stream entry {entry_id} of {self.stream!r}",
                count,
                self.max_deliveries,
                "max_deliveries",
            )
        if len(payloads) == 1:
            self._held[entry_id] = _ONE
            return [Envelope(payloads[0], None, 0, headers, entry_id, error)]
        entry = Parts(entry_id, len(payloads))
        self._held[entry_id] = entry
        return [Envelope(p, None, 0, headers, entry, error) for p in payloads]

    def _headers(self, entry_id: str, count: int) -> dict[str, Any]:
        return {"stream": self.stream, "message_id": entry_id, "delivery_count": count}

    def headers_of(self, envelope: Envelope) -> dict[str, Any]:
        """The headers a dead letter of ``envelope`` carries: stream, entry id, delivery count.

        Envelopes of a first delivery carry no headers dict (one object less per message); the
        pipeline asks for these only when it writes a dead letter.
        """
        receipt = envelope.receipt
        entry_id = receipt.key if isinstance(receipt, Parts) else str(receipt)
        return self._headers(entry_id, 1)

    def _lost(self, entry_id: str) -> Envelope:
        logger.warning(
            "%r: pending entry %s was trimmed from the stream before it was acknowledged",
            self,
            entry_id,
        )
        headers = {"stream": self.stream, "message_id": entry_id}
        error = StreamEntryLost(
            f"stream entry {entry_id} of {self.stream!r} was trimmed or deleted before it was "
            "acknowledged; its data is gone (raise the stream's MAXLEN)"
        )
        self._held[entry_id] = _ONE
        return Envelope(None, headers=headers, receipt=entry_id, error=error)

    # -- settling: XACK and requeue, coalesced ------------------------------------------------

    def _settle(self, envelopes: Sequence[Envelope], *, requeue: bool) -> None:
        """Queue the entries of these envelopes for one XACK (or requeue) per settle pass."""
        held = self._held
        out = self._requeues if requeue else self._acks
        for envelope in envelopes:
            receipt = envelope.receipt
            if isinstance(receipt, Parts):
                verdict = receipt.settle(REQUEUE if requeue else ACK)
                if verdict is None:
                    continue
                entry_id = receipt.key
                if held.get(entry_id) is receipt:
                    del held[entry_id]
                (self._requeues if verdict == REQUEUE else self._acks).append(entry_id)
            elif isinstance(receipt, str):
                held.pop(receipt, None)
                out.append(receipt)
        self._wake_settler()

    def _wake_settler(self) -> None:
        if self._client is None:
            return
        if self._settler is None or self._settler.done():
            self._settler = asyncio.create_task(self._settle_loop(), name=f"{self!r} acks")
        self._settle_wakeup.set()

    async def _settle_loop(self) -> None:
        """Send queued XACKs and requeues; exits when idle after close() (the client closes)."""
        errors = self._errors
        failures = 0
        deadline: float | None = None
        while True:
            if not self._acks and not self._requeues:
                if self._settle_final:
                    break
                self._settle_wakeup.clear()
                await self._settle_wakeup.wait()
                continue
            if not self._settle_final:
                await asyncio.sleep(0)  # settlements queued in this loop turn go together
            acks, self._acks = self._acks, []
            requeues, self._requeues = self._requeues, []
            try:
                await self._send_settlements(acks, requeues)
                failures = 0
            except (errors.ConnectionError, errors.TimeoutError, OSError) as exc:
                self._acks[:0] = acks
                self._requeues[:0] = requeues
                self._log_transient("XACK", exc)
                if self._settle_final:
                    deadline = deadline or time.monotonic() + _CLOSE_FLUSH_SECONDS
                    if time.monotonic() > deadline:
                        logger.error(
                            "%r: gave up sending %d acks and %d requeues; those entries stay "
                            "pending and will be delivered again",
                            self,
                            len(self._acks),
                            len(self._requeues),
                        )
                        self._acks.clear()
                        self._requeues.clear()
                        break
                await asyncio.sleep(min(_MAX_BACKOFF, 0.05 * 2**failures))
                failures += 1
            except Exception as exc:  # refused (the group is gone, ...): retrying cannot help
                logger.error(
                    "%r: Redis refused %d acks and %d requeues: %s; entries that still exist "
                    "stay pending and will be delivered again",
                    self,
                    len(acks),
                    len(requeues),
                    _scrub(str(exc), self._secret),
                )
        if self._closing:
            with contextlib.suppress(Exception):
                await self._client.aclose()

    async def _send_settlements(self, acks: Sequence[str], requeues: Sequence[str]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for start in range(0, len(acks), _CHUNK):
            pipe.xack(self.stream, self.group, *acks[start : start + _CHUNK])
        # A requeued entry stays in the PEL; backdating its idle time makes any janitor (this
        # worker's included) claim it at its next pass instead of after claim_idle.
        idle = round(self.claim_idle * 1000)
        for start in range(0, len(requeues), _CHUNK):
            pipe.xclaim(
                self.stream,
                self.group,
                self.consumer,
                0,
                list(requeues[start : start + _CHUNK]),
                idle=idle,
                justid=True,
            )
        await pipe.execute()

    # -- the janitor task --------------------------------------------------------------------

    async def _janitor_loop(self) -> None:
        """Keep held entries fresh and claim dead consumers' idle ones, every claim_idle / 3."""
        errors = self._errors
        period = self.claim_idle / 3
        while not await _wait(self._stop, period):
            try:
                await self._refresh_held()
                if self._consuming and not self._pending_phase:  # own entries first
                    await self._claim_idle()
            except (errors.ConnectionError, errors.TimeoutError, OSError) as exc:
                self._log_transient("janitor pass", exc)
            except Exception as exc:  # the janitor must outlive any one bad pass
                if "NOGROUP" not in str(exc):  # the reader recreates a vanished group
                    logger.error(
                        "%r: janitor pass failed: %s: %s",
                        self,
                        type(exc).__name__,
                        _scrub(str(exc), self._secret),
                    )

    async def _refresh_held(self) -> None:
        held = list(self._held)
        if not held:
            return
        pipe = self._client.pipeline(transaction=False)
        for start in range(0, len(held), _CHUNK):
            pipe.xclaim(
                self.stream, self.group, self.consumer, 0, held[start : start + _CHUNK], justid=True
            )
        await pipe.execute()

    async def _claim_idle(self) -> None:
        cursor = "0-0"
        min_idle = round(self.claim_idle * 1000)
        pages = 0
        while self._consuming:
            if pages and len(self._buffer) >= self.count:
                return
            reply = await self._client.xautoclaim(
                self.stream, self.group, self.consumer, min_idle, cursor, count=self.count
            )
            pages += 1
            cursor = _text(reply[0])
            claimed = [(_text(i), f) for i, f in reply[1] if i is not None]
            fresh = [(i, f) for i, f in claimed if i not in self._held]
            deleted = [_text(i) for i in reply[2]] if len(reply) > 2 else []
            if fresh or deleted:
                logger.info(
                    "%r: claimed %d idle entries (%d already trimmed)",
                    self,
                    len(fresh) + len(deleted),
                    len(deleted),
                )
            counts = await self._delivery_counts([i for i, f in fresh if f])
            envelopes: list[Envelope] = []
            for entry_id, fields in fresh:
                if fields:
                    envelopes.extend(self._envelopes(entry_id, fields, counts.get(entry_id, 1)))
                else:
                    envelopes.append(self._lost(entry_id))
            envelopes.extend(self._lost(i) for i in deleted if i not in self._held)
            self._push(envelopes)
            if cursor == "0-0":
                return

    # -- stopping and closing ----------------------------------------------------------------

    def _requeue_unhanded(self) -> None:
        """Give back entries read ahead that iteration will never hand out (it has ended).

        Through the settle path: an entry whose frame was split, some of its messages in a
        batch still running, stays held (refreshed, never claimable) until that batch settles
        them, and is then requeued once. Requeued at once, another consumer claimed the whole
        frame and processed its running messages a second time, concurrently.
        """
        unhanded = self._unhanded()
        if unhanded:
            self._settle(unhanded, requeue=True)

    async def ack_many(self, envelopes: Sequence[Envelope]) -> None:
        """Acknowledge these envelopes' entries: one XACK per settle pass, however many."""
        self._settle(envelopes, requeue=False)

    async def nack_many(self, envelopes: Sequence[Envelope], requeue: bool) -> None:
        """Give entries back (``requeue``: claimable at once by any consumer) or reject them.

        A rejected entry is acknowledged: the pipeline rejects only what it dead-lettered.
        """
        self._settle(envelopes, requeue=requeue)

    async def close(self) -> None:
        """Stop reading, flush queued acks, close the connections. Safe to call again.

        Waits for the in-flight XREADGROUP (at most ``block`` seconds). Entries read but never
        handed out are made claimable at once. Envelopes handed out and not yet settled stay
        pending under this consumer: settle them before close(), or call close() again after
        settling them late (their XACKs are sent then).
        """
        async with self._close_lock:
            self.stop_consuming()
            self._closing = True
            self._stop.set()
            for task in (self._reader, self._janitor):
                if task is not None:  # returns within `block`; shielded so a cancelled close()
                    await asyncio.shield(task)  # never cancels a command halfway
            self._reader = self._janitor = None
            self._requeue_unhanded()
            self._settle_final = True
            if self._client is None:
                return
            self._wake_settler()
            if self._settler is not None:
                await asyncio.shield(self._settler)


class RedisStreamSink:
    """Appends every item of a batch to a stream (XADD), in one round trip per batch.

    Args:
        url: redis://, rediss:// (TLS) or unix:// URL; its password never appears in logs.
        stream: the stream key (created by the first XADD).
        maxlen: trim the stream to about this many entries on every XADD; None keeps all. Keep it
            well above what consumer groups may still have pending, or unread entries are lost.
        field: the entry field that holds the encoded item.
        encode: "json" (default), "bytes" (items are bytes), "text" (items are str, stored as
            UTF-8) or "frame" (each item as a one-message batchpunk frame).
        approximate: trim with ``MAXLEN ~`` (much cheaper; the stream may keep a few more).
        tls: as for RedisStreamSource.
        hmac_key: with encode="frame", sign every frame with this key (sources then need it).

    ``write`` returns the new entry ids, one per item. An item that cannot be encoded fails alone
    (PartialFailure) with a PayloadError naming it, not retried; the others are still written.
    When Redis refuses some XADDs of a batch (out of memory under ``noeviction``, read-only,
    loading), the items it took keep their ids and only the refused ones fail, each with
    RedisUnavailable (an outage: held and retried, never dead-lettered); if it took none, the
    whole batch fails with it. Any other error reply fails its item alone, as a ConnectorError
    that claims neither (retried, and isolated only if it keeps failing).
    """

    def __init__(
        self,
        url: str,
        stream: str,
        maxlen: int | None = None,
        *,
        field: str = "data",
        encode: str = "json",
        approximate: bool = True,
        tls: bool | Mapping[str, Any] | None = None,
        hmac_key: bytes | str | None = None,
    ) -> None:
        owner = "RedisStreamSink"
        self._hmac_key = hmac_key_option(owner, hmac_key)
        self._client_kwargs = _client_kwargs(owner, url, tls)
        self._url = url
        self.stream = _name(owner, "stream", stream)
        self.maxlen = None if maxlen is None else int_option(owner, "maxlen", maxlen)
        self.field = _name(owner, "field", field)
        self.encode = choice_option(owner, "encode", encode, ENCODINGS)
        if not isinstance(approximate, bool):
            raise ConfigError(f"{owner}.approximate: expected true or false")
        self.approximate = approximate
        self._encoder = self._make_encoder(encode)
        self._client: Any = None
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisStreamSink(url={mask_url(self._url)!r}, stream={self.stream!r})"

    def _make_encoder(self, encode: str) -> Callable[[Any], bytes]:
        if encode == "json":
            return lambda item: json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode()
        if encode == "bytes":

            def raw(item: Any) -> bytes:
                if not isinstance(item, bytes | bytearray | memoryview):
                    raise TypeError(f"encode='bytes' needs bytes items, got {type(item).__name__}")
                return bytes(item)

            return raw
        if encode == "text":

            def text(item: Any) -> bytes:
                if not isinstance(item, str):
                    raise TypeError(f"encode='text' needs str items, got {type(item).__name__}")
                return item.encode("utf-8")

            return text
        encode_batch = importlib.import_module("batchpunk.codec").encode_batch
        key = self._hmac_key
        return lambda item: bytes(encode_batch([item], hmac_key=key))

    async def write(self, batch: Sequence[Any]) -> list[str | None]:
        """XADD every item in one pipeline; the entry ids, in order (None where encoding failed)."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self._client is None:
            redis = require("redis.asyncio", "redis", "RedisStreamSink")
            self._client = redis.Redis.from_url(
                self._url, socket_timeout=30.0, socket_connect_timeout=5.0, **self._client_kwargs
            )
        failures: dict[int, BaseException] = {}
        pipe = self._client.pipeline(transaction=False)
        written: list[int] = []
        for index, item in enumerate(batch):
            try:
                data = self._encoder(item)
            except Exception as exc:  # the item's fault: no retry encodes it (not retryable)
                failures[index] = PayloadError(
                    f"RedisStreamSink: item {index} cannot be encoded ({self.encode}): {exc}"
                )
                continue
            pipe.xadd(
                self.stream,
                {self.field: data},
                maxlen=self.maxlen,
                approximate=self.approximate,
            )
            written.append(index)
        results: list[str | None] = [None] * len(batch)
        if written:
            # Each XADD succeeds or fails on its own: raising the first error would have the
            # engine send the written items again.
            replies = await pipe.execute(raise_on_error=False)
            outages: list[RedisUnavailable] = []
            for index, reply in zip(written, replies, strict=True):
                if not isinstance(reply, BaseException):
                    results[index] = _text(reply)
                elif _is_outage_reply(reply):
                    outage = RedisUnavailable(
                        f"RedisStreamSink: item {index} not written to {self.stream!r}: Redis "
                        f"refused the XADD ({type(reply).__name__}: {reply})"
                    )
                    outage.__cause__ = reply
                    failures[index] = outage
                    outages.append(outage)
                else:
                    # Any other reply: not known to be Redis's state, nor known to be the
                    # item's (an XADD of a valid payload has no such error): a plain connector
                    # error, retried, and isolated only if it keeps failing while others pass.
                    refused = ConnectorError(
                        f"RedisStreamSink: item {index} not written to {self.stream!r}: "
                        f"{type(reply).__name__}: {reply}"
                    )
                    refused.__cause__ = reply
                    failures[index] = refused
            if len(outages) == len(batch):  # Redis took nothing: an outage of the whole batch
                raise outages[0]
        if failures:
            raise PartialFailure(failures, results)
        return results

    async def close(self) -> None:
        """Close the connections; later writes raise. Safe to call again."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
