"""Dead letters: the record of a message that ended unprocessed, and the sinks that keep them.

Every accepted message ends processed or as exactly one DeadLetter; these sinks are where the
second kind goes. A sink only has to implement ``async put(letters)``; raising from it makes
batchpunk keep the letters and retry with backoff.

Every class has one import path, this package: ``from batchpunk.deadletter import
JsonlDeadLetters``. Inside it, ``_record`` holds the record, the protocol and the in-memory sink
(what the engine needs), and ``_files`` the durable sinks, which need the codec and load on first
use so that importing the engine stays light. ``_files`` imports ``_record``, never the reverse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchpunk.deadletter._record import REASONS, DeadLetter, DeadLetterSink, MemoryDeadLetters

if TYPE_CHECKING:
    from batchpunk.deadletter._files import (
        JsonlDeadLetters,
        MalformedDeadLetter,
        SqliteDeadLetters,
        StoredError,
        letter_from_record,
        letter_record,
        open_dead_letter_file,
    )

__all__ = [
    "REASONS",
    "DeadLetter",
    "DeadLetterSink",
    "JsonlDeadLetters",
    "MalformedDeadLetter",
    "MemoryDeadLetters",
    "SqliteDeadLetters",
    "StoredError",
    "letter_from_record",
    "letter_record",
    "open_dead_letter_file",
]

_LAZY = (
    "JsonlDeadLetters",
    "SqliteDeadLetters",
    "StoredError",
    "MalformedDeadLetter",
    "letter_from_record",
    "letter_record",
    "open_dead_letter_file",
)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from batchpunk.deadletter import _files

        return getattr(_files, name)
    raise AttributeError(f"module 'batchpunk.deadletter' has no attribute {name!r}")
