"""Matplotlib charts as PNG bytes: metric distributions per method and deletion/insertion curves.

Uses ``Figure`` with the Agg canvas directly (no pyplot), so the report never changes the
caller's matplotlib backend or global state.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 80


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def distributions(values: dict[str, dict[str, np.ndarray]], title: str) -> bytes:
    """One row per metric: step histograms of every method (left), box plots (right).

    ``values``: metric -> method -> finite values.
    """
    metrics = [m for m, per in values.items() if any(len(v) for v in per.values())]
    rows = max(len(metrics), 1)
    fig = Figure(figsize=(10.5, 0.6 + 2.1 * rows), layout="constrained")
    fig.suptitle(title, fontsize=11)
    axes = fig.subplots(rows, 2, squeeze=False)
    for (hist_ax, box_ax), metric in zip(axes, metrics):
        per = {k: v for k, v in values[metric].items() if len(v)}
        everything = np.concatenate(list(per.values()))
        lo, hi = float(everything.min()), float(everything.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, min(30, max(5, len(everything) // 3)) + 1)
        for method, v in per.items():
            hist_ax.hist(v, bins=bins, histtype="step", linewidth=1.5, label=f"{method} (n={len(v)})")
        hist_ax.set_title(metric, fontsize=9, loc="left")
        hist_ax.set_ylabel("rows", fontsize=8)
        hist_ax.tick_params(labelsize=7)
        hist_ax.legend(fontsize=7, frameon=False)
        box_ax.boxplot(list(per.values()), orientation="horizontal", tick_labels=list(per),
                       showmeans=True, widths=0.6)
        box_ax.tick_params(labelsize=7)
        box_ax.set_title(f"{metric} (triangle: mean)", fontsize=9, loc="left")
    if not metrics:
        axes[0, 0].text(0.5, 0.5, "no metric values", ha="center", va="center")
    return _png(fig)


def curves(stats: dict[str, dict[str, dict[str, np.ndarray]]], title: str) -> bytes:
    """Mean deletion (left) and insertion (right) curves per method with a 95% band.

    ``stats``: method -> curve column -> {"mean", "ci", "n"} (see ``data.curves_of``).
    """
    fig = Figure(figsize=(10.5, 3.4), layout="constrained")
    fig.suptitle(title, fontsize=11)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for ax, column, label in zip(axes, ("deletion_curve", "insertion_curve"),
                                 ("deletion (lower is better)", "insertion (higher is better)")):
        drawn = False
        for method, per in stats.items():
            c = per.get(column)
            if c is None:
                continue
            x = np.linspace(0.0, 1.0, len(c["mean"]))
            line = ax.plot(x, c["mean"], linewidth=1.6, label=f"{method} (n={int(c['n'])})")[0]
            ax.fill_between(x, c["mean"] - c["ci"], c["mean"] + c["ci"], color=line.get_color(),
                            alpha=0.18, linewidth=0)
            drawn = True
        ax.set_title(label, fontsize=9, loc="left")
        ax.set_xlabel("fraction of pixels removed" if column == "deletion_curve"
                      else "fraction of pixels inserted", fontsize=8)
        ax.set_ylabel("target score", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlim(0, 1)
        if drawn:
            ax.legend(fontsize=7, frameon=False)
        else:
            ax.text(0.5, 0.5, "not stored", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)
