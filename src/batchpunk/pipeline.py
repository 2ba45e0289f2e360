"""Pipelines: a Source feeding a BatchProcessor whose processor is a Sink, acknowledged safely.

A pipeline is the product most users want: point batchpunk at a queue and a store and run it as
a service. Its one promise is about acknowledgements:

- an envelope is acknowledged only after its batch was written by the sink, or after its dead
  letter was stored by the dead-letter sink ("durably dead-lettered");
- an envelope not finished when the pipeline stops is nacked with requeue, never acknowledged;
  a source that cannot take messages back (``redelivers`` false, or no ``nack_many``) gets
  them stored as dead letters with reason "shutdown" instead, and any that could not be
  stored are counted as ``lost``;
- the end of the input is not a request to stop quickly: batches held by an outage get up to
  ``delivery_timeout`` (then they are dead-lettered "expired"), not ``drain_timeout`` (with a
  spool they stay in it for the next start instead);
- an envelope the source could not decode (``malformed``), or that the broker delivered too often
  (header ``batchpunk_redelivered``), goes straight to the dead-letter sink (through the engine's
  ``reject``) and is acknowledged once stored, and the source goes on.

The Envelope itself travels through the engine: the processor's messages are envelopes, the
handler hands their payloads to ``sink.write`` (or the envelopes to ``sink.write_envelopes``),
and a dead letter's message is its envelope until the pipeline's desk unwraps it into the
payload and the envelope's own headers. So a batch that was written is settled with one
``source.ack_many(batch)`` and no per-message ticket, callback or identity map exists.
Acknowledgements are sent by a background task, so neither the sink nor the engine ever waits
for the broker; batches that finish while an acknowledgement is in flight are settled together.

Connector hooks (all optional, looked up by name, documented in docs/pipelines.md):

- ``async prepare(config)`` on the source, the sink or the dead-letter sink: called once before
  the first message, with the pipeline's BatchConfig. Use it to size a prefetch window (see
  ``prefetch_for``), open connections, or check a table, so that a wrong setting fails before
  anything is consumed.
- ``async ack_many(envelopes)`` and ``async nack_many(envelopes, requeue)`` on the source: settle
  envelopes per batch. A source without acknowledgements implements neither.
- ``redelivers`` (a bool attribute) on the source: whether a nacked envelope comes back (a
  broker, a checkpointed file). Without it, a source with ``nack_many`` redelivers and one
  without does not; what a source that does not redeliver would get back is stored as a
  "shutdown" dead letter instead.
- ``headers_of(envelope)`` on the source: the headers a dead letter of this envelope carries
  beyond ``envelope.headers`` (a stream name, an entry id), computed only when a letter is
  written, so that a source need not build a headers dict per message.
- ``async write_envelopes(envelopes)`` on the sink: called instead of ``write`` by a sink that
  needs per-message metadata.
- ``stop_consuming()`` on the source: end iteration soon while acknowledgements still work.
  Without it, the pipeline cancels a pending ``__anext__`` when it stops, so a source must not
  lose a message it already received when that happens (unacknowledged, it is redelivered).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import math
import signal
import time
from collections.abc import Callable, Sequence
from functools import partial
from itertools import chain
from typing import Any, Protocol, runtime_checkable

from batchpunk.batch import Batch, as_results
from batchpunk.codec.serializers import serialize
from batchpunk.config import PIPELINE_CIRCUIT_BREAKER, BatchConfig, OverflowPolicy
from batchpunk.deadletter import DeadLetter, DeadLetterSink, MemoryDeadLetters
from batchpunk.envelope import REDELIVERED, AcksMany, Envelope, Sink, Source, WritesEnvelopes
from batchpunk.errors import (
    BufferFull,
    DeliveryLimitExceeded,
    PartialFailure,
    ProcessorClosed,
)
from batchpunk.processor import BatchProcessor
from batchpunk.spool import Spool

__all__ = [
    "Envelope",
    "Source",
    "Sink",
    "Pipeline",
    "Preparable",
    "AcksMany",
    "WritesEnvelopes",
    "StopsConsuming",
    "REDELIVERED",
    "prefetch_for",
]

log = logging.getLogger("batchpunk.pipeline")

#: Seconds a hard stop waits for queued acknowledgements, the nacks, and the engine.
ABORT_SECONDS = 2.0
#: Seconds after the end of the input before a warning says that unfinished messages are waited
#: for, when there is no drain_timeout to wait instead.
_WARN_AFTER = 5.0


@runtime_checkable
class Preparable(Protocol):
    """A connector that wants the pipeline's BatchConfig before the first message."""

    async def prepare(self, config: BatchConfig) -> None: ...


@runtime_checkable
class StopsConsuming(Protocol):
    """A source that can end iteration on request without closing (acks still work)."""

    def stop_consuming(self) -> None: ...


