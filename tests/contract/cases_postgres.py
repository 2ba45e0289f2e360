"""PostgresSink in the contract suite: the COPY path and the idempotent (stage table) path."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from tests.contract.harness import OpenedSink, SinkCase

DSN = "postgresql://postgres@127.0.0.1:5432/test"


def _open(idempotency_key: str | None) -> Any:
    @asynccontextmanager
    async def open_sink() -> AsyncIterator[OpenedSink]:
        import asyncpg

        from batchpunk.connectors.postgres import PostgresSink

        table = f"bp_contract_{uuid.uuid4().hex[:12]}"
        admin = await asyncpg.connect(DSN)
        # seq keeps write order; the primary key makes the idempotent path possible.
        await admin.execute(
            f"CREATE TABLE {table} (seq bigserial, id int PRIMARY KEY, body text NOT NULL)"
        )
        sink = PostgresSink(DSN, table, ("id", "body"), idempotency_key=idempotency_key)

        async def stored() -> list[Any]:
            found = await admin.fetch(f"SELECT id, body FROM {table} ORDER BY seq")
            return [{"id": r["id"], "body": r["body"]} for r in found]

        try:
            yield OpenedSink(sink=sink, stored=stored)
        finally:
            await sink.close()
            await admin.execute(f"DROP TABLE IF EXISTS {table}")
            await admin.close()

    return open_sink


SINK_CASES = [
    SinkCase(name="postgres-copy", server="postgres", open=_open(None)),
    SinkCase(name="postgres-idempotent", server="postgres", open=_open("id")),
]
