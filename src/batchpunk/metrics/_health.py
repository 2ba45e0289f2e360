"""Liveness and readiness, decided from the stats alone: a pure function any server can route to.

Kubernetes' two questions: is the process alive (``/healthz``: it answers at all), and should it
get work (``/readyz``). A worker whose downstream is out, whose circuit is open or whose source is
disconnected cannot deliver: it is not ready, but restarting it would not bring the database
back, so only readiness fails.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["liveness", "readiness"]


def liveness(stats: Mapping[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """200 while the process serves; the state is included for a human reading it."""
    body: dict[str, Any] = {"status": "alive"}
    if stats is not None and "state" in stats:
        body["state"] = stats["state"]
    return 200, body


def readiness(stats: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    """(status code, JSON body): 503 with the reasons while the pipeline cannot deliver, else 200.

    Not ready while ``downstream.state`` is "unavailable", the circuit is "open", or
    ``pipeline.source_connected`` is False (docs/observability.md). Missing keys count
    as healthy, so a bare BatchProcessor's stats work as well as a pipeline's.
    """
    reasons: list[str] = []
    downstream = stats.get("downstream") or {}
    if downstream.get("state") == "unavailable":
        since = downstream.get("since")
        held = downstream.get("held", 0)
        reasons.append(
            f"downstream unavailable since {since:.3f} (unix time), {held} message(s) held"
            if isinstance(since, int | float)
            else f"downstream unavailable, {held} message(s) held"
        )
    if stats.get("circuit") == "open":
        reasons.append("circuit breaker open")
    pipeline = stats.get("pipeline") or {}
    if pipeline.get("source_connected") is False:
        reasons.append("source disconnected")
    body: dict[str, Any] = {
        "status": "unavailable" if reasons else "ready",
        "reasons": reasons,
        "downstream": downstream.get("state", "available"),
        "circuit": stats.get("circuit", "closed"),
    }
    if "source_connected" in pipeline:
        body["source_connected"] = pipeline["source_connected"]
    return (503 if reasons else 200), body


def downstream_line(stats: Mapping[str, Any], now: float | None = None) -> str:
    """A short status for the live view and summary lines: "" while the downstream answers."""
    import time

    downstream = stats.get("downstream") or {}
    if downstream.get("state") != "unavailable":
        return ""
    since = downstream.get("since")
    length = ""
    if isinstance(since, int | float):
        length = f" for {max(0.0, (time.time() if now is None else now) - since):.0f}s"
    return (
        f"downstream UNAVAILABLE{length}: {int(downstream.get('held') or 0):,} held, "
        f"{int(downstream.get('probes') or 0)} probe(s)"
    )
