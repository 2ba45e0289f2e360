"""Structured logging helpers: the batchpunk fields reach JSON and key=value output."""

from __future__ import annotations

import io
import json
import logging

import pytest

from batchpunk.metrics import LOG_FIELDS, JsonFormatter, KeyValueFormatter, log_extra


def emit(formatter: logging.Formatter, **extra: object) -> str:
    """Log one warning (and one error with a traceback) through ``formatter``; return the text."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("batchpunk.test-logging")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("batch %s failed", 7, extra=extra)
        try:
            raise ValueError("bad payload")
        except ValueError:
            logger.exception("giving up", extra=extra)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_json_formatter_writes_one_object_per_record_with_the_fields() -> None:
    """Each record is one JSON line carrying message, level and every batchpunk field given."""
    text = emit(JsonFormatter(), **log_extra(batch_id=7, key=b"k1", size=100, reason="failed"))
    first, second = (json.loads(line) for line in text.splitlines())
    assert first["message"] == "batch 7 failed"
    assert first["level"] == "WARNING"
    assert first["logger"] == "batchpunk.test-logging"
    assert first["batch_id"] == 7
    assert first["size"] == 100
    assert first["reason"] == "failed"
    assert first["key"] == "b'k1'"  # not JSON-native: its repr
    assert first["time"].endswith("Z")
    assert "ValueError: bad payload" in second["error"]


def test_key_value_formatter_appends_fields_before_the_traceback() -> None:
    """The fields follow the message on its first line; a traceback stays below."""
    text = emit(KeyValueFormatter("%(levelname)s %(message)s"), batch_id=3, attempt=2, key="a b")
    lines = text.splitlines()
    assert lines[0] == "WARNING batch 7 failed batch_id=3 key='a b' attempt=2"
    assert lines[1] == "ERROR giving up batch_id=3 key='a b' attempt=2"
    assert lines[-1] == "ValueError: bad payload"


def test_key_value_formatter_leaves_plain_records_alone() -> None:
    """A record without batchpunk fields formats exactly as logging.Formatter would."""
    text = emit(KeyValueFormatter("%(message)s"))
    assert text.splitlines()[0] == "batch 7 failed"


def test_log_extra_refuses_unknown_fields_and_drops_none() -> None:
    """A misspelt field is a ValueError naming it; None values are left out."""
    assert log_extra(size=3, key=None) == {"size": 3}
    with pytest.raises(ValueError, match="batchid"):
        log_extra(batchid=1)
    assert set(LOG_FIELDS) == {"batch_id", "key", "priority", "size", "attempt", "reason"}
