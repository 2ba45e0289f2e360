"""Structured logging: the fields batchpunk puts on its records, and two formatters that show them.

batchpunk logs on the stdlib logger "batchpunk" and attaches context in ``extra``: the names in
:data:`LOG_FIELDS`. Nothing is logged per message above DEBUG. The standard formatters drop
``extra`` fields, so pick one of these to see them: :class:`JsonFormatter` for log shippers (one
JSON object per line), :class:`KeyValueFormatter` for humans (``... batch_id=42 size=1000``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["LOG_FIELDS", "JsonFormatter", "KeyValueFormatter", "log_extra"]

#: Context fields batchpunk records may carry, in the order formatters print them.
LOG_FIELDS = ("batch_id", "key", "priority", "size", "attempt", "reason")


def log_extra(**fields: Any) -> dict[str, Any]:
    """An ``extra`` dict of the batchpunk fields given, refusing names no formatter prints.

    ``log.warning("batch failed", extra=log_extra(batch_id=7, attempt=2))``; a misspelt field
    raises ValueError at once instead of vanishing from the logs.
    """
    unknown = set(fields) - set(LOG_FIELDS)
    if unknown:
        raise ValueError(
            f"log_extra: unknown field(s) {sorted(unknown)}; expected some of {list(LOG_FIELDS)}"
        )
    return {name: value for name, value in fields.items() if value is not None}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in LOG_FIELDS if hasattr(record, name)}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the batchpunk fields, error.

    Choose it when logs go to a shipper (Loki, Elasticsearch, CloudWatch) that indexes fields.
    Values JSON cannot hold (a key that is bytes, say) are written as their repr. ``context``
    holds fields put on every line, such as the pipeline's name (``batchpunk run`` sets
    ``pipeline``), so lines of several workers in one log stay apart.
    """

    def __init__(
        self,
        fmt: str | None = None,
        datefmt: str | None = None,
        *,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(fmt, datefmt)
        self.context = dict(context or {})

    def format(self, record: logging.LogRecord) -> str:
        """The record as a single line of JSON."""
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(self.context)
        out.update(_fields(record))
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=repr, ensure_ascii=False)


class KeyValueFormatter(logging.Formatter):
    """The usual formatted line followed by ``name=value`` for each batchpunk field present.

    Choose it for a terminal or a plain log file; ``fmt`` and ``datefmt`` work as in
    logging.Formatter.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The standard line, then the fields; an exception's traceback stays last."""
        fields = _fields(record)
        line = super().format(record)
        if not fields:
            return line
        pairs = " ".join(
            f"{name}={value!r}" if isinstance(value, str) and " " in value else f"{name}={value}"
            for name, value in fields.items()
        )
        head, newline, rest = line.partition("\n")
        return f"{head} {pairs}{newline}{rest}"
