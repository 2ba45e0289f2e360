"""Liveness and readiness from a stats dict: what /healthz and /readyz answer (contract 4).

A worker is *ready* when sending it messages helps: its downstream is reachable, its circuit
is not open and its source is connected. An orchestrator that sees 503 on /readyz stops routing
to it (or pages someone) without restarting it; /healthz stays 200 while the process serves,
because restarting a worker whose database is down only loses its place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["readiness"]


def readiness(stats: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    """HTTP status and JSON body for /readyz: 503 naming every reason not to be ready, else 200.

    Reads ``downstream.state``, ``circuit`` and ``pipeline.source_connected``; a field the
    engine does not report counts as fine, so a bare BatchProcessor is ready while it runs.
    """
    reasons: list[str] = []
    downstream = stats.get("downstream")
    if isinstance(downstream, Mapping) and downstream.get("state") == "unavailable":
        reasons.append("downstream unavailable")
    circuit = stats.get("circuit")
    if circuit == "open":
        reasons.append("circuit open")
    pipeline = stats.get("pipeline")
    if isinstance(pipeline, Mapping) and pipeline.get("source_connected") is False:
        reasons.append("source disconnected")
    state = stats.get("state")
    body: dict[str, Any] = {
        "ready": not reasons,
        "reason": "; ".join(reasons) if reasons else "ok",
        "state": state,
        "circuit": circuit,
    }
    if isinstance(downstream, Mapping):
        body["downstream"] = downstream.get("state")
    return (503 if reasons else 200), body
