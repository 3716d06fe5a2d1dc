"""PNG charts: grouped accuracy bars with 95% Wilson intervals, and per-layer LAWS curves.

Built on `matplotlib.figure.Figure` directly (Agg canvas, no pyplot): no global backend switch, no GUI, no
figure registry to leak, so it is safe in servers, tests and notebooks alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .io import save_figure


def accuracy_bars(groups: Sequence[str], series: dict[str, Sequence[dict | None]], path: str | Path,
                  title: str = "", ylabel: str = "accuracy") -> Path:
    """groups along x (tasks or IIT configurations); one bar per series (model) in each group.

    Each value is a stats dict {"accuracy", "ci95": [lo, hi]} (or None where a model has no number).
    """
    n_series = max(1, len(series))
    width = 0.8 / n_series
    fig = Figure(figsize=(max(4.0, 1.2 + len(groups) * (0.5 + 0.35 * n_series)), 3.6))
    ax = fig.add_subplot()
    for s, (label, values) in enumerate(series.items()):
        xs, heights, err_lo, err_hi = [], [], [], []
        for g, v in enumerate(values):
            if v is None or v.get("accuracy") is None:
                continue
            acc, (lo, hi) = v["accuracy"], v["ci95"]
            xs.append(g - 0.4 + width * (s + 0.5))
            heights.append(acc)
            err_lo.append(max(0.0, acc - lo))
            err_hi.append(max(0.0, hi - acc))
        ax.bar(xs, heights, width=width * 0.95, label=label, yerr=[err_lo, err_hi], capsize=3)
    ax.set_xticks(range(len(groups)), list(groups), rotation=30 if len(groups) > 6 else 0, ha="right"
                  if len(groups) > 6 else "center")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(title + ("\n(error bars: 95% Wilson interval)" if title else "error bars: 95% Wilson interval"),
                 fontsize=9)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def laws_curves(curves: dict[str, Sequence[float]], path: str | Path, title: str = "") -> Path:
    """One line per key segment: mean attention mass per layer (the LAWS vectors)."""
    fig = Figure(figsize=(6.0, 3.6))
    ax = fig.add_subplot()
    for label, values in curves.items():
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("attention mass per query token")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
