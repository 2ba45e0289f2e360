"""The one redactor: what every error, log line, dead letter and ``validate`` output goes through.

Secrets reach text in three shapes, and each is masked as ``***`` while the host and port stay
visible (an operator must still see which server failed):

* a URL's userinfo, whatever characters the password holds (``/``, ``@``, ``:``, quotes):
  ``postgresql://app:***@db.internal:5432/orders``;
* a query parameter or ``key=value`` pair whose name looks like a credential (``password``,
  ``token``, ``secret``, ``api_key``, ``signature``, ``auth``...), also a quoted JSON or Python
  key's string value (``"token": "***"``; ``"token": null`` stays), and an ``Authorization``
  scheme's credentials (``Bearer ***``);
* a known value: every value a pipeline file took from the environment, every environment
  variable whose name looks like a credential (``PG_PASSWORD``, ``API_TOKEN``), and the values a
  connector declares (a password given as its own keyword), each also in its URL-quoted form.

Known values are masked first, longest first, so a secret inside a URL is masked even when the
URL is malformed. Connectors call ``batchpunk.connectors._common.mask_secrets`` / ``mask_url``,
which delegate here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, quote_plus

__all__ = ["MASK", "Redactor", "env_secrets", "is_secret_name", "redact", "redact_value"]

MASK = "***"

#: A name that looks like it holds a credential (environment variables, query keys, headers).
_SECRET_WORDS = (
    r"pass(?:word|wd|phrase)?|pwd|secret|token|api[_-]?key|apikey|access[_-]?key|private[_-]?key"
    r"|auth|authorization|credentials?|signature|sig|session|cookie"
)
_SECRET_NAME = re.compile(rf"(?:^|[^a-z])(?:{_SECRET_WORDS})(?:$|[^a-z])", re.IGNORECASE)

# scheme://userinfo@host: a user name (no '/', '?', '#' or '@'), then optionally ':' and a
# password that runs up to the last '@' followed by a host and a delimiter, so a password
# holding '/', '@' or ':' is masked whole, while an '@' in a path or query is not userinfo.
_URL_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)"
    r"(?P<userinfo>[^\s/?#@:\"]*(?::\S*)?)@"
    r"(?P<host>[^\s'\"<>/?#@\\,;]*)(?=[/?#\s'\"<>\\,;)\]}]|$)"
)
_PAIR = re.compile(
    rf"(?P<head>(?<![A-Za-z0-9_.\-])(?P<name>(?:[A-Za-z0-9_.\-]*[_.\-])?(?:{_SECRET_WORDS})"
    r"(?:[_.\-][A-Za-z0-9_.\-]*)?)"
    r"(?P<sep>(?P<quoted_key>[\"'])?\s*[=:]\s*))"
    # after a quoted key (JSON, a Python repr) only a string value: "token": null stays JSON
    r"(?P<value>'[^']*'|\"[^\"]*\"|(?(quoted_key)(?!)|[^\s&;,'\"}\])]+))",
    re.IGNORECASE,
)
# In a URL's query a value runs to the next '&', '#', quote or space, whatever it holds.
_QUERY = re.compile(
    rf"(?P<head>[?&;](?P<name>(?:[A-Za-z0-9_.\-]*[_.\-])?(?:{_SECRET_WORDS})"
    r"(?:[_.\-][A-Za-z0-9_.\-]*)?)=)(?P<value>[^&#\s'\"]+)",
    re.IGNORECASE,
)
_AUTH_SCHEME = re.compile(r"\b(?P<scheme>Bearer|Basic|Token|Digest)\s+(?P<cred>[^\s'\",;]+)")


def is_secret_name(name: str) -> bool:
    """True when a variable, key or header name looks like it holds a credential."""
    return bool(_SECRET_NAME.search(name)) or name.lower() in {"user_password"}


#: Variables whose names look like credentials but are not (the shell's working directory).
_NOT_SECRETS = frozenset({"PWD", "OLDPWD", "SSH_AUTH_SOCK"})


def env_secrets(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """Values of environment variables named like credentials (``*_PASSWORD``, ``*_TOKEN``...)."""
    env = os.environ if environ is None else environ
    return frozenset(
        v for k, v in env.items() if v and k.upper() not in _NOT_SECRETS and is_secret_name(k)
    )


def _variants(secret: str) -> set[str]:
    """A secret and the forms it takes in text: quoted in URLs, escaped by repr() and JSON."""
    forms = {secret, quote(secret, safe=""), quote_plus(secret, safe="")}
    forms.add(repr(secret)[1:-1])
    forms.add(json.dumps(secret)[1:-1])
    forms.add(json.dumps(secret, ensure_ascii=False)[1:-1])
    return forms


#: Schemes whose URLs carry a token as the whole userinfo (``nats://TOKEN@host``,
#: ``https://TOKEN@host``); elsewhere a userinfo without ':' is a user name and stays.
_TOKEN_SCHEMES = frozenset({"nats", "tls", "ws", "wss", "http", "https", "git", "ssh"})


def _userinfo(match: re.Match[str]) -> str:
    scheme = match.group("scheme")
    user, colon, _ = match.group("userinfo").partition(":")
    if colon:
        shown = f"{user}:{MASK}"
    elif scheme[:-3].lower() in _TOKEN_SCHEMES:
        shown = MASK
    else:
        shown = user
    return f"{scheme}{shown}@{match.group('host')}"


#: Unquoted values after a credential-named word that hold no credential: no value at all
#: (``token=None``), an error's wording (``password: expected str``), an auth scheme.
_NOT_VALUES = frozenset({"None", "null", "expected", "Bearer", "Basic", "Token", "Digest"})


def _pair(match: re.Match[str]) -> str:
    value = match.group("value")
    if value.startswith(("'", '"')) and len(value) >= 2:
        return f"{match.group('head')}{value[0]}{MASK}{value[-1]}"
    if value.startswith(MASK) or value in _NOT_VALUES:
        return match.group(0)
    start = match.start()
    if (
        start
        and match.string[start - 1] in "/\\"
        and match.group("sep")[:1] == ":"
        and (match.group("sep")[1:2].isspace())
    ):
        # "/etc/passwd: No such file": the end of a path, then a message, not a key's value
        # (a value after a path is still masked: /run/secrets/db_password=abc)
        return match.group(0)
    return f"{match.group('head')}{MASK}"


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with URL userinfo, credential-named pairs and every given secret masked."""
    known: set[str] = set()
    for secret in secrets:
        if isinstance(secret, str) and secret.strip():  # blank: masking spaces hides nothing
            known |= _variants(secret)
    for secret in sorted(known, key=len, reverse=True):
        if secret not in text:
            continue
        if len(secret) >= 4:
            text = text.replace(secret, MASK)
        else:  # a short value ("5", "on") is masked as a whole word, not inside other words
            text = re.sub(rf"(?<![\w]){re.escape(secret)}(?![\w])", MASK, text)
    text = _AUTH_SCHEME.sub(lambda m: f"{m.group('scheme')} {MASK}", text)
    text = _QUERY.sub(_pair, text)  # before userinfo: a query value may hold an '@'
    text = _PAIR.sub(_pair, text)
    if "://" in text:
        text = _URL_USERINFO.sub(_userinfo, text)
    return text


def redact_value(value: Any, secrets: Iterable[str] = ()) -> Any:
    """A JSON-like value with every string in it redacted (dict keys that name secrets too)."""
    secrets = tuple(secrets)
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, list | tuple):
        return [redact_value(v, secrets) for v in value]
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            if isinstance(key, str) and is_secret_name(key) and isinstance(item, str) and item:
                out[key] = MASK
            else:
                out[key] = redact_value(item, secrets)
        return out
    return value


class Redactor:
    """A redactor bound to a set of known secrets: a callable for text, a logging filter too.

    Attributes:
        secrets: the known values (from the environment, a pipeline file, a connector).
    """

    def __init__(self, secrets: Iterable[str] = (), *, environ: Mapping[str, str] | None = None):
        self.secrets = frozenset(s for s in secrets if s) | env_secrets(environ)

    def __call__(self, text: str) -> str:
        return redact(text, self.secrets)

    def value(self, value: Any) -> Any:
        """``redact_value`` with this redactor's secrets."""
        return redact_value(value, self.secrets)

    def with_secrets(self, more: Iterable[str]) -> Redactor:
        """A redactor that also knows ``more``."""
        joined = Redactor(())
        joined.secrets = self.secrets | frozenset(s for s in more if s)
        return joined
