"""Shared test helpers: real servers on localhost, skipped with a reason unless CI=true."""

from __future__ import annotations

import os
import socket

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"

SERVERS = {
    "rabbitmq": ("127.0.0.1", 5672),
    "redis": ("127.0.0.1", 6379),
    "nats": ("127.0.0.1", 4222),
    "postgres": ("127.0.0.1", 5432),
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


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print how many generated cases the hostile-input suite ran (tests/hostile_support.py)."""
    import sys

    support = sys.modules.get("tests.hostile_support")
    counts = getattr(support, "COUNTS", None)
    if counts:
        parts = ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))
        terminalreporter.write_line(
            f"hostile inputs: {sum(counts.values())} generated cases ({parts})"
        )
