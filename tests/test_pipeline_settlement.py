"""Pipeline settlement edge cases, each a defect found by review: every envelope a source yields
is acknowledged once or nacked once, never both and never neither."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from batchpunk.config import BatchConfig
from batchpunk.deadletter import MemoryDeadLetters
from batchpunk.envelope import Envelope
from batchpunk.errors import ConfigError, PartialFailure
from batchpunk.pipeline import Pipeline
from batchpunk.pipeline_file import parse_pipeline


class Source:
    """Yields envelopes (receipt = index) and counts the acks and nacks of each."""

    def __init__(self, envelopes: list[Envelope], *, hang_at_end: bool = False) -> None:
        self.envelopes = envelopes
        self.hang_at_end = hang_at_end
        self.acks: Counter[Any] = Counter()
        self.nacks: Counter[Any] = Counter()

    def __aiter__(self) -> AsyncIterator[Envelope]:
        return self._each()

    async def _each(self) -> AsyncIterator[Envelope]:
        for envelope in self.envelopes:
            yield envelope
        if self.hang_at_end:
            await asyncio.Event().wait()

    async def ack_many(self, envelopes: Sequence[Envelope]) -> None:
        self.acks.update(envelope.receipt for envelope in envelopes)

    async def nack_many(self, envelopes: Sequence[Envelope], requeue: bool) -> None:
        self.nacks.update(envelope.receipt for envelope in envelopes)

    async def close(self) -> None:
        return None

    def unsettled_or_twice(self) -> dict[Any, tuple[int, int]]:
        out = {}
        for envelope in self.envelopes:
            counts = (self.acks[envelope.receipt], self.nacks[envelope.receipt])
            if counts not in ((1, 0), (0, 1)):
                out[envelope.receipt] = counts
        return out


def envelopes(count: int) -> list[Envelope]:
    return [Envelope({"i": i}, receipt=i) for i in range(count)]


class Sink:
    """Fails its first call the way ``first`` says, then writes."""

    def __init__(self, first: Any = None) -> None:
        self.first = first
        self.calls = 0
        self.closed = False
        self.calls_after_close = 0

    async def write(self, batch: Sequence[Any]) -> Any:
        self.calls += 1
        if self.closed:
            self.calls_after_close += 1
        if self.calls == 1 and self.first is not None:
            return self.first(batch)
        return None

    async def close(self) -> None:
        self.closed = True


def out_of_range(batch: Sequence[Any]) -> Any:
    raise PartialFailure({len(batch) + 5: ValueError("bad")})


def one_result(batch: Sequence[Any]) -> Any:
    return [1]


@pytest.mark.parametrize("first", [out_of_range, one_result], ids=["indices", "results"])
async def test_a_sink_outcome_the_engine_refuses_is_not_acknowledged(first: Any) -> None:
    """A PartialFailure with indices outside the batch, or one result for three messages, is a
    ResultMismatch: the engine retries the whole batch. Its envelopes were acknowledged at once
    and again after the retry; now only after the retry."""
    source = Source(envelopes(3))
    config = BatchConfig(max_size=3, max_wait=0.01, retry_delay=0.01)
    pipeline = Pipeline(source, Sink(first), config, dead_letter=MemoryDeadLetters())
    await asyncio.wait_for(pipeline.run(), 10)
    assert source.unsettled_or_twice() == {}
    assert sum(source.acks.values()) == 3


def always_fails(batch: Sequence[Any]) -> Any:
    raise ValueError("transient")


async def test_a_hard_stop_nacks_a_batch_waiting_to_retry_and_the_engine_stops() -> None:
    """A batch sleeping before its retry is not being written, so the hard stop's nack of
    "batches under way" missed it; the engine also went on after run() returned and called
    the closed sink. Now the engine stops at once: each envelope nacked once, no later call."""
    source = Source(envelopes(5), hang_at_end=True)

    class Failing(Sink):
        async def write(self, batch: Sequence[Any]) -> Any:
            await super().write(batch)
            raise ValueError("transient")

    sink = Failing()
    config = BatchConfig(max_size=5, max_wait=0.01, retry_delay=3.0, retry_jitter=False)
    pipeline = Pipeline(source, sink, config, dead_letter=MemoryDeadLetters())
    run = asyncio.create_task(pipeline.run())
    for _ in range(500):
        if sink.calls:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    await asyncio.wait_for(pipeline.stop(drain=False), 10)
    await run
    assert dict(source.nacks) == {i: 1 for i in range(5)}
    assert not source.acks
    await asyncio.sleep(3.2)  # past the retry the batch was waiting for
    assert sink.calls_after_close == 0


async def test_a_stop_while_a_source_connects_ends_start_up_at_once() -> None:
    """A prepare() hook still connecting (a broker that does not answer) held run() until it
    returned, through a first and a second stop."""

    class SlowToConnect(Source):
        async def prepare(self, config: BatchConfig) -> None:
            await asyncio.sleep(30)

    pipeline = Pipeline(SlowToConnect(envelopes(3)), Sink(), BatchConfig(max_size=5))
    run = asyncio.create_task(pipeline.run())
    await asyncio.sleep(0.1)
    pipeline.request_stop()
    await asyncio.wait_for(run, 5)


async def test_a_headers_of_hook_that_raises_does_not_keep_a_letter_from_its_sink() -> None:
    """The source's headers_of hook raised for a malformed envelope: its letter was never
    stored and the envelope never settled. The letter keeps the envelope's own headers."""

    class Hooked(Source):
        def headers_of(self, envelope: Envelope) -> dict[str, Any]:
            return {"entry": envelope.receipt["id"]}  # not a dict for the malformed one

    bad = Envelope(b"\xff", receipt=1, error=ValueError("not JSON"))
    source = Hooked([Envelope({"i": 0}, receipt={"id": 0}), bad])
    letters = MemoryDeadLetters()
    config = BatchConfig(max_size=5, max_wait=0.01, drain_timeout=0.5)
    await asyncio.wait_for(Pipeline(source, Sink(), config, dead_letter=letters).run(), 10)
    assert [(letter.reason, letter.message) for letter in letters.letters] == [
        ("malformed", b"\xff")
    ]
    assert source.acks[1] == 1
    assert source.nacks[1] == 0


