"""Pipelines: a Source feeding a BatchProcessor whose processor is a Sink, acknowledged safely.

A pipeline is the product most users want: point batchpunk at a queue and a store and run it as
a service. Its one promise is about acknowledgements:

- an envelope is acknowledged only after its batch was written by the sink, or after its dead
  letter was stored by the dead-letter sink ("durably dead-lettered");
- an envelope not finished when the pipeline stops is nacked with requeue, never acknowledged;
- an envelope the source could not decode (``malformed``), or that the broker delivered too often
  (header ``batchpunk_redelivered``), goes straight to the dead-letter sink and is acknowledged
  once stored, and the source goes on.

Acknowledgements are coalesced by a background task, so neither the sink nor the engine ever
waits for the broker: the engine marks envelopes finished, the task settles them in groups
(through the source's optional ``ack_many``).

Connector hooks (all optional, looked up by name, documented in docs/pipelines.md):

- ``async prepare(config)`` on the source, the sink or the dead-letter sink: called once before
  the first message, with the pipeline's BatchConfig. Use it to size a prefetch window (see
  ``prefetch_for``), open connections, or check a table, so that a wrong setting fails before
  anything is consumed.
- ``async ack_many(envelopes)`` on the source: settles a group of envelopes in one broker call
  instead of one ``ack()`` each.
- ``stop_consuming()`` on the source: end iteration soon while acknowledgements still work.
  Without it, the pipeline cancels a pending ``__anext__`` when it stops, so a source must not
  lose a message it already received when that happens (unacknowledged, it is redelivered).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import fields
from typing import Any, Protocol, runtime_checkable

from batchpunk.config import BatchConfig, OverflowPolicy
from batchpunk.deadletter import DeadLetter, DeadLetterSink, MemoryDeadLetters
from batchpunk.envelope import Envelope, Sink, Source
from batchpunk.errors import BatchpunkError, BufferFull, ProcessorClosed
from batchpunk.processor import BatchProcessor
from batchpunk.retry import backoff_delay
from batchpunk.spool import Spool

__all__ = [
    "Envelope",
    "Source",
    "Sink",
    "Pipeline",
    "Preparable",
    "AcksMany",
    "StopsConsuming",
    "REDELIVERED",
    "prefetch_for",
]

log = logging.getLogger("batchpunk.pipeline")

#: Header a broker source sets on an envelope delivered more times than its limit: the pipeline
#: dead-letters it with reason "redelivered" (and its ``error``) instead of processing it.
REDELIVERED = "batchpunk_redelivered"

#: The default ``Envelope.on_ack``: an envelope carrying it needs no acknowledgement call.
_NO_ACK = {f.name: f for f in fields(Envelope)}["on_ack"].default

#: Seconds a hard stop waits for queued acknowledgements, the nacks, and the engine.
ABORT_SECONDS = 2.0


@runtime_checkable
class Preparable(Protocol):
    """A connector that wants the pipeline's BatchConfig before the first message."""

    async def prepare(self, config: BatchConfig) -> None: ...


@runtime_checkable
class AcksMany(Protocol):
    """A source that settles many envelopes in one broker call (XACK, multiple=True, ...)."""

    async def ack_many(self, envelopes: Sequence[Envelope]) -> None: ...


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


_OPEN, _FINISHED, _NACKED, _UNSTORED = 0, 1, 2, 3


class _Ticket:
    """The engine's completion tracker for one envelope (done / set_result / set_exception)."""

    __slots__ = ("envelope", "pipeline", "state")

    def __init__(self, pipeline: Pipeline, envelope: Envelope) -> None:
        self.pipeline = pipeline
        self.envelope = envelope
        self.state = _OPEN

    def done(self) -> bool:
        return self.state != _OPEN

    def set_result(self, value: Any) -> None:
        if self.state == _OPEN:
            self.state = _FINISHED
            self.pipeline._finished(self)

    def set_exception(self, exc: BaseException) -> None:
        if self.state != _OPEN:
            return
        if self.pipeline._desk.take_stored(self.envelope.payload):
            self.state = _FINISHED
            self.pipeline._finished(self)
        else:
            # The engine gave up storing this letter (it keeps it in memory): not durable, so
            # the envelope must go back to the broker, not be acknowledged.
            self.state = _UNSTORED


