"""PNG plots of tokens per second (matplotlib, optional: ``pip install shardinfer[plot]``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Series = Sequence[tuple[float, float]]  # (seconds, tokens per second)


def plot_rates(path: Path, series: Mapping[str, Series], *, title: str, note: str = "") -> Path | None:
    """One line per series; returns the written path, or None (with a hint) without matplotlib."""
    plt = _pyplot(path)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    for label, points in series.items():
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label, linewidth=1.4)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("tokens / s")
    ax.set_ylim(bottom=0)
    ax.legend(loc="best", fontsize=8)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, alpha=0.7)
    return _save(plt, fig, ax, path, title)


def plot_bars(path: Path, values: dict[str, float], *, title: str, ylabel: str) -> Path | None:
    """A bar chart (strategy comparison); None without matplotlib."""
    plt = _pyplot(path)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    bars = ax.bar(list(values), list(values.values()), color="#4c72b0")
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_ylabel(ylabel)
    return _save(plt, fig, ax, path, title)


def _pyplot(path: Path) -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("no plot %s: matplotlib is not installed (pip install 'shardinfer[plot]')", path.name)
        return None
    return plt


def _save(plt: Any, fig: Any, ax: Any, path: Path, title: str) -> Path:
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
