"""The "one message at a time" PostgreSQL baseline that batchpunk's benchmarks compare against.

What a consumer without batching does: one ``INSERT`` per message, each its own autocommit
transaction (one commit, one WAL flush per row), on a single connection. Shared by
bench/postgres_sink.py and bench/brokers.py so both measure the same baseline.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["OneRowInserter", "insert_one_at_a_time"]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class OneRowInserter:
    """Inserts payloads (dicts holding ``columns``) one row per autocommit INSERT.

    ``on_conflict_do_nothing`` adds ``ON CONFLICT DO NOTHING`` so the baseline pays the same
    idempotency as a sink with an idempotency key.
    """

    def __init__(
        self,
        dsn: str,
        table: str,
        columns: Sequence[str],
        *,
        on_conflict_do_nothing: bool = False,
    ) -> None:
        target = ".".join(_quote(part) for part in table.split("."))
        names = ", ".join(_quote(c) for c in columns)
        marks = ", ".join(f"${n}" for n in range(1, len(columns) + 1))
        conflict = " ON CONFLICT DO NOTHING" if on_conflict_do_nothing else ""
        self._sql = f"INSERT INTO {target} ({names}) VALUES ({marks}){conflict}"
        self._dsn = dsn
        self._columns = tuple(columns)
        self._conn: Any = None
        self._stmt: Any = None

    async def open(self) -> None:
        """Connect and prepare the INSERT."""
        import asyncpg

        self._conn = await asyncpg.connect(self._dsn)
        self._stmt = await self._conn.prepare(self._sql)

    async def insert(self, payload: Mapping[str, Any]) -> None:
        """Insert and commit one row."""
        await self._stmt.fetch(*(payload[c] for c in self._columns))

    async def close(self) -> None:
        """Close the connection; idempotent."""
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


async def insert_one_at_a_time(
    dsn: str, table: str, columns: Sequence[str], payloads: Iterable[Mapping[str, Any]]
) -> tuple[int, float]:
    """Insert every payload with its own autocommit INSERT; return (rows, seconds)."""
    inserter = OneRowInserter(dsn, table, columns)
    await inserter.open()
    count = 0
    try:
        started = time.perf_counter()
        for payload in payloads:
            await inserter.insert(payload)
            count += 1
        return count, time.perf_counter() - started
    finally:
        await inserter.close()
