"""RabbitMQ connector settings: bad values fail by name before anything connects; TLS, secrets."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from batchpunk.config import BatchConfig, BatchTrigger
from batchpunk.connectors.rabbitmq import (
    RabbitMQError,
    RabbitMQSink,
    RabbitMQSource,
    mask_url,
)
from batchpunk.errors import ConfigError
from tests.conftest import require_server

URL = "amqp://guest:guest@127.0.0.1:5672/"


def source(**overrides: Any) -> RabbitMQSource:
    args: dict[str, Any] = {"url": URL, "queue": "orders"}
    args.update(overrides)
    return RabbitMQSource(**args)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"url": "http://host/"}, "url"),
        ({"url": None}, "url"),
        ({"queue": ""}, "queue"),
        ({"prefetch": 0}, "prefetch"),
        ({"prefetch": 70000}, "prefetch"),
        ({"prefetch": True}, "prefetch"),
        ({"declare": "yes"}, "declare"),
        ({"quorum": True, "durable": False}, "durable"),
        ({"max_deliveries": 0}, "max_deliveries"),
        ({"max_deliveries": 3}, "max_deliveries"),
        (
            {"max_deliveries": 5, "quorum": True, "queue_arguments": {"x-delivery-limit": 4}},
            "max_deliveries",
        ),
        (
            {"max_deliveries": 4, "quorum": True, "queue_arguments": {"x-delivery-limit": 4}},
            "max_deliveries",
        ),
        ({"decode": "yaml"}, "decode"),
        ({"close_timeout": 0}, "close_timeout"),
        ({"reconnect_interval": -1}, "reconnect_interval"),
        ({"tls": "on"}, "tls"),
        ({"tls": {"ca": "x"}}, "tls"),
        ({"tls": {"verify": "no"}}, "tls.verify"),
        ({"tls": {"key_file": "k.pem"}}, "tls.key_file"),
        ({"tls": {"cafile": "a.pem", "ca_file": "a.pem"}}, "tls.ca_file"),
        ({"tls": {"ca_file": "/nonexistent/ca.pem"}}, "tls.ca_file"),
    ],
)
def test_bad_source_settings_fail_naming_the_field(overrides: dict[str, Any], field: str) -> None:
    """Each wrong setting raises ConfigError whose message starts with the field's name."""
    with pytest.raises(ConfigError, match=rf"^RabbitMQSource\.{field}"):
        source(**overrides)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"mode": "batch"}, "mode"),
        ({"exchange": None}, "exchange"),
        ({"routing_key": 5}, "routing_key"),
        ({"exchange_type": "fan"}, "exchange_type"),
        ({"queue": ""}, "queue"),
        ({"compression": "brotli"}, "compression"),
        ({"compression": "none", "level": 3}, "level"),
    ],
)
def test_bad_sink_settings_fail_naming_the_field(overrides: dict[str, Any], field: str) -> None:
    """Each wrong sink setting raises ConfigError whose message starts with the field's name."""
    args: dict[str, Any] = {"url": URL, "exchange": "events", "routing_key": "new"}
    args.update(overrides)
    with pytest.raises(ConfigError, match=rf"^RabbitMQSink\.{field}"):
        RabbitMQSink(**args)


async def test_prepare_fits_the_prefetch_to_running_and_filling_batches() -> None:
    """Without a given prefetch, prepare() allows every running batch plus one filling."""
    made = source()
    await made.prepare(BatchConfig(max_size=500, max_concurrent_batches=4))
    assert made.prefetch == 500 * 5
    serial = source()
    await serial.prepare(BatchConfig(max_size=500, enable_parallel_processing=False))
    assert serial.prefetch == 1000
    huge = source()
    await huge.prepare(BatchConfig(max_size=20_000, trigger=BatchTrigger.BOTH))
    assert huge.prefetch == 65535


async def test_a_prefetch_below_max_size_is_refused_when_batches_wait_to_fill() -> None:
    """Under SIZE or ALL a prefetch under max_size would deadlock: prepare() says so by name."""
    for trigger in (BatchTrigger.SIZE, BatchTrigger.ALL):
        with pytest.raises(ConfigError, match=r"^source\.prefetch: 100 is below batch\.max_size"):
            await source(prefetch=100).prepare(BatchConfig(max_size=500, trigger=trigger))
    with pytest.raises(ConfigError, match=r"^batch\.max_size"):
        await source().prepare(BatchConfig(max_size=70_000, trigger=BatchTrigger.SIZE))


