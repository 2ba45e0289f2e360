"""Amazon SQS: a long-polling Source that keeps slow batches invisible, and a batching Sink.

Choose SQS on AWS when you want a queue without servers to run: no partitions, any number of
workers, each message delivered to one worker at a time for the visibility timeout. Both
connectors use aiobotocore (the ``sqs`` extra): botocore's own request signing, retries and
endpoint rules, on aiohttp, so a long poll is a pending coroutine rather than a blocked
thread (docs/brokers/sqs.md says why this client).

How the source keeps its promise (every received message ends processed or durably
dead-lettered, then deleted):

- ``receivers`` tasks long-poll ReceiveMessage (up to 10 messages each) so that one batch of
  ``max_size`` fills from several receives in flight; when the buffer is full they stop
  receiving (backpressure: the messages stay in the queue, not in memory).
- A keeper task extends the visibility of every message this worker holds (buffered or in a
  running batch) every ``visibility_timeout / 3`` seconds, so a slow batch is never handed to
  another worker halfway; a killed worker stops extending, and its messages come back after
  the visibility timeout.
- ``ack_many`` deletes with DeleteMessageBatch, 10 at a time; the entries SQS reports as failed
  are retried alone. ``nack_many(requeue=True)`` makes messages visible again at once.
- A message received more than ``max_receives`` times (ApproximateReceiveCount) is not
  processed again but dead-lettered as "redelivered", then deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from batchpunk.connectors._common import PayloadError, mask_secrets
from batchpunk.connectors._toolkit import (
    REDELIVERED,
    BufferedSource,
    choice_option,
    delivery_limit_error,
    int_option,
    payload_decoder,
    reconnect_delay,
)
from batchpunk.envelope import Envelope
from batchpunk.errors import (
    ConfigError,
    ConnectorError,
    PartialFailure,
    require,
)

__all__ = ["SqsError", "SqsSink", "SqsSource", "SqsUnavailable"]

logger = logging.getLogger(__name__)

DECODINGS = ("json", "text")
ENCODINGS = ("json", "text")

#: SQS limits: entries per batch call, and bytes per message and per SendMessageBatch.
BATCH_ENTRIES = 10
MAX_BYTES = 262_144

_DEFAULT_COUNT = 100
_OUTAGE_CODES = {
    "ServiceUnavailable",
    "InternalError",
    "InternalFailure",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "RequestTimeout",
    "KmsThrottled",
}


class SqsError(ConnectorError):
    """Something SQS refused that retrying will not fix (a missing queue, denied access)."""


class SqsUnavailable(SqsError, ConnectionError):
    """SQS could not be reached, timed out or throttled: an outage, retried and waited out."""

    unavailable = True


def _is_outage(exc: BaseException) -> bool:
    botocore = require("botocore.exceptions", "sqs", "SqsSource")
    if isinstance(
        exc,
        botocore.EndpointConnectionError
        | botocore.ConnectionClosedError
        | botocore.ConnectTimeoutError
        | botocore.ReadTimeoutError
        | OSError
        | TimeoutError,
    ):
        return True
    if isinstance(exc, botocore.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in _OUTAGE_CODES or status in (429, 500, 502, 503, 504)
    return False


def _translate(owner: str, exc: BaseException, doing: str, secrets: Sequence[str]) -> SqsError:
    text = mask_secrets(f"{owner}: {doing} failed: {type(exc).__name__}: {exc}", secrets)
    return SqsUnavailable(text) if _is_outage(exc) else SqsError(text)


class _Client:
    """One aiobotocore SQS client, opened on first use and closed once."""

    def __init__(
        self,
        owner: str,
        region: str | None,
        endpoint_url: str | None,
        credentials: Mapping[str, str | None],
        *,
        read_timeout: float,
        connections: int,
    ) -> None:
        self.owner = owner
        self.region = region
        self.endpoint_url = endpoint_url
        self.credentials = {k: v for k, v in credentials.items() if v}
        self.read_timeout = read_timeout
        self.connections = connections
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._lock = asyncio.Lock()

    async def get(self) -> Any:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                session_module = require("aiobotocore.session", "sqs", self.owner)
                config_module = require("botocore.config", "sqs", self.owner)
                config = config_module.Config(
                    max_pool_connections=self.connections,
                    read_timeout=self.read_timeout,
                    connect_timeout=5,
                    retries={"max_attempts": 3, "mode": "standard"},
                )
                stack = contextlib.AsyncExitStack()
                session = session_module.get_session()
                self._client = await stack.enter_async_context(
                    session.create_client(
                        "sqs",
                        region_name=self.region,
                        endpoint_url=self.endpoint_url,
                        config=config,
                        **self.credentials,
                    )
                )
                self._stack = stack
            return self._client

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()


def _check_url(owner: str, url: Any) -> str:
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise ConfigError(f"{owner}.queue_url: expected the queue's https:// URL, got {url!r}")
    return url


def _credentials(
    access_key_id: str | None, secret_access_key: str | None, session_token: str | None
) -> dict[str, str | None]:
    return {
        "aws_access_key_id": access_key_id,
        "aws_secret_access_key": secret_access_key,
        "aws_session_token": session_token,
    }


class _Held:
    """One received message until it is deleted or given back (the envelope's receipt)."""

    __slots__ = ("handle", "message_id", "settled")

    def __init__(self, handle: str, message_id: str) -> None:
        self.handle = handle
        self.message_id = message_id
        self.settled = False


class SqsSource(BufferedSource):
    """Receives from an SQS queue and deletes each message only after its batch finished.

    Args:
        queue_url: the queue's URL (``https://sqs.<region>.amazonaws.com/<account>/<name>``).
        region: the AWS region; None takes it from the environment / AWS config.
        endpoint_url: another endpoint (a VPC endpoint, or a local moto / LocalStack).
        decode: "json" (default) or "text".
        wait_time: seconds one ReceiveMessage long-polls (0 to 20); close() waits about as long.
        visibility_timeout: seconds a received message stays invisible to other workers; the
            source extends it every third of that while it holds the message. None reads the
            queue's own setting.
        max_receives: receives after which a message is dead-lettered as "redelivered" instead
            of processed (keep it below the queue's redrive maxReceiveCount, if any).
        count: messages per batch this source fills; None takes the pipeline's ``max_size``.
        receivers: ReceiveMessage calls in flight; None: enough to fill ``count`` (count / 10,
            from 1 to 10).
        batch_key: "group" (default: the FIFO MessageGroupId, so that ``preserve_order`` keeps
            each group's order; None on standard queues) or "none".
        max_message_bytes: a larger body is dead-lettered as malformed; None accepts any.
        aws_access_key_id, aws_secret_access_key, aws_session_token: explicit credentials;
            None uses the usual AWS chain (environment, profile, instance role).
    """

    def __init__(
        self,
        queue_url: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        decode: str = "json",
        wait_time: int = 20,
        visibility_timeout: int | None = None,
        max_receives: int = 10,
        count: int | None = None,
        receivers: int | None = None,
        batch_key: str = "group",
        max_message_bytes: int | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
    ) -> None:
        owner = "SqsSource"
        self.queue_url = _check_url(owner, queue_url)
        self.decode = choice_option(owner, "decode", decode, DECODINGS)
        self.wait_time = int_option(owner, "wait_time", wait_time, 0, 20)
        self._visibility_given = (
            None
            if visibility_timeout is None
            else int_option(owner, "visibility_timeout", visibility_timeout, 1, 43_200)
        )
        self.visibility_timeout = self._visibility_given or 30
        self.max_receives = int_option(owner, "max_receives", max_receives, 1)
        super().__init__(owner, count, _DEFAULT_COUNT)  # checks count here, in Args order
        self._receivers_given = (
            None if receivers is None else int_option(owner, "receivers", receivers, 1)
        )
        if batch_key not in ("group", "none"):
            raise ConfigError(f"{owner}.batch_key: expected 'group' or 'none', got {batch_key!r}")
        self.batch_key = batch_key
        self.max_message_bytes = (
            None
            if max_message_bytes is None
            else int_option(owner, "max_message_bytes", max_message_bytes, 1)
        )
        self._secrets = [s for s in (aws_secret_access_key, aws_session_token) if s]
        self._client = _Client(
            owner,
            region,
            endpoint_url,
            _credentials(aws_access_key_id, aws_secret_access_key, aws_session_token),
            read_timeout=self.wait_time + 15,
            connections=30,
        )
        decoder = payload_decoder(owner, decode)  # the toolkit's: one per project
        self._decoder: Callable[[str], Any] = lambda body: decoder(body.encode())[0]
        self._held: dict[str, _Held] = {}  # receipt handle -> held message
        self._by_id: dict[str, _Held] = {}  # message id -> held message
        self._stop = asyncio.Event()  # set by close(): the keeper ends
        # The keeper's extensions and the releases take turns: an extension already sent when a
        # message is given back would hide it again for a whole visibility timeout.
        self._visibility = asyncio.Lock()
        # Processed messages whose delete failed by an outage: still held (kept invisible)
        # while a task retries the delete, so that they are not processed again.
        self._undeleted: list[_Held] = []
        self._redeleter: asyncio.Task[None] | None = None
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []
        self._keeper: asyncio.Task[None] | None = None
        #: Counts for tests and stats.
        self.received = 0
        self.deleted = 0
        self.extended = 0
        self.redelivered = 0

    def __repr__(self) -> str:
        return f"SqsSource(queue_url={self.queue_url!r})"

    @property
    def receivers(self) -> int:
        """ReceiveMessage calls kept in flight."""
        return self._receivers_given or max(1, min(10, -(-self.count // BATCH_ENTRIES)))

    @property
    def connected(self) -> bool:
        """True while the source receives without a lasting failure."""
        return self._started and self._failure is None and not self._closed

    # -- starting (the buffer and iteration are BufferedSource's) -----------------------------

    async def _open(self) -> None:
        try:
            client = await self._client.get()
            reply = await client.get_queue_attributes(
                QueueUrl=self.queue_url, AttributeNames=["VisibilityTimeout", "FifoQueue"]
            )
        except Exception as exc:
            await self._client.close()
            raise _translate(repr(self), exc, "opening the queue", self._secrets) from exc
        attributes = reply.get("Attributes", {})
        if self._visibility_given is None:
            self.visibility_timeout = int(attributes.get("VisibilityTimeout", 30))
            if self.visibility_timeout < 1:
                # A queue whose messages are never hidden: every worker would receive every
                # message while its batch runs. Each receive asks for 30 s instead.
                logger.info("%r: the queue's VisibilityTimeout is 0; receiving with 30 s", self)
                self.visibility_timeout = 30
        self.fifo = attributes.get("FifoQueue") == "true"
        self._tasks = [
            asyncio.create_task(self._read_loop(), name=f"{self!r} receive {i}")
            for i in range(self.receivers)
        ]
        self._keeper = asyncio.create_task(self._keep_loop(), name=f"{self!r} keeper")

    fifo = False

    # -- receiving -----------------------------------------------------------------------------

    async def _read(self) -> list[Envelope]:
        client = await self._client.get()
        reply = await client.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=BATCH_ENTRIES,
            WaitTimeSeconds=self.wait_time,
            VisibilityTimeout=self.visibility_timeout,
            MessageSystemAttributeNames=[
                "ApproximateReceiveCount",
                "SentTimestamp",
                "MessageGroupId",
            ],
            MessageAttributeNames=["All"],
        )
        messages = reply.get("Messages", ())
        if not messages:
            return []
        if self._stopping():  # received while stopping: give them back at once
            await self._release([m["ReceiptHandle"] for m in messages])
            return []
        envelopes: list[Envelope] = []
        for message in messages:
            held = self._by_id.get(message["MessageId"])
            if held is not None:
                # Delivered again while this worker holds it (a standard queue delivers at
                # least once): one envelope is enough; only the newest receipt counts.
                self._held.pop(held.handle, None)
                held.handle = message["ReceiptHandle"]
                self._held[held.handle] = held
                continue
            envelopes.append(self._envelope(message))
        self.received += len(envelopes)
        return envelopes

    def _read_failed(self, exc: Exception) -> BaseException | None:
        error = _translate(repr(self), exc, "receiving", self._secrets)
        if isinstance(error, SqsUnavailable):
            logger.warning("%s; retrying", error)
            return None
        logger.error("%s; the source stops", error)
        return error

    def _envelope(self, message: Mapping[str, Any]) -> Envelope:
        handle, message_id = message["ReceiptHandle"], message["MessageId"]
        held = _Held(handle, message_id)
        self._held[handle] = held
        self._by_id[message_id] = held
        attributes = message.get("Attributes", {})
        count = int(attributes.get("ApproximateReceiveCount", 1))
        group = attributes.get("MessageGroupId")
        headers: dict[str, Any] = {
            "queue_url": self.queue_url,
            "message_id": message_id,
            "receive_count": count,
        }
        if "SentTimestamp" in attributes:
            headers["sent_timestamp"] = int(attributes["SentTimestamp"])
        if group is not None:
            headers["group_id"] = group
        if message.get("MessageAttributes"):
            headers["message_attributes"] = {
                name: value.get("StringValue", value.get("BinaryValue"))
                for name, value in message["MessageAttributes"].items()
            }
        body: str = message.get("Body", "")
        error: BaseException | None = None
        payload: Any = body
        if self.max_message_bytes is not None and len(body.encode()) > self.max_message_bytes:
            error = PayloadError(
                f"SQS message {message_id} is {len(body.encode())} bytes, more than "
                f"max_message_bytes={self.max_message_bytes}"
            )
        else:
            try:
                payload = self._decoder(body)
            except Exception as exc:
                error = exc
        if error is None and count > self.max_receives:
            self.redelivered += 1
            headers[REDELIVERED] = True
            error = delivery_limit_error(
                f"SQS message {message_id}", count, self.max_receives, "max_receives"
            )
        key = group if self.batch_key == "group" else None
        return Envelope(payload, key=key, headers=headers, receipt=held, error=error)

    # -- keeping held messages invisible -----------------------------------------------------

    async def _keep_loop(self) -> None:
        # A third of the timeout: two extensions may fail before a held message shows (a floor
        # of 1 s let every extension of a 1 s timeout arrive after the message had shown).
        period = self.visibility_timeout / 3
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), period)
            if self._stop.is_set():
                return
            async with self._visibility:
                handles = list(self._held)  # taken in turn: a release meanwhile is not undone
                if not handles:
                    continue
                try:
                    await self._change_visibility(handles, self.visibility_timeout)
                    self.extended += len(handles)
                except Exception as exc:
                    logger.warning(
                        "%s; held messages may become visible to other workers",
                        _translate(repr(self), exc, "extending visibility", self._secrets),
                    )

    async def _change_visibility(self, handles: Sequence[str], seconds: int) -> None:
        client = await self._client.get()
        calls = []
        for start in range(0, len(handles), BATCH_ENTRIES):
            entries = [
                {"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": seconds}
                for i, h in enumerate(handles[start : start + BATCH_ENTRIES])
            ]
            calls.append(
                client.change_message_visibility_batch(QueueUrl=self.queue_url, Entries=entries)
            )
        for reply in await asyncio.gather(*calls):
            for failed in reply.get("Failed", ()):
                logger.info(
                    "%r: visibility change refused for one message (%s): it was deleted or its "
                    "receipt expired",
                    self,
                    failed.get("Code"),
                )

    # -- settling ------------------------------------------------------------------------------

    def _take(self, envelopes: Sequence[Envelope]) -> list[_Held]:
        taken: list[_Held] = []
        for envelope in envelopes:
            held = envelope.receipt
            if isinstance(held, _Held) and not held.settled:
                held.settled = True
                self._held.pop(held.handle, None)
                self._by_id.pop(held.message_id, None)
                taken.append(held)
        return taken

    async def ack_many(self, envelopes: Sequence[Envelope]) -> None:
        """Delete the messages (DeleteMessageBatch, 10 at a time; failed entries alone).

        If SQS is unreachable the messages stay held (kept invisible) and their delete is
        retried until it succeeds or the source closes: deleting late beats processing twice.
        """
        taken = self._take(envelopes)
        if taken:
            await self._delete_or_hold(taken)

    async def nack_many(self, envelopes: Sequence[Envelope], requeue: bool) -> None:
        """Requeue: visible again at once for any worker. Reject: delete."""
        taken = self._take(envelopes)
        if not taken:
            return
        if requeue:
            await self._release([held.handle for held in taken])
        else:
            await self._delete_or_hold(taken)

    async def _delete_or_hold(self, taken: list[_Held]) -> None:
        try:
            await self._delete([held.handle for held in taken])
        except SqsUnavailable as exc:
            for held in taken:
                self._held[held.handle] = held  # settled, and kept invisible by the keeper
            self._undeleted += taken
            if self._redeleter is None or self._redeleter.done():
                self._redeleter = asyncio.get_running_loop().create_task(
                    self._redelete(), name=f"{self!r} delete retry"
                )
            logger.warning("%s; the delete is retried, the messages kept invisible", exc)

    async def _redelete(self) -> None:
        """Retry the deletes an outage failed, with backoff, until none is left."""
        failures = 0
        while self._undeleted and not self._stop.is_set():
            failures += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), reconnect_delay(failures))
            if self._stop.is_set():
                return  # close() makes the last attempt
            batch, self._undeleted = self._undeleted, []
            try:
                await self._delete([held.handle for held in batch])
            except SqsUnavailable:
                self._undeleted[:0] = batch
                continue
            except Exception as exc:  # the receipts are gone: SQS delivers them again
                logger.warning("%s; the messages will be delivered again", exc)
            for held in batch:
                self._held.pop(held.handle, None)
            failures = 0

    async def _release(self, handles: Sequence[str]) -> None:
        try:
            async with self._visibility:
                await self._change_visibility(handles, 0)
        except Exception as exc:
            logger.warning(
                "%s; those messages come back after the visibility timeout instead",
                _translate(repr(self), exc, "giving messages back", self._secrets),
            )

    async def _delete(self, handles: Sequence[str]) -> None:
        client = await self._client.get()
        calls = []
        chunks = [handles[s : s + BATCH_ENTRIES] for s in range(0, len(handles), BATCH_ENTRIES)]
        for chunk in chunks:
            entries = [{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(chunk)]
            calls.append(client.delete_message_batch(QueueUrl=self.queue_url, Entries=entries))
        try:
            replies = await asyncio.gather(*calls)
        except Exception as exc:
            raise _translate(repr(self), exc, "deleting messages", self._secrets) from exc
        retry: list[str] = []
        for chunk, reply in zip(chunks, replies, strict=True):
            self.deleted += len(reply.get("Successful", ()))
            retry.extend(chunk[int(f["Id"])] for f in reply.get("Failed", ()))
        for handle in retry:  # a partial failure: each failed entry alone, once more
            try:
                await client.delete_message(QueueUrl=self.queue_url, ReceiptHandle=handle)
                self.deleted += 1
            except Exception as exc:
                error = _translate(repr(self), exc, "deleting a message", self._secrets)
                if isinstance(error, SqsUnavailable):
                    raise error from exc  # the caller holds them and retries
                logger.warning(
                    "%s; the message will be delivered again after its visibility timeout", error
                )

    # -- stopping and closing ----------------------------------------------------------------

    def _stopping(self) -> bool:
        return not self._consuming

    async def close(self) -> None:
        """Stop receiving, give back every message not settled, close. Safe to call again.

        Waits for the receives in flight (at most ``wait_time`` seconds) so that nothing SQS
        already delivered stays invisible for a whole visibility timeout.
        """
        if self._closed:
            return
        self.stop_consuming()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=self.wait_time + 5)
            for task in pending:
                task.cancel()
        self._unhanded()
        # The keeper ends first: an extension still on its way would hide again what is given
        # back below. So does the delete retry, after one last attempt below.
        self._stop.set()
        for waiting in (self._keeper, self._redeleter):
            if waiting is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await waiting
        undeleted, self._undeleted = self._undeleted, []
        for held in undeleted:
            self._held.pop(held.handle, None)
        if undeleted:
            with contextlib.suppress(Exception):  # else delivered again: at least once
                await self._delete([held.handle for held in undeleted])
        # Everything still held (read ahead, or handed out and never settled) goes back now,
        # rather than staying invisible for a whole visibility timeout.
        handles = list(self._held)
        for held in self._held.values():
            held.settled = True
        self._held.clear()
        self._by_id.clear()
        if handles and self._started:
            await self._release(handles)
        self._closed = True
        await self._client.close()


