"""PostgresSink's ``positions`` option (issue 15): rows and stream positions in one transaction.

With ``positions = "table_name"``, every batch that comes with stream positions (Kafka topic,
partition and offset in the envelope headers) is written like this, in ONE transaction:

1. lock each (stream, partition) of the batch (``pg_advisory_xact_lock``), so two writers of
   one partition never interleave (a worker that lost the partition in a rebalance and a new
   owner, say);
2. read which of the batch's offsets the positions table already records as written, and drop
   those messages (they count as written: this is what makes a redelivery a no-op);
3. write the remaining rows with the sink's usual statement;
4. record the written offsets as ranges ``(stream, part, first_offset, last_offset)``.

So a table without any unique key receives each message exactly once, across crashes,
redeliveries and rebalances: the rows and the record of them commit or vanish together. The
source reads the ranges back on start and on every partition assignment (``load_positions``)
and skips what was written, so even the redelivered messages are not processed again.

Ranges rather than one "last offset" per partition: the engine runs several batches of one
partition at once and they may commit in any order, so the written offsets of a partition are
not always a prefix. Ranges below the group's committed offset are deleted when a partition is
assigned (everything below it is finished for good).

Kept apart from postgres.py (which issue 12 reworks) with two small hooks there: the
``positions`` constructor argument and ``write_envelopes``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from batchpunk.connectors._common import check_identifier, fail_payloads
from batchpunk.envelope import Envelope

if TYPE_CHECKING:
    from batchpunk.connectors.postgres import PostgresSink

__all__ = ["PositionTable", "position_of"]


def position_of(envelope: Envelope) -> tuple[str, int, int] | None:
    """(stream, partition, offset) of an envelope from a source with positions, else None.

    KafkaSource puts topic, partition and offset in every envelope's headers.
    """
    headers = envelope.headers
    if not headers:
        return None
    topic, partition, offset = headers.get("topic"), headers.get("partition"), headers.get("offset")
    if isinstance(topic, str) and isinstance(partition, int) and isinstance(offset, int):
        return topic, partition, offset
    return None


def _ranges(offsets: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted offsets as contiguous (first, last) ranges."""
    out: list[tuple[int, int]] = []
    for offset in sorted(offsets):
        if out and offset == out[-1][1] + 1:
            out[-1] = (out[-1][0], offset)
        elif not out or offset > out[-1][1]:
            out.append((offset, offset))
    return out