async def test_a_small_prefetch_under_a_time_trigger_only_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With a time trigger a small prefetch only shrinks batches: a warning, and it is kept."""
    made = source(prefetch=100)
    await made.prepare(BatchConfig(max_size=500, trigger=BatchTrigger.BOTH))
    assert made.prefetch == 100
    assert "prefetch 100 is below" in caplog.text


def test_mask_url_hides_only_the_password() -> None:
    """The password becomes *** while user, host, port and vhost stay readable."""
    assert mask_url("amqp://app:s3cr%40t@broker:5672/prod") == "amqp://app:***@broker:5672/prod"
    assert mask_url("amqp://broker/") == "amqp://broker/"


def test_credentials_never_show_in_repr_or_errors() -> None:
    """repr() and a refused URL both mask the password."""
    made = source(url="amqp://app:pw-secret@broker:5672/")
    assert "pw-secret" not in repr(made)
    assert "broker:5672" in repr(made)
    sink = RabbitMQSink("amqp://app:pw-secret@broker/", "x", "y")
    assert "pw-secret" not in repr(sink)
    with pytest.raises(ConfigError) as caught:
        source(url="amqpx://app:pw-secret@broker/")
    assert "pw-secret" not in str(caught.value)


async def test_an_unreachable_broker_fails_with_the_password_masked() -> None:
    """Connecting to a closed port raises RabbitMQError naming the masked URL."""
    made = source(url="amqp://guest:pw-secret@127.0.0.1:1/")
    with pytest.raises(RabbitMQError, match=r"amqp://guest:\*\*\*@127\.0\.0\.1:1/") as caught:
        await made.start()
    assert "pw-secret" not in str(caught.value)
    await made.close()


async def test_a_wrong_password_fails_with_the_password_masked() -> None:
    """The broker refusing credentials gives RabbitMQError without the password in it."""
    require_server("rabbitmq")
    made = source(url="amqp://guest:wrong-pw-123@127.0.0.1:5672/")
    with pytest.raises(RabbitMQError) as caught:
        await made.start()
    assert "wrong-pw-123" not in str(caught.value)
    assert "***" in str(caught.value)
    await made.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and key made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_tls_files_build_a_client_context(certificate: tuple[Path, Path]) -> None:
    """ca_file, cert_file and key_file (or cafile, certfile, keyfile) load into one context."""
    cert, key = certificate
    for names in (("ca_file", "cert_file", "key_file"), ("cafile", "certfile", "keyfile")):
        made = source(tls=dict(zip(names, (str(cert), str(cert), str(key)), strict=True)))
        context = made._context
        assert isinstance(context, ssl.SSLContext)
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.cert_store_stats()["x509_ca"] == 1
    relaxed = source(tls={"verify": False})._context
    assert relaxed is not None
    assert relaxed.verify_mode == ssl.CERT_NONE


def test_a_wrong_key_file_is_reported_by_field(certificate: tuple[Path, Path]) -> None:
    """A key that does not load is a ConfigError naming tls.cert_file, not an ssl traceback."""
    cert, _ = certificate
    with pytest.raises(ConfigError, match=r"tls\.cert_file"):
        source(tls={"cert_file": str(cert), "key_file": str(cert)})


async def test_a_tls_context_is_used_even_on_an_amqp_url() -> None:
    """Given TLS settings, the connector speaks TLS: the plaintext port fails the handshake."""
    require_server("rabbitmq")
    url = "amqp://guest:pw-secret@127.0.0.1:5672/"
    made = source(url=url, tls=ssl.create_default_context())
    with pytest.raises(RabbitMQError, match=r"amqps://guest:\*\*\*@") as caught:
        await made.start()
    assert "pw-secret" not in str(caught.value)
    await made.close()
    sink = RabbitMQSink(url, "", "dead", mode="items", tls={"verify": False})
    with pytest.raises(RabbitMQError, match=r"amqps://guest:\*\*\*@") as caught:
        await sink.write([{"id": 1}])
    assert "pw-secret" not in str(caught.value)
    await sink.close()
