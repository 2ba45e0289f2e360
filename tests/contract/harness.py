"""The one contract every Source and every Sink keeps, whatever the broker or store behind it.

A connector joins the suite by adding a module ``tests/contract/cases_<name>.py`` that defines
``SOURCE_CASES`` and/or ``SINK_CASES`` (lists of the cases below). The suite in
``test_contract.py`` finds every such module and runs each contract test over each case.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from batchpunk.envelope import Sink, Source


class SourcePlace(Protocol):
    """A fresh queue/stream/file already holding the payloads a case was opened with."""

    def source(self) -> Source:
        """A new consumer of this place (same durable name / group / file each time)."""
        ...

    async def outstanding(self) -> int | None:
        """Messages the broker still holds unacknowledged or undelivered; None if unobservable."""
        ...


@dataclass(frozen=True)
class SourceCase:
    """How to build a place holding given payloads, and Sources that read it.

    ``open(payloads)`` publishes the JSON-native payloads to a fresh place (a unique name per
    call) and yields a SourcePlace; it cleans up on exit. ``redelivers`` is True when a second
    ``place.source()`` delivers again what the first nacked with requeue or never acked.
    ``acks_out_of_order`` is False for a log with one committed position per partition.
    """

    name: str
    server: str | None
    open: Callable[[Sequence[Any]], AbstractAsyncContextManager[SourcePlace]]
    redelivers: bool = True
    #: False when the broker keeps one position per partition (Kafka): an acknowledgement
    #: above an unsettled message is then delivered again, so the redelivery test acks a prefix.
    acks_out_of_order: bool = True


@dataclass(frozen=True)
class OpenedSink:
    """A sink ready to write, with the means to read back what it stored."""

    sink: Sink
    #: Every payload stored so far, in write order.
    stored: Callable[[], Awaitable[list[Any]]]


@dataclass(frozen=True)
class SinkCase:
    """How to build one Sink over a fresh table/stream/file, and read back what it stored.

    Payloads given to the sink are dicts ``{"id": int, "body": str}``.
    """

    name: str
    server: str | None
    open: Callable[[], AbstractAsyncContextManager[OpenedSink]]


def discover() -> tuple[list[SourceCase], list[SinkCase]]:
    """Collect the cases of every ``cases_*`` module beside this one."""
    import tests.contract as package

    sources: list[SourceCase] = []
    sinks: list[SinkCase] = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("cases_"):
            module = importlib.import_module(f"tests.contract.{info.name}")
            sources.extend(getattr(module, "SOURCE_CASES", []))
            sinks.extend(getattr(module, "SINK_CASES", []))
    return sources, sinks


async def take(source: Source, count: int, seconds: float = 10.0) -> list[Any]:
    """Read exactly ``count`` envelopes from a source, failing if they do not come in time."""
    import asyncio

    out: list[Any] = []

    async def read() -> None:
        iterator: AsyncIterator[Any] = source.__aiter__()
        while len(out) < count:
            out.append(await iterator.__anext__())

    await asyncio.wait_for(read(), seconds)
    return out