class PositionTable:
    """The positions table of one PostgresSink: written ranges per (stream, partition)."""

    def __init__(self, name: str) -> None:
        parts = name.split(".") if isinstance(name, str) else [name]
        if len(parts) > 2:
            raise ValueError("expected name or schema.name")
        for part in parts:
            check_identifier("PostgresSink.positions", part)
        self.name = name
        self._ready = False

    async def ensure(self, conn: Any) -> None:
        """Create the table and its index if missing (once per sink)."""
        if self._ready:
            return
        index = self.name.replace(".", "_") + "_last"
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {self.name} ("
            " stream text NOT NULL, part integer NOT NULL,"
            " first_offset bigint NOT NULL, last_offset bigint NOT NULL);"
            f"CREATE INDEX IF NOT EXISTS {index} ON {self.name} (stream, part, last_offset)"
        )
        self._ready = True

    async def load(
        self, conn: Any, stream: str, floors: Mapping[int, int]
    ) -> dict[int, list[tuple[int, int]]]:
        """Written ranges at or above each partition's floor; forgets the ranges below it."""
        await self.ensure(conn)
        out: dict[int, list[tuple[int, int]]] = {}
        async with conn.transaction():
            for part, floor in floors.items():
                await conn.execute(
                    f"DELETE FROM {self.name} WHERE stream = $1 AND part = $2 AND last_offset < $3",
                    stream,
                    part,
                    floor,
                )
                rows = await conn.fetch(
                    f"SELECT first_offset, last_offset FROM {self.name} "
                    "WHERE stream = $1 AND part = $2 ORDER BY first_offset",
                    stream,
                    part,
                )
                if rows:
                    out[part] = [(int(r[0]), int(r[1])) for r in rows]
        return out

    async def write(self, sink: PostgresSink, envelopes: Sequence[Envelope]) -> None:
        """Write the envelopes not yet recorded, and record them, in one transaction.

        Envelopes without a position are written as usual inside the same transaction. A
        payload that cannot be shaped into a row fails alone (PartialFailure, the rest commits);
        a row the table refuses fails the whole call (nothing commits) and the engine bisects
        the batch down to it, as for any sink that cannot name its bad rows; alone, it fails
        with the error write() gives it (PostgresDataError naming the row and column).
        """
        await sink.open()
        pool, info = sink._pool, sink._info
        if pool is None or info is None:
            from batchpunk.connectors.postgres import PostgresRetryable

            raise PostgresRetryable(f"PostgresSink for {sink._target} is closed")
        positions = [position_of(e) for e in envelopes]
        by_part: dict[tuple[str, int], list[int]] = {}
        for position in positions:
            if position is not None:
                by_part.setdefault(position[:2], []).append(position[2])
        failures: dict[int, BaseException] = {}
        try:
            async with pool.acquire(timeout=sink._timeout) as conn:
                await self.ensure(conn)
                async with conn.transaction():
                    written: set[tuple[str, int, int]] = set()
                    for stream, part in sorted(by_part):
                        offsets = by_part[(stream, part)]
                        await conn.execute(
                            "SELECT pg_advisory_xact_lock(hashtextextended($1, $2))",
                            f"{self.name}:{stream}",
                            part,
                        )
                        rows = await conn.fetch(
                            f"SELECT first_offset, last_offset FROM {self.name} WHERE stream = $1 "
                            "AND part = $2 AND last_offset >= $3 AND first_offset <= $4",
                            stream,
                            part,
                            min(offsets),
                            max(offsets),
                        )
                        for first, last in rows:
                            written.update((stream, part, o) for o in offsets if first <= o <= last)
                    todo = [i for i, p in enumerate(positions) if p not in written]
                    if todo:
                        shaped = sink._shape([envelopes[i].payload for i in todo], info)
                        for index, error in shaped.failures.items():  # cannot be encoded
                            failures[todo[index]] = error
                            if positions[todo[index]] is not None:
                                written.add(positions[todo[index]])  # type: ignore[arg-type]
                        if shaped.rows:
                            pending = [(todo[i], r) for i, r in shaped.rows]
                            try:
                                await sink._write_rows(
                                    conn, shaped.columns, [r for _, r in pending]
                                )
                            except Exception as exc:
                                if len(pending) > 1:  # the engine bisects down to the row
                                    raise
                                error, bad = await sink._blame(conn, shaped.columns, pending, exc)
                                raise bad.get(0, error) from sink._cause(exc)
                    new: dict[tuple[str, int], list[int]] = {}
                    for position in positions:
                        if position is not None and position not in written:
                            new.setdefault(position[:2], []).append(position[2])
                    streams: list[str] = []
                    parts: list[int] = []
                    firsts: list[int] = []
                    lasts: list[int] = []
                    for (stream, part), offsets in new.items():
                        for first, last in _ranges(offsets):
                            streams.append(stream)
                            parts.append(part)
                            firsts.append(first)
                            lasts.append(last)
                    if streams:
                        await conn.execute(
                            f"INSERT INTO {self.name} (stream, part, first_offset, last_offset) "
                            "SELECT * FROM unnest($1::text[], $2::int[], $3::bigint[], "
                            "$4::bigint[])",
                            streams,
                            parts,
                            firsts,
                            lasts,
                        )
        except Exception as exc:
            if getattr(exc, "retryable", True) is False or type(exc).__module__.startswith(
                "batchpunk"
            ):
                raise
            raise sink._translate(exc, "writing with positions") from sink._cause(exc)
        if failures:  # the others are committed; these go on to dead-lettering
            fail_payloads(failures, len(envelopes))