BASE = '[source]\ntype = "generator"\ncount = 5\n[sink]\ntype = "jsonl"\npath = "-"\n[batch]\n'


async def test_max_bytes_in_a_pipeline_file_measures_dict_payloads_as_json() -> None:
    """A file cannot pass a sizer, and its sources yield dicts: max_bytes dead-lettered every
    message as "malformed" ("pass BatchConfig(sizer=...)"). Dicts are measured as JSON."""
    spec = parse_pipeline(BASE + "max_size = 10\nmax_wait = 0.05\nmax_bytes = 100000", environ={})
    spec.check()
    pipeline = spec.build()
    await asyncio.wait_for(pipeline.run(), 10)
    stats = await pipeline.get_stats()
    assert (stats["processed"], stats["dead_lettered"]) == (5, 0)


@pytest.mark.parametrize("name", ["..x", ".x", "x."])
def test_a_retry_on_name_that_is_no_module_path_is_a_config_error(name: str) -> None:
    """import_module raised TypeError or ValueError for these: a traceback, not exit 2."""
    with pytest.raises(ConfigError, match=r"\[batch\] retry_on: .* is not an exception class"):
        parse_pipeline(BASE + f'retry_on = ["{name}"]', environ={})


@pytest.mark.parametrize("value", ["false", "0.0"])
def test_circuit_breaker_threshold_zero_must_be_the_integer_zero(value: str) -> None:
    """false and 0.0 equal 0, and silently turned the breaker off."""
    with pytest.raises(ConfigError, match="circuit_breaker_threshold"):
        parse_pipeline(BASE + f"circuit_breaker_threshold = {value}", environ={})


def test_circuit_breaker_threshold_zero_from_the_environment_turns_it_off() -> None:
    """The docs say "${NAME}" becomes a number and 0 turns the breaker off; it was refused."""
    spec = parse_pipeline(BASE + 'circuit_breaker_threshold = "${T}"', environ={"T": "0"})
    assert spec.batch.circuit_breaker_threshold is None


def test_validate_output_keeps_numbers_from_the_environment_and_shows_the_spool(
    tmp_path: Path,
) -> None:
    """A short number from the environment was masked wherever its text appeared
    ("max_wait": 5.***, invalid JSON); [spool] was missing from the output, and its documented
    commit_interval = 0.0 was refused."""
    path = tmp_path / "p.toml"
    path.write_text(
        BASE
        + 'max_size = "${BATCH_SIZE}"\ncircuit_breaker_threshold = "${T}"\n'
        + f'[spool]\npath = "{tmp_path / "spool"}"\ncommit_interval = 0.0\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "batchpunk", "validate", "--json", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "BATCH_SIZE": "7", "T": "0"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert (shown["batch"]["max_size"], shown["batch"]["max_wait"]) == (7, 5.0)
    assert shown["batch"]["circuit_breaker_threshold"] is None
    assert shown["spool"]["commit_interval"] == 0.0


def test_a_short_number_inside_a_longer_value_stays_a_secret() -> None:
    """Only a key's whole value that is a short number is a setting: a 7-digit PIN inside a
    header was shown by validate and left in error messages once numbers were exempted."""
    without_sink = BASE.replace('[sink]\ntype = "jsonl"\npath = "-"\n', "")
    spec = parse_pipeline(
        without_sink
        + '[sink]\ntype = "http"\nurl = "https://api.example/in"\n'
        + '[sink.headers]\nX-Account = "acct-pin ${API_KEY}"\n',
        environ={"API_KEY": "4817263"},
    )
    assert "4817263" not in json.dumps(spec.describe(), default=str)
    assert "4817263" not in spec.redact("login failed for pin 4817263")
