"""The selection run's report: cluster-mean trajectories and cluster sizes (``report.png``)."""
from __future__ import annotations

import io

import numpy as np

from ..layout import RunDir, write_bytes_atomic

MAX_CURVES = 20  # cluster-mean trajectories drawn at most


def curves_to_draw(sizes: np.ndarray, max_curves: int = MAX_CURVES) -> np.ndarray:
    """Non-empty clusters to draw: all when few, else evenly spaced over the size ranking."""
    ranked = np.argsort(-sizes, kind="stable")
    ranked = ranked[sizes[ranked] > 0]
    if len(ranked) <= max_curves:
        return ranked
    return ranked[np.linspace(0, len(ranked) - 1, max_curves).round().astype(int)]


def plot_clusters(means: np.ndarray, sizes: np.ndarray, steps: list[int]) -> bytes:
    """PNG bytes: cluster-mean trajectories (left) and a histogram of cluster sizes (right)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sizes = np.asarray(sizes)
    shown = curves_to_draw(sizes)
    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    cmap = colormaps["viridis"]
    for i, c in enumerate(shown):
        left.plot(steps, means[c], marker="o", ms=3, color=cmap(i / max(1, len(shown) - 1)),
                  label=f"cluster {c} ({sizes[c]:,})")
    left.set(xlabel="proxy training step", ylabel="mean loss",
             title=f"cluster-mean trajectories ({len(shown)} of {int((sizes > 0).sum())} clusters)")
    if len(shown) <= 10:
        left.legend(fontsize=7)
    right.hist(sizes[sizes > 0], bins=min(50, max(5, len(sizes) // 4)), color="tab:blue")
    right.set(xlabel="cluster size (examples)", ylabel="clusters",
              title=f"cluster sizes (K={len(sizes)}, N={int(sizes.sum()):,})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_report(run: RunDir, means: np.ndarray, sizes: np.ndarray, steps: list[int]) -> str:
    """Write ``report.png`` into the run directory; returns its path."""
    write_bytes_atomic(run.fs, run.report, plot_clusters(means, sizes, steps))
    return run.report
