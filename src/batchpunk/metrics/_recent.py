"""The last few dead letters, kept beside the real dead-letter sink for the status page.

The status page shows what failed most recently without reading the dead-letter store (a
file, a table, a broker queue), which may be large, remote, or write-only. ``RecentDeadLetters``
wraps any DeadLetterSink: it forwards every ``put`` and, once the sink stored the letters,
remembers the last ``keep`` of them in a ring. Letters that the sink refused are not shown:
they are not dead letters yet (the engine retries them).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from batchpunk.deadletter import DeadLetter, DeadLetterSink

__all__ = ["RecentDeadLetters", "letter_summary"]

#: Characters of a message or an error shown per letter.
PREVIEW = 300


class RecentDeadLetters:
    """A DeadLetterSink that forwards to ``sink`` and keeps the last ``keep`` stored letters.

    Other attributes (``read``, ``close``, ``letters``...) are the wrapped sink's, so it can
    stand wherever the sink stood.
    """

    def __init__(self, sink: DeadLetterSink, keep: int = 50) -> None:
        if not callable(getattr(sink, "put", None)):
            raise TypeError(f"sink: expected an object with async put(letters), got {sink!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep: expected a positive int, got {keep!r}")
        self.sink = sink
        self._recent: deque[tuple[float, DeadLetter]] = deque(maxlen=keep)

    async def put(self, letters: Sequence[DeadLetter]) -> None:
        """Store through the wrapped sink, then remember the letters (newest last)."""
        await self.sink.put(letters)
        now = time.time()
        self._recent.extend((now, letter) for letter in letters)

    def recent(self) -> list[tuple[float, DeadLetter]]:
        """(time stored, letter) pairs, newest first."""
        return list(reversed(self._recent))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sink, name)

    def __repr__(self) -> str:
        return f"RecentDeadLetters({self.sink!r}, keep={self._recent.maxlen})"


def letter_summary(
    stored: float, letter: DeadLetter, redact: Callable[[str], str]
) -> dict[str, Any]:
    """A JSON-friendly, redacted, truncated view of one letter for the status page."""

    def text(value: Any) -> str:
        shown = value if isinstance(value, str) else repr(value)
        shown = redact(shown)
        return shown if len(shown) <= PREVIEW else shown[: PREVIEW - 1] + "…"

    error = letter.error
    return {
        "stored": stored,
        "first_seen": letter.first_seen,
        "reason": letter.reason,
        "attempts": letter.attempts,
        "key": None if letter.key is None else text(letter.key),
        "error_type": letter.error_type or (type(error).__name__ if error is not None else ""),
        "error": text(str(error)) if error is not None else "",
        "message": text(letter.message),
    }
