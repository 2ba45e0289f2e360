"""PNG plots of benchmark results for the docs: one horizontal bar chart per headline.

A table of rates asks the reader to compare numbers; a bar per configuration, the baseline in
grey and each ratio written at the end of its bar, shows the answer at a glance. The bench
scripts call ``bar_chart`` when run with ``--plot``; the files land in docs/img/, where the README
and the guides link them. Needs matplotlib (extra ``dev``); nothing else in bench/ does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["IMG", "bar_chart"]

#: Where plots are written: the repository's docs/img/.
IMG = Path(__file__).resolve().parent.parent / "docs" / "img"

_BASELINE = "#9aa4ae"
_OURS = "#2f81f7"
_MISSED = "#d1242f"


def bar_chart(
    name: str,
    title: str,
    rows: Sequence[tuple[str, float, str, bool]],
    *,
    unit: str,
    note: str = "",
) -> Path:
    """Write docs/img/<name>.png: one bar per row, top to bottom, and return its path.

    Each row is (label, value, annotation written after the bar, is_baseline). An annotation
    ending in "MISSED" is drawn in red, so a missed target cannot hide in a picture.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row[0] for row in rows]
    values = [row[1] for row in rows]
    colors = [_BASELINE if row[3] else _OURS for row in rows]
    height = 0.9 + 0.48 * len(rows)
    fig, ax = plt.subplots(figsize=(9.0, height), dpi=110)
    positions = list(range(len(rows)))[::-1]
    bars = ax.barh(positions, values, color=colors, height=0.62)
    ax.set_yticks(positions, labels, fontsize=10)
    top = max(values) if values else 1.0
    for bar, (_, value, annotation, _baseline) in zip(bars, rows, strict=True):
        text = f"{value:,.0f}" + (f"   {annotation}" if annotation else "")
        ax.text(
            bar.get_width() + top * 0.01,
            bar.get_y() + bar.get_height() / 2,
            text,
            va="center",
            fontsize=9.5,
            color=_MISSED if annotation.endswith("MISSED") else "#1f2328",
        )
    ax.set_xlim(0, top * 1.38)
    ax.set_xlabel(unit, fontsize=9.5, color="#57606a")
    ax.set_title(title, fontsize=12, loc="left", color="#1f2328", pad=10)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(axis="y", length=0)
    ax.tick_params(axis="x", labelsize=8.5, colors="#57606a")
    ax.xaxis.set_major_formatter(
        matplotlib.ticker.FuncFormatter(
            lambda v, _: f"{v / 1e6:.1f}M" if top >= 1e6 else f"{v:,.0f}"
        )
    )
    ax.grid(axis="x", color="#d0d7de", linewidth=0.6)
    ax.set_axisbelow(True)
    load = os.getloadavg()
    footer = f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    fig.text(0.01, 0.01, f"{note}  ({footer})" if note else footer, fontsize=8, color="#57606a")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    IMG.mkdir(parents=True, exist_ok=True)
    path = IMG / f"{name}.png"
    fig.savefig(path)
    plt.close(fig)
    return path
