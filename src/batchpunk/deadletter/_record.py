"""The dead-letter record, the sink protocol and the in-memory sink (no codec, no I/O).

The engine imports only this part of ``batchpunk.deadletter``; the durable file sinks live in
``_files`` and load on first use. Import every name from ``batchpunk.deadletter``.
"""

from __future__ import annotations

import time
import traceback as _tb
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["DeadLetter", "DeadLetterSink", "MemoryDeadLetters", "REASONS"]

#: Why a message was dead-lettered.
REASONS = ("failed", "dropped", "expired", "shutdown", "malformed", "redelivered")


@dataclass(slots=True)
class DeadLetter:
    """A message that ended unprocessed, with why and how it failed.

    Attributes:
        message: the message as it was accepted.
        key: its lane key.
        priority: its priority.
        reason: one of REASONS.
        error: the exception that finally failed it (for durable sinks read back, an exception
            whose str() is the original's).
        attempts: processor calls that included this message.
        first_seen: wall-clock time (time.time()) when its lane started waiting.
        error_type: qualified name of the error's type, kept by durable sinks.
        traceback: formatted traceback of the error, when one was raised.
        headers: source metadata (message id, delivery count) for pipelines.
    """

    message: Any
    key: Any = None
    priority: int = 0
    reason: str = "failed"
    error: BaseException | None = None
    attempts: int = 0
    first_seen: float = field(default_factory=time.time)
    error_type: str = ""
    traceback: str = ""
    headers: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.error is not None:
            if not self.error_type:
                kind = type(self.error)
                self.error_type = f"{kind.__module__}.{kind.__qualname__}".removeprefix("builtins.")
            if not self.traceback and self.error.__traceback__ is not None:
                self.traceback = "".join(_tb.format_exception(self.error))


@runtime_checkable
class DeadLetterSink(Protocol):
    """Where dead letters go. ``put`` returns only once the letters are stored."""

    async def put(self, letters: Sequence[DeadLetter]) -> None: ...


class MemoryDeadLetters:
    """Keeps letters in a list: for tests, demos, and processes that inspect them directly."""

    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    async def put(self, letters: Sequence[DeadLetter]) -> None:
        self.letters.extend(letters)

    async def read(self) -> AsyncIterator[DeadLetter]:
        """Yield every letter stored so far, oldest first."""
        for letter in list(self.letters):
            yield letter

    def __len__(self) -> int:
        return len(self.letters)

    def __repr__(self) -> str:
        return f"MemoryDeadLetters({len(self.letters)} letters)"