class SqsSink:
    """Sends each batch with SendMessageBatch: groups of 10 within SQS's 256 KiB per call.

    Args:
        queue_url, region, endpoint_url, aws_*: as for SqsSource.
        encode: "json" (default) or "text" (str items).
        group_field: for FIFO queues, the item field whose value is the MessageGroupId
            (required by FIFO queues; ``"id"`` style fields spread the load, a constant keeps
            one global order).
        dedup_field: for FIFO queues, the item field used as MessageDeduplicationId (else the
            queue must have content-based deduplication).
        delay: seconds (0 to 900) each message stays invisible after sending.

    ``write`` returns each item's MessageId. Entries SQS fails are retried alone; an entry SQS
    blames on the sender (too large, invalid characters) fails alone as a bad message. When one
    SendMessageBatch call raises while others sent their entries, only that call's entries fail
    (PartialFailure, with the MessageIds of the sent ones); a FIFO batch stops at the failed call
    and its later entries fail as an outage, to be retried in order. An unreachable SQS (no call
    sent anything, all by an outage) fails the whole batch as an outage.
    """

    def __init__(
        self,
        queue_url: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        encode: str = "json",
        group_field: str | None = None,
        dedup_field: str | None = None,
        delay: int = 0,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
    ) -> None:
        owner = "SqsSink"
        self.queue_url = _check_url(owner, queue_url)
        self.encode = choice_option(owner, "encode", encode, ENCODINGS)
        for name, value in (("group_field", group_field), ("dedup_field", dedup_field)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{owner}.{name}: expected a field name, got {value!r}")
        self.group_field = group_field
        self.dedup_field = dedup_field
        self.delay = int_option(owner, "delay", delay, 0, 900)
        self._secrets = [s for s in (aws_secret_access_key, aws_session_token) if s]
        self._client = _Client(
            owner,
            region,
            endpoint_url,
            _credentials(aws_access_key_id, aws_secret_access_key, aws_session_token),
            read_timeout=30,
            connections=50,
        )
        self._closed = False

    def __repr__(self) -> str:
        return f"SqsSink(queue_url={self.queue_url!r})"

    def _entry(self, index: int, item: Any) -> dict[str, Any]:
        if self.encode == "json":
            try:
                body = json.dumps(item, separators=(",", ":"), ensure_ascii=False)
            except (TypeError, ValueError) as exc:
                raise PayloadError(f"SqsSink: item is not JSON-serializable: {exc}") from None
        elif isinstance(item, str):
            body = item
        else:
            raise PayloadError(f"SqsSink(encode='text'): expected str, got {type(item).__name__}")
        try:
            size = len(body.encode())
        except UnicodeEncodeError as exc:  # a lone surrogate: SQS takes UTF-8 only
            raise PayloadError(f"SqsSink: item {index} cannot be encoded as UTF-8: {exc}") from None
        if size > MAX_BYTES:
            raise PayloadError(f"SqsSink: a {size}-byte message exceeds SQS's {MAX_BYTES} bytes")
        entry: dict[str, Any] = {"Id": str(index), "MessageBody": body}
        if self.delay:
            entry["DelaySeconds"] = self.delay
        for field, name in (
            (self.group_field, "MessageGroupId"),
            (self.dedup_field, "MessageDeduplicationId"),
        ):
            if field is not None:
                if not isinstance(item, Mapping) or field not in item:
                    raise PayloadError(f"SqsSink: item has no field {field!r} for {name}")
                entry[name] = str(item[field])
        return entry

    @staticmethod
    def _groups(entries: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """Entries in calls of at most 10 and at most 256 KiB of bodies each, in order."""
        groups: list[list[dict[str, Any]]] = []
        current: list[dict[str, Any]] = []
        size = 0
        for entry in entries:
            length = len(entry["MessageBody"].encode())
            if current and (len(current) == BATCH_ENTRIES or size + length > MAX_BYTES):
                groups.append(current)
                current, size = [], 0
            current.append(entry)
            size += length
        if current:
            groups.append(current)
        return groups

    def _group_failed(
        self,
        group: Sequence[dict[str, Any]],
        exc: BaseException,
        answered: bool,
        failures: dict[int, BaseException],
    ) -> None:
        """Fail each entry of a SendMessageBatch call that raised (SQS sent none of them).

        An outage stays an outage (retried whole). Otherwise, when another call of the batch
        succeeded (the queue takes writes), a call of one entry failed for that entry: a
        PayloadError naming it; a call of several stays a retryable SqsError, so the engine
        splits it and only the bad entry ends alone instead of all its neighbours.
        """
        error: BaseException = _translate(repr(self), exc, "sending", self._secrets)
        if answered and len(group) == 1 and not isinstance(error, SqsUnavailable):
            index = int(group[0]["Id"])
            text = f"SqsSink: SQS refused item {index}: {type(exc).__name__}: {exc}"
            error = PayloadError(mask_secrets(text, self._secrets))
        for entry in group:
            failures[int(entry["Id"])] = error

    async def write(self, batch: Sequence[Any]) -> list[str | None]:
        """Send the batch; each item's MessageId (None where it failed)."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        failures: dict[int, BaseException] = {}
        entries: list[dict[str, Any]] = []
        for index, item in enumerate(batch):
            try:
                entries.append(self._entry(index, item))
            except PayloadError as exc:
                failures[index] = exc
        results: list[str | None] = [None] * len(batch)
        client = await self._client.get()
        groups = self._groups(entries)
        replies: list[Any] = []  # per group: its reply, or the exception its call raised
        if self.group_field is None:  # a standard queue keeps no order: send at once
            replies = await asyncio.gather(
                *(client.send_message_batch(QueueUrl=self.queue_url, Entries=g) for g in groups),
                return_exceptions=True,
            )
        else:  # FIFO: one call after the other, so the queue keeps the batch's order
            for group in groups:
                try:
                    replies.append(
                        await client.send_message_batch(QueueUrl=self.queue_url, Entries=group)
                    )
                except Exception as exc:
                    replies.append(exc)
                    break  # the later groups must not overtake this one: they wait, unsent
        raised = [r for r in replies if isinstance(r, BaseException)]
        for reply in raised:
            if not isinstance(reply, Exception):  # CancelledError and the like: not ours
                raise reply
        if raised and len(raised) == len(replies) and all(map(_is_outage, raised)):
            # No call sent anything (a FIFO batch stops at its first failed call) and SQS did
            # not answer: the whole batch is an outage, held and retried whole.
            raise _translate(repr(self), raised[0], "sending", self._secrets) from raised[0]
        # Some calls may have sent their entries: name every index that was not sent.
        answered = len(raised) < len(replies)
        for group, reply in zip(groups, replies, strict=False):
            if isinstance(reply, BaseException):
                self._group_failed(group, reply, answered, failures)
        for group in groups[len(replies) :]:  # FIFO groups after a failed one, never sent
            for entry in group:
                failures[int(entry["Id"])] = SqsUnavailable(
                    f"SqsSink: item {entry['Id']} not sent: an earlier call of this FIFO batch "
                    "failed, so it waits to be retried in order"
                )
        replies = [r for r in replies if not isinstance(r, BaseException)]
        by_id = {entry["Id"]: entry for entry in entries}
        retry: list[dict[str, Any]] = []
        for reply in replies:
            for ok in reply.get("Successful", ()):
                results[int(ok["Id"])] = ok["MessageId"]
            for failed in reply.get("Failed", ()):
                index = int(failed["Id"])
                if failed.get("SenderFault"):
                    failures[index] = PayloadError(
                        f"SqsSink: SQS refused item {index}: {failed.get('Code')}: "
                        f"{failed.get('Message', '')}"
                    )
                else:
                    retry.append(by_id[failed["Id"]])
        for entry in retry:  # failed on SQS's side: each alone, once more
            index = int(entry["Id"])
            single = {k: v for k, v in entry.items() if k != "Id"}
            try:
                reply = await client.send_message(QueueUrl=self.queue_url, **single)
                results[index] = reply["MessageId"]
            except Exception as exc:
                failures[index] = _translate(repr(self), exc, "sending one message", self._secrets)
        if failures:
            if len(batch) == 1:
                raise failures[0]
            raise PartialFailure(failures, results)
        return results

    async def close(self) -> None:
        """Close the client; later writes raise. Safe to call again."""
        self._closed = True
        await self._client.close()