def prefetch_for(config: BatchConfig) -> int:
    """The fewest unacknowledged deliveries a broker must allow one consumer under ``config``.

    Every running batch holds its messages unacknowledged, and one more batch must be able to
    fill while they run; a smaller window makes a SIZE-triggered pipeline wait forever for a
    batch that cannot fill. RabbitMQ's prefetch (and similar windows) should be at least this.
    """
    return config.max_size * (config.concurrency + 1)


class _Desk:
    """The engine's dead-letter sink: unwraps envelopes into letters, settles them once stored.

    Letters with reason "shutdown" (batches still unfinished when drain_timeout ran out, or
    waiting when a hard stop began) are not stored here: their envelopes are given back, so the
    broker redelivers them to the next worker rather than parking them in the dead-letter sink.
    A source that cannot take them back gets them stored by the pipeline's settle task instead
    (``Pipeline._keep_as_letters``), which is handed the letter to keep its error and attempts.
    """

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def put(self, letters: Sequence[DeadLetter]) -> None:
        pipeline = self.pipeline
        stored: list[DeadLetter] = []
        settled: list[Envelope] = []
        back: list[Envelope] = []
        for letter in letters:
            envelope = letter.message
            if not isinstance(envelope, Envelope):  # pragma: no cover - only envelopes enter
                stored.append(letter)
            elif letter.reason == "shutdown":
                back.append(envelope)
                if not pipeline._redelivers:
                    pipeline._letters_back[id(envelope)] = letter
                    if pipeline.spool is not None:
                        # The spool passes on only the letters of messages not on its disk
                        # (a write under way, or abandoned): given back, they are not kept.
                        pipeline._unspooled.add(id(envelope))
            else:
                stored.append(_unwrap(letter, envelope, pipeline._headers_of))
                settled.append(envelope)
        if stored:
            await pipeline.dead_letter.put(stored)
            pipeline._warn_if_in_memory(stored)
        if settled:
            pipeline._settle_later(settled)
        if back:
            pipeline._give_back_later(back)


def _unwrap(
    letter: DeadLetter,
    envelope: Envelope,
    headers_of: Callable[[Envelope], Any] | None = None,
) -> DeadLetter:
    """The letter as the dead-letter sink sees it: the payload, with its envelope's headers.

    ``headers_of`` is the source's optional hook for headers it does not build per message
    (a stream name and entry id): asked only here, when a letter is written.
    """
    headers: dict[str, Any] = {}
    if headers_of is not None:
        try:
            headers.update(headers_of(envelope) or {})
        except Exception as exc:  # a source's hook must not keep the letter from its sink
            log.warning("headers_of failed for a dead letter (its own headers are kept): %r", exc)
    if envelope.headers:
        headers.update(envelope.headers)
    if letter.headers:
        headers.update(letter.headers)
    key = letter.key
    return DeadLetter(
        message=envelope.payload,
        key=key if _hashable(key) else repr(key),
        priority=letter.priority if isinstance(letter.priority, int) else 0,
        reason=letter.reason,
        error=letter.error,
        attempts=letter.attempts,
        first_seen=letter.first_seen,
        error_type=letter.error_type,
        traceback=letter.traceback,
        headers=headers,
    )


