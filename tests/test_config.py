"""BatchConfig: documented defaults, frozen values, and a ValueError naming each bad field."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest

from batchpunk import BatchConfig, BatchProcessor, BatchTrigger, OverflowPolicy


async def _noop(batch: list[Any]) -> None:
    """A processor that accepts every batch."""


def test_defaults_follow_the_issues() -> None:
    """Every field issue 2 and 3 name has its documented default."""
    config = BatchConfig()
    expected = {
        "max_size": 100,
        "max_wait": 5.0,
        "trigger": BatchTrigger.BOTH,
        "retry_failed": True,
        "max_retries": 3,
        "retry_delay": 1.0,
        "enable_partial_batches": True,
        "enable_parallel_processing": True,
        "max_concurrent_batches": 5,
        "compression_threshold": 1024,
        "max_bytes": None,
        "sizer": None,
        "max_pending": 10_000,
        "overflow": OverflowPolicy.BLOCK,
        "preserve_order": False,
        "batch_timeout": None,
        "drain_timeout": 30.0,
        "retry_max_delay": 30.0,
        "retry_jitter": True,
        "split_retries": 0,
        "circuit_breaker_threshold": None,
        "circuit_breaker_cooldown": 30.0,
        "message_ttl": None,
    }
    for name, value in expected.items():
        assert getattr(config, name) == value, name


def test_default_retry_on_retries_every_exception() -> None:
    """By default retry_on covers every Exception."""
    retry_on = BatchConfig().retry_on
    assert isinstance(retry_on, tuple)
    assert Exception in retry_on


def test_config_is_frozen() -> None:
    """A config cannot change after it is built, so a running processor sees fixed values."""
    config = BatchConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_size = 5  # type: ignore[misc]


def test_enum_fields_accept_their_string_values() -> None:
    """trigger and overflow given as strings (as from a file) become the enums."""
    config = BatchConfig(trigger="all", overflow="drop_oldest")  # type: ignore[arg-type]
    assert config.trigger is BatchTrigger.ALL
    assert config.overflow is OverflowPolicy.DROP_OLDEST


def test_optional_fields_accept_none_and_zero_where_meaningful() -> None:
    """None disables the optional limits, and zero delays or drain timeouts are valid."""
    config = BatchConfig(
        max_pending=None,
        batch_timeout=None,
        drain_timeout=0,
        retry_delay=0,
        max_retries=0,
        circuit_breaker_threshold=None,
        message_ttl=None,
        max_bytes=None,
        retry_on=lambda exc: True,
    )
    assert config.max_pending is None
    assert config.drain_timeout == 0


def test_parallel_processing_off_means_one_slot() -> None:
    """With enable_parallel_processing False only one processor call may run at once."""
    assert BatchConfig(max_concurrent_batches=7).concurrency == 7
    assert BatchConfig(max_concurrent_batches=7, enable_parallel_processing=False).concurrency == 1


def test_to_dict_is_json_ready() -> None:
    """to_dict() of a config with callables and enums serialises to JSON."""
    config = BatchConfig(sizer=len, retry_on=(ValueError, OSError), trigger=BatchTrigger.SIZE)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["trigger"] == "size"
    assert data["max_size"] == 100


BAD_VALUES: list[tuple[str, Any]] = [
    ("max_size", 0),
    ("max_size", -1),
    ("max_size", 2.5),
    ("max_size", True),
    ("max_size", "10"),
    ("max_wait", 0),
    ("max_wait", -1.0),
    ("max_wait", math.nan),
    ("max_wait", math.inf),
    ("max_wait", "1"),
    ("trigger", "sometimes"),
    ("trigger", 3),
    ("retry_failed", "yes"),
    ("retry_failed", 1),
    ("max_retries", -1),
    ("max_retries", 1.5),
    ("retry_delay", -0.1),
    ("retry_delay", math.inf),
    ("enable_partial_batches", None),
    ("enable_parallel_processing", 1),
    ("max_concurrent_batches", 0),
    ("compression_threshold", -1),
    ("max_bytes", 0),
    ("max_bytes", "1kb"),
    ("sizer", 42),
    ("max_pending", 0),
    ("max_pending", -5),
    ("overflow", "explode"),
    ("preserve_order", "no"),
    ("batch_timeout", 0),
    ("batch_timeout", -1),
    ("drain_timeout", -1),
    ("drain_timeout", math.nan),
    ("retry_max_delay", -1),
    ("retry_jitter", "x"),
    ("retry_on", (ValueError, 3)),
    ("retry_on", (int,)),
    ("retry_on", 42),
    ("unavailable_on", (ValueError, 3)),
    ("unavailable_on", 42),
    ("delivery_timeout", 0),
    ("delivery_timeout", -1.0),
    ("delivery_timeout", math.inf),
    ("split_retries", -1),
    ("circuit_breaker_threshold", 0),
    ("circuit_breaker_cooldown", -1),
    ("message_ttl", 0),
    ("message_ttl", -1),
    ("serializer", "xml"),
    ("compression", "rar"),
    ("compression_level", 1.5),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_value_raises_value_error_naming_the_field(field: str, value: Any) -> None:
    """A bad value fails at construction with a ValueError whose message names its field."""
    with pytest.raises(ValueError, match=rf"\b{field}\b") as caught:
        BatchConfig(**{field: value})
    assert repr(value) in str(caught.value) or field in str(caught.value)


def test_every_field_has_a_bad_value_case() -> None:
    """The parametrized table above covers every validated field of BatchConfig."""
    covered = {field for field, _ in BAD_VALUES}
    assert set(BatchConfig.field_names()) == covered


def test_processor_rejects_a_config_that_is_not_a_batch_config() -> None:
    """BatchProcessor names the config argument when given something else."""
    with pytest.raises(ValueError, match="config"):
        BatchProcessor({"max_size": 3}, _noop)  # type: ignore[arg-type]


def test_processor_rejects_a_processor_that_is_not_callable() -> None:
    """BatchProcessor names the processor argument when it cannot be called."""
    with pytest.raises(ValueError, match="processor"):
        BatchProcessor(BatchConfig(), "not callable")  # type: ignore[arg-type]


def test_processor_rejects_a_dead_letter_target_it_cannot_call() -> None:
    """BatchProcessor names dead_letter when it has neither put() nor __call__."""
    with pytest.raises(ValueError, match="dead_letter"):
        BatchProcessor(BatchConfig(), _noop, dead_letter=42)
