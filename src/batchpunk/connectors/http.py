"""HttpSink: one POST per batch to an HTTP endpoint (httpx, the ``http`` extra).

Bulk HTTP APIs (search indexes, analytics collectors, webhooks that take arrays) are the
downstream batching pays off most for: one request instead of hundreds. The status code decides
what happens next: 2xx is success; 3xx, 401, 403, 404, 405, 407, 408, 429 and 5xx are retried
with the pipeline's backoff (and no sooner than a Retry-After header asks, up to
retry_max_delay), all but 500, 501 and 505+ as an outage (held whole, never bisected); any other
4xx is the payloads' fault and is not retried (the engine isolates the offending payload and
dead-letters it with the response body in its error).
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from batchpunk._redact import is_secret_name
from batchpunk.connectors._common import PayloadError, mask_secrets, mask_url
from batchpunk.errors import ConfigError, ConnectorError, require

__all__ = ["HttpSink", "HttpStatusError", "HttpTransportError"]

log = logging.getLogger(__name__)

_FORMATS = ("json", "frame")

#: Not the payload's fault: the credentials are refused (401, 403, 407 at a proxy), the URL or
#: the method is wrong (404, 405), the server timed out waiting for the request (408), is rate
#: limiting (429), or is overloaded or gone (502-504). Each hits every payload alike: retried,
#: and held as an outage (bounded by delivery_timeout), never bisected into dead letters.
_OUTAGE_STATUSES = frozenset({401, 403, 404, 405, 407, 408, 429, 502, 503, 504})


class HttpStatusError(ConnectorError):
    """The endpoint answered with a status that is not a success.

    Attributes:
        status: the HTTP status code.
        body: the start of the response body (what the server said was wrong).
        retryable: True for 3xx, 401, 403, 404, 405, 407, 408, 429 and 5xx (worth another
            try), False for other 4xx (400, 409, 413, 422, ...: the request's content).
        unavailable: True for 3xx, 401, 403, 404, 405, 407, 408, 429, 502, 503 and 504 (an
            outage, not a bad payload: a redirect, refused credentials, a missing endpoint or a
            refused method mean the configuration or the server needs fixing; no payload is at
            fault).
        retry_after: the seconds the server's Retry-After header asked for (delta-seconds or
            an HTTP date), None without one or when it cannot be read.
    """

    def __init__(
        self, message: str, *, status: int, body: str, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        #: The server's Retry-After in seconds, if it sent one: the engine waits at least this
        #: long (up to retry_max_delay) before the next attempt (retry.retry_after).
        self.retry_after = retry_after
        # A redirect is the endpoint's or the configuration's doing, never a payload's: held
        # as an outage (the operator sees the URL to fix), not bisected into dead letters.
        redirect = 300 <= status < 400
        self.retryable = status in _OUTAGE_STATUSES or status >= 500 or redirect
        self.unavailable = status in _OUTAGE_STATUSES or redirect


class HttpTransportError(ConnectorError, ConnectionError):
    """The request did not get an answer (connection refused, timeout, TLS failure); retryable."""

    retryable = True
    unavailable = True


class HttpSink:
    """POSTs each batch as a JSON array (or a batchpunk frame) and checks the answer.

    Choose it to feed an HTTP bulk API. Credentials belong in ``headers`` (``Authorization``)
    or the URL's userinfo, both filled from environment variables in a pipeline file; neither
    appears in errors or logs.

    Args:
        url: the endpoint.
        method: "POST" (default) or "PUT".
        headers: extra request headers.
        timeout: seconds for the whole request.
        format: "json" (a JSON array, ``application/json``) or "frame" (the batch encoded with
            the pipeline's codec settings, ``application/x-batchpunk-frame``).
        verify: verify the server's TLS certificate (True), a CA bundle path, or False.
        results: read a JSON array of one result per payload from a 2xx answer and return it.
            A 2xx whose body is not such an array (not JSON, not an array, another length)
            still means delivered: the batch completes without results and an error is
            logged. Per-item statuses inside a 2xx (Elasticsearch's bulk ``items``) are not
            parsed.
        max_error_body: characters of the response body kept in an error.
    """

    def __init__(
        self,
        url: str,
        *,
        method: str = "POST",
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        format: str = "json",
        verify: bool | str = True,
        results: bool = False,
        max_error_body: int = 500,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"url: expected an http:// or https:// URL, got {mask_url(str(url))!r}"
            )
        method = str(method).upper()
        if method not in ("POST", "PUT"):
            raise ConfigError(f"method: expected 'POST' or 'PUT', got {method!r}")
        if format not in _FORMATS:
            raise ConfigError(f"format: expected one of {_FORMATS}, got {format!r}")
        if not isinstance(timeout, int | float) or timeout <= 0:
            raise ConfigError(f"timeout: expected seconds > 0, got {timeout!r}")
        self.url = url
        self.method = method
        self.headers = dict(headers or {})
        self.timeout = float(timeout)
        self.format = format
        self.verify = verify
        self.results = results
        self.max_error_body = max_error_body
        self._client: Any = None
        self._closed = False
        self._secrets = _header_secrets(self.headers) + _url_secrets(url)

    def _http_client(self) -> Any:
        if self._client is None:
            httpx = require("httpx", "http", "HttpSink")
            self._client = httpx.AsyncClient(timeout=self.timeout, verify=self.verify)
        return self._client

    def _body(self, batch: Sequence[Any]) -> tuple[bytes, str]:
        if self.format == "frame":
            encode = getattr(batch, "encode", None)
            if callable(encode):
                data = encode()
            else:
                from batchpunk.codec import encode_batch

                data = encode_batch(list(batch))
            return bytes(data), "application/x-batchpunk-frame"
        try:
            data = json.dumps(list(batch), ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise PayloadError(f"batch is not JSON-serializable: {exc}") from None
        return data.encode("utf-8"), "application/json"

    def _error_body(self, response: Any) -> str:
        """The start of the response body, with every secret (echoed by the server) masked.

        Masked before it is cut, so a secret straddling ``max_error_body`` leaves no prefix.
        """
        longest = max((len(s) for s in self._secrets), default=0)
        # room for a secret's longest written form (percent-encoded UTF-8: 12 chars a char)
        window = response.text[: self.max_error_body + 12 * longest]
        return mask_secrets(window, self._secrets)[: self.max_error_body]

    async def write(self, batch: Sequence[Any]) -> Sequence[Any] | None:
        """Send the batch in one request; None, or the server's results when ``results``."""
        if self._closed:
            raise ConfigError(f"HttpSink({mask_url(self.url)!r}) is closed")
        httpx = require("httpx", "http", "HttpSink")
        body, content_type = self._body(batch)
        client = self._http_client()
        headers = {"content-type": content_type, **self.headers}
        where = f"{self.method} {mask_url(self.url)}"
        try:
            # httpx's timeout bounds each read, not the request: a server trickling its answer
            # held a write for as long as it liked.
            async with asyncio.timeout(self.timeout):
                response = await client.request(
                    self.method, self.url, content=body, headers=headers
                )
        except TimeoutError:
            raise HttpTransportError(
                f"{where}: no complete answer within timeout={self.timeout}s"
            ) from None
        except httpx.HTTPError as exc:
            detail = mask_secrets(str(exc) or type(exc).__name__, self._secrets)
            raise HttpTransportError(f"{where}: {type(exc).__name__}: {detail}") from None
        if response.status_code >= 300:
            text = self._error_body(response)
            reason = response.reason_phrase or ""
            raise HttpStatusError(
                f"{where} answered {response.status_code} {reason}: {text}".rstrip(": "),
                status=response.status_code,
                body=text,
                retry_after=_retry_after(response.headers.get("retry-after")),
            )
        if not self.results:
            return None
        return self._results(response, len(batch), where)

    def _results(self, response: Any, size: int, where: str) -> list[Any] | None:
        """The 2xx answer's JSON array of one result per payload, or None (logged) without one.

        A 2xx says the payloads were delivered: an answer that is not such an array never
        fails the batch, which would send the delivered payloads again.
        """
        try:
            out = response.json()
        except ValueError:
            problem = "is not JSON"
        else:
            if not isinstance(out, list):
                problem = f"is a {type(out).__name__}, not an array"
            elif len(out) != size:
                problem = f"holds {len(out)} results for {size} payloads"
            else:
                return out
        log.error(
            "HttpSink: %s answered %d, so the batch of %d is delivered, but its body %s: "
            "results = true expects a JSON array of one result per payload; the batch "
            "completes without results. Body: %s",
            where,
            response.status_code,
            size,
            problem,
            self._error_body(response),
        )
        return None

    async def close(self) -> None:
        """Close the connection pool; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def __repr__(self) -> str:
        return f"HttpSink({mask_url(self.url)!r}, format={self.format!r})"


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (RFC 9110: delta-seconds or an HTTP date), else None.

    An unreadable value is ignored rather than failing the write: the backoff still applies.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²".isdigit() is True, float("²") raises
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT; a zone-less one is read as such
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


def _url_secrets(url: str) -> tuple[str, ...]:
    """The password of the URL's userinfo, as written and decoded (a server may echo it)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return ()
    if not password:
        return ()
    return tuple(dict.fromkeys((password, unquote(password))))


def _header_secrets(headers: Mapping[str, str]) -> tuple[str, ...]:
    """Every header value, and the credential alone of a credential header (``Bearer x``: ``x``).

    A server that rejects a token often echoes the token without its scheme word, so the whole
    value alone would not be found in the answer.
    """
    secrets: list[str] = []
    for name, value in headers.items():
        if not value:
            continue
        secrets.append(value)
        if is_secret_name(name):
            credential = value.split(None, 1)[-1].strip()
            if credential != value:
                secrets.append(credential)
    return tuple(secrets)
