"""What the embedded connectors share: payload errors, secret masking and a worker thread.

Kept private: users meet these through the connectors' behaviour (a non-retryable error that
names the bad payload, a URL printed without its password), not by importing them.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

from batchpunk._identifiers import SQL_KEYWORDS
from batchpunk._redact import redact
from batchpunk.errors import ConfigError, ConnectorError, PartialFailure

__all__ = [
    "TLS_KEYS",
    "tls_context",
    "PayloadError",
    "Worker",
    "check_identifier",
    "fail_payloads",
    "mask_secrets",
    "mask_url",
]

R = TypeVar("R")

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class PayloadError(ConnectorError, ValueError):
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
    """The URL with its userinfo masked (host and port kept): safe for logs, reprs and errors."""
    return redact(url)


def mask_secrets(text: str, secrets: Any = ()) -> str:
    """``text`` through the one redactor (``batchpunk._redact``), with ``secrets`` known too."""
    return redact(text, secrets or ())


def check_identifier(field: str, value: Any) -> str:
    """A SQL table or column name, refused unless it is a plain identifier (no quoting games)."""
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise ConfigError(
            f"{field}: expected a plain SQL identifier (letters, digits, _), got {value!r}"
        )
    if value.lower() in SQL_KEYWORDS:
        raise ConfigError(f"{field}: {value!r} is an SQL keyword; choose another name")
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


TLS_KEYS = ("ca_file", "cert_file", "key_file", "verify")
TLS_ALIASES = {"cafile": "ca_file", "certfile": "cert_file", "keyfile": "key_file"}


def tls_context(tls: Any, where: str) -> ssl.SSLContext | None:
    """An SSLContext from one, or from a table of PEM paths; a wrong key or file names itself.

    ``tls`` is None/False (no TLS), True (the system's trust store), an SSLContext, or a table
    with ca_file, cert_file, key_file and verify; the ssl module's spellings (cafile, certfile,
    keyfile) are accepted too. Every broker connector builds its context here, so one pipeline
    file spells TLS the same way for each.
    """
    if tls is None or tls is False or isinstance(tls, ssl.SSLContext):
        return tls or None
    if tls is True:
        return ssl.create_default_context()
    if not isinstance(tls, Mapping):
        raise ConfigError(
            f"{where}.tls: expected true, an ssl.SSLContext or a table with "
            f"{', '.join(TLS_KEYS)}, got {type(tls).__name__}"
        )
    settings: dict[str, Any] = {}
    for key, value in tls.items():
        name = TLS_ALIASES.get(key, key)
        if name not in TLS_KEYS:
            raise ConfigError(
                f"{where}.tls: unknown key {key!r}; expected some of {', '.join(TLS_KEYS)}"
            )
        if name in settings:
            raise ConfigError(f"{where}.tls.{name}: given twice (as {name} and {key})")
        if name == "verify":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.tls.verify: expected true or false, got {value!r}")
        elif not isinstance(value, str) or not value:
            raise ConfigError(f"{where}.tls.{name}: expected a file path, got {value!r}")
        settings[name] = value
    if "key_file" in settings and "cert_file" not in settings:
        raise ConfigError(f"{where}.tls.key_file: needs tls.cert_file as well")
    try:
        context = ssl.create_default_context(cafile=settings.get("ca_file"))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{where}.tls.ca_file: cannot load {settings.get('ca_file')!r}: {exc}"
        ) from None
    if "cert_file" in settings:
        try:
            context.load_cert_chain(settings["cert_file"], settings.get("key_file"))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"{where}.tls.cert_file: cannot load {settings['cert_file']!r} "
                f"(with key_file {settings.get('key_file')!r}): {exc}"
            ) from None
    if settings.get("verify") is False:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
