"""The Grafana dashboard and docs/observability.md stay in step with the exported metrics."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batchpunk.metrics import OTEL_METRICS, PROMETHEUS_METRICS

DOCS = Path(__file__).resolve().parent.parent / "docs"


def exported_series(namespace: str = "batchpunk") -> set[str]:
    """Every series name PrometheusMetrics exports, suffixes included."""
    names: set[str] = set()
    for kind, exported, _, _, _ in PROMETHEUS_METRICS.values():
        base = f"{namespace}_{exported}"
        if kind == "counter":
            names.add(f"{base}_total")
        elif kind == "histogram":
            names.update({f"{base}_bucket", f"{base}_sum", f"{base}_count"})
        else:
            names.add(base)
    return names


def expressions(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    """(panel title, expr) of every target, rows' nested panels included."""
    for panel in panels:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
        yield from expressions(panel.get("panels", []))


def test_every_dashboard_expression_names_only_exported_metrics() -> None:
    """Each expr of the dashboard mentions at least one metric, and only ones we export."""
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exported = exported_series()
    seen: set[str] = set()
    count = 0
    for title, expr in expressions(dashboard["panels"]):
        count += 1
        names = set(re.findall(r"\bbatchpunk_[a-z_]+", expr))
        assert names, f"panel {title!r}: expr names no batchpunk metric: {expr}"
        assert names <= exported, f"panel {title!r}: unknown {sorted(names - exported)}"
        seen |= names
    assert count >= 15
    plotted = {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in seen}
    every = {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in exported}
    assert plotted == every, f"not plotted: {sorted(every - plotted)}"


def test_dashboard_is_importable_shape() -> None:
    """The dashboard has a title, a uid, a datasource variable, and unique panel ids and places."""
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    assert dashboard["title"] == "batchpunk"
    assert dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_observability_doc_lists_every_metric_under_both_names() -> None:
    """docs/observability.md names every collector metric, its Prometheus and OTel names."""
    text = (DOCS / "observability.md").read_text()
    for name, (kind, exported, labels, _, _) in PROMETHEUS_METRICS.items():
        assert f"`{name}`" in text, name
        suffix = "_total" if kind == "counter" else ""
        assert f"batchpunk_{exported}{suffix}" in text, exported
        for label in labels:
            assert f"`{label}`" in text, label
    for _, instrument, _, _, _ in OTEL_METRICS.values():
        assert instrument in text, instrument