class Pipeline:
    """Reads envelopes from ``source``, batches them, writes batches to ``sink``, settles them.

    Args:
        source: an async iterator of Envelopes with ``async close()``.
        sink: an object with ``async write(payloads)`` (or ``async write_envelopes(envelopes)``)
            and ``async close()``.
        config: batching, retries and backpressure; ``max_pending`` bounds the envelopes read
            and not yet finished (BLOCK backpressure: the source is not read while full).
        dead_letter: where messages that end unprocessed go (``async put(letters)``); by default
            a MemoryDeadLetters, kept as ``pipeline.dead_letter``.
        metrics_collector: passed to the BatchProcessor.

    ``await run()`` consumes until the source ends or a stop is requested, then drains: every
    envelope read is acknowledged after success or durable dead-lettering, or nacked with
    requeue. ``await stop()`` asks for that from another task; ``stop(drain=False)`` nacks every
    unfinished envelope at once instead (never one whose batch was already written).
    ``run(handle_signals=True)`` turns SIGINT/SIGTERM into ``stop()`` and a second signal into
    ``stop(drain=False)``.

    The source, the sink and the dead-letter sink are closed when ``run()`` returns.
    """

    def __init__(
        self,
        source: Source,
        sink: Sink,
        config: BatchConfig | None = None,
        *,
        dead_letter: DeadLetterSink | None = None,
        metrics_collector: object | None = None,
        spool: Spool | None = None,
    ) -> None:
        if not callable(getattr(source, "__aiter__", None)):
            raise ValueError(f"source: expected an async iterator of Envelopes, got {source!r}")
        if not callable(getattr(sink, "write", None)) and not callable(
            getattr(sink, "write_envelopes", None)
        ):
            raise ValueError(f"sink: expected an object with async write(batch), got {sink!r}")
        if dead_letter is not None and not callable(getattr(dead_letter, "put", None)):
            raise ValueError(
                f"dead_letter: expected an object with async put(letters), got {dead_letter!r}"
            )
        if config is None:  # the circuit breaker is on by default in pipelines (issue 13)
            threshold, cooldown = PIPELINE_CIRCUIT_BREAKER
            config = BatchConfig(
                circuit_breaker_threshold=threshold, circuit_breaker_cooldown=cooldown
            )
        if config.overflow is OverflowPolicy.RAISE:
            raise ValueError(
                "overflow: a pipeline reads its source only when there is room; use 'block' "
                "(or a drop policy), not 'raise'"
            )
        self.source = source
        self.sink = sink
        self.config = config
        self.dead_letter: DeadLetterSink = (
            dead_letter if dead_letter is not None else MemoryDeadLetters()
        )
        self._in_memory = dead_letter is None
        self.metrics_collector = metrics_collector
        #: The durable spool between the source and the engine (docs/spool.md), or None.
        self.spool = spool
        self._ack_on_write = _acks_on_write(spool, source)
        # With a spool: envelopes (by id) that must not be settled again (acknowledged once in
        # the spool, or replayed from it with nothing to settle).
        # Keyed by id() and holding the envelope itself, so that an entry never matches a later
        # envelope at a reused address (a stale id swallowed that one's only settlement).
        self._early: dict[int, Envelope] = {}
        # ack_on_write: ids of written envelopes whose commit has not returned yet.
        self._awaiting_commit: set[int] = set()
        if spool is not None:
            spool.extract = _payload_of
            spool.rebuild = self._replayed
        #: The engine, once run() started it.
        self.processor: BatchProcessor[Any, Any] | None = None
        #: Letters that could not be stored before shutdown (their envelopes were nacked).
        self.undelivered: list[DeadLetter] = []
        #: True once a stop was requested, and True for a hard (drain=False) stop.
        self.stop_requested = False
        self.aborted = False
        #: Signals received by run(handle_signals=True).
        self.signals_received = 0
        ack_many = getattr(source, "ack_many", None)
        nack_many = getattr(source, "nack_many", None)
        self._ack_many: Callable[[Sequence[Envelope]], Any] | None = (
            ack_many if callable(ack_many) else None
        )
        self._nack_many: Callable[[Sequence[Envelope], bool], Any] | None = (
            nack_many if callable(nack_many) else None
        )
        # Whether an envelope given back comes back (see the module docstring): if not, it is
        # stored as a "shutdown" letter, with the engine's letter for it when there is one.
        self._redelivers = bool(getattr(source, "redelivers", self._nack_many is not None))
        self._letters_back: dict[int, DeadLetter] = {}
        # With a spool: envelopes given back that never reached it (ids), see _nack.
        self._unspooled: set[int] = set()
        self._shutdown_letters = 0
        self._lost = 0
        headers_of = getattr(source, "headers_of", None)
        self._headers_of: Callable[[Envelope], Any] | None = (
            headers_of if callable(headers_of) else None
        )
        write_envelopes = getattr(sink, "write_envelopes", None)
        self._write_envelopes = write_envelopes if callable(write_envelopes) else None
        self._desk = _Desk(self)
        # Batches whose sink call is under way: a hard stop gives them back to the source.
        self._writing: dict[int, Sequence[Envelope]] = {}
        # Envelopes a hard stop gave back (by id): never acknowledged after that.
        self._given_back: set[int] = set()
        self._to_ack: list[Sequence[Envelope]] = []
        self._to_nack: list[Envelope] = []
        self._received = 0
        self._rejected: dict[str, int] = {}
        self._acked = 0
        self._ack_errors = 0
        self._nacked = 0
        self._started = False
        self._in_next = False
        self._stop_event = asyncio.Event()
        self._hard_event = asyncio.Event()
        self._ack_wake = asyncio.Event()
        self._acks_closing = False
        self._consumer: asyncio.Task[None] | None = None
        self._ack_task: asyncio.Task[None] | None = None
        self._done = asyncio.Event()
        self._began = 0.0

    def __repr__(self) -> str:
        return (
            f"Pipeline({self.source!r} -> {self.sink!r}, received={self._received}, "
            f"unfinished={self._unfinished()})"
        )

    # -- life cycle ----------------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = False) -> None:
        """Consume until the source ends or stop() is requested, then drain and close.

        Raises what the source raised, after the drain; ProcessorClosed if run twice.
        """
        if self._started:
            raise ProcessorClosed("a Pipeline runs once; build a new one to run again")
        self._started = True
        self._began = time.monotonic()
        loop = asyncio.get_running_loop()
        installed: list[int] = []
        consumer_error: BaseException | None = None
        try:
            if handle_signals:
                # Before the prepare hooks: a signal while they connect is a graceful stop
                # (nothing is consumed, exit 0), not the default action that kills the process.
                installed = self._install_signals(loop)
            for part in (self.source, self.sink, self.dead_letter):
                prepare = getattr(part, "prepare", None)
                if callable(prepare):
                    # A stop while it connects (a server down, a long connect timeout) ends
                    # start-up at once: nothing was consumed, nothing is left to settle.
                    preparing = asyncio.ensure_future(prepare(self.config))
                    if not await _first(preparing, self._stop_event):
                        preparing.cancel()
                        await asyncio.gather(preparing, return_exceptions=True)
                        return
                    preparing.result()
            _hand_positions(self.source, self.sink)  # issue 15: effectively once (Kafka)
            processor: BatchProcessor[Any, Any] = BatchProcessor(
                _envelope_config(self.config),
                self._write,
                self.metrics_collector,
                dead_letter=self._desk,
                spool=self.spool,
            )
            self.processor = processor
            starting = asyncio.ensure_future(processor.start())
            if not await _first(starting, self._stop_event):
                # A stop request while start() replays the spool (waiting for room behind an
                # outage, say): stopping the engine ends the replay, the rest stays in the
                # spool; a second request hurries the stop.
                stopping = asyncio.ensure_future(processor.stop(drain=not self.aborted))
                stopping.add_done_callback(_consume_result)
                if not await _first(starting, self._hard_event):
                    _hurry(processor)
            await starting
            self._ack_task = loop.create_task(self._ack_loop(), name="batchpunk-acks")
            consumer = loop.create_task(self._consume(processor), name="batchpunk-consumer")
            self._consumer = consumer
            await _first(consumer, self._stop_event)
            if not consumer.done():
                self._end_consumption()
                await _first(consumer, self._hard_event, timeout=self.config.drain_timeout)
                if self._in_next and not consumer.done():
                    consumer.cancel()  # the source ignored stop_consuming()
            if not self.aborted:
                await self._drain(processor, consumer)
            if self.aborted:
                await self._abort(processor)
            if consumer.done() and not consumer.cancelled():
                consumer_error = consumer.exception()
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
            for task in (self._ack_task, self._consumer):
                if task is not None and not task.done():
                    task.cancel()
            if self._ack_task is not None:
                await asyncio.gather(self._ack_task, return_exceptions=True)
            await self._settle_leftovers()
            await self._close_all()
            self._done.set()
        if consumer_error is not None:
            raise consumer_error

    def request_stop(self, *, drain: bool = True) -> None:
        """Ask run() to stop: drain (default) or nack everything unfinished at once.

        Safe from any task, a signal handler, or a sink; returns at once.
        """
        self.stop_requested = True
        self._stop_event.set()
        if not drain:
            self.aborted = True
            self._hard_event.set()
        if self._consumer is not None:
            self._end_consumption()

    async def stop(self, *, drain: bool = True) -> None:
        """Request a stop and wait until run() has finished (do not await this from a sink)."""
        self.request_stop(drain=drain)
        if self._started:
            await self._done.wait()

    # -- consuming -----------------------------------------------------------------------------

    async def _consume(self, processor: BatchProcessor[Any, Any]) -> None:
        add_nowait, add = processor.add_message_nowait, processor.add_message
        spool = self.spool
        # ack_on_write: the spool whose commits settle envelopes.
        spooled = spool if self._ack_on_write else None
        next_envelope = self.source.__aiter__().__anext__
        # A source that can stop consuming ends its iteration itself, once it has handed out
        # what it promised to (the HTTP source: the rest of the requests it received, so that
        # none is answered "not kept" for part of its events): read on until it does.
        reads_to_the_end = isinstance(self.source, StopsConsuming)
        while not self.stop_requested or (reads_to_the_end and not self.aborted):
            self._in_next = True
            try:
                envelope = await next_envelope()
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._stop_event.is_set() and task is not None:
                    task.uncancel()
                    return
                raise
            finally:
                self._in_next = False
            self._received += 1
            headers = envelope.headers
            if headers and headers.get(REDELIVERED):
                error = envelope.error or DeliveryLimitExceeded(
                    "the broker delivered this message more times than its limit"
                )
                self._reject(processor, envelope, "redelivered", error)
                continue
            if envelope.error is not None:
                self._reject(processor, envelope, "malformed", envelope.error)
                continue
            # ack_on_write settles an envelope once it is in the spool: only if it was written.
            # One the drop policy dead-lettered instead (spool or engine full) is settled when
            # its letter is stored, as without a spool; acking it on another message's commit
            # would lose it if the letter never were.
            sequence = spool.sequence if spool is not None else 0
            try:
                try:
                    add_nowait(envelope, key=envelope.key, priority=envelope.priority)
                    if spooled is not None and spooled.sequence != sequence:
                        self._awaiting_commit.add(id(envelope))
                        spooled.when_durable(partial(self._durable, envelope))
                except BufferFull:
                    await add(envelope, key=envelope.key, priority=envelope.priority)
                    if spooled is not None and spooled.sequence != sequence:
                        self._durable(envelope)  # add_message returned once it was durable
            except ProcessorClosed:
                # Stop began while this waited for room: it goes back to the source, unless
                # it is in the spool already (the next start processes it): then it is kept.
                if spooled is not None and spooled.sequence != sequence:
                    self._durable(envelope)
                elif spool is not None and spool.sequence != sequence:
                    self._give_back_later([envelope])
                else:
                    self._give_back_unwritten(envelope)
                return
            except asyncio.CancelledError:
                # A hard stop while this waited for room.
                if spool is not None and spool.sequence != sequence:
                    self._give_back_later([envelope])
                else:
                    self._give_back_unwritten(envelope)
                raise
            except BufferFull as exc:
                # The spool could not write it (a full or failing disk under a drop policy, or
                # stop() giving up on the last writes): it was never durable.
                if self.stop_requested:
                    self._give_back_unwritten(envelope)
                    return
                self._reject(processor, envelope, "dropped", exc)
            except (ValueError, TypeError) as exc:  # an unusable key or priority, or a payload
                # the spool's serializer cannot write (bytes under json: use msgpack)
                self._reject(processor, envelope, "malformed", exc)

    def _reject(
        self,
        processor: BatchProcessor[Any, Any],
        envelope: Envelope,
        reason: str,
        error: BaseException,
    ) -> None:
        """Dead-letter an envelope that never reaches a batch; the desk settles it once stored."""
        self._rejected[reason] = self._rejected.get(reason, 0) + 1
        try:
            stored = processor.reject(
                envelope, reason, error, key=envelope.key, priority=envelope.priority
            )
        except ProcessorClosed:
            self._give_back_unwritten(envelope)
            return
        stored.add_done_callback(_consume_result)

    def _end_consumption(self) -> None:
        """Make the consumer leave its loop: ask the source, or cancel a pending __anext__."""
        stop_consuming = getattr(self.source, "stop_consuming", None)
        if callable(stop_consuming) and not self.aborted:
            stop_consuming()
        elif (self._in_next or self.aborted) and self._consumer and not self._consumer.done():
            self._consumer.cancel()

    # -- writing -------------------------------------------------------------------------------

    async def _write(self, batch: Batch[Envelope]) -> Sequence[Any] | None:
        """The engine's processor: write the batch, then queue its acknowledgement."""
        token = id(batch)
        self._writing[token] = batch
        try:
            if self._write_envelopes is not None:
                result = self._write_envelopes(batch)
            else:
                result = self.sink.write([envelope.payload for envelope in batch])
            if inspect.isawaitable(result):
                result = await result
        except PartialFailure as failure:
            if failure.fits(len(batch)):  # else the engine retries the whole batch
                failed = failure.failures
                self._settle_later([e for i, e in enumerate(batch) if i not in failed])
            raise
        finally:
            del self._writing[token]
        results = as_results(result)
        if results is None or len(results) == len(batch):  # else the engine retries it whole
            self._settle_later(batch)
        return results

    # -- settling ------------------------------------------------------------------------------

    # -- the spool ------------------------------------------------------------------------------

    def _replayed(self, payload: Any, key: Any, priority: int) -> Envelope:
        """An envelope for a message the spool replays: it has no source message to settle."""
        envelope = Envelope(payload, key, priority)
        self._early[id(envelope)] = envelope
        return envelope

    def _durable(self, envelope: Envelope, _: Any = None) -> None:
        """ack_on_write: the envelope is in the spool; acknowledge it unless already settled."""
        ident = id(envelope)
        self._awaiting_commit.discard(ident)
        if self._early.pop(ident, None) is not None:
            return  # processed (and settled) before its commit returned
        self._settle_later([envelope], committed=True)

    def _not_settled(
        self, envelopes: Sequence[Envelope], committed: bool = False
    ) -> Sequence[Envelope]:
        """Drop envelopes settled already (or with nothing to settle); note the rest as settled
        where a second settlement is to come: ack_on_write settles a written envelope at its
        commit and again when it is finished, whichever comes first. One never written (a
        rejected or dropped one) is settled once, and not noted."""
        early, note = self._early, self._ack_on_write
        if not early and not note:
            return envelopes
        waiting = self._awaiting_commit
        out = []
        for envelope in envelopes:
            ident = id(envelope)
            if early.pop(ident, None) is not None:
                continue
            if note and (committed or ident in waiting):
                early[ident] = envelope
            out.append(envelope)
        return out

    def _settle_later(self, envelopes: Sequence[Envelope], committed: bool = False) -> None:
        """These envelopes are finished (written, or dead letters stored), or ``committed`` to
        the spool under ack_on_write: acknowledge them."""
        if self.spool is not None:
            envelopes = self._not_settled(envelopes, committed)
        if self._given_back:
            envelopes = [e for e in envelopes if id(e) not in self._given_back]
        if not envelopes:
            return
        self._to_ack.append(envelopes)
        if not self._ack_wake.is_set():
            self._ack_wake.set()

    def _give_back_unwritten(self, envelope: Envelope) -> None:
        """``_give_back_later`` for an envelope that never reached the spool.

        With a spool, everything the engine holds is in it, so what a source that cannot take
        messages back is given back stays in the spool for the next start; only an envelope
        marked here would be lost, and is stored as a "shutdown" letter instead.
        """
        if self.spool is not None and not self._redelivers:
            self._unspooled.add(id(envelope))
        self._give_back_later([envelope])

    def _give_back_later(self, envelopes: Sequence[Envelope]) -> None:
        """These envelopes end unfinished: nack them with requeue (once each)."""
        if self.spool is not None:
            envelopes = self._not_settled(envelopes)
        given_back = self._given_back
        for envelope in envelopes:
            if id(envelope) not in given_back:
                given_back.add(id(envelope))
                self._to_nack.append(envelope)
        if not self._ack_wake.is_set():
            self._ack_wake.set()

    async def _ack_loop(self) -> None:
        wake = self._ack_wake
        while True:
            await wake.wait()
            wake.clear()
            while self._to_ack or self._to_nack:
                await self._send_settlements()
            if self._acks_closing:
                return

    async def _send_settlements(self) -> None:
        acks, self._to_ack = self._to_ack, []
        nacks, self._to_nack = self._to_nack, []
        if acks:
            await self._ack(acks[0] if len(acks) == 1 else list(chain.from_iterable(acks)))
        if nacks:
            await self._nack(nacks)

    async def _ack(self, envelopes: Sequence[Envelope]) -> None:
        ack_many = self._ack_many
        if ack_many is None:  # a source without acknowledgements: nothing to send
            self._acked += len(envelopes)
            return
        try:
            await ack_many(envelopes)
            self._acked += len(envelopes)
        except Exception as exc:
            self._ack_errors += len(envelopes)
            log.warning(
                "acknowledging %d message(s) failed (the broker redelivers them): %s",
                len(envelopes),
                exc,
            )

    async def _nack(self, envelopes: Sequence[Envelope]) -> None:
        if not self._redelivers:
            if self.spool is not None:
                # In the spool already (the next start runs them), save the unwritten ones.
                unwritten = [e for e in envelopes if id(e) in self._unspooled]
                self._nacked += len(envelopes) - len(unwritten)
                envelopes = unwritten
            if envelopes:
                await self._keep_as_letters(envelopes)
            return
        nack_many = self._nack_many
        if nack_many is None:
            self._nacked += len(envelopes)
            return
        try:
            await nack_many(envelopes, True)
            self._nacked += len(envelopes)
        except Exception as exc:
            self._ack_errors += len(envelopes)
            log.warning("nack failed (the broker redelivers on disconnect): %s", exc)
        log.info("returned %d unfinished message(s) to the source", len(envelopes))

    async def _keep_as_letters(self, envelopes: Sequence[Envelope]) -> None:
        """The source cannot take these back: store them as "shutdown" letters, then settle.

        A letter the dead-letter sink does not take (an error, or the stop's time running out)
        leaves its message lost: counted in ``lost`` and kept in ``undelivered``.
        """
        kept = self._letters_back
        letters = []
        for envelope in envelopes:
            letter = kept.pop(id(envelope), None)
            if letter is None:
                letter = DeadLetter(
                    message=envelope,
                    key=envelope.key,
                    priority=envelope.priority,
                    reason="shutdown",
                    error=ProcessorClosed("the pipeline stopped before this message was written"),
                )
            letters.append(_unwrap(letter, envelope, self._headers_of))
        stored = False
        try:
            await self.dead_letter.put(letters)
            stored = True
        except Exception as exc:
            log.error(
                "%d unfinished message(s) are lost: their source cannot take them back and the "
                "dead-letter sink failed to store them: %s",
                len(letters),
                exc,
            )
        finally:
            if not stored:  # failed, or cancelled when the stop's time ran out
                self._lost += len(letters)
                self.undelivered.extend(letters)
        if not stored:
            return
        shutdown = sum(letter.reason == "shutdown" for letter in letters)
        self._shutdown_letters += shutdown
        log.warning(
            "%d unfinished message(s) stored as dead letters (%d with reason shutdown): the "
            "source cannot take them back",
            len(letters),
            shutdown,
        )
        self._warn_if_in_memory(letters)
        await self._ack(envelopes)

    async def _settle_leftovers(self) -> None:
        """After the engine stopped: send what is queued, nack letters that were never stored."""
        processor = self.processor
        if processor is not None and processor.dead_letters:
            letters, processor.dead_letters = processor.dead_letters, []
            unstored = [
                letter
                for letter in letters
                if isinstance(letter.message, Envelope) and letter.reason != "shutdown"
            ]
            if unstored and not self._redelivers:
                # One more try, by the settle task: else the messages are lost.
                for letter in unstored:
                    self._letters_back[id(letter.message)] = letter
            elif unstored:
                self.undelivered.extend(
                    _unwrap(letter, letter.message, self._headers_of) for letter in unstored
                )
                log.error(
                    "%d dead letter(s) could not be stored before the stop; their messages "
                    "are nacked, and the letters kept in pipeline.undelivered",
                    len(unstored),
                )
            self._give_back_later([letter.message for letter in letters])
        if self._to_ack or self._to_nack:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_settlements(), ABORT_SECONDS * 5)

    async def _flush_settlements(self) -> None:
        while self._to_ack or self._to_nack:
            await self._send_settlements()

    def _unfinished(self) -> int:
        settled = self._acked + self._ack_errors + self._nacked + self._lost + len(self._to_nack)
        return max(0, self._received - settled)

    def _warn_if_in_memory(self, letters: Sequence[DeadLetter]) -> None:
        """Letters kept only in memory are lost at exit: say so, so none vanishes silently."""
        if self._in_memory and letters:
            reasons = sorted({letter.reason for letter in letters})
            log.warning(
                "%d message(s) dead-lettered (reason: %s); kept in memory only "
                "(pipeline.dead_letter): pass dead_letter= or add a [dead_letter] section",
                len(letters),
                ", ".join(reasons),
            )

    # -- stopping ------------------------------------------------------------------------------

    async def _drain(
        self, processor: BatchProcessor[Any, Any], consumer: asyncio.Task[None]
    ) -> None:
        """Graceful: let the engine finish (dead letters included), send every settlement.

        After a stop request the engine gets drain_timeout. When the input simply ended, it
        gets what a running engine would give its held batches (delivery_timeout, after which
        they are dead-lettered "expired"; forever for None), plus drain_timeout for the rest;
        a first signal meanwhile leaves drain_timeout more, a second one stops at once. Not
        with a spool: what is unfinished stays in it and runs after the next start.
        """
        config = self.config
        ended = not self.stop_requested and consumer.done() and not consumer.cancelled()
        # With a spool the unfinished messages stay in it for the next start: nothing to wait for.
        if ended and consumer.exception() is None and self.spool is None:
            drain, delivery = config.drain_timeout, config.delivery_timeout
            grace = math.inf if drain is None or delivery is None else delivery + drain
            stopping = asyncio.ensure_future(processor.stop(drain=True, grace=grace))
            await _first(stopping, self._stop_event, timeout=drain or _WARN_AFTER)
            if not stopping.done() and not self._stop_event.is_set():
                log.warning(
                    "the input ended with %d message(s) unfinished: waiting for them (up to "
                    "delivery_timeout=%ss); SIGINT/SIGTERM stops the wait",
                    processor.pending + processor.in_flight,
                    config.delivery_timeout,
                )
            if not await _first(stopping, self._stop_event):
                # A stop request: drain_timeout more, then what still runs is cancelled.
                done = await _first(stopping, self._hard_event, timeout=config.drain_timeout)
                if not done and not self.aborted:
                    _hurry(processor)
        else:
            stopping = asyncio.ensure_future(processor.stop(drain=True))
        await _first(stopping, self._hard_event)
        await _first(consumer, self._hard_event)
        if self.aborted:
            return
        await self._settle_leftovers()
        self._acks_closing = True
        self._ack_wake.set()
        if self._ack_task is not None:
            await _first(self._ack_task, self._hard_event, timeout=self.config.drain_timeout)

    async def _abort(self, processor: BatchProcessor[Any, Any]) -> None:
        """Hard stop: settle what already finished, nack the rest, give the engine a moment.

        Batches whose sink call returned are already queued for acknowledgement and are sent
        first; batches whose call is still under way are nacked (an idempotent sink makes the
        redelivery harmless), and acknowledgements that would follow for them are dropped.
        """
        for batch in list(self._writing.values()):
            self._give_back_later(batch)
        # grace=0: batches still running, waiting to retry or held by an outage are cancelled
        # and come back as "shutdown" letters (nacked); a graceful stop under way is hurried.
        stopping = asyncio.ensure_future(processor.stop(drain=False, grace=0))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._flush_settlements(), ABORT_SECONDS)
        done, _ = await asyncio.wait({stopping}, timeout=ABORT_SECONDS)
        if not done:
            log.warning("stopped at once: the engine is still cancelling running batches")
        await self._settle_leftovers()
        # An acknowledgement already on its way (the ack task inside ack_many) may finish.
        self._acks_closing = True
        self._ack_wake.set()
        if self._ack_task is not None:
            await asyncio.wait({self._ack_task}, timeout=ABORT_SECONDS)

    async def _close_all(self) -> None:
        closed: list[int] = []
        for part in (self.source, self.sink, self.dead_letter):
            close = getattr(part, "close", None)
            if not callable(close) or id(part) in closed:
                continue
            closed.append(id(part))
            try:
                result = close()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                log.warning("closing %s failed: %s", type(part).__name__, exc)

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        installed: list[int] = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, self._on_signal, signum)
            except (NotImplementedError, RuntimeError, ValueError):
                continue  # not the main thread, or a platform without loop signal handlers
            installed.append(signum)
        return installed

    def _on_signal(self, signum: int) -> None:
        self.signals_received += 1
        name = signal.Signals(signum).name
        if self.signals_received == 1:
            log.warning("%s: draining, then stopping (send it again to stop at once)", name)
            self.request_stop()
        else:
            log.warning("%s again: stopping at once, unfinished messages are nacked", name)
            self.request_stop(drain=False)

    # -- stats ---------------------------------------------------------------------------------

    @property
    def lost(self) -> int:
        """Messages that were neither processed, stored as dead letters, nor given back to a
        source that redelivers them: only a source that cannot take messages back loses any,
        and only when its "shutdown" letters could not be stored either."""
        return 0 if self._redelivers else self._lost + len(self._to_nack)

    async def get_stats(self, history: bool = False) -> dict[str, Any]:
        """The engine's stats (rejected envelopes included), with the pipeline's own counts.

        received = processed + dead_lettered + pending + in_flight holds for these numbers.
        ``pipeline`` holds what only the pipeline knows: envelopes read, rejected by reason,
        acknowledged, failed acknowledgements, nacked, unfinished, elapsed seconds, and whether
        the source is connected (``source_connected``).
        """
        stats: dict[str, Any] = {}
        if self.processor is not None:
            stats = await self.processor.get_stats(history)
        stats["pipeline"] = {
            "read": self._received,
            "rejected": dict(self._rejected),
            "acked": self._acked,
            "ack_errors": self._ack_errors,
            "nacked": self._nacked,
            "unfinished": self._unfinished(),
            "undelivered_letters": len(self.undelivered),
            "shutdown_letters": self._shutdown_letters,
            "lost": self.lost,
            # A source may expose ``connected`` (bool, read by /readyz); one that does not counts as
            # connected while the pipeline runs.
            "source_connected": bool(getattr(self.source, "connected", True)),
            "elapsed": time.monotonic() - self._began if self._began else 0.0,
        }
        return stats


