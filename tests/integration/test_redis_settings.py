"""Redis Streams connector settings: checked when built, secrets masked (no server needed)."""

from __future__ import annotations

from typing import Any

import pytest

from batchpunk.connectors.redis_streams import (
    RedisStreamSink,
    RedisStreamSource,
    _client_kwargs,
)
from batchpunk.errors import ConfigError

URL = "redis://127.0.0.1:6379"


def source(**options: Any) -> RedisStreamSource:
    return RedisStreamSource(URL, "s", "g", "c", **options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"claim_idle": 0}, r"RedisStreamSource\.claim_idle: expected a number of seconds > 0"),
        ({"claim_idle": "60"}, r"claim_idle: expected a number of seconds"),
        ({"block": -1.0}, r"RedisStreamSource\.block: expected a number of seconds > 0"),
        ({"max_deliveries": 0}, r"RedisStreamSource\.max_deliveries: expected an integer >= 1"),
        ({"count": True}, r"RedisStreamSource\.count: expected an integer >= 1"),
        ({"decode": "yaml"}, r"RedisStreamSource\.decode: expected one of"),
        ({"field": ""}, r"RedisStreamSource\.field: expected a non-empty string"),
        ({"create_group": "yes"}, r"RedisStreamSource\.create_group: expected true or false"),
        ({"tls": {"cafile": "x"}}, r"RedisStreamSource\.tls\.cafile: unknown setting"),
        ({"tls": {"verify": "no"}}, r"RedisStreamSource\.tls\.verify: expected true or false"),
        ({"tls": "on"}, r"RedisStreamSource\.tls: expected true, false or a table"),
    ],
)
def test_bad_source_settings_fail_at_construction_naming_the_field(
    options: dict[str, Any], message: str
) -> None:
    """Each wrong source setting raises ConfigError naming the setting and what was expected."""
    with pytest.raises(ConfigError, match=message):
        source(**options)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "http://h:6379", "stream": "s"}, r"RedisStreamSink\.url: expected a redis://"),
        ({"url": URL, "stream": ""}, r"RedisStreamSink\.stream: expected a non-empty string"),
        ({"url": URL, "stream": "s", "maxlen": 0}, r"RedisStreamSink\.maxlen: expected an int"),
        ({"url": URL, "stream": "s", "encode": "xml"}, r"RedisStreamSink\.encode: expected one"),
    ],
)
def test_bad_sink_settings_fail_at_construction_naming_the_field(
    kwargs: dict[str, Any], message: str
) -> None:
    """Each wrong sink setting raises ConfigError naming the setting and what was expected."""
    with pytest.raises(ConfigError, match=message):
        RedisStreamSink(**kwargs)


def test_a_bad_url_error_never_shows_the_password() -> None:
    """A URL with the wrong scheme is refused with its password masked."""
    with pytest.raises(ConfigError) as failure:
        RedisStreamSource("http://user:hunter2@h:6379", "s", "g", "c")
    assert "hunter2" not in str(failure.value)
    assert "user:***@h:6379" in str(failure.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://app:topsecret@h:6379", "redis://app:***@h:6379"),
        ("rediss://:topsecret@h:6380/2", "rediss://:***@h:6380/2"),
        ("unix:///tmp/r.sock?db=1&password=topsecret", "unix:///tmp/r.sock?db=1&password=***"),
    ],
)
def test_repr_masks_the_password(url: str, shown: str) -> None:
    """Source and sink reprs, which end up in logs, show the URL without its password."""
    for connector in (RedisStreamSource(url, "s", "g", "c"), RedisStreamSink(url, "s")):
        assert "topsecret" not in repr(connector)
        assert f"url={shown!r}" in repr(connector)


def test_tls_settings_become_redis_ssl_options_on_a_plain_url() -> None:
    """tls on a redis:// URL switches to an SSL connection with the mapped certificate options."""
    from redis.asyncio.connection import SSLConnection

    kwargs = _client_kwargs(
        "RedisStreamSource",
        URL,
        {"ca_file": "/ca.pem", "cert_file": "/c.pem", "key_file": "/k.pem", "verify": False},
    )
    assert kwargs == {
        "ssl_ca_certs": "/ca.pem",
        "ssl_certfile": "/c.pem",
        "ssl_keyfile": "/k.pem",
        "ssl_cert_reqs": "none",
        "connection_class": SSLConnection,
    }


def test_tls_follows_the_url_scheme_unless_contradicted() -> None:
    """rediss:// needs no tls setting; tls=false with rediss:// or tls on unix:// is refused."""
    assert _client_kwargs("RedisStreamSink", "rediss://h:6380", None) == {}
    with pytest.raises(ConfigError, match=r"tls: false contradicts the rediss:// URL"):
        _client_kwargs("RedisStreamSink", "rediss://h:6380", False)
    with pytest.raises(ConfigError, match=r"tls: TLS does not apply to a unix://"):
        _client_kwargs("RedisStreamSink", "unix:///tmp/r.sock", True)
