"""The Source and Sink contract, run over every case that a ``cases_*`` module declares.

Source contract: a consumer pass yields every published payload exactly once; acknowledged
messages are not delivered to a later consumer; messages nacked with requeue (or never settled)
are, when the case ``redelivers``; close() is idempotent and ends iteration.

Sink contract: written batches are stored exactly, in order; write returns None or one result
per payload; close() is idempotent; a bad payload raises an error that names the problem.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from batchpunk.envelope import Envelope, Source
from batchpunk.errors import PartialFailure
from tests.conftest import require_server
from tests.contract.harness import SinkCase, SourceCase, SourcePlace, discover, take

SOURCE_CASES, SINK_CASES = discover()

pytestmark = pytest.mark.timeout(60)


def payloads(count: int) -> list[dict[str, Any]]:
    return [{"id": i, "body": f"payload {i}"} for i in range(count)]


def key(payload: Any) -> int:
    return int(payload["id"])


async def nothing_more(source: Source, iterator: AsyncIterator[Envelope] | None = None) -> bool:
    """True if the source ends, or yields nothing within a short wait."""
    iterator = iterator if iterator is not None else source.__aiter__()
    try:
        extra = await asyncio.wait_for(iterator.__anext__(), 0.7)
    except (StopAsyncIteration, TimeoutError):
        return True
    await nack(source, [extra])
    return False


async def ack(source: Source, envelopes: Sequence[Envelope]) -> None:
    """Acknowledge per batch, as the pipeline does; a source without acknowledgements has none."""
    ack_many = getattr(source, "ack_many", None)
    if ack_many is not None:
        await ack_many(list(envelopes))


async def nack(source: Source, envelopes: Sequence[Envelope]) -> None:
    """Give envelopes back with requeue, as the pipeline does at shutdown."""
    nack_many = getattr(source, "nack_many", None)
    if nack_many is not None:
        await nack_many(list(envelopes), True)


async def settled(place: SourcePlace) -> None:
    """Wait until the place reports nothing outstanding (when it can tell)."""
    for _ in range(50):
        left = await place.outstanding()
        if left is None or left == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{left} message(s) still outstanding after every one was acknowledged")


# -- sources ------------------------------------------------------------------------------------


@pytest.fixture(params=SOURCE_CASES, ids=[case.name for case in SOURCE_CASES])
def source_case(request: pytest.FixtureRequest) -> SourceCase:
    case: SourceCase = request.param
    if case.server is not None:
        require_server(case.server)
    return case


async def test_a_consumer_pass_yields_every_payload_exactly_once(source_case: SourceCase) -> None:
    """Every published payload arrives once, none twice, and after acknowledging them all
    nothing is left outstanding."""
    published = payloads(40)
    async with source_case.open(published) as place:
        source = place.source()
        envelopes = await take(source, len(published))
        assert sorted(envelopes_payloads(envelopes), key=key) == published
        assert not any(envelope.malformed for envelope in envelopes)
        await ack(source, envelopes)
        await source.close()
        await settled(place)
        later = place.source()
        assert await nothing_more(later)
        await later.close()


def envelopes_payloads(envelopes: list[Envelope]) -> list[Any]:
    return [envelope.payload for envelope in envelopes]


async def test_acked_messages_stay_gone_and_unsettled_ones_come_back(
    source_case: SourceCase,
) -> None:
    """A new consumer gets exactly what the previous one nacked with requeue or never settled,
    when the case redelivers, and never what it acknowledged."""
    published = payloads(24)
    async with source_case.open(published) as place:
        first = place.source()
        envelopes = await take(first, len(published))
        by_id = {key(e.payload): e for e in envelopes}
        acked = set(range(0, 24, 2))
        nacked = set(range(1, 12, 2))
        await ack(first, [by_id[i] for i in sorted(acked)])
        await nack(first, [by_id[i] for i in sorted(nacked)])
        await first.close()
        if not source_case.redelivers:
            second = place.source()
            assert await nothing_more(second)
            await second.close()
            return
        unsettled = set(range(24)) - acked - nacked
        second = place.source()
        again = await take(second, len(nacked | unsettled))
        assert {key(e.payload) for e in again} == nacked | unsettled
        assert acked.isdisjoint(key(e.payload) for e in again)
        await ack(second, again)
        await second.close()
        await settled(place)


async def test_close_is_idempotent_and_ends_iteration(source_case: SourceCase) -> None:
    """close() twice is fine, and a source closed mid-stream yields nothing more."""
    published = payloads(10)
    async with source_case.open(published) as place:
        source = place.source()
        [envelope] = await take(source, 1)
        await nack(source, [envelope])
        await source.close()
        await source.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(source.__aiter__().__anext__(), 10)


# -- sinks --------------------------------------------------------------------------------------


@pytest.fixture(params=SINK_CASES, ids=[case.name for case in SINK_CASES])
def sink_case(request: pytest.FixtureRequest) -> SinkCase:
    case: SinkCase = request.param
    if case.server is not None:
        require_server(case.server)
    return case


async def test_a_sink_stores_exactly_the_batches_written_in_order(sink_case: SinkCase) -> None:
    """Two batches written are stored exactly, in write order; write returns None or one
    result per payload."""
    first, second = payloads(12), payloads(17)[12:]
    async with sink_case.open() as opened:
        for batch in (first, second):
            result = await opened.sink.write(batch)
            assert result is None or len(result) == len(batch)
        assert await opened.stored() == first + second


async def test_a_sink_close_is_idempotent(sink_case: SinkCase) -> None:
    """close() may be called twice after writing."""
    async with sink_case.open() as opened:
        await opened.sink.write(payloads(3))
        await opened.sink.close()
        await opened.sink.close()


async def test_a_bad_payload_raises_an_error_naming_the_problem(sink_case: SinkCase) -> None:
    """A payload without ``body`` holding an unencodable value is refused with an error whose
    message names the missing column or the value's type."""
    async with sink_case.open() as opened:
        with pytest.raises(Exception) as info:  # noqa: PT011 - each sink has its own error type
            await opened.sink.write([{"id": 1, "oops": object()}])
        error: BaseException = info.value
        if isinstance(error, PartialFailure):
            assert list(error.failures) == [0]
            error = error.failures[0]
        message = str(error).lower()
        assert any(word in message for word in ("body", "object", "serializ")), message