def _envelope_config(config: BatchConfig) -> BatchConfig:
    """The engine's config: a byte trigger measures the payload, not the envelope."""
    if config.max_bytes is None:
        return config
    sizer = config.sizer or _payload_size

    def envelope_size(envelope: Envelope) -> int:
        return sizer(envelope.payload)

    return dataclasses.replace(config, sizer=envelope_size)


def _payload_size(payload: Any) -> int:
    """A payload's bytes: its length for bytes and text, else its size as JSON (the codec's).

    A pipeline file cannot pass a sizer, and its sources yield dicts: measuring them as JSON,
    what a JSON sink writes, makes ``[batch] max_bytes`` mean something for them.
    """
    if isinstance(payload, bytes | bytearray | memoryview | str):
        return len(payload)
    try:
        return len(serialize(payload, "json", "payload"))
    except TypeError as exc:
        raise ValueError(
            f"sizer: max_bytes is set but this {type(payload).__name__} payload has no byte "
            f"size ({exc}); pass BatchConfig(sizer=...) to measure it"
        ) from None


def _consume_result(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: an unstored letter is reported by the pipeline


def _hurry(processor: BatchProcessor[Any, Any]) -> None:
    """Hurry a stop under way, in the background: what still runs is cancelled at once."""
    hurry = asyncio.ensure_future(processor.stop(grace=0))
    hurry.add_done_callback(_consume_result)


async def _first(
    task: asyncio.Future[Any],
    event: asyncio.Event,
    *,
    timeout: float | None = None,  # noqa: ASYNC109
) -> bool:
    """Wait until ``task`` is done or ``event`` is set, at most ``timeout``; True if it is done.

    Waits without cancelling ``task``: a drain interrupted by a hard stop keeps running.
    """
    if task.done():
        return True
    if event.is_set():
        return False
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    return task.done()


def _acks_on_write(spool: Spool | None, source: Any) -> bool:
    """Whether envelopes are settled once in the spool (the spool's setting, else the source's)."""
    if spool is None:
        return False
    if spool.ack_on_write is not None:
        return spool.ack_on_write
    return bool(getattr(source, "ack_on_spool_write", False))


def _payload_of(envelope: Any) -> Any:
    """What the spool writes of an envelope: its payload (key and priority go beside it)."""
    return envelope.payload if isinstance(envelope, Envelope) else envelope


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _hand_positions(source: Any, sink: Any) -> None:
    """Issue 15: a sink storing stream positions (PostgresSink ``positions``) is handed to a
    source that can resume after them (KafkaSource.use_positions), before the first message."""
    use_positions = getattr(source, "use_positions", None)
    if getattr(sink, "positions", None) is not None and callable(use_positions):
        use_positions(sink)
