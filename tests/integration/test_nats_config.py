"""NATS connector settings: bad values fail by name before anything connects; TLS and secrets."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from batchpunk.connectors.nats import NatsJetStreamSink, NatsJetStreamSource
from batchpunk.errors import ConfigError
from tests.conftest import require_server
from tests.contract.cases_nats import unique


def source(**overrides: Any) -> NatsJetStreamSource:
    args: dict[str, Any] = {
        "servers": "nats://127.0.0.1:4222",
        "stream": "ORDERS",
        "subject": "orders.>",
        "durable": "writer",
    }
    args.update(overrides)
    return NatsJetStreamSource(**args)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"servers": []}, "servers"),
        ({"servers": 4222}, "servers"),
        ({"stream": ""}, "stream"),
        ({"stream": "a.b"}, "stream/durable"),
        ({"durable": "my durable"}, "durable"),
        ({"subject": None}, "subject"),
        ({"ack_wait": 0}, "ack_wait"),
        ({"ack_wait": float("inf")}, "ack_wait"),
        ({"max_deliver": 1}, "max_deliver"),
        ({"batch": 0}, "batch"),
        ({"fetch_timeout": -1}, "fetch_timeout"),
        ({"decode": "yaml"}, "decode"),
        ({"create": "yes"}, "create"),
        ({"max_ack_pending": 0}, "max_ack_pending"),
        ({"nak_delay": -0.5}, "nak_delay"),
        ({"reconnect_attempts": -2}, "reconnect_attempts"),
        ({"tls": "on"}, "tls"),
        ({"tls": {"ca": "x"}}, "tls"),
        ({"tls": {"verify": "no"}}, "tls.verify"),
        ({"tls": {"key_file": "k.pem"}}, "tls.key_file"),
        ({"tls": {"ca_file": "/nonexistent/ca.pem"}}, "tls.ca_file"),
    ],
)
def test_bad_source_settings_fail_naming_the_field(overrides: dict[str, Any], field: str) -> None:
    """Each wrong setting raises ConfigError whose message starts with the field's name."""
    with pytest.raises(ConfigError, match=rf"^NatsJetStreamSource\.{field}"):
        source(**overrides)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"subject": "orders.*"}, "subject"),
        ({"encode": "xml"}, "encode"),
        ({"msg_id": 3}, "msg_id"),
        ({"timeout": 0}, "timeout"),
        ({"max_in_flight": 0}, "max_in_flight"),
    ],
)
def test_bad_sink_settings_fail_naming_the_field(overrides: dict[str, Any], field: str) -> None:
    """Each wrong sink setting raises ConfigError whose message starts with the field's name."""
    args: dict[str, Any] = {"servers": "nats://127.0.0.1:4222", "subject": "orders.new"}
    args.update(overrides)
    with pytest.raises(ConfigError, match=rf"^NatsJetStreamSink\.{field}"):
        NatsJetStreamSink(**args)


def test_a_secret_of_the_wrong_type_is_not_echoed() -> None:
    """A password given as a number is refused without printing it."""
    with pytest.raises(ConfigError, match="password") as caught:
        source(password=918273645)
    assert "918273645" not in str(caught.value)


def test_credentials_never_show_in_repr() -> None:
    """repr() of a source or sink masks URL credentials, whatever form they take."""
    shown = repr(source(servers="nats://alice:pw-secret@host:4222,nats://tok-secret@other:4222"))
    assert "pw-secret" not in shown
    assert "tok-secret" not in shown
    assert "host:4222" in shown
    sink = NatsJetStreamSink("nats://bob:pw-secret@host:4222", "a.b", password="x")
    assert "pw-secret" not in repr(sink)


def test_servers_accept_a_list_or_a_comma_separated_string() -> None:
    """Both spellings of several servers give the same list."""
    many = ["nats://a:4222", "nats://b:4222"]
    assert source(servers=many).servers == many
    assert source(servers="nats://a:4222, nats://b:4222").servers == many


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
    """ca_file, cert_file and key_file load into the SSLContext the client will use."""
    cert, key = certificate
    made = source(tls={"ca_file": str(cert), "cert_file": str(cert), "key_file": str(key)})
    context = made._conn.tls
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.cert_store_stats()["x509_ca"] == 1
    relaxed = source(tls={"verify": False})._conn.tls
    assert relaxed is not None
    assert relaxed.verify_mode == ssl.CERT_NONE


def test_a_wrong_key_file_is_reported_by_field(certificate: tuple[Path, Path]) -> None:
    """A key that does not load is a ConfigError naming tls.cert_file, not an ssl traceback."""
    cert, _ = certificate
    with pytest.raises(ConfigError, match=r"tls\.cert_file"):
        source(tls={"cert_file": str(cert), "key_file": str(cert)})


@pytest.mark.parametrize(
    "overrides",
    [{"tls": True}, {"servers": "tls://127.0.0.1:4222"}],
    ids=["tls-setting", "tls-scheme"],
)
async def test_tls_is_never_downgraded_to_plaintext(overrides: dict[str, Any]) -> None:
    """With TLS asked for, a server that does not require TLS is refused, not used in clear."""
    require_server("nats")
    names = {"stream": unique("S"), "subject": f"{unique('bp')}.x", "durable": unique("D")}
    made = source(connect_timeout=2.0, **names, **overrides)
    with pytest.raises(ConnectionError, match="refusing to send credentials and messages"):
        await made.start()
    await made.close()


def test_failed_pulls_back_off_on_the_shared_reconnect_delay_and_an_answer_resets_it() -> None:
    """Failed pulls wait a jittered, doubling, capped delay; a served pull starts it over."""
    src = source(fetch_timeout=1.0)
    bounds = [min(5.0, 0.1 * 2 ** (n - 1)) for n in range(1, 12)]
    delays = [src._failed_pull_delay() for _ in bounds]
    assert all(0.0 <= delay <= bound for delay, bound in zip(delays, bounds, strict=True))
    assert src._pull_failures == len(bounds)
    src._pull_reply = "inbox.1"
    src._on_status("inbox.1", "408", "Request Timeout")  # the server served the pull
    assert src._pull_failures == 0
    assert src._failed_pull_delay() <= 0.1


async def test_settlements_without_a_connection_log_one_line_for_the_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """500 acks while disconnected: one warning naming the count and the first, not 500; each
    message leaves the unsettled set (the server redelivers it after ack_wait)."""
    import logging

    from batchpunk.envelope import Envelope

    src = source()
    replies = [
        f"$JS.ACK.ORDERS.writer.1.{seq}.{seq}.1700000000000000000.0" for seq in range(1, 501)
    ]
    for reply in replies:
        src._unsettled[reply] = None
    with caplog.at_level(logging.WARNING, "batchpunk"):
        await src.ack_many([Envelope({"n": i}, receipt=r) for i, r in enumerate(replies)])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "500 settlement(s) failed (first: ack of stream sequence 1)" in warnings[0]
    assert not src._unsettled
