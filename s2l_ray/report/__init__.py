"""What a selection run shows a person: ``report.png`` (cluster-mean trajectories and sizes, written by the
clustering stage: ``png``) and ``report.html`` (the clusters with examples, sources, the data map, the proxy's
loss, the run's facts, written by the selection stage: ``data`` gathers, ``html`` draws)."""
from __future__ import annotations

from ..layout import RunDir, write_bytes_atomic
from .png import write_report


def write_html(run: RunDir) -> str:
    """Write ``report.html`` for the run's current selection; returns its path."""
    from .data import collect
    from .html import render

    path = run.path("report.html")
    write_bytes_atomic(run.fs, path, render(collect(run)).encode())
    return path


__all__ = ["write_html", "write_report"]