class _Desk:
    """Wraps the dead-letter sink: adds envelope headers and records which messages it stored.

    The record of stored messages (by identity) lets a ticket tell a letter that reached the
    sink from one the engine gave up on at shutdown, which must not be acknowledged.

    Letters with reason "shutdown" (batches still unfinished when drain_timeout ran out) are not
    stored: their envelopes are nacked with requeue instead, so the broker redelivers them to
    the next worker rather than parking them in the dead-letter sink.
    """

    def __init__(self, sink: DeadLetterSink, pipeline: Pipeline) -> None:
        self.sink = sink
        self.pipeline = pipeline
        self._stored: dict[int, int] = {}

    async def put(self, letters: Sequence[DeadLetter]) -> None:
        letters = [letter for letter in letters if letter.reason != "shutdown"]
        if not letters:
            return
        by_id = self.pipeline._by_id
        if by_id:
            for letter in letters:
                ticket = by_id.get(id(letter.message))
                if ticket is not None and ticket.envelope.payload is letter.message:
                    letter.headers = {**ticket.envelope.headers, **letter.headers}
        await self.sink.put(letters)
        self.pipeline._warn_if_in_memory(letters)
        stored = self._stored
        for letter in letters:
            ident = id(letter.message)
            stored[ident] = stored.get(ident, 0) + 1

    def take_stored(self, message: Any) -> bool:
        ident = id(message)
        count = self._stored.get(ident, 0)
        if not count:
            return False
        if count == 1:
            del self._stored[ident]
        else:
            self._stored[ident] = count - 1
        return True


