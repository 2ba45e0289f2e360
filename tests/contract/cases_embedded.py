"""Embedded cases for the Source and Sink contract suite: no server needed.

Sources: JSON Lines with a checkpoint (a file is a queue that redelivers what was not
acknowledged). Sinks: SQLite, JSON Lines, and HTTP against a local server started per case.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from batchpunk.connectors import HttpSink, JsonlSink, JsonlSource, SqliteSink
from batchpunk.envelope import Source
from tests.contract.harness import OpenedSink, SinkCase, SourceCase


class _JsonlPlace:
    """A JSON Lines file and the checkpoint its consumers share."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "queue.jsonl"
        self.checkpoint = folder / "queue.checkpoint"

    def source(self) -> Source:
        return JsonlSource(str(self.path), checkpoint=str(self.checkpoint))

    async def outstanding(self) -> int | None:
        """Lines not acknowledged according to the checkpoint."""
        offsets, position = [], 0
        for line in self.path.read_bytes().splitlines(keepends=True):
            if line.strip():
                offsets.append(position)
            position += len(line)
        if not self.checkpoint.exists():
            return len(offsets)
        state = json.loads(self.checkpoint.read_text(encoding="utf-8"))
        acked = set(state["acked"])
        return sum(1 for o in offsets if o >= state["offset"] and o not in acked)


@asynccontextmanager
async def _open_jsonl_source(payloads: Sequence[Any]) -> AsyncIterator[_JsonlPlace]:
    with tempfile.TemporaryDirectory(prefix="batchpunk-contract-") as folder:
        place = _JsonlPlace(Path(folder))
        place.path.write_text("".join(json.dumps(p) + "\n" for p in payloads), encoding="utf-8")
        yield place


@asynccontextmanager
async def _open_sqlite_sink() -> AsyncIterator[OpenedSink]:
    with tempfile.TemporaryDirectory(prefix="batchpunk-contract-") as folder:
        path = Path(folder) / "sink.db"
        sink = SqliteSink(str(path), "items", ["id", "body"])

        async def stored() -> list[Any]:
            with sqlite3.connect(path) as db:
                rows = db.execute("SELECT id, body FROM items ORDER BY rowid").fetchall()
            return [{"id": i, "body": body} for i, body in rows]

        try:
            yield OpenedSink(sink=sink, stored=stored)
        finally:
            await sink.close()


@asynccontextmanager
async def _open_jsonl_sink() -> AsyncIterator[OpenedSink]:
    with tempfile.TemporaryDirectory(prefix="batchpunk-contract-") as folder:
        path = Path(folder) / "sink.jsonl"
        sink = JsonlSink(str(path))

        async def stored() -> list[Any]:
            if not path.exists():
                return []
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

        try:
            yield OpenedSink(sink=sink, stored=stored)
        finally:
            await sink.close()


@asynccontextmanager
async def _open_http_sink() -> AsyncIterator[OpenedSink]:
    """HttpSink against a local HTTP/1.1 server that stores each posted JSON array."""
    received: list[Any] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                received.extend(json.loads(await reader.readexactly(length)))
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sink = HttpSink(f"http://127.0.0.1:{port}/items")

    async def stored() -> list[Any]:
        return list(received)

    try:
        yield OpenedSink(sink=sink, stored=stored)
    finally:
        await sink.close()
        server.close()
        await server.wait_closed()


SOURCE_CASES = [SourceCase(name="jsonl", server=None, open=_open_jsonl_source, redelivers=True)]
SINK_CASES = [
    SinkCase(name="sqlite", server=None, open=_open_sqlite_sink),
    SinkCase(name="jsonl", server=None, open=_open_jsonl_sink),
    SinkCase(name="http", server=None, open=_open_http_sink),
]
