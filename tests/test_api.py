"""The public surface: names importable from batchpunk, __all__ in step, errors and Batch."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import batchpunk
from batchpunk import errors

#: Names issues 2 and 3 fix as importable from the package itself.
REQUIRED = {
    "BatchProcessor",
    "BatchConfig",
    "BatchTrigger",
    "OverflowPolicy",
    "Batch",
    "DeadLetter",
    "BufferFull",
    "ProcessorClosed",
    "BatchpunkError",
    "PartialFailure",
}


def test_required_names_are_importable_from_the_package() -> None:
    """Every name the issues fix can be imported from batchpunk and is listed in __all__."""
    for name in sorted(REQUIRED):
        assert getattr(batchpunk, name) is not None
        assert name in batchpunk.__all__, name


def test_all_matches_the_public_names() -> None:
    """__all__ lists exactly the package's public non-module names, each once."""
    public = {
        name
        for name, value in vars(batchpunk).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert len(batchpunk.__all__) == len(set(batchpunk.__all__))
    assert set(batchpunk.__all__) == public


def test_star_import_gives_exactly_all() -> None:
    """`from batchpunk import *` binds every name in __all__ and nothing else public."""
    namespace: dict[str, object] = {}
    exec("from batchpunk import *", namespace)
    names = {name for name in namespace if not name.startswith("__")}
    assert names == set(batchpunk.__all__)


@pytest.mark.parametrize("name", ["BufferFull", "ProcessorClosed"])
def test_engine_errors_derive_from_the_root(name: str) -> None:
    """BufferFull and ProcessorClosed are BatchpunkErrors, so one except clause catches both."""
    kind = getattr(batchpunk, name)
    assert issubclass(kind, batchpunk.BatchpunkError)
    with pytest.raises(batchpunk.BatchpunkError):
        raise kind("x")


def test_every_exported_exception_derives_from_the_root() -> None:
    """Every exception class batchpunk exports roots in BatchpunkError."""
    exported = [getattr(batchpunk, n) for n in batchpunk.__all__] + [
        getattr(errors, n) for n in errors.__all__
    ]
    kinds = [k for k in exported if isinstance(k, type) and issubclass(k, BaseException)]
    assert kinds
    for kind in kinds:
        assert issubclass(kind, batchpunk.BatchpunkError), kind


def test_batch_is_a_list_with_its_lane_and_history() -> None:
    """Batch is a real list subclass carrying key, priority, attempt and flush_reason."""
    batch = batchpunk.Batch([1, 2, 3], key="k", priority=4, attempt=2, flush_reason="size")
    assert isinstance(batch, list)
    assert issubclass(batchpunk.Batch, list)
    assert batch == [1, 2, 3]
    assert batch[1:] == [2, 3]
    assert (batch.key, batch.priority, batch.attempt, batch.flush_reason) == ("k", 4, 2, "size")


def test_batch_defaults_to_a_first_attempt_in_the_shared_lane() -> None:
    """A Batch built with no lane details is the shared lane's first attempt."""
    batch = batchpunk.Batch(["a"])
    assert batch.key is None
    assert batch.priority == 0
    assert batch.attempt == 1


def test_enum_values_are_the_documented_strings() -> None:
    """BatchTrigger and OverflowPolicy values are the strings config files use."""
    assert {t.value for t in batchpunk.BatchTrigger} == {"size", "timeout", "both", "all"}
    assert {p.value for p in batchpunk.OverflowPolicy} == {
        "block",
        "raise",
        "drop_newest",
        "drop_oldest",
    }


def test_dead_letter_keeps_the_fields_the_issues_fix() -> None:
    """DeadLetter has message, key, priority, reason, error, attempts and first_seen."""
    names = {f.name for f in dataclasses.fields(batchpunk.DeadLetter)}
    assert {"message", "key", "priority", "reason", "error", "attempts", "first_seen"} <= names


def test_partial_failure_is_raisable_by_processors() -> None:
    """PartialFailure is a BatchpunkError that keeps its failures and optional results."""
    error = ValueError("bad")
    partial = batchpunk.PartialFailure({1: error}, results=["a", None])
    assert isinstance(partial, batchpunk.BatchpunkError)
    assert partial.failures == {1: error}
    assert list(partial.results or ()) == ["a", None]
    assert batchpunk.PartialFailure({0: error}).results is None


async def test_get_stats_reports_every_documented_key() -> None:
    """get_stats() keeps the original keys and adds the counts issues 2 and 3 name."""

    async def noop(batch: batchpunk.Batch[int]) -> None:
        return None

    async with batchpunk.BatchProcessor(batchpunk.BatchConfig(max_size=2), noop) as p:
        await p.add_message(1)
        await p.add_message(2)
        await p.flush()
        stats = await p.get_stats()
    expected = {
        "current_batch_size",
        "batch_age",
        "is_processing",
        "config",
        "received",
        "processed",
        "failed",
        "dead_lettered",
        "dropped",
        "batches",
        "retries",
        "splits",
        "pending",
        "in_flight",
        "flush_reasons",
        "circuit",
    }
    assert expected <= set(stats)
    assert stats["received"] == stats["processed"] == 2
    assert stats["batches"] == 1
    assert stats["flush_reasons"] == {"size": 1}
    assert stats["circuit"] == "closed"
    assert isinstance(stats["config"], dict)