class Pipeline:
    """Reads envelopes from ``source``, batches them, writes batches to ``sink``, settles them.

    Args:
        source: an async iterator of Envelopes with ``async close()``.
        sink: an object with ``async write(batch)`` (the engine's processor) and ``async close()``.
        config: batching, retries and backpressure; ``max_pending`` bounds the envelopes read
            and not yet finished (BLOCK backpressure: the source is not read while full).
        dead_letter: where messages that end unprocessed go (``async put(letters)``); by default
            a MemoryDeadLetters, kept as ``pipeline.dead_letter``.
        metrics_collector: passed to the BatchProcessor.

    ``await run()`` consumes until the source ends or a stop is requested, then drains: every
    envelope read is acknowledged after success or durable dead-lettering, or nacked with
    requeue. ``await stop()`` asks for that from another task; ``stop(drain=False)`` nacks every
    unfinished envelope at once instead. ``run(handle_signals=True)`` turns SIGINT/SIGTERM into
    ``stop()`` and a second signal into ``stop(drain=False)``.

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
        if not callable(getattr(sink, "write", None)):
            raise ValueError(f"sink: expected an object with async write(batch), got {sink!r}")
        if dead_letter is not None and not callable(getattr(dead_letter, "put", None)):
            raise ValueError(
                f"dead_letter: expected an object with async put(letters), got {dead_letter!r}"
            )
        config = config if config is not None else BatchConfig()
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
        #: The engine, once run() started it.
        self.processor: BatchProcessor[Any, Any] | None = None
        #: Letters of rejected envelopes that could not be stored before shutdown.
        self.undelivered: list[DeadLetter] = []
        #: True once a stop was requested, and True for a hard (drain=False) stop.
        self.stop_requested = False
        self.aborted = False
        #: Signals received by run(handle_signals=True).
        self.signals_received = 0
        self._desk = _Desk(self.dead_letter, self)
        self._open: set[_Ticket] = set()
        self._by_id: dict[int, _Ticket] = {}
        self._to_ack: list[Envelope] = []
        self._rejects: list[tuple[DeadLetter, _Ticket]] = []
        self._received = 0
        self._rejected: dict[str, int] = {}
        self._rejects_stored: dict[str, int] = {}
        self._acked = 0
        self._ack_errors = 0
        self._nacked = 0
        self._started = False
        self._in_next = False
        self._stop_event = asyncio.Event()
        self._hard_event = asyncio.Event()
        self._ack_wake = asyncio.Event()
        self._reject_wake = asyncio.Event()
        self._rejects_closing = False
        self._acks_closing = False
        self._consumer: asyncio.Task[None] | None = None
        self._ack_task: asyncio.Task[None] | None = None
        self._reject_task: asyncio.Task[None] | None = None
        self._done = asyncio.Event()
        self._began = 0.0

    def __repr__(self) -> str:
        return (
            f"Pipeline({self.source!r} -> {self.sink!r}, received={self._received}, "
            f"unfinished={len(self._open)})"
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
        tasks: list[asyncio.Task[None]] = []
        consumer_error: BaseException | None = None
        try:
            if handle_signals:
                # Before the prepare hooks: a signal while they connect is a graceful stop
                # (nothing is consumed, exit 0), not the default action that kills the process.
                installed = self._install_signals(loop)
            for part in (self.source, self.sink, self.dead_letter):
                prepare = getattr(part, "prepare", None)
                if callable(prepare):
                    await prepare(self.config)
            processor: BatchProcessor[Any, Any] = BatchProcessor(
                self.config,
                self.sink.write,
                self.metrics_collector,
                dead_letter=self._desk,
                spool=self.spool,
            )
            self.processor = processor
            await processor.start()
            self._ack_task = loop.create_task(self._ack_loop(), name="batchpunk-acks")
            self._reject_task = loop.create_task(self._reject_loop(), name="batchpunk-rejects")
            tasks += [self._ack_task, self._reject_task]
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
            for task in (*tasks, self._consumer):
                if task is not None and not task.done():
                    task.cancel()
            await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)
            leftover, self._to_ack = self._to_ack, []
            if leftover:  # finished, but the ack task was interrupted: settle them now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._settle(leftover), ABORT_SECONDS)
            await self._nack_open()
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
        accept, offer = processor._accept, processor._offer
        iterator = self.source.__aiter__()
        next_envelope = iterator.__anext__
        open_tickets, by_id = self._open, self._by_id
        spool = self.spool
        ack_on_write = _acks_on_write(spool, self.source)
        while not self.stop_requested:
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
            ticket = _Ticket(self, envelope)
            open_tickets.add(ticket)
            if envelope.malformed:
                self._reject(ticket, "malformed")
                continue
            headers = envelope.headers
            if headers:
                if headers.get(REDELIVERED):
                    self._reject(ticket, "redelivered")
                    continue
                by_id.setdefault(id(envelope.payload), ticket)
            try:
                payload, key, priority = envelope.payload, envelope.key, envelope.priority
                tracker: _Ticket | None = ticket
                if spool is not None:
                    # Appended now, durable by the next group commit: reading the source goes
                    # on meanwhile, so one commit covers many envelopes.
                    durable = False
                    try:
                        payload = spool.admit_nowait(payload, key, priority, True)
                    except BufferFull:  # the spool is full: wait for room (BLOCK)
                        payload = await spool.admit(payload, key, priority)
                        durable = True
                    if payload is None:  # spool full, drop policy: dead-lettered (no headers)
                        spool.settle_dropped(ticket.set_result)
                        continue
                    if ack_on_write and payload.mark is not None:
                        tracker = None  # settled with the source once durable
                        if durable:
                            ticket.set_result(None)
                        else:
                            spool.when_durable(ticket.set_result)
                if not offer(payload, key, priority, tracker):
                    await accept(payload, key, priority, tracker)
            except ProcessorClosed:
                return  # stop began while this waited for room: it is nacked at shutdown
            except (ValueError, TypeError) as exc:  # an unusable key or priority, or a payload
                # the spool's serializer cannot write (bytes under json: use msgpack)
                self._reject(ticket, "malformed", exc)

    def _end_consumption(self) -> None:
        """Make the consumer leave its loop: ask the source, or cancel a pending __anext__."""
        stop_consuming = getattr(self.source, "stop_consuming", None)
        if callable(stop_consuming) and not self.aborted:
            stop_consuming()
        elif (self._in_next or self.aborted) and self._consumer and not self._consumer.done():
            self._consumer.cancel()

    # -- finishing envelopes -------------------------------------------------------------------

    def _finished(self, ticket: _Ticket) -> None:
        self._open.discard(ticket)
        envelope = ticket.envelope
        if envelope.headers and self._by_id.get(id(envelope.payload)) is ticket:
            del self._by_id[id(envelope.payload)]
        self._to_ack.append(envelope)
        if not self._ack_wake.is_set():
            self._ack_wake.set()

    async def _ack_loop(self) -> None:
        wake = self._ack_wake
        while True:
            await wake.wait()
            wake.clear()
            todo, self._to_ack = self._to_ack, []
            if todo:
                await self._settle(todo)
            elif self._acks_closing:
                return

    async def _settle(self, envelopes: list[Envelope]) -> None:
        ack_many = getattr(self.source, "ack_many", None)
        if callable(ack_many):
            try:
                await ack_many(envelopes)
                self._acked += len(envelopes)
            except Exception as exc:
                self._ack_errors += len(envelopes)
                log.warning("acknowledging %d message(s) failed: %s", len(envelopes), exc)
            return
        first: Exception | None = None
        failed = 0
        for envelope in envelopes:
            if envelope.on_ack is _NO_ACK:
                continue  # a source without acknowledgements: nothing to send
            try:
                await envelope.ack()
            except Exception as exc:
                failed += 1
                first = first or exc
        self._acked += len(envelopes) - failed
        if failed:
            self._ack_errors += failed
            log.warning(
                "acknowledging %d message(s) failed (the broker redelivers them): %s", failed, first
            )

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

    # -- rejected envelopes (malformed, redelivered) --------------------------------------------

    def _reject(self, ticket: _Ticket, reason: str, error: BaseException | None = None) -> None:
        envelope = ticket.envelope
        if error is None:
            error = envelope.error or BatchpunkError(f"envelope rejected ({reason})")
        letter = DeadLetter(
            message=envelope.payload,
            key=envelope.key if _hashable(envelope.key) else repr(envelope.key),
            priority=envelope.priority if isinstance(envelope.priority, int) else 0,
            reason=reason,
            error=error,
            attempts=0,
            headers=dict(envelope.headers),
        )
        self._rejected[reason] = self._rejected.get(reason, 0) + 1
        self._rejects.append((letter, ticket))
        if not self._reject_wake.is_set():
            self._reject_wake.set()

    async def _reject_loop(self) -> None:
        wake = self._reject_wake
        while True:
            await wake.wait()
            wake.clear()
            while self._rejects:
                todo, self._rejects = self._rejects, []
                letters = [letter for letter, _ in todo]
                attempt = 0
                while True:
                    try:
                        await self.dead_letter.put(letters)
                        self._warn_if_in_memory(letters)
                        break
                    except Exception as exc:
                        attempt += 1
                        delay = max(
                            0.01,
                            backoff_delay(
                                attempt,
                                base=self.config.retry_delay,
                                cap=self.config.retry_max_delay,
                                jitter=False,
                            ),
                        )
                        log.warning(
                            "storing %d rejected message(s) failed (attempt %d, retry in "
                            "%.2fs): %s",
                            len(letters),
                            attempt,
                            delay,
                            exc,
                        )
                        try:
                            await asyncio.sleep(delay)
                        except asyncio.CancelledError:
                            self._rejects[:0] = todo  # still unfinished: nacked at shutdown
                            raise
                counts: dict[str, int] = {}
                for letter in letters:
                    counts[letter.reason] = counts.get(letter.reason, 0) + 1
                observer = getattr(self.processor, "_observer", None)
                for reason, count in counts.items():
                    self._rejects_stored[reason] = self._rejects_stored.get(reason, 0) + count
                    if observer is not None:  # so exporters count these dead letters too
                        observer.dead_lettered(count, reason)
                for _, ticket in todo:
                    ticket.set_result(None)
            if self._rejects_closing:
                return

    # -- stopping ------------------------------------------------------------------------------

    async def _drain(
        self, processor: BatchProcessor[Any, Any], consumer: asyncio.Task[None]
    ) -> None:
        """Graceful: let the engine finish, store rejected letters, send every acknowledgement."""
        timeout = self.config.drain_timeout
        stopping = asyncio.ensure_future(processor.stop(drain=True))
        await _first(stopping, self._hard_event)
        await _first(consumer, self._hard_event)
        if self.aborted:
            return
        self._rejects_closing = True
        self._reject_wake.set()
        task = self._reject_task
        if task is not None and not await _first(task, self._hard_event, timeout=timeout):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._rejects:
            self.undelivered.extend(letter for letter, _ in self._rejects)
            log.error(
                "%d rejected message(s) could not be stored in the dead-letter sink within "
                "drain_timeout=%ss; they are nacked, and kept in pipeline.undelivered",
                len(self._rejects),
                timeout,
            )
            self._rejects.clear()
        # Only now: storing the last rejected letters may still have finished envelopes.
        self._acks_closing = True
        self._ack_wake.set()
        if self._ack_task is not None:
            await _first(self._ack_task, self._hard_event, timeout=timeout)

    async def _abort(self, processor: BatchProcessor[Any, Any]) -> None:
        """Hard stop: settle what already finished, nack the rest, give the engine a moment."""
        todo, self._to_ack = self._to_ack, []
        if todo:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settle(todo), ABORT_SECONDS)
        await self._nack_open()
        stopping = asyncio.ensure_future(processor.stop(drain=False))
        done, _ = await asyncio.wait({stopping}, timeout=ABORT_SECONDS)
        if not done:
            log.warning("stopped at once: the engine is still finishing running batches")

    async def _nack_open(self) -> None:
        """Return every unfinished envelope to its broker (requeue); none is acknowledged."""
        tickets = [t for t in self._open if t.state in (_OPEN, _UNSTORED)]
        self._open.clear()
        self._by_id.clear()
        if not tickets:
            return
        for ticket in tickets:
            ticket.state = _NACKED

        async def nack_all() -> int:
            failed = 0
            for ticket in tickets:
                try:
                    await ticket.envelope.nack(True)
                except Exception as exc:
                    failed += 1
                    log.warning("nack failed (the broker redelivers on disconnect): %s", exc)
            return failed

        try:
            failed = await asyncio.wait_for(nack_all(), ABORT_SECONDS * 5)
        except TimeoutError:
            failed = len(tickets)
        self._nacked += len(tickets) - failed
        log.info("returned %d unfinished message(s) to the source", len(tickets))

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

    async def get_stats(self, history: bool = False) -> dict[str, Any]:
        """The engine's stats, counting the envelopes dead-lettered before the engine too.

        received = processed + dead_lettered + pending + in_flight holds for these numbers.
        ``pipeline`` holds what only the pipeline knows: envelopes read, rejected by reason,
        acknowledged, failed acknowledgements, nacked, unfinished, elapsed seconds.
        """
        stats: dict[str, Any] = {}
        if self.processor is not None:
            stats = await self.processor.get_stats(history)
        rejected = sum(self._rejected.values())
        stored = sum(self._rejects_stored.values())
        stats["received"] = stats.get("received", 0) + rejected
        stats["dead_lettered"] = stats.get("dead_lettered", 0) + stored
        stats["pending"] = stats.get("pending", 0) + rejected - stored
        reasons = dict(stats.get("dead_letter_reasons", {}))
        for reason, count in self._rejects_stored.items():
            reasons[reason] = reasons.get(reason, 0) + count
        stats["dead_letter_reasons"] = reasons
        stats["pipeline"] = {
            "read": self._received,
            "rejected": dict(self._rejected),
            "acked": self._acked,
            "ack_errors": self._ack_errors,
            "nacked": self._nacked,
            "unfinished": len(self._open),
            "undelivered_letters": len(self.undelivered),
            "elapsed": time.monotonic() - self._began if self._began else 0.0,
        }
        return stats


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


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
