"""Small matplotlib pictures of stage results (Dagster metadata images, DVC plots)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib  # lazy: matplotlib (Agg set first), only for plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib (Agg set first), only for plots

    return plt


def metrics_bars(table: Mapping[str, Mapping[str, float]], metrics: list[str], out: Path, title: str) -> Path:
    """Grouped bars: one group per metric, one bar per model."""
    plt = _pyplot()
    names = list(table)
    x = np.arange(len(metrics))
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    for i, name in enumerate(names):
        ax.bar(x + i * width, [float(table[name].get(m, float("nan"))) for m in metrics], width, label=name)
    ax.set_xticks(x + width * (len(names) - 1) / 2, metrics)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def top_ap_bars(per_class_ap: Mapping[str, float], out: Path, title: str, n: int = 20) -> Path:
    """Horizontal bars of the ``n`` tags with the highest AP (and, if room, the lowest)."""
    plt = _pyplot()
    items = sorted(per_class_ap.items(), key=lambda kv: -kv[1])
    shown = items[:n] if len(items) <= 2 * n else items[: n // 2] + items[-(n // 2):]
    fig, ax = plt.subplots(figsize=(5, 0.22 * max(len(shown), 4) + 0.8), dpi=80)
    ax.barh([k for k, _ in shown][::-1], [v for _, v in shown][::-1])
    ax.set_xlim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
