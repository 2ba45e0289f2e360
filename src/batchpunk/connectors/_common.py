"""What the embedded connectors share: payload errors, secret masking and a worker thread.

Kept private: users meet these through the connectors' behaviour (a non-retryable error that
names the bad payload, a URL printed without its password), not by importing them.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

from batchpunk.errors import BatchpunkError, ConfigError, PartialFailure

__all__ = [
    "PayloadError",
    "Worker",
    "check_identifier",
    "fail_payloads",
    "mask_secrets",
    "mask_url",
]

R = TypeVar("R")

_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:@/\s]*):(?P<pw>[^@/\s]*)@")
_KV_PASSWORD = re.compile(
    r"(?P<head>\b(?:password|passwd|pwd)\s*=\s*)(?P<pw>'[^']*'|\"[^\"]*\"|\S+)"
)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class PayloadError(BatchpunkError, ValueError):
    """A payload this sink can never write (a missing column, a value it cannot encode).

    ``retryable`` is False: the engine skips the retries and isolates the payload at once, so it
    ends as a dead letter carrying this message instead of costing backoff sleeps.
    """

    retryable = False


def fail_payloads(failures: Mapping[int, BaseException], size: int) -> NoReturn:
    """Raise the failure of some payloads of a batch of ``size`` in the form the engine expects.

    A batch of one raises the payload's own error (its message names the problem); a larger
    batch raises PartialFailure so that only the bad payloads go on to dead-lettering.
    """
    if size == 1 and 0 in failures:
        raise failures[0]
    raise PartialFailure(dict(failures))


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***``: safe for logs, reprs and errors."""
    return mask_secrets(url)


def mask_secrets(text: str, secrets: Any = ()) -> str:
    """``text`` with URL passwords, ``password=...`` pairs and every given secret masked."""
    text = _URL_PASSWORD.sub(r"\g<head>:***@", text)
    text = _KV_PASSWORD.sub(r"\g<head>***", text)
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, "***")
        else:  # a short value ("5", "on") is masked as a whole word, not inside other words
            text = re.sub(rf"(?<![\w]){re.escape(secret)}(?![\w])", "***", text)
    return text


def check_identifier(field: str, value: Any) -> str:
    """A SQL table or column name, refused unless it is a plain identifier (no quoting games)."""
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise ConfigError(
            f"{field}: expected a plain SQL identifier (letters, digits, _), got {value!r}"
        )
    return value


class Worker:
    """One dedicated thread for blocking I/O that must stay ordered and off the event loop.

    sqlite3 connections and append-only files want a single owner thread; a shared default
    executor would interleave writes and let a slow disk starve other users of the pool.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._executor: ThreadPoolExecutor | None = None

    async def call(self, fn: Callable[..., R], *args: Any) -> R:
        """Run ``fn(*args)`` in the thread and return its result (or raise its error)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` without waiting: for cleanup where awaiting is not possible."""
        if self._executor is not None:
            self._executor.submit(fn, *args)

    def shutdown(self) -> None:
        """Let the thread finish its queued calls and exit; safe to call twice."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
