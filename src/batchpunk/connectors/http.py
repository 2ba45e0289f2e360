"""HttpSink: one POST per batch to an HTTP endpoint (httpx, the ``http`` extra).

Bulk HTTP APIs (search indexes, analytics collectors, webhooks that take arrays) are the
downstream batching pays off most for: one request instead of hundreds. The status code decides
what happens next: 2xx is success, 429 and 5xx are retried with the pipeline's backoff, any other
4xx is the payloads' fault and is not retried (the engine isolates the offending payload and
dead-letters it with the response body in its error).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from batchpunk.connectors._common import PayloadError, mask_secrets, mask_url
from batchpunk.errors import ConfigError, ConnectorError, require

__all__ = ["HttpSink", "HttpStatusError", "HttpTransportError"]

_FORMATS = ("json", "frame")


class HttpStatusError(ConnectorError):
    """The endpoint answered with a status that is not a success.

    Attributes:
        status: the HTTP status code.
        body: the start of the response body (what the server said was wrong).
        retryable: True for 429 and 5xx (worth another try), False for other 4xx.
    """

    def __init__(self, message: str, *, status: int, body: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        self.retryable = status == 429 or status >= 500
        self.unavailable = status in (429, 502, 503, 504)  # overloaded or gone: an outage


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
        self._secrets = tuple(v for v in self.headers.values() if v)

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
            response = await client.request(self.method, self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            detail = mask_secrets(str(exc) or type(exc).__name__, self._secrets)
            raise HttpTransportError(f"{where}: {type(exc).__name__}: {detail}") from None
        if response.status_code >= 300:
            text = mask_secrets(response.text[: self.max_error_body], self._secrets)
            reason = response.reason_phrase or ""
            raise HttpStatusError(
                f"{where} answered {response.status_code} {reason}: {text}".rstrip(": "),
                status=response.status_code,
                body=text,
            )
        if not self.results:
            return None
        try:
            out = response.json()
        except ValueError:
            raise HttpStatusError(
                f"{where} answered {response.status_code} without the JSON array of results "
                "that results = true expects",
                status=response.status_code,
                body=response.text[: self.max_error_body],
            ) from None
        if not isinstance(out, list):
            raise HttpStatusError(
                f"{where} answered a {type(out).__name__}, expected a JSON array of results",
                status=response.status_code,
                body=response.text[: self.max_error_body],
            )
        return out

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
